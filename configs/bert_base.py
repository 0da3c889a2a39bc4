"""BERT-base shape (110M without token-type embeddings and pooler): post-LN, GELU, learned positions, masked-LM."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.update(arch='encoder_only', position='learned', norm='layer', norm_position='post', mlp='gelu',
                      use_bias=True, tie_embeddings=True, num_layers=12, num_heads=12, d_model=768, d_ff=3072,
                      vocab_size=30522, max_len=512, dropout=0.1, norm_eps=1e-12,
                      scan_layers=True)  # published shapes scan their blocks (README "Scaling up")
  config.data.update(seq_len=512, tokenizer='sentencepiece', vocab_size=30522, mask_rate=0.15)
  config.train.update(batch_size=32, learning_rate=1e-4, warmup_steps=10000, b2=0.999, weight_decay=0.01)
  return config
