"""One training step of jaxformer vs. the equivalent PyTorch eager (nanoGPT) step, on the same CPU, interleaved.

  python benchmarks/cpu_step_vs_torch.py                                   # shakespeare_char:cpu recipe
  python benchmarks/cpu_step_vs_torch.py --config=configs/shakespeare_char.py:cpu --rounds=10 --reps=20
  python benchmarks/cpu_step_vs_torch.py --variants=jaxformer,jaxformer_x4,plain_jax --torch_1thread

Needs torch (CPU wheel) in the environment; it is not a jaxformer dependency (`pip install torch`).

What is timed (per step, wall clock, after warm-up/compilation, batch already on the device):
  pytorch eager    nanoGPT's model.py/train.py step with --device=cpu --compile=False: GPT (bias=False, tied
                   embeddings, exact GELU, F.scaled_dot_product_attention causal), forward + cross-entropy,
                   backward, clip_grad_norm_(1.0), AdamW (decay on >=2-D params), zero_grad(set_to_none).
  jaxformer        THE REAL jaxformer step: jaxformer.training.step.make_train_step on the recipe config
                   (shakespeare_char:cpu = 4 layers, 4 heads, d_model 128, context 64, batch 12, AdamW b2 0.99,
                   clip 1.0), vocab 65, packed-batch keys tokens/targets/segment_ids/positions.
                   Its projections are single 2-D matmuls over the B*T rows (jaxformer.model.layers.matmul), the
                   fix found in benchmarks/NOTES_cpu_performance.md.
  jaxformer x4     the same real step with train.steps_per_call=4: one jitted call runs 4 optimizer steps (a
                   lax.scan over 4 stacked batches); the row reports per-step time = call time / 4.
  plain_jax        a standalone ~60-line JAX GPT in the recommended formulation (no Flax), for reference.

Both frameworks run in one process with the malloc settings train.py uses (jaxformer.training.host_memory:
freed memory is reused rather than unmapped; --malloc_defaults turns that off for both).
Timings on a shared machine are noisy: the variants are interleaved in rounds, and the table reports the minimum
and the median over all rounds plus the ratio to PyTorch measured in the same run; the load average is printed.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402


# ------------------------------------------------------------------------------------------- PyTorch (nanoGPT)
def torch_step_fn(n_layer, n_head, n_embd, block_size, vocab, lr, b1, b2, wd, clip, seed=0):
  import torch
  import torch.nn as nn
  from torch.nn import functional as F
  torch.manual_seed(seed)

  class LayerNorm(nn.Module):  # nanoGPT's LayerNorm with bias=False
    def __init__(self, n):
      super().__init__()
      self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
      return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)

  class Attention(nn.Module):
    def __init__(self):
      super().__init__()
      self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
      self.c_proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x):
      b, t, c = x.shape
      q, k, v = self.c_attn(x).split(n_embd, dim=2)
      q, k, v = (a.view(b, t, n_head, c // n_head).transpose(1, 2) for a in (q, k, v))
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln_1, self.attn, self.ln_2 = LayerNorm(n_embd), Attention(), LayerNorm(n_embd)
      self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
      self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)
      self.gelu = nn.GELU()

    def forward(self, x):
      x = x + self.attn(self.ln_1(x))
      return x + self.c_proj(self.gelu(self.c_fc(self.ln_2(x))))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block_size, n_embd)
      self.h = nn.ModuleList([Block() for _ in range(n_layer)])
      self.ln_f = LayerNorm(n_embd)
      self.lm_head = nn.Linear(n_embd, vocab, bias=False)
      self.wte.weight = self.lm_head.weight
      for p in self.parameters():
        if p.dim() >= 2:
          nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx, targets):
      x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], dtype=torch.long))
      for blk in self.h:
        x = blk(x)
      logits = self.lm_head(self.ln_f(x))
      return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

  model = GPT()
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': wd}, {'params': no_decay, 'weight_decay': 0.0}],
                          lr=lr, betas=(b1, b2))

  def step(x, y):
    loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  return step


# ------------------------------------------------------------------------------------------ jaxformer steps
def jaxformer_step_fn(config, steps_per_call=1):
  from jaxformer import sharding as shd
  from jaxformer.training import optimizer as opt_lib
  from jaxformer.training import step as step_lib
  from jaxformer.training import state as state_lib
  mesh = shd.make_mesh(config)
  tx, schedule = opt_lib.make_optimizer(config.train)
  setup = state_lib.make_setup(config, mesh, tx, schedule)
  state = state_lib.initial_state(config, setup)
  train_step = step_lib.make_train_step(config, setup, steps_per_call)
  holder = {'state': state}

  def step(batch):
    holder['state'], metrics = train_step(holder['state'], batch)
    return metrics['loss']

  return step


# ------------------------------------------------------------------------------------- plain JAX reference
def plain_jax_step_fn(n_layer, n_head, d, t, vocab, lr, b1, b2, wd, clip, seed=0):
  """A standalone GPT (same model as the torch one) in the formulation recommended for XLA:CPU."""
  ks = iter(jax.random.split(jax.random.PRNGKey(seed), 2 + 4 * n_layer))
  normal = lambda shape: 0.02 * jax.random.normal(next(ks), shape, jnp.float32)
  params = {'wte': normal((vocab, d)), 'wpe': normal((t, d)), 'ln_f': jnp.ones((d,)),
            'h': [{'ln1': jnp.ones((d,)), 'ln2': jnp.ones((d,)), 'qkv': normal((d, 3 * d)), 'proj': normal((d, d)),
                   'fc': normal((d, 4 * d)), 'fc2': normal((4 * d, d))} for _ in range(n_layer)]}
  causal = np.tril(np.ones((t, t), bool))

  def ln(x, w):
    m = x.mean(-1, keepdims=True)
    v = jnp.square(x - m).mean(-1, keepdims=True)
    return (x - m) * jax.lax.rsqrt(v + 1e-5) * w

  def loss_fn(p, x, y):
    b = x.shape[0]
    h = (p['wte'][x] + p['wpe'][None]).reshape(b * t, d)  # 2-D [B*T, D] activations throughout
    for blk in p['h']:
      q, k, v = jnp.split(ln(h, blk['ln1']) @ blk['qkv'], 3, axis=-1)
      q, k, v = (a.reshape(b, t, n_head, d // n_head) for a in (q, k, v))
      s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d // n_head).astype(np.float32)
      w = jax.nn.softmax(jnp.where(causal, s, -1e30), axis=-1)
      h = h + jnp.einsum('bhqk,bkhd->bqhd', w, v).reshape(b * t, d) @ blk['proj']
      h = h + jax.nn.gelu(ln(h, blk['ln2']) @ blk['fc'], approximate=False) @ blk['fc2']
    logits = ln(h, p['ln_f']) @ p['wte'].T
    return optax.softmax_cross_entropy_with_integer_labels(logits, y.reshape(-1)).mean()

  tx = optax.chain(optax.clip_by_global_norm(clip),
                   optax.adamw(lr, b1=b1, b2=b2, weight_decay=wd, mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)))

  @jax.jit
  def train_step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  holder = {'p': params, 's': tx.init(params)}

  def step(x, y):
    holder['p'], holder['s'], loss = train_step(holder['p'], holder['s'], x, y)
    return loss

  return step


# ---------------------------------------------------------------------------------------------------- main
def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default=str(REPO / 'configs/shakespeare_char.py') + ':cpu')
  ap.add_argument('--vocab', type=int, default=65, help='tinyshakespeare characters (the char tokenizer gives 65)')
  ap.add_argument('--variants', default='pytorch,jaxformer,jaxformer_x4,plain_jax',
                  help='pytorch (needs torch), jaxformer, jaxformer_x4 (--steps_per_call steps per call), plain_jax')
  ap.add_argument('--steps_per_call', type=int, default=4, help='train.steps_per_call of the jaxformer_x4 variant')
  ap.add_argument('--rounds', type=int, default=8)
  ap.add_argument('--reps', type=int, default=15, help='timed steps per variant per round')
  ap.add_argument('--batches', type=int, default=8)
  ap.add_argument('--torch_1thread', action='store_true', help='also time PyTorch with torch.set_num_threads(1)')
  ap.add_argument('--malloc_defaults', action='store_true',
                  help="leave glibc malloc's thresholds alone (train.py raises them: jaxformer.training.host_memory)")
  args = ap.parse_args()
  from jaxformer.training import host_memory
  kept = False if args.malloc_defaults else host_memory.keep_freed_memory()  # the whole process: torch too

  try:
    import torch
    if 'pytorch' not in args.variants.split(','):
      torch = None
  except ImportError:  # still time the JAX variants; ratios are then to the first of them
    torch = None
    print('# torch is not installed: PyTorch rows skipped (pip install torch for them)')
  from jaxformer.cli import load_config_file
  config = load_config_file(args.config)
  config.model.vocab_size = args.vocab
  m, tr = config.model, config.train
  b, t, v = tr.batch_size, config.data.seq_len, args.vocab
  variants = [s for s in args.variants.split(',') if s]

  rng = np.random.default_rng(0)
  np_batches = []
  for _ in range(args.batches):  # token 0 is padding for jaxformer's loss weights; use 1..V-1
    x, y = rng.integers(1, v, (b, t)).astype(np.int32), rng.integers(1, v, (b, t)).astype(np.int32)
    np_batches.append({'tokens': x, 'targets': y, 'segment_ids': np.ones((b, t), np.int32),
                       'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()})

  runners = {}
  hp = dict(lr=float(tr.learning_rate), b1=float(tr.b1), b2=float(tr.b2), wd=float(tr.weight_decay),
            clip=float(tr.grad_clip_norm))
  if torch is not None:
    tstep = torch_step_fn(m.num_layers, m.num_heads, m.d_model, t, v, **hp)
    tb = [(torch.from_numpy(nb['tokens']).long(), torch.from_numpy(nb['targets']).long()) for nb in np_batches]
    runners['pytorch eager (nanoGPT)'] = lambda i: tstep(*tb[i % len(tb)]).item()
  if torch is not None and args.torch_1thread:  # less sensitive to other processes on the cores than 2 OpenMP threads
    tstep1 = torch_step_fn(m.num_layers, m.num_heads, m.d_model, t, v, **hp)
    nthreads = torch.get_num_threads()

    def one_thread(i):
      torch.set_num_threads(1)
      try:
        return tstep1(*tb[i % len(tb)]).item()
      finally:
        torch.set_num_threads(nthreads)
    runners['pytorch eager, 1 thread'] = one_thread

  jb = [jax.tree.map(jnp.asarray, nb) for nb in np_batches]
  per_call = {}  # runner name -> optimizer steps per timed call (times are divided by it)
  if 'jaxformer' in variants:
    jstep = jaxformer_step_fn(config)
    runners['jaxformer train step'] = lambda i, f=jstep: jax.block_until_ready(f(jb[i % len(jb)]))
  if 'jaxformer_x4' in variants:  # k steps per call; per-step time = call time / k (see `per_call` below)
    k = args.steps_per_call
    jstep4 = jaxformer_step_fn(config, steps_per_call=k)
    jb4 = [{key: jnp.stack([jb[(k * i + j) % len(jb)][key] for j in range(k)]) for key in jb[0]}
           for i in range(len(jb))]
    name = f'jaxformer, steps_per_call={k} (/{k})'
    runners[name] = lambda i, f=jstep4: jax.block_until_ready(f(jb4[i % len(jb4)]))
    per_call[name] = k
  if 'plain_jax' in variants:
    pstep = plain_jax_step_fn(m.num_layers, m.num_heads, m.d_model, t, v, **hp)
    runners['plain JAX, recommended form'] = (
        lambda i, f=pstep: jax.block_until_ready(f(jb[i % len(jb)]['tokens'], jb[i % len(jb)]['targets'])))

  for name, run in runners.items():  # warm up (compilation, allocator)
    for i in range(3):
      run(i)

  load0 = os.getloadavg()[0]
  times = {name: [] for name in runners}
  for r in range(args.rounds):
    for name, run in runners.items():
      for i in range(args.reps):
        t0 = time.perf_counter()
        run(i)
        times[name].append((time.perf_counter() - t0) / per_call.get(name, 1))
  load1 = os.getloadavg()[0]

  ref = 'pytorch eager (nanoGPT)' if torch is not None else next(iter(runners))
  tmin, tmed = min(times[ref]), statistics.median(times[ref])
  print(f'# CPU training step, {args.config}: {m.num_layers} layers, {m.num_heads} heads, d_model {m.d_model}, '
        f'context {t}, batch {b}, vocab {v}, AdamW')
  print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, '
        + (f'torch {torch.__version__} ({torch.get_num_threads()} threads); ' if torch is not None else '')
        + f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; malloc thresholds raised (host_memory): {kept}')
  print(f'# {args.rounds} interleaved rounds x {args.reps} steps; load average {load0:.1f} -> {load1:.1f}')
  print()
  print(f'| {"step":36s} | min ms | median ms | ratio to {"torch" if torch is not None else "row 1"} (min) '
        f'| ratio (median) |')
  print(f'|{"-" * 38}|-------:|----------:|---------------------:|---------------:|')
  for name, ts in times.items():
    mn, md = min(ts), statistics.median(ts)
    print(f'| {name:36s} | {mn * 1e3:6.2f} | {md * 1e3:9.2f} | {mn / tmin:20.2f} | {md / tmed:14.2f} |')


if __name__ == '__main__':
  main()
