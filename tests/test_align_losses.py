"""jaxformer.align.losses against TRL's numbers (tests/fixtures/align/reference.json, made by make_reference.py with
trl's own trainer methods), plus properties that hold whatever TRL does."""
import inspect
import json
import math
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from jaxformer import settings
from jaxformer.align import losses

REFERENCE = pathlib.Path(__file__).parent / 'fixtures' / 'align' / 'reference.json'
TOL = {'rtol': 1e-5, 'atol': 1e-5}
# The functions run jitted (as training runs them): one compilation per function and shape is ~4x faster on CPU than
# compiling every primitive eagerly, and keeps this file to a few seconds. Only the arguments Python branches on are
# static (beta, gamma, clip_eps, ... are traced, so the cases share one compilation); the tests' own arithmetic is
# numpy for the same reason.
STATIC = {'loss_type', 'center_coef', 'num_generations', 'method', 'scale', 'clip_eps_high', 'kl_coef',
          'kl_bias_correction', 'kl_estimator'}


def _jitted(fn):
  return jax.jit(fn, static_argnames=[name for name in inspect.signature(fn).parameters if name in STATIC])


L = types.SimpleNamespace(**{name: _jitted(getattr(losses, name)) for name in (
    'token_logps', 'sequence_logps', 'dpo_losses', 'simpo_losses', 'reward_losses', 'group_advantages', 'rloo_rewards',
    'kl_per_token', 'clipped_policy_loss', 'rloo_policy_loss', 'ppo_value_mask', 'ppo_rewards', 'gae', 'ppo_losses')})


@pytest.fixture(scope='module')
def ref():
  with open(REFERENCE, encoding='utf-8') as f:
    return json.load(f)


def close(actual, expected, **tol):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), **(tol or TOL))


def f32(x):
  return np.asarray(x, np.float32)


# ------------------------------------------------------------------------------------------------ against TRL
def test_reference_records_versions(ref):
  assert ref['trl_version'] and ref['torch_version']
  assert ref['ppo']['source']['path'] == 'trl/experimental/ppo/ppo_trainer.py'


def test_token_and_sequence_logps_match_trl(ref):
  case = ref['token_logps']
  logits, targets = f32(case['logits']), np.asarray(case['targets'])
  per_token = L.token_logps(logits, targets)
  assert per_token.dtype == jnp.float32 and per_token.shape == targets.shape
  close(per_token, case['token_logps'])  # TRL's selective_log_softmax, unscored targets gathering id 0 as well
  sums, counts = L.sequence_logps(logits, targets, targets >= 0)
  close(sums, case['sums'])  # CPOTrainer.get_batch_logps
  close(counts, case['counts'])
  close(sums / counts, case['means'])


@pytest.mark.parametrize('index', range(5))
def test_dpo_losses_match_trl(ref, index):
  case, p = ref['dpo'][index], ref['pairs']
  losses, chosen_rewards, rejected_rewards = L.dpo_losses(
      f32(p['chosen_logps']), f32(p['rejected_logps']), f32(p['ref_chosen_logps']), f32(p['ref_rejected_logps']),
      np.asarray(p['chosen_tokens']), np.asarray(p['rejected_tokens']), beta=case['beta'],
      loss_type=case['loss_type'])
  close(losses, case['losses'])
  close(np.mean(losses), case['mean_loss'])
  close(chosen_rewards, case['chosen_rewards'])
  close(rejected_rewards, case['rejected_rewards'])


@pytest.mark.parametrize('index', range(2))
def test_simpo_losses_match_trl(ref, index):
  case, p = ref['simpo'][index], ref['pairs']
  losses, chosen_rewards, rejected_rewards = L.simpo_losses(
      f32(p['chosen_logps']), f32(p['rejected_logps']), np.asarray(p['chosen_tokens']),
      np.asarray(p['rejected_tokens']), beta=case['beta'], gamma=case['gamma'])
  close(losses, case['losses'])
  close(chosen_rewards, case['chosen_rewards'])
  close(rejected_rewards, case['rejected_rewards'])


