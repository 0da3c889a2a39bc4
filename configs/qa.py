"""Extractive question answering (model.head=span, SQuAD): a tiny BERT-like encoder trained from scratch, or any
BERT checkpoint fine-tuned.

  python train.py --config=configs/qa.py --workdir=runs/qa                           # tiny encoder, toy data
  python train.py --config=configs/qa.py:tests/fixtures/hf/bert --workdir=W           # a Hugging Face BERT
  python eval.py  --config=configs/qa.py --workdir=runs/qa                            # SQuAD exact match / F1

The data is the committed toy set (tests/fixtures/qa/, 400 train / 60 validation lines in SQuAD's format:
context, question, answers {text, answer_start}); its contexts are longer than a row, so each is read in windows
overlapping by data.doc_stride tokens. Point --config.data.source=jsonl:<file or {split} pattern> at SQuAD's own
(one JSON object per question); the Hugging Face run_qa defaults are data.seq_len=384, data.doc_stride=128.
On the toy data the tiny char-level encoder learns to answer with a colour within a few hundred steps (EM 23, F1 28
at 400 steps on 2 CPU cores, about chance for picking the sentence); matching the question's animal to its
sentence takes longer: the recipe shows the plumbing, not a trained reader.
"""
from configs import default, hf as hf_recipe

TOY_DATA = 'jsonl:tests/fixtures/qa/{split}.jsonl'


def get_config(directory: str = ''):
  if directory:
    config = hf_recipe.get_config(directory)
    config.model.update(head='span', pooler=False)
    config.train.update(batch_size=16, num_steps=300, learning_rate=1e-4, warmup_steps=30, eval_every=100,
                        eval_steps=-1)
    config.data.update(source=TOY_DATA, seq_len=min(64, config.model.max_len), doc_stride=16)
    config.checkpoint.every_steps = 100
    return config
  config = default.get_config()
  config.model.update(arch='encoder_only', head='span', position='learned', norm='layer', norm_position='post',
                      mlp='gelu', num_layers=2, num_heads=4, d_model=64, d_ff=256, max_len=128, dropout=0.0,
                      type_vocab_size=2)
  config.data.update(source=TOY_DATA, tokenizer='char', seq_len=128, doc_stride=32, pack=False)
  config.train.update(batch_size=32, num_steps=600, learning_rate=1e-3, warmup_steps=50, log_every=50,
                      eval_every=200, eval_steps=-1)
  config.checkpoint.every_steps = 200
  return config
