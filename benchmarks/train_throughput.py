"""Training throughput and MFU of the real jaxformer train step (jaxformer.training.step), one table.

  python benchmarks/train_throughput.py                       # all rows, sizes picked for the device
  python benchmarks/train_throughput.py --rows=gpt2_small --steps=20

Rows: gpt_tiny, shakespeare_char:cpu, a GPT-2-small-shaped step (12 x 768, vocab 50257) and a T5-small-shaped
step (6+6 x 512, vocab 32128). On CPU the GPT-2/T5 rows use a reduced batch and sequence length (printed in the
table) so they finish in about a minute; on an accelerator they use batch 8 x 1024 (GPT-2) and 32 x 512/512 (T5).

The step is built exactly as train.py builds it: make_optimizer -> make_setup -> init_state -> make_train_step on
the mesh of the config (one device here), batches of random token ids with the architecture's keys. Each row
compiles and warms up (--warmup steps), then times --steps steps with one block_until_ready at the end.

FLOPs per token: jaxformer.flops (PaLM appendix B: 6 x matmul weights N, incl. the logits projection, plus
12 x layers x d_model x context for attention; causal masking not discounted). encoder_decoder rows count FLOPs
per target token over both stacks. Peak: jaxformer.flops table by device kind for GPU/TPU (bf16/fp16 peak for a
bf16 compute dtype, else the fp32/TF32 figure); on CPU a float32 1024^3 matmul measured in the same process.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxformer import flops as flops_lib  # noqa: E402
from jaxformer import sharding as shd  # noqa: E402
from jaxformer.config import ModelConfig, validate  # noqa: E402
from jaxformer.training import optimizer as opt_lib  # noqa: E402
from jaxformer.training import step as step_lib  # noqa: E402
from jaxformer.training import state as state_lib


def _row_configs(on_cpu: bool, dtype: str | None):
  from configs import gpt2_small, gpt_tiny, shakespeare_char, t5_small
  rows = {}
  c = gpt_tiny.get_config()
  c.model.vocab_size = 64  # the built-in language's char vocabulary size order
  rows['gpt_tiny'] = (c, 'as recipe')
  c = shakespeare_char.get_config('cpu')
  c.model.vocab_size = 65 + 5
  rows['shakespeare_char:cpu'] = (c, 'as recipe')
  c = gpt2_small.get_config()
  if on_cpu:
    c.train.batch_size, c.data.seq_len = 2, 256
    note = 'reduced for CPU: batch 2 x 256'
  else:
    c.train.batch_size, c.data.seq_len = 8, 1024
    note = 'batch 8 x 1024'
  rows['gpt2_small-shaped'] = (c, note)
  c = t5_small.get_config()
  c.model.dropout = 0.0
  if on_cpu:
    c.train.batch_size, c.data.seq_len, c.data.src_seq_len = 2, 128, 128
    note = 'reduced for CPU: batch 2 x 128/128'
  else:
    c.train.batch_size, c.data.seq_len, c.data.src_seq_len = 32, 512, 512
    note = 'batch 32 x 512/512'
  rows['t5_small-shaped'] = (c, note)
  for config, _ in rows.values():
    config.mesh.update(data=1, fsdp=1, tensor=1, distributed='off')
    config.train.grad_accum_steps = 1
    if dtype:
      config.model.dtype = dtype
  return rows


def _batch(config, rng: np.random.Generator) -> dict:
  b, t, v = config.train.batch_size, config.data.seq_len, config.model.vocab_size
  tok = lambda length: rng.integers(3, v, size=(b, length), dtype=np.int32)
  if config.model.arch == 'encoder_decoder':
    return {'src_tokens': tok(config.data.src_seq_len), 'tgt_tokens': tok(t), 'targets': tok(t)}
  return {'tokens': tok(t), 'targets': tok(t)}


def bench(config, steps: int, warmup: int) -> dict:
  validate(config)
  mesh = shd.make_mesh(config, jax.devices()[:1])
  tx, schedule = opt_lib.make_optimizer(config.train)
  setup = state_lib.make_setup(config, mesh, tx, schedule)
  state = state_lib.initial_state(config, setup)
  train_step = step_lib.make_train_step(config, setup)
  rng = np.random.default_rng(0)
  batches = [jax.device_put(_batch(config, rng)) for _ in range(2)]
  t0 = time.perf_counter()
  state, m = train_step(state, batches[0])
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    state, m = train_step(state, batches[i % 2])
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for i in range(steps):
    state, m = train_step(state, batches[i % 2])
  jax.block_until_ready((state, m))
  step_s = (time.perf_counter() - t0) / steps
  cfg = ModelConfig.from_config(config.model)
  seq = config.data.seq_len
  src = config.data.src_seq_len if cfg.arch == 'encoder_decoder' else None
  step_flops = flops_lib.train_flops_per_step(cfg, config.train.batch_size, seq, src)
  tokens = config.train.batch_size * seq
  return dict(step_s=step_s, compile_s=compile_s, tokens_per_s=tokens / step_s, flops_per_token=step_flops / tokens,
              flops_per_s=step_flops / step_s, loss=float(m['loss']))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--rows', default='', help='comma-separated row names (default: all)')
  p.add_argument('--steps', type=int, default=0, help='timed steps per row (default: 10 on CPU, 50 otherwise)')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--dtype', default='', help='model.dtype override, e.g. bfloat16 (default: the recipe\'s)')
  args = p.parse_args(argv)
  from jaxformer.training import host_memory
  host_memory.keep_freed_memory()  # as train.py does (no per-call page faults of XLA:CPU temp buffers)
  dev = jax.devices()[0]
  on_cpu = dev.platform == 'cpu'
  steps = args.steps or (10 if on_cpu else 50)
  rows = _row_configs(on_cpu, args.dtype or None)
  if args.rows:
    rows = {k: v for k, v in rows.items() if k in args.rows.split(',')}
  if on_cpu:
    peak = max(flops_lib.measure_cpu_flops(n, repeats=5) for n in (1024, 2048))
    peak_src = 'measured: best fp32 1024^3 / 2048^3 matmul, this run, before and after the rows'
  else:
    peak, peak_src = None, 'jaxformer.flops.PEAK_FLOPS'
  model_name = platform.processor() or dev.device_kind
  if on_cpu and os.path.exists('/proc/cpuinfo'):
    names = [l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')]
    model_name = f'{names[0] if names else "cpu"}, {os.cpu_count()} cores'
  import flax
  import jaxlib
  print(f'device: {dev.platform} ({dev.device_kind}; {model_name}); jax {jax.__version__}, jaxlib '
        f'{jaxlib.__version__}, flax {flax.__version__}; {steps} timed steps after {args.warmup} warmup')
  header = ('| row | shape | dtype | step (ms) | tokens/s | FLOPs/token | achieved FLOP/s | peak FLOP/s | MFU |')
  print(header)
  print('|' + '---|' * 9)
  for name, (config, note) in rows.items():
    r = bench(config, steps, args.warmup)
    dtype = config.model.dtype
    row_peak = peak if on_cpu else flops_lib.peak_flops_per_device(dev, dtype)
    mfu = flops_lib.mfu(r['flops_per_s'], 1.0, row_peak)
    print(f'| {name} | {note} | {dtype} | {r["step_s"] * 1e3:.1f} | {r["tokens_per_s"]:,.0f} | '
          f'{r["flops_per_token"] / 1e6:.2f}M | {r["flops_per_s"] / 1e9:.2f} G | '
          f'{(row_peak or float("nan")) / 1e9:.1f} G | {"n/a" if mfu is None else f"{mfu:.1%}"} |', flush=True)
  if on_cpu:  # the host is shared: re-measure after the rows and report MFU against the best peak seen
    late = max(flops_lib.measure_cpu_flops(n, repeats=6) for n in (1024, 2048))
    print(f'CPU peak measured before rows {peak / 1e9:.1f} G, after rows {late / 1e9:.1f} G '
          f'(MFU above is against the before-rows figure; divide by {late / peak:.2f} for the after-rows one)')
  print(f'peak source: {peak_src}. FLOPs/token = 6N + 12*L*d*T (PaLM app. B), per target token.')


if __name__ == '__main__':
  main()