def test_reward_losses_match_trl(ref):
  r = ref['reward']
  for case in r['cases']:
    margin = f32(r['margin']) if case['margin'] else None
    losses = L.reward_losses(f32(r['chosen_rewards']), f32(r['rejected_rewards']), margin,
                             center_coef=case['center_coef'])
    close(losses, case['losses'])
    close(np.mean(losses), case['mean_loss'])


def test_grpo_advantages_match_trl(ref):
  g = ref['groups']
  rewards = f32(g['rewards'])
  close(L.group_advantages(rewards, g['num_generations'], method='grpo'), g['grpo']['True'])  # TRL default: scaled
  for scale in (True, False):
    close(L.group_advantages(rewards, g['num_generations'], method='grpo', scale=scale), g['grpo'][str(scale)])


def test_rloo_rewards_and_advantages_match_trl(ref):
  g = ref['groups']
  for case in g['rloo']:
    rewards = L.rloo_rewards(f32(g['rewards']), f32(g['old_logps']), f32(g['ref_logps']), f32(g['mask']),
                             beta=case['beta'])
    close(rewards, case['rewards'])
    close(L.group_advantages(rewards, g['num_generations'], method='rloo', scale=case['scale']),
          case['advantages'])
    if not case['scale']:  # TRL's default normalize_advantages=False is the default here too
      close(L.group_advantages(rewards, g['num_generations'], method='rloo'), case['advantages'])


def test_kl_per_token_matches_trl(ref):
  close(L.kl_per_token(f32(ref['policy']['logps']), f32(ref['policy']['ref_logps'])), ref['kl_per_token'])


@pytest.mark.parametrize('index', range(4))
def test_clipped_policy_loss_matches_trl_grpo(ref, index):
  case, x = ref['grpo_loss'][index], ref['policy']
  loss, metrics = L.clipped_policy_loss(
      f32(x['logps']), f32(x['old_logps']), f32(x['ref_logps']), f32(x['advantages']), f32(x['mask']),
      clip_eps=case['clip_eps'], clip_eps_high=case['clip_eps_high'], kl_coef=case['kl_coef'],
      kl_bias_correction=case['kl_bias_correction'])
  close(loss, case['loss'])
  if case['kl'] is not None:  # TRL logs kl only when beta != 0
    close(metrics['kl'], case['kl'])
  for key in ('clip_fraction', 'clip_low_fraction', 'clip_high_fraction'):
    close(metrics[key], case[key])
  if case['kl_bias_correction'] and case['clip_eps_high'] is None:  # TRL's defaults are the defaults here too
    default_loss, _ = L.clipped_policy_loss(f32(x['logps']), f32(x['old_logps']), f32(x['ref_logps']),
                                            f32(x['advantages']), f32(x['mask']), clip_eps=case['clip_eps'],
                                            kl_coef=case['kl_coef'])
    close(default_loss, case['loss'])


@pytest.mark.parametrize('index', range(2))
def test_rloo_policy_loss_matches_trl(ref, index):
  case, x = ref['rloo_loss'][index], ref['policy']
  loss, metrics = L.rloo_policy_loss(f32(x['logps']), f32(x['old_logps']), f32(x['advantages']), f32(x['mask']),
                                     clip_eps=case['clip_eps'], clip_eps_high=case['clip_eps_high'])
  close(loss, case['loss'])
  for key in ('clip_fraction', 'clip_low_fraction', 'clip_high_fraction'):
    close(metrics[key], case[key])


def test_ppo_rewards_and_value_mask_match_trl(ref):
  p = ref['ppo']
  mask = f32(p['mask'])
  close(L.ppo_value_mask(mask), f32(p['value_mask']))
  for case in p['rewards']:
    # the raw log-probs (TRL fills their padding with 1.0 first; ppo_rewards must not need that)
    rewards = L.ppo_rewards(f32(p['scores']), f32(p['raw']['logprobs']), f32(p['raw']['ref_logprobs']), mask,
                            kl_coef=case['kl_coef'], kl_estimator=case['kl_estimator'])
    close(rewards, case['rewards'])


