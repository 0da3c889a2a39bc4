"""A look inside the model: `return_intermediates=True` (every layer's attention probabilities and block outputs) and
eval.py --mode=attention (heat maps / .npz arrays of them)."""
import builtins
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from jaxformer.apps import attention_map
from jaxformer.apps import evaluate as evaluation
from jaxformer.errors import UserError
from jaxformer.model import build_model
from test_scan import CASES, pair, inputs  # every arch (GQA, T5's relative bias), both layouts, padded rows

REPO = pathlib.Path(__file__).resolve().parents[1]
ATOL = 2e-5


def check_probabilities(weights, q_real, k_real, causal):
  """Rows of real queries sum to 1 over keys; masked keys (padding, the future when causal) and padding queries
  get exactly 0."""
  w = np.asarray(weights)  # [L, B, N, T, S]
  allowed = q_real[:, None, :, None] & k_real[:, None, None, :]
  if causal:
    allowed = allowed & np.tril(np.ones((w.shape[-2], w.shape[-1]), bool))
  allowed = np.broadcast_to(allowed[None], w.shape)
  assert (w[~allowed] == 0).all()
  sums = w.sum(-1)
  np.testing.assert_allclose(sums[np.broadcast_to(q_real[None, :, None], sums.shape)], 1.0, atol=1e-5)
  assert (sums[~np.broadcast_to(q_real[None, :, None], sums.shape)] == 0).all()


@pytest.mark.parametrize('arch,position,norm_position', CASES)
def test_intermediates_of_every_family_in_both_layouts(arch, position, norm_position):
  """Same logits with and without intermediates (the request runs the softmax path instead of the configured
  kernel: chunked, which never materialises the probabilities; xla for encoder_decoder, to keep compiles short);
  the scanned stack returns what the unrolled one does; shapes [layers, batch, heads, queries, keys]."""
  impl = 'xla' if arch == 'encoder_decoder' else 'chunked'
  unrolled, scanned = pair(arch, position, norm_position, attention_impl=impl)
  args = inputs(arch)
  (src, tgt), layers = (args if arch == 'encoder_decoder' else (args[0], args[0])), {'encoder': 3, 'decoder': 3}
  if arch == 'encoder_decoder':
    layers['decoder'] = 2
  plain = np.asarray(nnx.jit(lambda m, *a: m(*a))(unrolled, *args))
  with_intermediates = nnx.jit(lambda m, *a: m(*a, return_intermediates=True))
  logits, inter = with_intermediates(unrolled, *args)
  scanned_logits, scanned_inter = with_intermediates(scanned, *args)
  np.testing.assert_allclose(logits, plain, atol=ATOL)
  np.testing.assert_allclose(scanned_logits, plain, atol=ATOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=ATOL), inter, scanned_inter)

  stacks = {'encoder_only': ['encoder'], 'decoder_only': ['decoder']}.get(arch, ['encoder', 'decoder'])
  assert sorted(inter) == sorted(stacks)
  b, n, d = tgt.shape[0], 4, 16
  for stack in stacks:
    x = src if stack == 'encoder' else tgt
    t = x.shape[1]
    expected = {'self_attention': (layers[stack], b, n, t, t), 'hidden': (layers[stack], b, t, d)}
    if stack == 'decoder' and arch == 'encoder_decoder':
      expected['cross_attention'] = (layers[stack], b, n, t, src.shape[1])
    assert {k: v.shape for k, v in inter[stack].items()} == expected
    real = np.asarray(x) != 0
    if stack == 'decoder' and arch == 'encoder_decoder':
      real[:, 0] = True  # the decoder's start token is always real
    check_probabilities(inter[stack]['self_attention'], real, real, causal=stack == 'decoder')
    if 'cross_attention' in inter[stack]:
      check_probabilities(inter[stack]['cross_attention'], real, np.asarray(src) != 0, causal=False)


