"""Decode speed: greedy decoding with the KV cache vs. recomputing the full prefix for every new token.

  python benchmarks/decode_throughput.py                       # small models, 64 and 256 new tokens
  python benchmarks/decode_throughput.py --lengths=128,512 --batch=16 --d_model=256 --layers=4

For a small decoder_only and encoder_decoder model (random weights; EOS disabled so every row decodes the full
length), it prints new tokens/s of
  kv cache    jaxformer.decoding.greedy: the prompt (or BOS) is prefilled once, then one token per step against
              the cache; the encoder runs once;
  no cache    jaxformer.decoding.greedy_without_cache: every step runs the whole model on the [batch, prompt + N]
              buffer (and the encoder again, for encoder_decoder), the way decoding without a cache works in JAX,
              where shapes are static (an ideal growing prefix would do about half that work, but would need a
              new compilation for every length);
and their ratio. Both are one jit each (a while/fori loop inside), timed after a warm-up call that compiles;
the best of --repeats runs is reported. The two must produce the same tokens (checked, printed as 'same').
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxformer import decoding  # noqa: E402
from jaxformer.model import build_model, count_params  # noqa: E402


def make_model(arch: str, args, max_len: int):
  from configs import default
  config = default.get_config()
  config.model.update(arch=arch, position='rope', norm='rms', mlp='swiglu', use_bias=False, num_layers=args.layers,
                      num_heads=args.heads, d_model=args.d_model, d_ff=4 * args.d_model, vocab_size=args.vocab,
                      max_len=max_len, init_std=0.02, dtype=args.dtype)
  return build_model(config.model, rngs=nnx.Rngs(params=0, dropout=1))


def best_time(fn, repeats: int) -> tuple[float, np.ndarray]:
  out = np.asarray(jax.block_until_ready(fn()))  # compile + run once
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best, np.asarray(out)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--archs', default='decoder_only,encoder_decoder')
  parser.add_argument('--lengths', default='64,256', help='new tokens per row, comma-separated')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--prompt_len', type=int, default=8, help='decoder_only prompt tokens (BOS + random)')
  parser.add_argument('--src_len', type=int, default=32, help='encoder_decoder source tokens')
  parser.add_argument('--d_model', type=int, default=128)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--layers', type=int, default=2)
  parser.add_argument('--vocab', type=int, default=512)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)
  lengths = [int(x) for x in args.lengths.split(',')]
  rng = np.random.default_rng(0)
  device = jax.devices()[0]
  print(f'device: {device.platform} ({device.device_kind}), batch {args.batch}, d_model {args.d_model}, '
        f'{args.layers} layer(s), {args.heads} heads, vocab {args.vocab}, {args.dtype}; greedy, EOS disabled')

  rows = []
  for arch in args.archs.split(','):
    for n in lengths:
      if arch == 'decoder_only':
        prompt = rng.integers(5, args.vocab, size=(args.batch, args.prompt_len)).astype(np.int32)
        prompt[:, 0] = decoding.BOS_ID
        src, desc = None, f'prompt {args.prompt_len}'
        max_len = args.prompt_len + n
      else:
        prompt = None
        src = rng.integers(5, args.vocab, size=(args.batch, args.src_len)).astype(np.int32)
        desc = f'source {args.src_len}'
        max_len = max(args.src_len, 1 + n)
      model = make_model(arch, args, max_len)
      cached, out_cached = best_time(
          lambda: decoding.greedy(model, prompt, src_tokens=src, max_new_tokens=n, eos_id=-1), args.repeats)
      full, out_full = best_time(
          lambda: decoding.greedy_without_cache(model, prompt, src_tokens=src, max_new_tokens=n, eos_id=-1),
          args.repeats)
      tokens = args.batch * n
      rows.append((arch, f'{count_params(model) / 1e6:.2f}M', desc, n, tokens / cached, tokens / full, full / cached,
                   'same' if np.array_equal(out_cached, out_full) else 'DIFFERENT'))

  header = ('arch', 'params', 'input', 'new tokens', 'kv cache tok/s', 'no cache tok/s', 'speed-up', 'outputs')
  table = [header] + [(a, p, d, str(n), f'{c:,.0f}', f'{f:,.0f}', f'{r:.1f}x', s) for a, p, d, n, c, f, r, s in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  for i, row in enumerate(table):
    print(' | '.join(cell.rjust(w) if j >= 3 else cell.ljust(w) for j, (cell, w) in enumerate(zip(row, widths))))
    if i == 0:
      print('-+-'.join('-' * w for w in widths))


if __name__ == '__main__':
  main()
