"""Long context on a CPU: a tiny RoPE decoder at 2048 characters, and passkey retrieval. Pick the variant after a colon:

  python train.py --config=configs/long_context.py --workdir=runs/long_context             # tinyshakespeare, 2048 chars
  python train.py --config=configs/long_context.py:short --workdir=runs/long_context_256   # same model and tokens, 256
  python train.py --config=configs/long_context.py:passkey_warmup --workdir=runs/passkey_warmup   # copy drills, 128
  python train.py --config=configs/long_context.py:passkey --workdir=runs/passkey \
      --config.checkpoint.init_from=runs/passkey_warmup                                  # builtin:passkey, 512 chars
  python benchmarks/passkey.py --workdir=runs/passkey                # accuracy vs length, with and without RoPE scaling

The long variant attends over 2048 positions with the chunked (flash-style, memory linear in T) kernel and
recomputes each block in the backward pass (model.remat=block), so activation memory grows linearly, not
quadratically, with seq_len; `short` keeps the tokens per step (batch x seq_len = 8192) to give the step-time
baseline (benchmarks/RESULTS.md, "Long context").

Passkey retrieval is learnt in two stages by a 2 x 128 decoder: `passkey_warmup` trains it on packed 128-character
windows of copy drills (builtin:passkey_drills), which form the look-back-and-copy (induction) heads retrieval
needs in a few hundred steps; `passkey` continues from it (checkpoint.init_from, whose char vocabulary it
inherits) on whole prompts up to 512 characters (builtin:passkey, drills among them). Trained from scratch on
prompts alone the answer stays at chance (benchmarks/RESULTS.md). Both use learning rate 1e-3: at 3e-3 the same
model never formed the copy heads even on pure drills. benchmarks/passkey.py then measures the model at 512-4096
with RoPE unscaled and with linear / dynamic NTK / YaRN scaling applied at evaluation only.
"""
from configs import default

_MODEL = dict(arch='decoder_only', position='rope', norm='rms', mlp='swiglu', use_bias=False,
              num_layers=2, num_heads=4, d_model=64, d_ff=256)

VARIANTS = {
    'long': dict(model=dict(max_len=2048, attention_impl='chunked', remat='block'),
                 data=dict(seq_len=2048),
                 train=dict(batch_size=4)),
    'short': dict(model=dict(max_len=256), data=dict(seq_len=256), train=dict(batch_size=32)),
    # the passkey model: 128 wide; learning rate 1e-3 (the copy heads do not form at 3e-3)
    'passkey_warmup': dict(model=dict(max_len=512, d_model=128, d_ff=512),
                           data=dict(source='builtin:passkey_drills', seq_len=128, pack=True,
                                     sampling='random_windows'),
                           train=dict(batch_size=32, num_steps=800, learning_rate=1e-3, warmup_steps=50,
                                      eval_every=400, eval_steps=4)),
    # one prompt + answer per row (data.pack=False: packing could split a prompt from its question)
    'passkey': dict(model=dict(max_len=512, d_model=128, d_ff=512),
                    data=dict(source='builtin:passkey', seq_len=512, pack=False, sampling='streams'),
                    train=dict(batch_size=16, num_steps=1200, learning_rate=1e-3, warmup_steps=50,
                               eval_every=200, eval_steps=4)),
}


def get_config(variant: str = 'long'):
  config = default.get_config()
  config.model.update(_MODEL)
  config.data.update(source='text:../shared/data/tinyshakespeare/input.txt', tokenizer='char', pack=True,
                     sampling='random_windows')
  config.train.update(num_steps=600, learning_rate=3e-3, warmup_steps=50, min_learning_rate=3e-4,
                      log_every=25, eval_every=200, eval_steps=4, steps_per_call=1)
  default.apply_variant(config, VARIANTS, variant, 'long_context')
  config.checkpoint.every_steps = 200
  config.decode.update(method='greedy', max_len=8)
  return config