def test_one_layer_by_hand():
  """Layer 1 of a decoder_only GQA model: softmax(Q K^T / sqrt(head_dim)) from its input (layer 0's output, as
  intermediates report it), its norm and its q / k kernels, in numpy; query head h reads kv head h // 2."""
  cfg = default.get_config().model
  cfg.update(arch='decoder_only', position='learned', norm='layer', norm_position='pre', mlp='gelu', use_bias=True,
             num_layers=2, num_heads=4, num_kv_heads=2, d_model=16, d_ff=32, vocab_size=23, max_len=16,
             init_std=0.3, attention_impl='xla', scan_layers=False)  # blocks[1] below: the unrolled layout
  model = build_model(cfg, rngs=nnx.Rngs(params=3, dropout=4))
  tokens = jnp.asarray([[5, 9, 7, 11, 6, 8]], jnp.int32)
  _, inter = model(tokens, return_intermediates=True)
  block = model.decoder.blocks[1]
  x = np.asarray(block.attn_norm(inter['decoder']['hidden'][0]))[0]  # [T, D]
  attn = block.attn
  q = np.einsum('td,dnh->nth', x, np.asarray(attn.query[...])) + np.asarray(attn.query_bias[...])[:, None]
  k = np.einsum('td,dkh->kth', x, np.asarray(attn.key[...])) + np.asarray(attn.key_bias[...])[:, None]
  k = np.repeat(k, 2, axis=0)  # kv head of query head h: h // 2
  logits = np.einsum('nth,nsh->nts', q, k) / np.sqrt(q.shape[-1])
  t = x.shape[0]
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(inter['decoder']['self_attention'][1, 0]), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------- eval.py --mode=attention
# Tiny Hugging Face checkpoints (configs/hf.py:DIR evaluates their weights in an empty workdir: nothing to train).
HF = REPO / 'tests' / 'fixtures' / 'hf'


def hf_config(name, **decode):
  from configs import hf
  config = hf.get_config(str(HF / name))
  config.decode.update(**decode)
  return config


