"""Hugging Face import / export with model.scan_layers=True: the fixtures' logits (what transformers computed) from a
scanned model, and exports from scanned models (in Python and from a scanned workdir) that re-import unchanged."""
import ml_collections
import numpy as np
import pytest

from jaxformer import hf, sharding as shd
from jaxformer.training import state as state_lib
from jaxformer.hf import weights
from jaxformer.apps.export import export
from jaxformer.model import layout_convert
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.apps.train import run
from tests.test_hf import FIXTURES, expected, logits_of, random_model, tiny_section
from tests.test_train import tiny

NAMES = ('gpt2', 'bert', 't5_v1_1', 'llama')


def scanned_section(name: str) -> ml_collections.ConfigDict:
  section = hf.model_section(str(FIXTURES / name))
  section.scan_layers = True
  return section


@pytest.mark.parametrize('name', NAMES)
def test_scanned_import_gives_transformers_logits_and_saves_back_unchanged(name, tmp_path):
  section, model = hf.load(str(FIXTURES / name), scanned_section(name))
  params = hf.model_params(model)
  assert any('.blocks.layers.' in k for k in params) and not any('.blocks.0.' in k for k in params)
  e = expected(name)
  want = np.asarray(e['logits'], np.float32)
  got = logits_of(model, section, e)[..., :want.shape[-1]]
  if section.arch == 'encoder_only':
    real = np.asarray(e['attention_mask'], bool)
    got, want = got[real], want[real]
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  # export from the scanned model: the original tensors, under their Hugging Face names
  hf.save(model, section, str(tmp_path))
  original, saved = weights.read_dir(str(FIXTURES / name)), weights.read_dir(str(tmp_path))
  assert saved.keys() <= original.keys()
  for key, value in saved.items():
    np.testing.assert_array_equal(value, np.asarray(original[key], np.float32), err_msg=key)


def test_scanned_export_round_trips_in_either_layout(tmp_path):
  section = tiny_section(scan_layers=True)
  model = random_model(section)
  hf.save(model, section, str(tmp_path))
  again = hf.load_params(str(tmp_path), section)  # scanned
  before = hf.model_params(model)
  assert again.keys() == before.keys() and all(np.array_equal(again[k], before[k]) for k in before)
  flat = hf.load_params(str(tmp_path), tiny_section(scan_layers=False))  # unrolled: the same numbers, per layer
  per_layer = layout_convert.to_flat_layout(before, scanned=False)
  assert flat.keys() == per_layer.keys() and all(np.array_equal(flat[k], per_layer[k]) for k in flat)
  assert any('.blocks.1.' in k for k in flat)


def test_export_from_a_scanned_workdir(tmp_path):
  """`python -m jaxformer.hf export` on a workdir trained with scan_layers=True (export() is what its CLI runs)."""
  config = tiny('gpt_tiny', num_steps=2, eval_every=2, eval_steps=1)
  config.model.update(num_layers=2, scan_layers=True, use_bias=False)
  workdir, out = tmp_path / 'run', tmp_path / 'hf'
  run(config, str(workdir))
  assert export(str(workdir), str(out)) == 'llama'
  saved = ml_collections.ConfigDict(ckpt_lib.saved_config(str(workdir)))
  model, _ = state_lib.restore_model(str(workdir), saved, shd.make_mesh(saved))
  trained = layout_convert.to_flat_layout(hf.model_params(model), scanned=False)
  saved.model.scan_layers = False
  exported = hf.load_params(str(out), saved.model)
  assert exported.keys() == trained.keys() and all(np.array_equal(exported[k], trained[k]) for k in trained)