def test_gae_matches_trl_ppo(ref):
  p = ref['ppo']
  mask = f32(p['mask'])
  values = f32(p['raw']['values']) * np.asarray(L.ppo_value_mask(mask))  # TRL zeroes the values outside padding_mask_p1
  close(values, p['values'])
  for case in p['gae']:
    rewards = L.ppo_rewards(f32(p['scores']), f32(p['logprobs']), f32(p['ref_logprobs']), mask,
                            kl_coef=case['kl_coef'], kl_estimator=case['kl_estimator'])
    advantages, returns = L.gae(rewards, values, mask, gamma=case['gamma'], lam=case['lam'])
    close(advantages, case['advantages'])
    close(returns, case['returns'])


@pytest.mark.parametrize('index', range(2))
def test_ppo_losses_match_trl(ref, index):
  case, p = ref['ppo']['losses'][index], ref['ppo']
  pg_loss, vf_loss, metrics = L.ppo_losses(
      f32(p['new_logprobs']), f32(p['logprobs']), f32(p['advantages']), f32(p['new_values']), f32(p['values']),
      f32(p['returns']), f32(p['mask']), clip_eps=case['clip_eps'], value_clip=case['value_clip'],
      value_mask=f32(p['value_mask']))
  close(pg_loss, case['pg_loss'])
  close(vf_loss, case['vf_loss'])
  close(metrics['clip_fraction'], case['clip_fraction'])
  close(metrics['vf_clip_fraction'], case['vf_clip_fraction'])


def test_gpt2_dpo_reference_is_consistent(ref):
  """The stored GPT-2 numbers (for the lead's import check) hang together: sums of the per-token log-probs over the
  completion, and TRL's DPO loss on them equals dpo_losses."""
  g = ref['gpt2_dpo']
  per_token = np.asarray(g['per_token_logps'])
  mask = np.asarray(g['completion_mask'])[:, 1:]
  assert np.all(per_token[mask == 0] == 0)
  b = len(g['triples'])
  close(per_token.sum(1), g['chosen_logps'] + g['rejected_logps'])
  close(mask.sum(1), g['chosen_tokens'] + g['rejected_tokens'])
  for i in range(b):
    ids = g['prompt_ids'][i] + g['chosen_ids'][i]
    assert g['input_ids'][i][:len(ids)] == ids and g['chosen_ids'][i][-1] == g['eos_token_id']
    ids = g['prompt_ids'][i] + g['rejected_ids'][i]
    assert g['input_ids'][b + i][:len(ids)] == ids and g['rejected_ids'][i][-1] == g['eos_token_id']
  losses, _, _ = L.dpo_losses(f32(g['chosen_logps']), f32(g['rejected_logps']), f32(g['dpo']['ref_chosen_logps']),
                              f32(g['dpo']['ref_rejected_logps']), f32(g['chosen_tokens']), f32(g['rejected_tokens']),
                              beta=g['dpo']['beta'], loss_type=g['dpo']['loss_type'])
  close(np.mean(losses), g['dpo']['loss'])


