"""A tiny BERT (encoder_only, masked-LM) on the built-in synthetic language."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.update(arch='encoder_only', position='learned', norm='layer', norm_position='post', mlp='gelu',
                      num_layers=2, num_heads=4, d_model=128, d_ff=512, max_len=128)
  config.data.update(source='builtin:lm', tokenizer='char', seq_len=128, mask_rate=0.15)
  # Masked-LM learns from the 15% masked tokens only: a larger batch and learning rate than gpt_tiny's make the loss
  # fall as clearly in the same few CPU minutes (eval loss ~1.5 after 300 steps).
  config.train.update(batch_size=32, num_steps=300, learning_rate=3e-3, warmup_steps=30,
                      log_every=10, eval_every=100, eval_steps=8)
  config.checkpoint.every_steps = 100
  return config
