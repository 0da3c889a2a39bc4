"""The Transformer base model of Vaswani et al. (2017): 6+6 layers, d_model 512, 8 heads, d_ff 2048,
sinusoidal positions, post-LN, ReLU, shared source/target vocabulary tied to the output projection."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.update(arch='encoder_decoder', position='sinusoidal', norm='layer', norm_position='post', mlp='relu',
                      use_bias=True, tie_embeddings=True, num_layers=6, num_decoder_layers=6, num_heads=8,
                      d_model=512, d_ff=2048, vocab_size=37000, max_len=256, dropout=0.1,
                      scan_layers=True)  # published shapes scan their blocks (README "Scaling up")
  config.data.update(seq_len=256, src_seq_len=256, tokenizer='sentencepiece', vocab_size=37000, pack=False)
  config.train.update(schedule='rsqrt', learning_rate=1e-3, warmup_steps=4000, b1=0.9, b2=0.98, eps=1e-9,
                      label_smoothing=0.1, weight_decay=0.0, batch_size=256)
  config.decode.update(method='beam', beam_size=4, length_penalty=0.6)
  return config