def test_gradients_match_trl(ref):
  """d (mean) loss / d inputs, against torch autograd through the same TRL methods (a few cases)."""
  p = ref['pairs']
  rest = (f32(p['ref_chosen_logps']), f32(p['ref_rejected_logps']), np.asarray(p['chosen_tokens']),
          np.asarray(p['rejected_tokens']))
  for case in (ref['dpo'][0], ref['dpo'][3]):
    grad = jax.jit(jax.grad(lambda c, r, case=case: jnp.mean(losses.dpo_losses(
        c, r, *rest, beta=case['beta'], loss_type=case['loss_type'])[0]), argnums=(0, 1)))(
            f32(p['chosen_logps']), f32(p['rejected_logps']))
    close(grad[0], case['grad_chosen_logps'])
    close(grad[1], case['grad_rejected_logps'])
  x = ref['policy']
  old, ref_lp, adv, mask = f32(x['old_logps']), f32(x['ref_logps']), f32(x['advantages']), f32(x['mask'])
  for case in (ref['grpo_loss'][0], ref['grpo_loss'][2]):
    grad = jax.jit(jax.grad(lambda lp, case=case: losses.clipped_policy_loss(
        lp, old, ref_lp, adv, mask, clip_eps=case['clip_eps'], clip_eps_high=case['clip_eps_high'],
        kl_coef=case['kl_coef'], kl_bias_correction=case['kl_bias_correction'])[0]))(f32(x['logps']))
    close(grad, case['grad_logps'])
  case = ref['rloo_loss'][0]
  grad = jax.jit(jax.grad(lambda lp: losses.rloo_policy_loss(lp, old, adv, mask, clip_eps=case['clip_eps'])[0]))(
      f32(x['logps']))
  close(grad, case['grad_logps'])
  q, case = ref['ppo'], ref['ppo']['losses'][0]

  def ppo(lp, v):
    return losses.ppo_losses(lp, f32(q['logprobs']), f32(q['advantages']), v, f32(q['values']), f32(q['returns']),
                        f32(q['mask']), clip_eps=case['clip_eps'], value_clip=case['value_clip'],
                        value_mask=f32(q['value_mask']))

  grads = jax.jit(jax.grad(lambda lp, v: ppo(lp, v)[0] + ppo(lp, v)[1], argnums=(0, 1)))(
      f32(q['new_logprobs']), f32(q['new_values']))  # pg_loss depends on the log-probs only, vf_loss on the values
  close(grads[0], case['grad_logps'])
  close(grads[1], case['grad_values'])


# ------------------------------------------------------------------------------------------------ properties
# These reuse the reference's arrays (or their shapes), so most calls hit a compilation made above.
def _sigmoid_dpo(*args):
  return losses.dpo_losses(*args, beta=0.1, loss_type='sigmoid')[0]


def test_dpo_at_reference_policy(ref):
  p = ref['pairs']
  chosen, rejected = f32(p['chosen_logps']), f32(p['rejected_logps'])
  args = (chosen, rejected, chosen, rejected, np.asarray(p['chosen_tokens']), np.asarray(p['rejected_tokens']))
  losses, chosen_rewards, rejected_rewards = L.dpo_losses(*args, beta=0.1, loss_type='sigmoid')
  assert np.all(np.asarray(losses) == np.float32(math.log(2)))  # -log sigmoid(0) = ln 2
  assert np.all(np.asarray(chosen_rewards) == 0) and np.all(np.asarray(rejected_rewards) == 0)
  assert np.all(np.asarray(L.dpo_losses(*args, beta=0.1, loss_type='hinge')[0]) == 1.0)  # relu(1 - 0)
  close(L.dpo_losses(*args, beta=0.25, loss_type='ipo')[0], np.full(6, 4.0), rtol=1e-6)  # (0 - 1 / (2 * 0.25))**2
  # the gradient pushes the chosen up and the rejected down, by beta / 2 each
  grad = jax.jit(jax.grad(lambda c, r: jnp.sum(_sigmoid_dpo(c, r, *args[2:])), argnums=(0, 1)))(chosen, rejected)
  close(grad[0], np.full(6, -0.05), rtol=1e-6)
  close(grad[1], np.full(6, 0.05), rtol=1e-6)


def test_dpo_rejects_unknown_loss_type(ref):
  p = ref['pairs']
  chosen, rejected = f32(p['chosen_logps']), f32(p['rejected_logps'])
  with pytest.raises(ValueError, match='sigmoid'):
    L.dpo_losses(chosen, rejected, chosen, rejected, chosen, rejected, beta=0.1, loss_type='robust')


def test_simpo_is_length_normalised_and_reward_losses_margin():
  # doubling a response's length and its summed log-prob changes nothing
  a = L.simpo_losses(f32([-6.0, -12.0]), f32([-9.0, -9.0]), f32([3, 6]), f32([3, 3]), beta=2.0, gamma=1.0)
  close(a[0][0], a[0][1], rtol=1e-6)
  close(a[0][0], -math.log(1 / (1 + math.exp(-(2.0 * 1.0 - 1.0)))), rtol=1e-6)
  # a margin equal to the reward difference leaves the loss at ln 2; centring adds coef * (r_c + r_r)**2
  close(L.reward_losses(f32([3.0]), f32([1.0]), f32([2.0])), [math.log(2)], rtol=1e-6)
  close(L.reward_losses(f32([3.0]), f32([1.0]), f32([2.0]), center_coef=0.5), [math.log(2) + 8.0], rtol=1e-6)


