"""Any Hugging Face checkpoint directory as a recipe: its model, its tokenizer, its weights, fine-tuning defaults.

  python eval.py  --config=configs/hf.py:DIR --workdir=W --mode=generate --prompt='...'   # the pretrained weights
  python eval.py  --config=configs/hf.py:DIR --workdir=W --config.data.source=text:FILE    # perplexity
  python train.py --config=configs/hf.py:DIR --workdir=W --config.data.source=text:FILE    # fine-tune
  python -m jaxformer.hf export --workdir=W --output=OUT                                  # back to Hugging Face

DIR is what `save_pretrained` writes (config.json, model.safetensors or a sharded index, tokenizer.json). The model
section comes from config.json (jaxformer.hf.model_section), data.tokenizer=hf:DIR, checkpoint.init_from=hf:DIR.
Fine-tuning defaults: AdamW at 5e-5 (1e-4 for T5, as its papers fine-tune higher), linear decay after a short
warmup, weight decay 0.01, sequence lengths within the model's positions.
"""
import os

from configs import default
from jaxformer import hf


def get_config(directory: str = ''):
  if not directory:
    raise ValueError('configs/hf.py needs a checkpoint directory: --config=configs/hf.py:path/to/checkpoint.')
  directory = os.path.abspath(os.path.expanduser(directory))  # the saved config must work from any directory
  config = default.get_config()
  config.model = hf.model_section(directory)
  config.data.tokenizer = hf.PREFIX + directory
  config.checkpoint.init_from = hf.PREFIX + directory
  seq_len = min(512, config.model.max_len)
  config.data.update(seq_len=seq_len, src_seq_len=seq_len, pack=config.model.arch != 'encoder_decoder')
  t5 = config.model.arch == 'encoder_decoder'
  config.train.update(batch_size=8, num_steps=1000, learning_rate=1e-4 if t5 else 5e-5, schedule='linear',
                      warmup_steps=50, weight_decay=0.01, log_every=10, eval_every=200, eval_steps=20)
  config.decode.update(method='greedy', max_len=min(64, config.model.max_len))
  ids = hf.read_config(directory)
  eos = ids.get('eos_token_id')
  start = ids.get('decoder_start_token_id') if t5 else ids.get('bos_token_id')
  if eos is not None:
    config.decode.eos_id = int(eos[0] if isinstance(eos, list) else eos)
  if start is not None:
    config.decode.start_id = int(start)
  return config
