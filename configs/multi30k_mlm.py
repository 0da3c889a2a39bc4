"""Masked-LM (BERT-style, encoder_only) on the English side of Multi30k, one sentence per example.

  python train.py --config=configs/multi30k_mlm.py:cpu --workdir=runs/m30k_mlm_cpu   # CPU setting, a few minutes
  python eval.py  --config=configs/multi30k_mlm.py:cpu --workdir=runs/m30k_mlm_cpu   # masked-token ppl / accuracy

Data: `text:../shared/data/multi30k/{split}.en.gz` with text_unit='line' (one example per caption line); `{split}`
is filled per split (train -> train.en.gz, validation -> val.en.gz, test -> test_2016_flickr.en.gz, see
jaxformer/data/sources.py SPLIT_ALIASES). 15% of the tokens are masked; the loss, perplexity and accuracy are over
the masked tokens only (eval_loss / eval_perplexity / eval_accuracy in metrics.jsonl).
"""
from configs import default

VARIANTS = {
    # Character tokenizer, 2 post-LN layers 128 wide: the loss falls clearly within ~1000 CPU steps.
    'cpu': dict(model=dict(num_layers=2, num_heads=4, d_model=128, d_ff=512, dropout=0.0),
                data=dict(tokenizer='char'),
                train=dict(batch_size=32, num_steps=1000, learning_rate=3e-3, warmup_steps=100, eval_every=250,
                           eval_steps=10, log_every=50)),
    # Shared-size SentencePiece vocabulary, 4 layers 256 wide.
    'gpu': dict(model=dict(num_layers=4, num_heads=4, d_model=256, d_ff=1024, dropout=0.1),
                data=dict(tokenizer='sentencepiece', spm_model_type='bpe', vocab_size=8000),
                train=dict(batch_size=128, num_steps=10000, learning_rate=1e-3, warmup_steps=1000, eval_every=1000,
                           eval_steps=-1, log_every=100)),
}


def get_config(variant: str = 'cpu'):
  config = default.get_config()
  config.model.update(arch='encoder_only', position='learned', norm='layer', norm_position='post', mlp='gelu',
                      max_len=128)
  config.data.update(source='text:../shared/data/multi30k/{split}.en.gz', text_unit='line', seq_len=128,
                     mask_rate=0.15, pack=True, eval_split='validation', test_split='test')
  config.train.update(schedule='cosine', weight_decay=0.01, grad_clip_norm=1.0)
  default.apply_variant(config, VARIANTS, variant, 'multi30k_mlm')
  config.checkpoint.every_steps = 500
  return config
