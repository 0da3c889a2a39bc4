"""Text classification (model.head=classification): a tiny BERT-like encoder trained from scratch, or any BERT
checkpoint fine-tuned.

  python train.py --config=configs/classify.py --workdir=runs/cls                        # tiny encoder, toy data
  python train.py --config=configs/classify.py:tests/fixtures/hf/bert_cls --workdir=W    # a Hugging Face BERT
  python train.py --config=configs/classify.py:runs/m30k_mlm_cpu --workdir=W             # a jaxformer masked-LM run
  python eval.py  --config=configs/classify.py --workdir=runs/cls                        # accuracy, macro-F1

The data is the committed toy sentiment set (tests/fixtures/classify/, 600 train / 120 validation lines of
{"text", "label"}); point --config.data.source=jsonl:<file or {split} pattern> at your own, with
data.label_names (label strings in class-id order) or integer labels, and model.num_classes. With a checkpoint
directory the model, tokenizer and weights come from it (configs/hf.py); a BertForSequenceClassification keeps its
pooler and classifier, any other BERT gets BERT's pooler + classifier freshly initialised. With a jaxformer
training workdir (e.g. configs/multi30k_mlm.py's) the model section and tokenizer are that run's and the weights
its newest checkpoint's; its masked-LM head is left out and the classifier starts freshly initialised.
"""
import os

from configs import default, hf as hf_recipe
from jaxformer.training.saved_config import saved_config

LABEL_NAMES = 'negative,neutral,positive'
TOY_DATA = 'jsonl:tests/fixtures/classify/{split}.jsonl'


def get_config(directory: str = ''):
  num_classes = len(LABEL_NAMES.split(','))
  if directory and os.path.isdir(os.path.join(directory, 'checkpoints')):
    return _from_run(os.path.abspath(os.path.expanduser(directory)), num_classes)
  if directory:
    config = hf_recipe.get_config(directory)
    config.model.update(head='classification', pooler=config.model.arch == 'encoder_only')
    if config.model.num_classes < 2:
      config.model.num_classes = num_classes
    config.train.update(batch_size=16, num_steps=200, learning_rate=1e-4, warmup_steps=20, eval_every=100,
                        eval_steps=-1)
    config.data.update(source=TOY_DATA, label_names=LABEL_NAMES, seq_len=min(64, config.model.max_len))
    config.checkpoint.every_steps = 100
    return config
  config = default.get_config()
  config.model.update(arch='encoder_only', head='classification', num_classes=num_classes, position='learned',
                      norm='layer', norm_position='post', mlp='gelu', num_layers=2, num_heads=4, d_model=64,
                      d_ff=256, max_len=64, dropout=0.1)
  config.data.update(source=TOY_DATA, label_names=LABEL_NAMES, tokenizer='char', seq_len=64, pack=False)
  config.train.update(batch_size=32, num_steps=300, learning_rate=1e-3, warmup_steps=30, log_every=25,
                      eval_every=100, eval_steps=-1)
  config.checkpoint.every_steps = 100
  return config


def _from_run(workdir: str, num_classes: int):
  """The tiny recipe's data and schedule on the model and tokenizer of a jaxformer run (checkpoint.init_from),
  at a fine-tuning learning rate."""
  saved = saved_config(workdir) or {}
  if 'model' not in saved:
    raise ValueError(f'no config.json in {workdir}; give a jaxformer training workdir (or a Hugging Face directory).')
  config = get_config()
  config.model.update({k: v for k, v in saved['model'].items() if k in config.model})
  config.model.update(head='classification', num_classes=num_classes)
  config.data.update({k: v for k, v in saved.get('data', {}).items() if k in ('tokenizer', 'vocab_size')})
  config.data.seq_len = min(64, config.model.max_len)
  config.checkpoint.init_from = workdir
  config.train.learning_rate = 3e-4
  return config
