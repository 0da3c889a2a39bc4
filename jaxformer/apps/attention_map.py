"""eval.py --mode=attention's output: the attention probabilities of every layer and head, as named arrays (.npz) or
as heat-map grids (a picture; rows = layers, columns = heads; one grid per kind: encoder self-attention, decoder
self-attention, cross-attention).

matplotlib is an optional extra (`pip install -e '.[plot]'`), imported only when a picture is drawn, so nothing else
in jaxformer pays for it; its absence is one `error:` line naming the extra.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxformer.errors import UserError

# (stack, intermediate) -> the map's name, in drawing order; a model has the ones its arch builds
KINDS = (('encoder', 'self_attention'), ('decoder', 'self_attention'), ('decoder', 'cross_attention'))
TITLES = {'encoder_self_attention': 'encoder self-attention', 'decoder_self_attention': 'decoder self-attention',
          'decoder_cross_attention': 'cross-attention (decoder queries, encoder keys)'}
PICTURE_FORMATS = ('.png', '.pdf', '.svg')  # what --output may end in besides .npz (matplotlib writes them)
MAX_LABELS = 48  # token labels per axis of a heat map; longer inputs label every k-th token


@dataclasses.dataclass
class AttentionMap:
  """One kind of attention of one input: probabilities [layers, heads, queries, keys] and each axis' token labels."""
  name: str  # e.g. 'decoder_self_attention'
  weights: np.ndarray
  query_tokens: list[str]
  key_tokens: list[str]


def attention_maps(intermediates: Mapping[str, Mapping[str, Any]], tokens: Mapping[str, Sequence[str]],
                   row: int = 0) -> list[AttentionMap]:
  """The attention maps of batch row `row` of `model(..., return_intermediates=True)`'s intermediates.

  tokens: the labels of each stack's input ('encoder' / 'decoder'); cross-attention's keys are the encoder's."""
  out = []
  for stack, kind in KINDS:
    if kind in intermediates.get(stack, {}):
      keys = tokens['encoder'] if kind == 'cross_attention' else tokens[stack]
      out.append(AttentionMap(f'{stack}_{kind}', np.asarray(intermediates[stack][kind][:, row], np.float32),
                              list(tokens[stack]), list(keys)))
  return out


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
  """Readable axis labels: each id's piece of text (a space shown as '▁', a newline as '\\n'), special ids by name."""
  pieces = tokenizer.token_utf8()  # one entry per id; b'' for the special ids
  names = {getattr(tokenizer, f'{name}_id', -1): f'<{name}>' for name in ('pad', 'bos', 'eos', 'unk', 'mask')}
  labels = []
  for i in (int(i) for i in ids):
    text = pieces[i].decode('utf-8', 'replace') if 0 <= i < len(pieces) else ''
    text = text or names.get(i, f'<{i}>')
    labels.append(text.replace(' ', '\u2581').replace('\n', '\\n').replace('\t', '\\t'))
  return labels


def save_npz(path: str, maps: Sequence[AttentionMap]) -> list[str]:
  """One array per layer and kind, '<kind>_layer<i>' [heads, queries, keys] (kind e.g. decoder_self_attention),
  plus each stack's tokens: 'tokens' for a one-stack model, 'source_tokens' / 'target_tokens' for
  encoder_decoder. Returns the keys written."""
  arrays: dict[str, np.ndarray] = {}
  for m in maps:
    for layer, weights in enumerate(m.weights):
      arrays[f'{m.name}_layer{layer}'] = weights
  stacks = {m.name.split('_')[0]: m.query_tokens for m in maps}
  if len(stacks) == 1:
    arrays['tokens'] = np.asarray(next(iter(stacks.values())), dtype=str)
  else:
    arrays['source_tokens'] = np.asarray(stacks['encoder'], dtype=str)
    arrays['target_tokens'] = np.asarray(stacks['decoder'], dtype=str)
  _make_parent(path)
  with open(path, 'wb') as f:  # a file object: np.savez would append .npz to a path that lacks it
    np.savez(f, **arrays)
  return list(arrays)


def _pyplot() -> Any:
  """matplotlib.pyplot on the Agg backend (files only, no display), or one clear error naming the extra."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("drawing attention maps needs matplotlib: pip install -e '.[plot]' (or write the arrays with "
                    '--output=FILE.npz).') from None
  return plt


def draw(path: str, maps: Sequence[AttentionMap], title: str = '') -> None:
  """Every map as a grid of heat maps (rows = layers, columns = heads; one colour scale, 0..1), the grids of an
  encoder_decoder one under the other, written to `path` (its extension picks the format: PICTURE_FORMATS)."""
  plt = _pyplot()
  heads = max(m.weights.shape[1] for m in maps)
  longest = max(max(m.weights.shape[2:]) for m in maps)
  cell = min(4.0, max(1.6, 0.16 * longest))  # inches per heat map: room for one label per token
  font = max(4.0, min(9.0, 0.75 * cell * 72 / min(longest, MAX_LABELS)))  # points: 3/4 of a label's share
  rows = [m.weights.shape[0] for m in maps]
  fig = plt.figure(figsize=(heads * cell + 1.5, sum(rows) * cell + 0.6 * len(maps) + (0.4 if title else 0)),
                   layout='constrained')
  if title:
    fig.suptitle(title, fontsize=10)
  subfigs = fig.subfigures(len(maps), 1, height_ratios=rows, squeeze=False)[:, 0]
  for sub, m in zip(subfigs, maps):
    sub.suptitle(TITLES.get(m.name, m.name), fontsize=9)
    axes = sub.subplots(m.weights.shape[0], heads, squeeze=False)
    for layer, row in enumerate(axes):
      for head, ax in enumerate(row):
        if head >= m.weights.shape[1]:
          ax.axis('off')
          continue
        image = ax.imshow(m.weights[layer, head], cmap='viridis', vmin=0.0, vmax=1.0, interpolation='nearest',
                          aspect='auto')
        _label_axes(ax, m, font, first_column=head == 0, bottom_row=layer == len(axes) - 1)
        if layer == 0:
          ax.set_title(f'head {head}', fontsize=8)
        if head == 0:
          ax.set_ylabel(f'layer {layer}\nquery', fontsize=8)
    sub.colorbar(image, ax=axes, shrink=0.6, label='attention probability')
  _make_parent(path)
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _label_axes(ax: Any, m: AttentionMap, font: float, *, first_column: bool, bottom_row: bool) -> None:
  """Token labels on the keys (x, bottom row) and queries (y, first column); at most MAX_LABELS per axis."""
  for axis, labels, shown in ((ax.xaxis, m.key_tokens, bottom_row), (ax.yaxis, m.query_tokens, first_column)):
    step = max(1, -(-len(labels) // MAX_LABELS))
    ticks = list(range(0, len(labels), step))
    axis.set_ticks(ticks)
    axis.set_ticklabels([labels[i] for i in ticks] if shown else [], fontsize=font)
  if bottom_row:
    ax.tick_params(axis='x', labelrotation=90)
    ax.set_xlabel('key', fontsize=8)


def _make_parent(path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
