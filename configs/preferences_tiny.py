"""A tiny char-level GPT that learns 2-digit addition by SFT, then learns from preferences and from a reward: the
recipes of README's "Learning from preferences" (benchmarks/preferences/run.py runs them all and writes the table of
benchmarks/RESULTS.md). Variants (--config=configs/preferences_tiny.py:<variant>), each after the sft run:

  sft      supervised fine-tuning on sft_{split}.jsonl (the default)
  reward   a reward model (model.head=reward) on pairs_{split}.jsonl, started from runs/pref_sft
  dpo      DPO on pairs_{split}.jsonl against runs/pref_sft (frozen)
  simpo    SimPO on pairs_{split}.jsonl (no reference)
  grpo     GRPO on prompts_{split}.jsonl with the exact-match reward (benchmarks/preferences/rewards.py)
  rloo     RLOO, the same
  ppo      PPO, the same (a value head on the policy)

  python benchmarks/preferences/make_data.py   # (re)writes benchmarks/preferences/data/ (committed; seeded)
  python train.py --config=configs/preferences_tiny.py --workdir=runs/pref_sft
  python train.py --config=configs/preferences_tiny.py:grpo --workdir=runs/pref_grpo
  python benchmarks/preferences/accuracy.py runs/pref_sft benchmarks/preferences/data/prompts_validation.jsonl
  python eval.py --config=configs/preferences_tiny.py --workdir=runs/pref_sft --mode=generate --prompt='37+45='

Data: benchmarks/preferences/data/sft_{split}.jsonl, {"prompt": "37+45=", "response": "82"}: only the response and
its EOS are scored. sft_train is almost all carry-free sums (make_data.py says why); sft_validation and the prompt /
pair / ranking files are uniform over all 2-digit problems, ~3/4 of which carry.

Measured (2 shared CPU cores, ~40-60 s for the 500 steps): eval loss ~0.74-0.83 (uniform validation), greedy exact
match on prompts_validation 0.51 / 0.51 / 0.505 for seeds 0 / 1 / 2 (carry-free 100%, carrying ~29%); 8 samples
at temperature 1: mean 0.42-0.45, pass@8 0.69-0.74. It plateaus: 1000 steps give 0.555. So a reward
(benchmarks/preferences/rewards.py) on uniform prompts, or preferences that include carrying, has room to raise it.
"""
from configs import default

DATA = 'benchmarks/preferences/data'
SFT = 'runs/pref_sft'  # where the variants start from (--config.checkpoint.init_from=... to change)
_PAIRS = dict(data=dict(source=f'jsonl:{DATA}/pairs_{{split}}.jsonl', pack=False, seq_len=16),
              checkpoint=dict(init_from=SFT, every_steps=100),
              train=dict(batch_size=32, num_steps=200, warmup_steps=10, learning_rate=3e-4, min_learning_rate=0.0,
                         log_every=20, eval_every=100, steps_per_call=1))
_ONLINE = dict(data=dict(source=f'jsonl:{DATA}/prompts_{{split}}.jsonl', pack=False),
               checkpoint=dict(init_from=SFT, every_steps=100),
               train=dict(num_steps=500, warmup_steps=5, learning_rate=5e-4, min_learning_rate=0.0, log_every=20,
                          eval_every=100, steps_per_call=1),
               decode=dict(temperature=1.0, top_k=0, top_p=1.0))
_REWARD_FN = 'benchmarks.preferences.rewards:exact_match'
VARIANTS = {
    'sft': {},
    'reward': {**_PAIRS, 'model': dict(head='reward'),
               'train': dict(_PAIRS['train'], batch_size=64, num_steps=400, eval_every=200)},
    'dpo': {**_PAIRS, 'align': dict(method='dpo', beta=0.1)},
    'simpo': {**_PAIRS, 'align': dict(method='simpo', beta=2.0, gamma=0.5)},
    **{method: {**_ONLINE, 'align': dict(method=method, reward_fn=_REWARD_FN, prompts_per_step=32, num_generations=8,
                                         max_new_tokens=4, kl_coef=0.01)}
       for method in ('grpo', 'rloo', 'ppo')},
}


def get_config(variant: str = 'sft'):
  config = default.get_config()
  config.model.update(arch='decoder_only', position='learned', norm='layer', norm_position='pre', mlp='gelu',
                      use_bias=False, tie_embeddings=True, num_layers=2, num_heads=4, d_model=128, d_ff=512,
                      max_len=32)
  # "37+45=" + "82": 9-11 tokens with BOS and EOS; ~3 examples packed per row of 32
  config.data.update(source='jsonl:benchmarks/preferences/data/sft_{split}.jsonl', tokenizer='char', seq_len=32,
                     pack=True, sampling='streams')
  config.train.update(batch_size=64, num_steps=500, learning_rate=1e-3, warmup_steps=50, min_learning_rate=1e-4,
                      log_every=50, eval_every=250, eval_steps=-1, steps_per_call=5)
  config.checkpoint.update(every_steps=250, keep=1)
  config.decode.update(method='greedy', max_len=4, batch_size=200)  # the longest answer (3 digits) + EOS
  return default.apply_variant(config, VARIANTS, variant, 'preferences_tiny')
