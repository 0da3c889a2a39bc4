"""T5-small shape (v1.1 style): 6+6 layers, d_model 512, 8 heads, RMSNorm pre-LN, gated MLP, no biases.

T5 uses relative position buckets; we use RoPE, which plays the same role (relative offsets only).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model.update(arch='encoder_decoder', position='rope', norm='rms', norm_position='pre', mlp='swiglu',
                      use_bias=False, tie_embeddings=True, num_layers=6, num_decoder_layers=6, num_heads=8,
                      d_model=512, d_ff=1024, vocab_size=32128, max_len=512, dropout=0.1, norm_eps=1e-6,
                      scan_layers=True)  # published shapes scan their blocks (README "Scaling up")
  config.data.update(seq_len=512, src_seq_len=512, tokenizer='sentencepiece', vocab_size=32128, pack=False)
  config.train.update(optimizer='adafactor', schedule='rsqrt', learning_rate=1e-2, warmup_steps=10000,
                      batch_size=128)
  return config
