"""Export a training run to a Hugging Face directory.

  python -m jaxformer.hf export --workdir=W --output=DIR [--checkpoint_step=N]

Writes DIR/config.json + DIR/model.safetensors (transformers loads them with the matching AutoModelFor... class and
gives the same logits) from the newest (or the given) checkpoint of W, with the config the run saved; when the run
used an hf:<dir> tokenizer its files are copied too and its special ids go into config.json. Errors are one line.
"""
from __future__ import annotations

import argparse
import sys

import ml_collections
from flax import nnx

from jaxformer import cli, hf, sharding as shd
from jaxformer import peft as peft_lib
from jaxformer.config import ConfigError
from jaxformer.data.hf_tokenizer import NONE, HFTokenizer
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import step as step_lib
from jaxformer.errors import UserError


def token_ids(tokenizer: HFTokenizer, arch: str) -> dict[str, int]:
  """bos/eos/pad (and T5's decoder start = pad) ids for config.json; ids the tokenizer lacks are left out."""
  ids = {'bos_token_id': tokenizer.bos_id, 'eos_token_id': tokenizer.eos_id, 'pad_token_id': tokenizer.pad_id}
  if arch == 'encoder_decoder':
    ids['decoder_start_token_id'] = tokenizer.pad_id
  return {k: v for k, v in ids.items() if v != NONE}


def export(workdir: str, output: str, step: int | None = None) -> str:
  """Exports `workdir`'s checkpoint to `output`; returns the model_type written."""
  saved = ckpt_lib.saved_config(workdir, step)
  if saved is None:
    raise ConfigError(f'--workdir={workdir} has no config.json; point it at a directory train.py wrote.')
  config = ml_collections.ConfigDict(saved)
  config.mesh.update(data=-1, fsdp=1, tensor=1)  # whatever devices this machine has, each with the whole model
  model, _ = ckpt_lib.restore_model(workdir, config, shd.make_mesh(config), step=step)
  if peft_lib.is_active(config):  # a LoRA / BitFit run: the base model with the trained parameters folded in
    merged = peft_lib.merge(model, config)
    config.peft.method = 'none'
    model = step_lib.build_model(config)
    nnx.update(model, merged)
  spec = str(config.data.get('tokenizer', ''))
  tokenizer = HFTokenizer.from_spec(spec) if spec.startswith(hf.PREFIX) else None
  model_type = hf.save(model, config.model, output,
                       token_ids=token_ids(tokenizer, config.model.arch) if tokenizer is not None else None)
  if tokenizer is not None:
    tokenizer.save_files(output)
  else:
    print(f'note: the run used data.tokenizer={spec!r}, which has no Hugging Face tokenizer.json; only the model is '
          'exported.')
  return model_type


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog='python -m jaxformer.hf', description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True)
  p = commands.add_parser('export', help='a training run -> a Hugging Face directory')
  p.add_argument('--workdir', required=True, help='the directory train.py wrote')
  p.add_argument('--output', required=True, help='the Hugging Face directory to write')
  p.add_argument('--checkpoint_step', type=int, default=None, help='default: the newest checkpoint')
  args = parser.parse_args(argv)
  cli.quiet_logging()
  try:
    model_type = cli.guarded(lambda: export(args.workdir, args.output, args.checkpoint_step))
  except ValueError as e:  # a setting without a Hugging Face counterpart (families.py raises ValueError)
    cli.fail(UserError(str(e)))
  print(f'wrote {model_type} checkpoint to {args.output}')


if __name__ == '__main__':
  main(sys.argv[1:])
