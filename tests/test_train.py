"""End-to-end training through jaxformer.training.run on the built-in data, plus the loss functions."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import bert_tiny, gpt_tiny, t5_tiny
from jaxformer.apps.train import run
from jaxformer.training.step import token_losses
from jaxformer.training.writers import read_metrics

RECIPES = {'gpt_tiny': gpt_tiny, 'bert_tiny': bert_tiny, 't5_tiny': t5_tiny}


def tiny(recipe: str, **train):
  """The recipe shrunk for a CPU test: one 32-wide layer, short rows, one device."""
  config = RECIPES[recipe].get_config()
  config.model.update(num_layers=1, num_decoder_layers=1, d_model=32, num_heads=2, d_ff=64)
  if config.model.arch == 'encoder_decoder':
    config.data.update(seq_len=48, src_seq_len=16)
    config.model.max_len = 48
  else:
    config.data.update(seq_len=32)
    config.model.max_len = 32
  config.data.prefetch = 1
  config.mesh.update(data=1, fsdp=1, tensor=1, distributed='off')
  config.checkpoint.update(every_steps=1000, async_save=False)
  config.train.update(batch_size=8, num_steps=40, warmup_steps=5, learning_rate=1e-2, log_every=5, eval_every=1000,
                      eval_steps=2)
  config.train.update(**train)
  return config


@pytest.mark.parametrize('recipe', ['gpt_tiny', 'bert_tiny', 't5_tiny'])
def test_loss_falls(recipe, tmp_path):
  config = tiny(recipe, log_every=1)
  result = run(config, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  train = [r for r in rows if 'train_loss' in r]
  evals = [r for r in rows if 'eval_loss' in r]
  assert [r['step'] for r in train] == list(range(1, 41))
  first = np.mean([r['train_loss'] for r in train[:3]])
  last = np.mean([r['train_loss'] for r in train[-5:]])
  assert last < first - 0.25, (recipe, first, last)
  # an eval row at the end, consistent with its perplexity
  assert evals and evals[-1]['step'] == 40
  assert evals[-1]['eval_perplexity'] == pytest.approx(np.exp(evals[-1]['eval_loss']), rel=1e-5)
  assert result['eval_loss'] == pytest.approx(evals[-1]['eval_loss'])
  for key in ('learning_rate', 'grad_norm', 'tokens_per_sec', 'mfu'):
    assert train[-1][key] is not None and train[-1][key] > 0, key
  # resolved config (vocab from the tokenizer), a final checkpoint, tensorboard events
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['model']['vocab_size'] > 5 and saved['model']['arch'] == config.model.arch
  assert os.path.isdir(tmp_path / 'checkpoints' / '40')
  assert any(f.startswith('events') for f in os.listdir(tmp_path / 'tensorboard'))


def _reference_losses(logits, targets, ls, z):
  logits = np.asarray(logits, np.float64)
  lse = np.log(np.exp(logits).sum(-1))
  logp = logits - lse[..., None]
  v = logits.shape[-1]
  onehot = np.eye(v)[targets]
  ce = -(onehot * logp).sum(-1)
  soft = onehot * (1 - ls) + (1 - onehot) * ls / (v - 1)
  kl = (soft * (np.log(np.where(soft > 0, soft, 1)) - logp)).sum(-1)
  return ce, kl + z * lse ** 2


@pytest.mark.parametrize('ls,z', [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
def test_token_losses_match_reference(ls, z):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(2, 5))
  ce, objective = token_losses(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=ls, z_loss=z)
  ref_ce, ref_obj = _reference_losses(logits, targets, ls, z)
  np.testing.assert_allclose(ce, ref_ce, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(objective, ref_obj, rtol=1e-5, atol=1e-5)
