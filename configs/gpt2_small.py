"""GPT-2 small (124M): 12 layers, 12 heads, d_model 768, learned positions, LayerNorm with biases, tied embeddings."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.update(arch='decoder_only', position='learned', norm='layer', norm_position='pre', mlp='gelu',
                      use_bias=True, tie_embeddings=True, num_layers=12, num_heads=12, d_model=768, d_ff=3072,
                      vocab_size=50257, max_len=1024, dropout=0.0,
                      scan_layers=True)  # published shapes scan their blocks (README "Scaling up")
  config.data.update(seq_len=1024, tokenizer='sentencepiece', vocab_size=50257)
  config.train.update(batch_size=8, learning_rate=6e-4, warmup_steps=2000, b2=0.95, weight_decay=0.1)
  return config
