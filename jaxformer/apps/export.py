"""Export a training run to a Hugging Face directory (`python -m jaxformer.hf export`).

Writes DIR/config.json + DIR/model.safetensors (transformers loads them with the matching AutoModelFor... class and
gives the same logits) from the newest (or the given) checkpoint of the workdir, with the config the run saved
(read, checked and typed as eval.py reads it: settings.upgrade_saved, resolve.checked_config) and its parameters
read by training/state.py's restore_model, the path eval.py uses. When the run used an hf:<dir> tokenizer its
files are copied too (tokenizer.json with the tokens the run added, data.tokenizer_extra: the model's vocabulary
grew with them) and its special ids go into config.json. Errors are one line.

A model.head=reward run is written as *ForSequenceClassification with num_labels=1 (BERT: pooler + classifier;
GPT-2 / Llama / Qwen2: `score`). A decoder's class needs pad_token_id in config.json, because transformers reads
each row at its last token that is not the pad id; it is the tokenizer's pad id, or its eos id when it has none
(jaxformer's own tokenizers: 0). When it is the eos id a note says that transformers then reads rows ending in that
EOS, as jaxformer frames reward rows, one token early.

With --adapter, a peft.method=lora run is written as a Hugging Face peft LoRA adapter instead
(adapter_config.json + adapter_model.safetensors, hf/peft_format.py) that `PeftModel.from_pretrained` loads onto
its base (checkpoint.init_from's hf:<dir>, written as base_model_name_or_path) with the run's logits.
"""
from __future__ import annotations

import argparse
import dataclasses

from flax import nnx

from jaxformer import cli, hf
from jaxformer import peft as peft_lib
from jaxformer import resolve as resolve_lib
from jaxformer import settings as settings_lib
from jaxformer import sharding as shd
from jaxformer.data.hf_tokenizer import NONE, HFTokenizer
from jaxformer.data.tokenizers import extend_from_workdir
from jaxformer.errors import ConfigError, UserError
from jaxformer.hf import peft_format
from jaxformer.model import layout_convert
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import state as state_lib


def token_ids(tokenizer: HFTokenizer, arch: str, needs_pad: bool = False) -> dict[str, int]:
  """bos/eos/pad (and T5's decoder start = pad) ids for config.json; ids the tokenizer lacks are left out, but for
  a class that needs a pad id (hf.needs_pad_token: a decoder's reward model) a tokenizer without one gives its eos
  id, with a note when the pad id is the eos id."""
  ids = {'bos_token_id': tokenizer.bos_id, 'eos_token_id': tokenizer.eos_id, 'pad_token_id': tokenizer.pad_id}
  if arch == 'encoder_decoder':
    ids['decoder_start_token_id'] = tokenizer.pad_id
  if needs_pad and ids['pad_token_id'] == NONE:
    ids['pad_token_id'] = tokenizer.eos_id
  if needs_pad and ids['pad_token_id'] != NONE and ids['pad_token_id'] == tokenizer.eos_id:
    print(f'note: config.json\'s pad_token_id is the tokenizer\'s eos id {tokenizer.eos_id}; transformers reads a '
          'reward at the last token of a row that is not the pad id, so a row ending in that EOS (as jaxformer '
          'frames reward rows) is read one token early there; set pad_token_id to an id no row ends with (and pad '
          'with it) to get jaxformer\'s rewards.')
  return {k: v for k, v in ids.items() if v != NONE}


def export(workdir: str, output: str, step: int | None = None) -> str:
  """Exports `workdir`'s checkpoint to `output`; returns the model_type written."""
  saved = ckpt_lib.saved_config(workdir, step)
  if saved is None:
    raise ConfigError(f'--workdir={workdir} has no config.json; point it at a directory train.py wrote.')
  config = settings_lib.upgrade_saved(saved)
  config.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)  # whatever devices this machine has, each with the whole model
  settings = settings_lib.from_config(resolve_lib.checked_config(config))
  mesh = shd.make_mesh(settings)
  model, _ = state_lib.restore_model(workdir, settings, mesh, shd.rules_from_config(settings), step=step)
  if peft_lib.is_active(settings.peft):  # a LoRA / BitFit run: the base model with the trained parameters folded in
    merged = peft_lib.merge(model, settings.peft)
    settings = settings_lib.replace(settings, peft=dataclasses.replace(settings.peft, method='none'))
    model = state_lib.build_model(settings)
    nnx.update(model, merged)
  spec = settings.data.tokenizer
  tokenizer = HFTokenizer.from_spec(spec) if spec.startswith(hf.PREFIX) else None
  if tokenizer is not None:  # with the tokens the run added (data.tokenizer_extra), kept in its workdir
    extend_from_workdir(tokenizer, workdir)
  ids = (token_ids(tokenizer, settings.model.arch, hf.needs_pad_token(settings.model)) if tokenizer is not None
         else None)
  names = [n.strip() for n in settings.data.label_names.split(',') if n.strip()]
  model_type = hf.save(model, settings.model, output, token_ids=ids, label_names=names)
  if tokenizer is not None:
    tokenizer.save_files(output)
  else:
    print(f'note: the run used data.tokenizer={spec!r}, which has no Hugging Face tokenizer.json; only the model is '
          'exported.')
  return model_type


