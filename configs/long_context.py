"""Long context on a CPU: a tiny RoPE decoder at 2048 characters, and passkey retrieval. Pick the variant after a colon:

  python train.py --config=configs/long_context.py --workdir=runs/long_context             # tinyshakespeare, 2048 chars
  python train.py --config=configs/long_context.py:short --workdir=runs/long_context_256   # same model and tokens, 256
  python train.py --config=configs/long_context.py:passkey --workdir=runs/passkey          # builtin:passkey, 512 chars
  python benchmarks/passkey.py --workdir=runs/passkey                # accuracy vs length, with and without RoPE scaling

The long variant attends over 2048 positions with the chunked (flash-style, memory linear in T) kernel and
recomputes each block in the backward pass (model.remat=block), so activation memory grows linearly, not
quadratically, with seq_len; `short` keeps the tokens per step (batch x seq_len = 8192) to give the step-time
baseline (benchmarks/RESULTS.md, "Long context"). `passkey` trains the same model to retrieve a number hidden in
filler at up to 512 characters (data.source=builtin:passkey); benchmarks/passkey.py then measures it at 512-4096
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
    # one prompt + answer per row (data.pack=False: packing could split a prompt from its question)
    'passkey': dict(model=dict(max_len=512),
                    data=dict(source='builtin:passkey', seq_len=512, pack=False, sampling='streams'),
                    train=dict(batch_size=16, num_steps=500, learning_rate=3e-3, warmup_steps=50,
                               eval_every=100, eval_steps=4)),
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