def eval_cli(workdir, *args):
  return subprocess.run([sys.executable, 'eval.py', f'--config=configs/hf.py:{HF / "gpt2"}', f'--workdir={workdir}',
                         '--mode=attention', *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_eval_cli_writes_the_arrays_with_the_tokens(tmp_path):
  out = tmp_path / 'attn.npz'
  proc = eval_cli(tmp_path / 'run', '--prompt=Hello world', f'--output={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = np.load(out)
  assert sorted(saved) == ['decoder_self_attention_layer0', 'decoder_self_attention_layer1', 'tokens']
  assert saved['tokens'].tolist() == ['H', 'e', 'll', 'o', '\u2581w', 'or', 'l', 'd']  # GPT-2: no BOS in front
  t = len(saved['tokens'])
  for layer in (0, 1):
    w = saved[f'decoder_self_attention_layer{layer}']
    assert w.shape == (4, t, t)  # heads, queries, keys
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert (w[:, np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]] == 0).all()  # causal
    assert (w[:, np.tril_indices(t)[0], np.tril_indices(t)[1]] > 0).all()


def test_eval_draws_a_png(tmp_path):
  out = tmp_path / 'attn.png'
  results = evaluation.run(hf_config('gpt2'), str(tmp_path / 'run'), mode='attention', prompt='Hello world, hi',
                           output=str(out))
  data = out.read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n'
  assert 10_000 < len(data) < 500_000
  assert results['shapes'] == {'decoder_self_attention': [2, 4, 11, 11]}


def test_user_errors_are_one_line(tmp_path):
  for args, message in ((['--output=a.npz'], '--mode=attention needs one --prompt'),
                        (['--prompt=' + 'ab ' * 20, f'--output={tmp_path / "a.npz"}'],
                         'but model.max_len=32, the longest input the model reads; shorten the prompt')):
    proc = eval_cli(tmp_path / 'run', *args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
    assert message in lines[0] and 'Traceback' not in proc.stdout + proc.stderr
  with pytest.raises(evaluation.EvalError, match='writes a picture'):
    evaluation.run(hf_config('gpt2'), str(tmp_path), mode='attention', prompt='Hi', output='a.txt')
  with pytest.raises(evaluation.EvalError, match='--target sets the decoder text of an encoder_decoder model'):
    evaluation.run(hf_config('gpt2'), str(tmp_path), mode='attention', prompt='Hi', target='Ho')


def test_matplotlib_is_the_optional_plot_extra_imported_only_to_draw():
  """Declared in the plot and test extras only; the one import sits inside attention_map's drawing function, so
  importing jaxformer (or eval.py's app) never needs it."""
  import ast
  import tomllib
  project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
  named = lambda specs: any(s.startswith('matplotlib') for s in specs)  # noqa: E731
  assert named(project['optional-dependencies']['plot']) and named(project['optional-dependencies']['test'])
  assert not named(project['dependencies'])
  found = []
  for path in (REPO / 'jaxformer').rglob('*.py'):
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
      if any(name.split('.')[0] == 'matplotlib' for name in names):
        inside = [f.name for f in functions if f.lineno <= node.lineno <= f.end_lineno]
        found.append(f'{path.relative_to(REPO)}:{inside[-1] if inside else "<module>"}')
  assert set(found) == {'jaxformer/apps/attention_map.py:_pyplot'}, found


def test_missing_matplotlib_is_one_clear_error(monkeypatch, tmp_path):
  real_import = builtins.__import__

  def no_matplotlib(name, *args, **kwargs):
    if name.split('.')[0] == 'matplotlib':
      raise ImportError(f'No module named {name!r}')
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_matplotlib)
  maps = [attention_map.AttentionMap('decoder_self_attention', np.ones((1, 1, 2, 2)) / 2, ['a', 'b'], ['a', 'b'])]
  with pytest.raises(UserError, match=r"needs matplotlib: pip install -e '\.\[plot\]'"):
    attention_map.draw(str(tmp_path / 'a.png'), maps)
  assert not (tmp_path / 'a.png').exists()


def test_encoder_decoder_maps_read_the_target_or_the_translation(tmp_path):
  """encoder_decoder (T5): encoder self-, decoder self- and cross-attention; the decoder side is decode.start_id +
  --target, or + the model's own translation of the source (decode.*)."""
  config = hf_config('t5_v1_1', max_len=4)
  out = tmp_path / 'a.npz'
  given = evaluation.run(config, str(tmp_path / 'run'), mode='attention', prompt='Hello', target='Hi you',
                         output=str(out))
  saved = np.load(out)
  src, tgt = saved['source_tokens'].tolist(), saved['target_tokens'].tolist()
  assert src[-1] == '<eos>' and tgt[0] == '<pad>'  # T5: source + </s>; the decoder starts from its pad id
  s, t = len(src), len(tgt)
  assert given['shapes'] == {'encoder_self_attention': [2, 4, s, s], 'decoder_self_attention': [2, 4, t, t],
                             'decoder_cross_attention': [2, 4, t, s]}
  assert saved['decoder_cross_attention_layer1'].shape == (4, t, s)
  np.testing.assert_allclose(saved['decoder_cross_attention_layer1'].sum(-1), 1.0, atol=1e-5)

  translated = evaluation.run(config, str(tmp_path / 'run'), mode='attention', prompt='Hello',
                              output=str(tmp_path / 'b.npz'))
  r = evaluation.restore(config, str(tmp_path / 'run'))
  ids = evaluation._decode_batches(r, sources=[r.tokenizer.source(r.tokenizer.encode('Hello')).tolist()])[0]
  assert 1 <= len(ids) <= 4
  assert translated['tokens']['decoder'] == attention_map.token_labels(r.tokenizer, [config.decode.start_id] + ids)
