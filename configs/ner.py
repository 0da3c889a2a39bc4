"""Token classification (model.head=token_classification, NER): a tiny BERT-like encoder trained from scratch, or
any BERT checkpoint fine-tuned.

  python train.py --config=configs/ner.py --workdir=runs/ner                         # tiny encoder, toy data
  python train.py --config=configs/ner.py:tests/fixtures/hf/bert --workdir=W          # a Hugging Face BERT
  python eval.py  --config=configs/ner.py --workdir=runs/ner                          # entity P / R / F1

The data is the committed toy NER set (tests/fixtures/ner/, 400 train / 80 validation lines of {"tokens", "tags"}
with BIO tags); point --config.data.source=jsonl:<file or {split} pattern> at your own (CoNLL-2003 as Hugging Face
datasets exports it: --config.data.tags_key=ner_tags and integer tags), with data.label_names (the tag strings in
id order) and model.num_classes.
"""
from configs import default, hf as hf_recipe

LABEL_NAMES = 'O,B-PER,I-PER,B-LOC,I-LOC'
TOY_DATA = 'jsonl:tests/fixtures/ner/{split}.jsonl'


def get_config(directory: str = ''):
  num_classes = len(LABEL_NAMES.split(','))
  if directory:
    config = hf_recipe.get_config(directory)
    config.model.update(head='token_classification', num_classes=num_classes, pooler=False)
    config.train.update(batch_size=16, num_steps=200, learning_rate=1e-4, warmup_steps=20, eval_every=100,
                        eval_steps=-1)
    config.data.update(source=TOY_DATA, label_names=LABEL_NAMES, seq_len=min(64, config.model.max_len))
    config.checkpoint.every_steps = 100
    return config
  config = default.get_config()
  config.model.update(arch='encoder_only', head='token_classification', num_classes=num_classes, position='learned',
                      norm='layer', norm_position='post', mlp='gelu', num_layers=2, num_heads=4, d_model=64,
                      d_ff=256, max_len=128, dropout=0.1)
  config.data.update(source=TOY_DATA, label_names=LABEL_NAMES, tokenizer='char', seq_len=128, pack=False)
  config.train.update(batch_size=32, num_steps=300, learning_rate=1e-3, warmup_steps=30, log_every=25,
                      eval_every=100, eval_steps=-1)
  config.checkpoint.every_steps = 100
  return config
