"""Multi30k English -> German translation (WMT'16 multimodal task, text only), encoder_decoder.

  python train.py --config=configs/multi30k_en_de.py:cpu --workdir=runs/m30k_cpu   # CPU smoke run, BLEU > 0
  python train.py --config=configs/multi30k_en_de.py:gpu --workdir=runs/m30k_gpu   # small-GPU run
  python eval.py  --config=configs/multi30k_en_de.py:gpu --workdir=runs/m30k_gpu --split=test

Shared SentencePiece vocabulary trained on the English and German training text. Validation on `val`,
test on `test_2016_flickr`, decoded with beam search; BLEU is sacrebleu's, printed with its signature.
"""
from configs import default

VARIANTS = {
    'cpu': dict(model=dict(num_layers=2, num_decoder_layers=2, num_heads=4, d_model=128, d_ff=512, dropout=0.1),
                data=dict(vocab_size=2000),
                train=dict(batch_size=32, num_steps=1500, learning_rate=2e-3, warmup_steps=200, eval_every=500,
                           eval_steps=10, log_every=50)),
    'gpu': dict(model=dict(num_layers=3, num_decoder_layers=3, num_heads=8, d_model=512, d_ff=2048, dropout=0.2),
                data=dict(vocab_size=8000),
                train=dict(batch_size=128, num_steps=12000, learning_rate=1e-3, warmup_steps=1000, eval_every=1000,
                           eval_steps=-1, log_every=100, label_smoothing=0.1)),
}


def get_config(variant: str = 'cpu'):
  config = default.get_config()
  config.model.update(arch='encoder_decoder', position='sinusoidal', norm='layer', norm_position='pre', mlp='gelu',
                      use_bias=True, tie_embeddings=True, max_len=64)
  config.data.update(source='parallel:../shared/data/multi30k', src_lang='en', tgt_lang='de',
                     tokenizer='sentencepiece', spm_model_type='bpe', seq_len=64, src_seq_len=64, pack=False,
                     eval_split='validation', test_split='test')
  config.train.update(schedule='rsqrt', b2=0.98, weight_decay=0.0, label_smoothing=0.1, grad_clip_norm=1.0)
  default.apply_variant(config, VARIANTS, variant, 'multi30k_en_de')
  config.checkpoint.every_steps = 1000
  config.decode.update(method='beam', beam_size=4, length_penalty=0.6, max_len=64, batch_size=64)
  return config
