"""Chinese language model: character-level, or SentencePiece BPE at the same model shape and steps.

  python train.py --config=configs/zh_char.py --workdir=runs/zh_char           # one token per character
  python train.py --config=configs/zh_char.py:bpe --workdir=runs/zh_bpe        # SentencePiece BPE, 8000 pieces
  python eval.py --config=configs/zh_char.py --workdir=runs/zh_char --mode=generate --prompt='天下'
  python benchmarks/zh_vocab_extend.py    # :byte on English, then Chinese with vs without its top characters added

Data: ../shared/data/zh_fortunes/chinese.txt (Debian's fortunes-zh: classical poems, proverbs, Debian documents;
~960k characters) as one document, first 90% train, last 10% validation. Per-token perplexity cannot compare the
two tokenizers (a BPE token covers several characters); compare eval_bits_per_char (benchmarks/RESULTS.md).
The char vocabulary comes from the training split: 1.7% of the validation characters never occur there (mostly
'谚' of the proverb section) and become <unk>, which is easier to predict than the characters it stands for, so the
char model's bits per character on this split are a little optimistic; BPE (with byte fallback) and byte have no
<unk>.
"""
from configs import default

VARIANTS = {
    'char': dict(data=dict(tokenizer='char')),
    # 8000 pieces: the ~5.5k characters of the training split (character_coverage=1.0), 256 byte-fallback pieces
    # and ~2.3k merges (about 1.3 characters per token here)
    'bpe': dict(data=dict(tokenizer='sentencepiece', spm_model_type='bpe', vocab_size=8000)),
    'byte': dict(data=dict(tokenizer='byte')),
}


def get_config(variant: str = 'char'):
  config = default.get_config()
  # the shakespeare_char:cpu shape (nanoGPT's CPU recipe) with a 128-token context: sized for a few CPU minutes
  config.model.update(arch='decoder_only', position='learned', norm='layer', norm_position='pre', mlp='gelu',
                      num_layers=4, num_heads=4, d_model=128, d_ff=512, max_len=128, dropout=0.0, use_bias=False,
                      tie_embeddings=True)
  config.data.update(source='text:../shared/data/zh_fortunes/chinese.txt', text_unit='file', seq_len=128, pack=True,
                     sampling='random_windows')
  config.train.update(batch_size=16, num_steps=1000, optimizer='adamw', learning_rate=1e-3, schedule='cosine',
                      warmup_steps=100, min_learning_rate=1e-4, b1=0.9, b2=0.99, weight_decay=0.1,
                      grad_clip_norm=1.0, log_every=50, eval_every=500,
                      # the whole validation split at every eval (~96k characters)
                      eval_steps=-1, eval_batch_size=64, steps_per_call=5)
  default.apply_variant(config, VARIANTS, variant, 'zh_char')
  config.checkpoint.every_steps = 500
  config.decode.update(method='sample', temperature=0.8, top_k=200, max_len=100)
  return config
