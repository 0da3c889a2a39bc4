"""Character-level Shakespeare, nanoGPT's recipe. Pick the variant after a colon:

  python train.py --config=configs/shakespeare_char.py:cpu --workdir=runs/shakespeare_cpu   # ~1.90 val loss (nanoGPT here: 1.90)
  python train.py --config=configs/shakespeare_char.py:gpu --workdir=runs/shakespeare_gpu   # ~1.47 val loss

Data: tinyshakespeare as one document, first 90% train, last 10% validation (as nanoGPT splits it).
"""
from configs import default

VARIANTS = {
    # nanoGPT README's CPU command: 4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 iters.
    'cpu': dict(model=dict(num_layers=4, num_heads=4, d_model=128, d_ff=512, max_len=64, dropout=0.0),
                data=dict(seq_len=64),
                train=dict(batch_size=12, num_steps=2000, learning_rate=1e-3, warmup_steps=100,
                           min_learning_rate=1e-4, eval_every=250, log_every=50,
                           # every 250 steps an estimate on 2 of the validation split's 14 batches of 128 rows,
                           # spread over it (16,384 tokens; nanoGPT's estimate_loss reads 15,360 per split), and
                           # at step 2000 the whole split (111,594 tokens): the number above (benchmarks/RESULTS.md)
                           eval_steps=2, final_eval_steps=-1, eval_batch_size=128,
                           # 5 steps per jitted call: ~25% faster per step on CPU (cpu_step_vs_torch.py); a
                           # divisor of log_every, eval_every and checkpoint.every_steps, same math
                           steps_per_call=5)),
    # nanoGPT config/train_shakespeare_char.py: 6 layers, 6 heads, 384 wide, context 256, batch 64, 5000 iters.
    'gpu': dict(model=dict(num_layers=6, num_heads=6, d_model=384, d_ff=1536, max_len=256, dropout=0.2),
                data=dict(seq_len=256),
                train=dict(batch_size=64, num_steps=5000, learning_rate=1e-3, warmup_steps=100,
                           min_learning_rate=1e-4, eval_every=250, eval_steps=-1, log_every=50)),
}


def get_config(variant: str = 'cpu'):
  config = default.get_config()
  config.model.update(arch='decoder_only', position='learned', norm='layer', norm_position='pre', mlp='gelu',
                      use_bias=False, tie_embeddings=True)
  # i.i.d. random windows, as nanoGPT's get_batch: ~0.025 lower val loss than sequential streams here
  config.data.update(source='text:../shared/data/tinyshakespeare/input.txt', tokenizer='char', pack=True,
                     sampling='random_windows')
  config.train.update(optimizer='adamw', schedule='cosine', b1=0.9, b2=0.99, weight_decay=0.1, grad_clip_norm=1.0)
  default.apply_variant(config, VARIANTS, variant, 'shakespeare_char')
  config.checkpoint.every_steps = 1000
  config.decode.update(method='sample', temperature=0.8, top_k=200, max_len=500)
  return config