def test_group_advantages_properties(ref):
  rewards = f32(np.random.default_rng(3).normal(size=16))  # the reference's shape: 4 groups of 4
  rewards[4:8] = 0.7  # a constant group
  for scale in (True, False):
    grpo = np.asarray(L.group_advantages(rewards, 4, method='grpo', scale=scale)).reshape(4, 4)
    assert np.all(grpo[1] == 0)  # a constant group has no signal
    close(grpo.sum(1), np.zeros(4), atol=1e-5)
  rloo = np.asarray(L.group_advantages(rewards, 4, method='rloo', scale=False)).reshape(4, 4)
  close(rloo.sum(1), np.zeros(4), atol=1e-5)  # leave-one-out advantages sum to 0 per group
  close(rloo[1], np.zeros(4), atol=1e-6)
  grouped = rewards.reshape(4, 4)
  close(rloo, grouped * 4 / 3 - grouped.sum(1, keepdims=True) / 3, atol=1e-6)  # = G/(G-1) (r - group mean)
  scaled = np.asarray(L.group_advantages(rewards, 4, method='rloo', scale=True))
  close(scaled.mean(), 0.0, atol=1e-6)
  close(scaled.std(ddof=1), 1.0, rtol=1e-3)  # batch-normalised (unbiased std, + 1e-4)
  # GRPO's std is the unbiased one: a group {0, 1} has std 1 / sqrt(2)
  half = 0.5 / (0.5 ** 0.5 + 1e-4)
  close(L.group_advantages(f32([0.0, 1.0] * 8), 2, method='grpo'), [-half, half] * 8)
  assert np.all(np.asarray(L.group_advantages(rewards, 1, method='grpo')) == 0)
  with pytest.raises(ValueError):
    L.group_advantages(rewards, 5, method='grpo')
  with pytest.raises(ValueError):
    L.group_advantages(rewards, 4, method='ppo')


def test_policy_losses_on_policy(ref):
  x = ref['policy']
  logps, adv, mask = f32(x['logps']), f32(x['advantages']), f32(x['mask'])
  loss, metrics = L.clipped_policy_loss(logps, logps, logps, adv, mask, clip_eps=0.2, kl_coef=0.04)
  assert float(metrics['clip_fraction']) == 0.0 and float(metrics['kl']) == 0.0
  close(metrics['ratio_mean'], 1.0, rtol=1e-6)
  # on policy, the loss is minus the token-weighted mean advantage
  close(loss, -np.sum(adv[:, None] * mask) / np.sum(mask), rtol=1e-6)
  no_ref, _ = L.clipped_policy_loss(logps, logps, None, adv, mask, clip_eps=0.2, kl_coef=0.0)  # TRL's default beta 0
  close(no_ref, loss, rtol=1e-6)
  with pytest.raises(ValueError, match='ref_logps'):
    L.clipped_policy_loss(logps, logps, None, adv, mask, clip_eps=0.2, kl_coef=0.04)
  loss, metrics = L.rloo_policy_loss(logps, logps, adv, mask, clip_eps=0.2)
  assert float(metrics['clip_fraction']) == 0.0
  close(loss, -np.mean(adv), rtol=1e-6)
  p = ref['ppo']
  logps, values, mask = f32(p['new_logprobs']), f32(p['new_values']), f32(p['mask'])
  _, vf_loss, metrics = L.ppo_losses(logps, logps, f32(p['advantages']), values, values, values, mask, clip_eps=0.2,
                                     value_clip=0.2, value_mask=f32(p['value_mask']))
  assert float(metrics['clip_fraction']) == 0.0 and float(metrics['vf_clip_fraction']) == 0.0
  assert float(vf_loss) == 0.0


