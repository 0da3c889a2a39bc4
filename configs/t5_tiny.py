"""A tiny T5-style encoder_decoder on the built-in numbers-to-words translation task."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.update(arch='encoder_decoder', position='rope', norm='rms', norm_position='pre', mlp='swiglu',
                      use_bias=False, num_layers=2, num_decoder_layers=2, num_heads=4, d_model=128, d_ff=384,
                      max_len=64)
  config.data.update(source='builtin:numbers', tokenizer='char', seq_len=64, src_seq_len=32, pack=False)
  config.train.update(batch_size=32, num_steps=300, learning_rate=3e-3, warmup_steps=30,
                      log_every=10, eval_every=100, eval_steps=8)
  config.checkpoint.every_steps = 100
  config.decode.update(method='greedy', max_len=64)
  return config