def export_adapter(workdir: str, output: str, step: int | None = None) -> list[str]:
  """Writes `workdir`'s LoRA factors (a peft.method=lora run) as a Hugging Face peft adapter directory
  (adapter_config.json + adapter_model.safetensors, hf/peft_format.py) for its base's Hugging Face family; returns
  the module names. A peft.method=prefix run: its prefix as a peft PREFIX_TUNING adapter (['prefix']). What a LoRA adapter cannot hold (other trained parameters, a task head) is one line."""
  saved = ckpt_lib.saved_config(workdir, step)
  if saved is None:
    raise ConfigError(f'--workdir={workdir} has no config.json; point it at a directory train.py wrote.')
  config = settings_lib.upgrade_saved(saved)
  peft = config.peft
  if peft.method not in ('lora', 'prefix'):
    raise ConfigError(f'--adapter writes LoRA factors or a prefix, but --workdir={workdir} is a peft.method='
                      f'{peft.method} run (peft format: LoRA and prefix tuning); export the whole model without '
                      '--adapter.')
  if peft.train_extra:
    raise ConfigError(f'--workdir={workdir} also trained base parameters (peft.train_extra={peft.train_extra!r}), '
                      'which a LoRA adapter cannot hold; export the merged model without --adapter.')
  if config.model.head != 'lm':
    raise ConfigError(f'--workdir={workdir} trained a model.head={config.model.head} output layer as well, which '
                      'this LoRA export does not write (peft modules_to_save); export the merged model without '
                      '--adapter.')
  config.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
  settings = settings_lib.from_config(resolve_lib.checked_config(config))
  mesh = shd.make_mesh(settings)
  model, _ = state_lib.restore_model(workdir, settings, mesh, shd.rules_from_config(settings), step=step)
  base = str(settings.checkpoint.init_from)
  base = base[len(hf.PREFIX):] if base.startswith(hf.PREFIX) else base
  if not str(settings.checkpoint.init_from).startswith(hf.PREFIX):
    print(f'note: the base is {base or "the seed"}, not a Hugging Face directory; peft loads this adapter onto '
          'that base exported with python -m jaxformer.hf export (without --adapter).')
  if peft.method == 'prefix':  # the prefix, merged away from its MLP if it has one (peft_lib.prefix)
    peft_format.write_prefix(output, model, base_model=base)
    return ['prefix']
  params = layout_convert.to_flat_layout(hf.model_params(model), scanned=False)
  return peft_format.write_lora(output, params, settings.model, rank=settings.peft.rank, alpha=settings.peft.alpha,
                                dropout=settings.peft.dropout, base_model=base)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m jaxformer.hf', description=__doc__.splitlines()[0],
      epilog='export --workdir=RUN --output=DIR: the merged model (config.json + model.safetensors); add --adapter '
             'for a LoRA run\'s factors as a Hugging Face peft adapter (adapter_config.json + '
             'adapter_model.safetensors).')
  commands = parser.add_subparsers(dest='command', required=True)
  p = commands.add_parser('export', help='a training run -> a Hugging Face directory')
  p.add_argument('--workdir', required=True, help='the directory train.py wrote')
  p.add_argument('--output', required=True, help='the Hugging Face directory to write')
  p.add_argument('--checkpoint_step', type=int, default=None, help='default: the newest checkpoint')
  p.add_argument('--adapter', action='store_true',
                 help='a peft.method=lora run: write only its LoRA factors as a Hugging Face peft adapter '
                      '(adapter_config.json + adapter_model.safetensors) for its base, instead of the merged model; '
                      'a peft.method=prefix run (decoder_only): its prefix as a peft prefix-tuning adapter')
  args = parser.parse_args(argv)
  cli.quiet_logging()
  if args.adapter:
    modules = cli.guarded(lambda: export_adapter(args.workdir, args.output, args.checkpoint_step))
    print(f'wrote a peft prefix-tuning adapter to {args.output}' if modules == ['prefix'] else
          f'wrote a peft LoRA adapter on {len(modules)} modules to {args.output}')
    return
  try:
    model_type = cli.guarded(lambda: export(args.workdir, args.output, args.checkpoint_step))
  except ValueError as e:  # a setting without a Hugging Face counterpart (families.py raises ValueError)
    cli.fail(UserError(str(e)))
  print(f'wrote {model_type} checkpoint to {args.output}')