def _grpo_loss(logps, old, adv, mask):
  return losses.clipped_policy_loss(logps, old, logps, adv, mask, clip_eps=0.2, kl_coef=0.0)[0]


def test_clipped_tokens_get_no_gradient(ref):
  x = ref['policy']
  logps, old, mask = f32(x['logps']), f32(x['old_logps']), f32(x['mask'])
  adv = np.where(np.arange(len(logps)) % 2 == 0, 1.0, -1.0).astype(np.float32)
  grad = np.asarray(jax.jit(jax.grad(_grpo_loss))(logps, old, adv, mask))
  ratio = np.exp(logps - old)
  a = adv[:, None]
  clipped = (((ratio > 1.2) & (a > 0)) | ((ratio < 0.8) & (a < 0))) & (mask > 0)
  free = ~clipped & (mask > 0)
  assert clipped.any() and free.any()
  assert np.all(grad[clipped] == 0)
  assert np.all(grad[free] != 0)
  assert np.all(grad[mask == 0] == 0)


def test_padding_values_do_not_matter(ref):
  x, p = ref['policy'], ref['ppo']
  logps, old, adv, mask = f32(x['logps']), f32(x['old_logps']), f32(x['advantages']), f32(x['mask'])
  ppo_mask, value_mask = f32(p['mask']), f32(p['value_mask'])
  rng = np.random.default_rng(7)

  def garbage(m):
    return np.where(m > 0, 0.0, rng.uniform(-40, 40, m.shape)).astype(np.float32)

  def everything(shift, ppo_shift):
    lp, ref_lp = f32(p['logprobs']) + ppo_shift, f32(p['ref_logprobs']) - ppo_shift
    rewards = L.ppo_rewards(f32(p['scores']), lp, ref_lp, ppo_mask, kl_coef=0.05)
    values = f32(p['values'])  # zero outside value_mask, as gae needs
    advantages, returns = L.gae(rewards, values, ppo_mask, gamma=1.0, lam=0.95)
    return (L.clipped_policy_loss(logps + shift, old + shift, old - shift, adv, mask, clip_eps=0.2, kl_coef=0.04),
            L.rloo_policy_loss(logps + shift, old + shift, adv, mask, clip_eps=0.2),
            L.rloo_rewards(adv, logps + shift, old - shift, mask, beta=0.05),
            L.ppo_losses(f32(p['new_logprobs']) + ppo_shift, lp, advantages, values, values, returns, ppo_mask,
                         clip_eps=0.2, value_clip=0.2, value_mask=value_mask), advantages)

  clean = everything(np.zeros_like(mask), np.zeros_like(ppo_mask))
  dirty = everything(garbage(mask), garbage(ppo_mask))
  for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty)):
    close(a, b, rtol=1e-6, atol=1e-6)


