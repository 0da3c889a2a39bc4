"""A tiny char-level GPT that learns 2-digit addition by SFT: the base model of the preference / RL recipes.

  python benchmarks/preferences/make_data.py   # (re)writes benchmarks/preferences/data/ (committed; seeded)
  python train.py --config=configs/preferences_tiny.py --workdir=runs/pref_sft
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


def get_config():
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
  return config
