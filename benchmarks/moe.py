"""Mixture of experts on CPU: step time per dispatch implementation, and MoE vs dense at equal active compute.

  python benchmarks/moe.py                  # step times only (seconds)
  python benchmarks/moe.py --train_steps=300  # + validation loss of moe_tiny vs a dense gpt_tiny whose d_ff is the
                                              #   k active experts' width (same active MLP FLOPs per token)
  python benchmarks/moe.py --skip_step_times --corpus=shakespeare --train_steps=-1  # the same comparison on the
                                              #   committed Shakespeare text, nanoGPT's CPU recipe (2000 steps)

Step time: the median of --repeats jitted train steps of configs/moe_tiny.py (E=4, k=2, d_ff 384; capacity factor
1.25 for `capacity`), after one compile step. Shared, noisy cores give rough numbers: compare within one run only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import gpt_tiny, moe_tiny, shakespeare_char  # noqa: E402
from jaxformer import sharding as shd  # noqa: E402
from jaxformer.training import optimizer, step  # noqa: E402
from jaxformer.training import state as state_lib  # noqa: E402


def step_time(config, repeats: int) -> float:
  mesh = shd.make_mesh(config)
  tx, schedule = optimizer.make_optimizer(config.train)
  setup = state_lib.make_setup(config, mesh, tx, schedule)
  state = state_lib.initial_state(config, setup)
  rng = np.random.default_rng(0)
  b, t = config.train.batch_size, config.data.seq_len
  tokens = rng.integers(1, config.model.vocab_size, size=(b, t + 1)).astype(np.int32)
  batch = shd.shard_batch({'tokens': tokens[:, :-1], 'targets': tokens[:, 1:]}, setup.mesh, setup.rules)
  train_step = step.make_train_step(config, setup)
  state, m = train_step(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, m = train_step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def shrink(config):
  config.model.vocab_size = 64
  config.mesh.update(data=1, fsdp=1, expert=1, tensor=1, distributed='off')
  return config


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--train_steps', type=int, default=0)
  parser.add_argument('--skip_step_times', action='store_true')
  parser.add_argument('--corpus', default='builtin', choices=('builtin', 'shakespeare'),
                      help='the training comparison: moe_tiny vs gpt_tiny on builtin:lm, or the Shakespeare CPU '
                           'recipe (2000 steps with --train_steps=-1) on ../shared/data/tinyshakespeare')
  parser.add_argument('--moe_impl', default='dense', help='shakespeare: the MoE dispatch (dense = the same routing '
                                                          'as dropless, faster on XLA:CPU)')
  args = parser.parse_args()
  if not args.skip_step_times:
    step_times(args.repeats)
  if args.train_steps:
    compare_training(args.train_steps, args.corpus, args.moe_impl)


def step_times(repeats: int) -> None:
  print('| model | step time (s) |\n|---|---|')
  dense = shrink(gpt_tiny.get_config())
  dense.model.d_ff = 2 * dense.model.d_ff  # the k=2 active experts' width
  print(f'| dense gpt_tiny, d_ff {dense.model.d_ff} (equal active MLP FLOPs) | {step_time(dense, repeats):.4f} |')
  for impl in ('dropless', 'capacity', 'dense'):
    config = shrink(moe_tiny.get_config())
    config.model.update(moe_impl=impl, capacity_factor=1.25 if impl == 'capacity' else 0.0)
    print(f'| moe_tiny, moe_impl={impl} | {step_time(config, repeats):.4f} |')


def _shakespeare_pair(moe_impl: str):
  """configs/shakespeare_char.py:cpu (nanoGPT's CPU recipe, whole-split final validation) dense with 2x d_ff, and
  the same with 4 experts of d_ff, top-2 (equal active MLP FLOPs per token)."""
  dense = shakespeare_char.get_config('cpu')
  moe = shakespeare_char.get_config('cpu')
  dense.model.d_ff *= 2
  moe.model.update(num_experts=4, experts_per_token=2, moe_every=1, router='topk_softmax', moe_impl=moe_impl)
  return ((f'dense shakespeare_char:cpu, d_ff {dense.model.d_ff}', dense),
          (f'MoE E=4 k=2, expert d_ff {moe.model.d_ff} ({moe_impl})', moe))


def compare_training(train_steps: int, corpus: str, moe_impl: str) -> None:
  """A MoE model vs a dense one with the k active experts' d_ff, train_steps steps each: moe_tiny vs gpt_tiny on
  builtin:lm, or the Shakespeare CPU recipe on the committed text (--corpus=shakespeare)."""
  from jaxformer.apps.train import run
  from jaxformer.training.writers import read_metrics
  if corpus == 'shakespeare':
    pairs = _shakespeare_pair(moe_impl)
  else:
    dense = gpt_tiny.get_config()
    dense.model.d_ff *= 2
    pairs = (('dense gpt_tiny, 2x d_ff', dense), ('moe_tiny', moe_tiny.get_config()))
  print('\n| model | params (active) | final eval_loss | final train_moe_aux_loss | wall (s) |\n|---|---|---|---|---|')
  for name, config in pairs:
    if train_steps > 0:
      config.train.update(num_steps=train_steps, eval_every=train_steps)
    config.checkpoint.update(every_steps=10 ** 6, async_save=False)
    config.mesh.update(distributed='off')
    with tempfile.TemporaryDirectory() as workdir:
      start = time.perf_counter()
      run(config, workdir)
      wall = time.perf_counter() - start
      rows = read_metrics(workdir)
    first = next(r for r in rows if 'num_params' in r)
    last = [r for r in rows if 'eval_loss' in r][-1]
    aux = [r for r in rows if 'train_loss' in r][-1].get('train_moe_aux_loss')
    print(f'| {name} | {first["num_params"]:,} ({first.get("num_active_params", first["num_params"]):,}) | '
          f'{last["eval_loss"]:.4f} | {"-" if aux is None else f"{aux:.3f}"} | {wall:.0f} |', flush=True)


if __name__ == '__main__':
  main()
