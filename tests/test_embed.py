"""eval.py --mode=embed: one vector per line (the final hidden states pooled over the real tokens, L2-normalised),
independent of the batch it is computed in; a retrieval check on a small committed paraphrase set."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import hf as hf_recipe
from jaxformer.apps import evaluate as evaluation

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures' / 'hf'
PARAPHRASES = [json.loads(line) for line in
               (REPO / 'tests' / 'fixtures' / 'embed' / 'paraphrases.jsonl').read_text().splitlines()]


@pytest.mark.parametrize('fixture,pooling', [('gpt2', 'last'), ('bert', 'first'), ('t5_v1_1', 'mean')])
def test_embeddings_are_pooled_hidden_states_whatever_the_batch(fixture, pooling, tmp_path):
  """A text's vector alone equals its vector in a batch with longer texts (padding never counts), equals the pooled
  final hidden states of an unpadded forward pass, and has unit norm."""
  config = hf_recipe.get_config(str(FIXTURES / fixture))
  config.decode.update(embed_pooling=pooling, batch_size=4)
  r = evaluation.restore(config, str(tmp_path / 'wd'))
  texts = [PARAPHRASES[0]['text'], PARAPHRASES[6]['paraphrase'] * 2, 'a']
  together = evaluation.embed_texts(r, texts)
  alone = evaluation.embed_texts(r, texts[:1])
  np.testing.assert_allclose(together[0], alone[0], atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(together, axis=-1), 1.0, atol=1e-5)
  tokens, segments, _ = evaluation.embedding_rows(r, texts[:1])
  n = int(segments[0].sum())
  ids = tokens[:, :n]
  if fixture == 't5_v1_1':
    h = np.asarray(r.model.encode(ids))[0]
  else:
    h = np.asarray(r.model(ids, return_hidden=True)[1])[0]
  want = {'first': h[0], 'last': h[n - 1], 'mean': h.mean(axis=0)}[pooling]
  np.testing.assert_allclose(alone[0], want / np.linalg.norm(want), atol=2e-5)


def test_eval_py_embed_retrieves_paraphrases(tmp_path):
  """Through eval.py: each query's nearest line (cosine) among all the paraphrases is its own paraphrase (T5's
  encoder, mean pooling; reordered words keep most of a line's tokens); .jsonl output, one line per input line."""
  lines = [row['text'] for row in PARAPHRASES] + [row['paraphrase'] for row in PARAPHRASES]
  (tmp_path / 'lines.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in lines))
  run = subprocess.run([sys.executable, str(REPO / 'eval.py'), f'--config={REPO / "configs" / "hf.py"}:'
                        f'{FIXTURES / "t5_v1_1"}', f'--workdir={tmp_path / "wd"}', '--mode=embed',
                        f'--input={tmp_path / "lines.jsonl"}', f'--output={tmp_path / "vectors.jsonl"}'],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  vectors = np.array([json.loads(line)['embedding'] for line in (tmp_path / 'vectors.jsonl').read_text().splitlines()])
  n = len(PARAPHRASES)
  assert vectors.shape == (2 * n, 32)
  nearest = (vectors[:n] @ vectors[n:].T).argmax(axis=1)
  np.testing.assert_array_equal(nearest, np.arange(n))
