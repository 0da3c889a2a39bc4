"""Input pipeline throughput vs. the training step's consumption, so we know the pipeline is never the bottleneck.

  python benchmarks/data_throughput.py                 # recipes' cpu variants on CPU, gpu variants on a GPU
  python benchmarks/data_throughput.py --variant=gpu --batches=100 --train_steps=20

For tinyshakespeare (char, decoder_only) and Multi30k en->de (sentencepiece, encoder_decoder), with the shapes of
the matching recipe (configs/shakespeare_char.py, configs/multi30k_en_de.py), it prints:
  pipeline   tokens/s produced by make_train_iterator on ONE thread (prefetch=0: the producer's own speed; the
             background prefetch thread gives the same rate overlapped with the step), counting every slot of
             the [batch, seq_len] rows (+ encoder rows), and the non-padding share;
  train step tokens/s consumed by the recipe's jitted train step (jaxformer.training.step) on this machine's
             default device, same token counting;
  headroom   pipeline / train step: > 1 means the pipeline outruns the step.
Tokenizer training and the one-time ArrayRecord conversion happen before timing (reported separately).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxformer import data as data_lib  # noqa: E402

SHARED = REPO.parent / 'shared' / 'data'


def recipe(name: str, variant: str):
  if name == 'shakespeare':
    from configs import shakespeare_char as module  # pylint: disable=g-import-not-at-top
    config = module.get_config(variant)
    config.data.source = f'text:{SHARED / "tinyshakespeare" / "input.txt"}'
  else:
    from configs import multi30k_en_de as module  # pylint: disable=g-import-not-at-top
    config = module.get_config(variant)
    config.data.source = f'parallel:{SHARED / "multi30k"}'
  return config


def slots(batch: dict[str, np.ndarray]) -> tuple[int, int]:
  """(all token slots, non-padding tokens) of a batch, decoder and encoder sides together."""
  segments = [v for k, v in batch.items() if k.endswith('segment_ids')]
  return sum(s.size for s in segments), sum(int((s > 0).sum()) for s in segments)


def time_pipeline(config, tokenizer, workdir: str, batches: int) -> dict[str, float]:
  config = config.copy_and_resolve_references()
  config.data.prefetch = 0
  it = data_lib.make_train_iterator(config, tokenizer, workdir)
  for _ in range(3):  # warm the permutation / buffers
    next(it)
  total = real = 0
  start = time.perf_counter()
  for _ in range(batches):
    t, r = slots(next(it))
    total += t
    real += r
  seconds = time.perf_counter() - start
  return {'tokens_per_s': total / seconds, 'real_fraction': real / total, 'ms_per_batch': 1e3 * seconds / batches}


def time_train_step(config, tokenizer, workdir: str, steps: int) -> dict[str, float]:
  """Tokens/s of the recipe's jitted train step (one device; batches from the pipeline, already on device)."""
  from jaxformer import sharding as shd  # pylint: disable=g-import-not-at-top
  from jaxformer.training import optimizer as opt_lib  # pylint: disable=g-import-not-at-top
  from jaxformer.training import step as step_lib  # pylint: disable=g-import-not-at-top
  from jaxformer.training import state as state_lib
  config = config.copy_and_resolve_references()
  config.model.vocab_size = tokenizer.vocab_size
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  mesh = shd.make_mesh(config, devices=jax.devices()[:1])
  rules = shd.rules_from_config(config)
  tx, schedule = opt_lib.make_optimizer(config.train)
  setup = state_lib.make_setup(config, mesh, tx, schedule)
  state = state_lib.initial_state(config, setup)
  train_step = step_lib.make_train_step(config, setup)
  it = data_lib.make_train_iterator(config, tokenizer, workdir)
  batches = [shd.shard_batch(next(it), mesh, rules) for _ in range(min(steps, 8))]
  total = slots(jax.device_get(batches[0]))[0]
  state, metrics = train_step(state, batches[0])  # compile
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = train_step(state, batches[i % len(batches)])
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  it.close()
  return {'tokens_per_s': total * steps / seconds, 'ms_per_step': 1e3 * seconds / steps}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--variant', default='', help='recipe variant (cpu | gpu); default: gpu on a GPU, else cpu')
  parser.add_argument('--batches', type=int, default=50, help='pipeline batches timed')
  parser.add_argument('--train_steps', type=int, default=10, help='train steps timed (0 = skip)')
  parser.add_argument('--workdir', default='', help='where tokenizers / converted data go (default: a temp dir)')
  args = parser.parse_args(argv)
  variant = args.variant or ('gpu' if jax.default_backend() == 'gpu' else 'cpu')
  workroot = args.workdir or tempfile.mkdtemp(prefix='jaxformer_data_bench_')

  rows = []
  for name, label in (('shakespeare', 'tinyshakespeare'), ('multi30k', 'Multi30k en-de')):
    config = recipe(name, variant)
    workdir = os.path.join(workroot, f'{name}_{variant}')
    start = time.perf_counter()
    tokenizer = data_lib.get_tokenizer(config, workdir)
    data_lib.make_train_iterator(config, tokenizer, workdir).close()
    setup_s = time.perf_counter() - start
    pipe = time_pipeline(config, tokenizer, workdir, args.batches)
    step = None
    if args.train_steps:
      try:
        step = time_train_step(config, tokenizer, workdir, args.train_steps)
      except Exception as e:  # pylint: disable=broad-except
        # Keep the benchmark useful while the step has a bug: time it again without dropout and say so.
        print(f'{label}: train step failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); timing it with '
              'model.dropout = attention_dropout = 0 instead.')
        config.model.dropout = config.model.attention_dropout = 0.0
        step = time_train_step(config, tokenizer, workdir, args.train_steps)
        label += ' (no dropout)'
    shape = f'{config.train.batch_size}x{config.data.seq_len}'
    if config.model.arch == 'encoder_decoder':
      shape += f'+{config.data.src_seq_len}'
    rows.append((label, f'{config.data.tokenizer}/{tokenizer.vocab_size}', config.model.arch, shape, setup_s, pipe,
                 step))

  print(f'\ndevice: {jax.devices()[0].device_kind} ({jax.default_backend()}), recipe variant: {variant}, '
        f'host CPUs: {os.cpu_count()}')
  header = ('data', 'tokenizer/vocab', 'arch', 'batch', 'setup s', 'pipeline tok/s', 'non-pad', 'ms/batch',
            'train step tok/s', 'ms/step', 'headroom')
  table = [header]
  for label, tok, arch, shape, setup_s, pipe, step in rows:
    table.append((label, tok, arch, shape, f'{setup_s:.1f}', f'{pipe["tokens_per_s"]:,.0f}',
                  f'{100 * pipe["real_fraction"]:.0f}%', f'{pipe["ms_per_batch"]:.2f}',
                  f'{step["tokens_per_s"]:,.0f}' if step else '-', f'{step["ms_per_step"]:.1f}' if step else '-',
                  f'{pipe["tokens_per_s"] / step["tokens_per_s"]:.1f}x' if step else '-'))
  widths = [max(len(r[i]) for r in table) for i in range(len(header))]
  for i, r in enumerate(table):
    print('| ' + ' | '.join(c.rjust(w) if j >= 4 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) + ' |')
    if i == 0:
      print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')


if __name__ == '__main__':
  main()
