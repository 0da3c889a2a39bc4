"""Adapting a pretrained model to a new text domain: full fine-tuning vs LoRA, BitFit, adapters, prompt and prefix
tuning.

  python benchmarks/peft_methods.py                      # CPU-small: ~10 min on 2 cores
  python benchmarks/peft_methods.py --base_steps=2000 --adapt_steps=500

1. Pretrain a byte-level character model (shakespeare_char:cpu's shape, 4 x 128, with biases so BitFit has
   something to train) on tinyshakespeare's first 90% for --base_steps.
2. Adapt it to Multi30k English captions (../shared/data/multi30k/train.en.gz, one example per line, 90/10 split)
   with each method for the same --adapt_steps, from the same base (checkpoint.init_from), same batches and schedule.
3. Print one table: validation loss on the new domain (the base model's own first), trainable parameters,
   checkpoint bytes (the final step's folder), optimizer-state bytes, median step time and its ratio to full FT.

Learning rates are per method (PEFT methods train few parameters and take larger steps; prompt tuning the largest,
as in Lester et al.); they are printed in the table. Everything runs through jaxformer.training.run, as train.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import shakespeare_char  # noqa: E402
from jaxformer import peft
from jaxformer.apps import evaluate as evaluation  # noqa: E402
from jaxformer import sharding as shd  # noqa: E402
from jaxformer.resolve import resolve  # noqa: E402
from jaxformer.training import checkpoint as ckpt_lib  # noqa: E402
from jaxformer.training import optimizer as opt_lib  # noqa: E402
from jaxformer.training import step as step_lib  # noqa: E402
from jaxformer.training import state as state_lib
from jaxformer.apps.train import run  # noqa: E402
from jaxformer.training.writers import read_metrics  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'data')

# name -> (peft section, learning rate)
METHODS = {
    'full fine-tuning': (dict(method='none'), 1e-3),
    'lora r=8 (attention)': (dict(method='lora', targets='attention', rank=8, alpha=16.0), 3e-3),
    'lora r=8 (all)': (dict(method='lora', targets='all', rank=8, alpha=16.0), 3e-3),
    'bitfit': (dict(method='bitfit'), 3e-3),
    'adapter d=16': (dict(method='adapter', adapter_dim=16), 3e-3),
    'prompt n=16': (dict(method='prompt', num_prompt_tokens=16), 3e-2),
    'prefix n=16 (mlp 128)': (dict(method='prefix', num_prefix_tokens=16, prefix_projection=128), 3e-3),
}


def base_config(steps: int, data_dir: str):
  config = shakespeare_char.get_config('cpu')
  config.data.data_dir = data_dir  # every run reads the same prepared datasets
  config.data.update(source='text:' + os.path.join(DATA, 'tinyshakespeare', 'input.txt'), tokenizer='byte')
  config.model.use_bias = True
  config.train.update(num_steps=steps, eval_every=steps, log_every=25, steps_per_call=5, eval_steps=20,
                      eval_batch_size=64, warmup_steps=min(100, steps // 5))
  config.checkpoint.update(every_steps=steps, async_save=False)
  config.mesh.distributed = 'off'
  return config


def adapt_config(base_dir: str, steps: int, peft_values: dict, lr: float):
  config = base_config(steps, os.path.join(os.path.dirname(base_dir), 'data'))
  config.data.update(source='text:' + os.path.join(DATA, 'multi30k', 'train.en.gz'), text_unit='line')
  config.train.update(learning_rate=lr, min_learning_rate=lr / 10, warmup_steps=min(20, steps // 5),
                      weight_decay=0.0)  # no decay: the same objective for every method
  config.checkpoint.init_from = base_dir
  config.peft.update(**peft_values)
  if config.peft.method == 'prefix':  # the tokens' positions start after the prefix: rows shorter by P
    config.data.seq_len = config.model.max_len - config.peft.num_prefix_tokens
  return config


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def optimizer_bytes(config, workdir: str) -> int:
  """Bytes of the optimizer state a run holds (AdamW: two moments per trainable parameter, plus counters)."""
  r = resolve(config, workdir, training=False)
  tx, schedule = opt_lib.make_optimizer(r.config.train)
  setup = state_lib.make_setup(r.config, r.mesh, tx, schedule)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state['opt_state']))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--base_steps', type=int, default=500)
  parser.add_argument('--adapt_steps', type=int, default=200)
  parser.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(), 'jaxformer_peft_bench'))
  parser.add_argument('--methods', default=','.join(METHODS))
  args = parser.parse_args()
  base_dir = os.path.join(args.workdir, 'base')
  run(base_config(args.base_steps, os.path.join(args.workdir, 'data')), base_dir)

  # the base model, unadapted, on the new domain's validation rows (the same rows every method is scored on)
  probe = adapt_config(base_dir, args.adapt_steps, dict(method='none'), 1e-3)
  zero_shot = evaluation.run(probe, base_dir, bleu=False, output=os.path.join(args.workdir, 'zero_shot.json'),
                             overrides=['data.source', 'data.text_unit'])['loss']

  results = []
  for name in args.methods.split(','):
    peft_values, lr = METHODS[name]
    config = adapt_config(base_dir, args.adapt_steps, peft_values, lr)
    workdir = os.path.join(args.workdir, ''.join(c if c.isalnum() else '_' for c in name))
    run(config, workdir)
    rows = read_metrics(workdir)
    evals = [r for r in rows if 'eval_loss' in r]
    times = [r['step_time'] for r in rows if r.get('step_time')]
    saved = ml_collections.ConfigDict(json.load(open(os.path.join(workdir, 'config.json'))))
    model, _ = state_lib.restore_model(workdir, saved, shd.make_mesh(saved))
    total, trainable = peft.count_params(nnx.state(model, nnx.Param), config.peft)
    results.append(dict(name=name, lr=lr, eval_loss=evals[-1]['eval_loss'], trainable=trainable, total=total,
                        ckpt=dir_bytes(os.path.join(ckpt_lib.checkpoint_dir(workdir), str(args.adapt_steps))),
                        opt=optimizer_bytes(config, workdir), step_time=float(np.median(times))))

  full = next((r for r in results if r['name'] == 'full fine-tuning'), results[0])
  print(f'\njax {jax.__version__}, {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}; '
        f'base: {args.base_steps} steps on tinyshakespeare; adaptation: {args.adapt_steps} steps on Multi30k en')
  print(f'base model on Multi30k validation (no adaptation): loss {zero_shot:.4f}\n')
  print('| method | lr | val loss | trainable params | % of model | checkpoint bytes | optimizer-state bytes '
        '| step ms | step time vs full FT |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
  for r in results:
    print(f'| {r["name"]} | {r["lr"]:g} | {r["eval_loss"]:.4f} | {r["trainable"]:,} | '
          f'{100 * r["trainable"] / r["total"]:.2f}% | {r["ckpt"]:,} | {r["opt"]:,} | {1e3 * r["step_time"]:.1f} | '
          f'{r["step_time"] / full["step_time"]:.2f} |')


if __name__ == '__main__':
  main()