def test_gae_without_discount_is_reward_to_go_minus_value():
  # gamma = lam = 1, zero values: the raw advantage (the return) is the reward-to-go (the PPO reference's shape, 5 x 8)
  rewards, mask = np.zeros((5, 8), np.float32), np.zeros((5, 8), np.float32)
  rewards[0, :4], mask[0, :3] = [0.0, 0.0, 1.0, 0.0], 1
  rewards[1, :3], mask[1] = [0.5, -0.5, 2.0], 1
  advantages, returns = L.gae(rewards, np.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
  close(returns[:2], [[1.0, 1.0, 1.0] + [0.0] * 5, [2.0, 1.5, 2.0] + [0.0] * 5], atol=1e-6)
  assert np.all(np.asarray(advantages)[mask == 0] == 0)  # zero outside the mask
  valid = np.asarray(advantages)[mask > 0]
  close(valid.mean(), 0.0, atol=1e-6)  # whitened over the mask
  close(valid.std(ddof=1), 1.0, rtol=1e-4)
  # the score sits one past the last response token, or on the last position when the response fills the window
  scores = f32([3.0, 4.0, 0.0, 0.0, 0.0])
  rewards = np.asarray(L.ppo_rewards(scores, np.zeros_like(mask), np.zeros_like(mask), mask, kl_coef=0.05))
  assert rewards[0, 3] == 3.0 and rewards[1, 7] == 4.0 and np.count_nonzero(rewards) == 2


# ----------------------------------------------------------------------- TRL's DPOTrainer on the GPT-2 fixture
def test_gpt2_dpo_logps_and_loss_equal_trls():
  """jaxformer's import of tests/fixtures/hf/gpt2, its framing of the (prompt, chosen, rejected) texts and the DPO
  objective give TRL DPOTrainer's token ids, summed response log-probabilities and loss."""
  from tests.test_hf_reward import model_with  # the abstract-shape build: no jitted init to compile
  from jaxformer import hf
  from jaxformer.align import pairwise
  from jaxformer.data import rows as rows_lib
  from jaxformer.data.hf_tokenizer import HFTokenizer
  from jaxformer.data.sources import Preference

  with open(REFERENCE, encoding='utf-8') as f:
    ref = json.load(f)['gpt2_dpo']
  directory = str(pathlib.Path(__file__).resolve().parents[1] / ref['model_dir'])
  section = hf.model_section(directory)
  model = model_with(section, hf.load_params(directory, section))
  tok = HFTokenizer(directory)
  config = default.get_config()
  config.model.update(section)
  config.data.update(seq_len=len(ref['input_ids'][0]) - 1)
  config.align.method = 'dpo'
  task = rows_lib.PreferenceTask(settings.of(config), tok, train=False)
  pieces = task.tokenize([Preference(t['prompt'], t['chosen'], t['rejected'], 0.0) for t in ref['triples']])
  b = len(ref['triples'])
  batch = {k: [] for k in ('chosen_tokens', 'chosen_targets', 'rejected_tokens', 'rejected_targets')}
  for i, piece in enumerate(pieces):
    c_tokens, c_targets, r_tokens, r_targets, _ = task.item(piece, 0)
    for side, tokens, targets, trl in (('chosen', c_tokens, c_targets, i), ('rejected', r_tokens, r_targets, b + i)):
      n = int(sum(ref['attention_mask'][trl]))
      assert list(tokens) + [ref['eos_token_id']] == ref['input_ids'][trl][:n]  # TRL's ids: prompt + response + EOS
      scored = np.asarray(targets) != tok.unscored_target
      np.testing.assert_array_equal(scored, np.asarray(ref['completion_mask'][trl][1:n], bool))
      width = config.data.seq_len
      batch[f'{side}_tokens'].append(np.pad(tokens, (0, width - len(tokens))))
      batch[f'{side}_targets'].append(np.pad(targets, (0, width - len(targets)), constant_values=tok.unscored_target))
  arrays = {k: jnp.asarray(np.stack(v)) for k, v in batch.items()}
  for side in ('chosen', 'rejected'):
    lengths = np.asarray([len(p[0 if side == 'chosen' else 3]) for p in pieces])
    arrays[f'{side}_segment_ids'] = jnp.asarray((np.arange(config.data.seq_len)[None] < lengths[:, None]), jnp.int32)
    arrays[f'{side}_positions'] = jnp.broadcast_to(jnp.arange(config.data.seq_len), (b, config.data.seq_len)).astype(
        jnp.int32)
  lp = pairwise.response_logps(model, arrays, tok.unscored_target, deterministic=True)
  np.testing.assert_allclose(lp['chosen_logps'], ref['chosen_logps'], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(lp['rejected_logps'], ref['rejected_logps'], rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(lp['chosen_tokens'], ref['chosen_tokens'])
  dpo = ref['dpo']
  arrays.update(ref_chosen_logps=jnp.asarray(dpo['ref_chosen_logps']), ref_rejected_logps=jnp.asarray(
      dpo['ref_rejected_logps']))
  config.align.update(beta=dpo['beta'], dpo_loss=dpo['loss_type'])
  total, sums = pairwise.DPO().sums(model, arrays, settings.of(config), tok.unscored_target, deterministic=True)
  assert float(sums['weight_sum']) == b
  np.testing.assert_allclose(float(total) / b, dpo['loss'], rtol=1e-5)
