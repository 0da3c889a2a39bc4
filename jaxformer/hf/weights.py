"""Reading and writing the safetensors files of a Hugging Face directory, with numpy only (no torch).

The format (https://github.com/huggingface/safetensors#format) is an 8-byte little-endian header size, a JSON header
{name: {dtype, shape, data_offsets}, "__metadata__": {...}} and the raw little-endian tensor bytes. It is read here
directly, memory-mapped, rather than through the `safetensors` package because its numpy API has no bfloat16, the
dtype most Hub checkpoints are stored in (ml_dtypes, which jax depends on, provides it).

Sharded checkpoints: model.safetensors.index.json maps each tensor name to the shard file holding it.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from jaxformer.errors import ConfigError

WEIGHTS_NAME = 'model.safetensors'
INDEX_NAME = 'model.safetensors.index.json'
DTYPES: dict[str, np.dtype] = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


def read_file(path: str) -> dict[str, np.ndarray]:
  """name -> array (memory-mapped, read-only) for one .safetensors file."""
  with open(path, 'rb') as f:
    (size,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(size))
  header.pop('__metadata__', None)
  data = np.memmap(path, dtype=np.uint8, mode='r', offset=8 + size) if header else np.zeros(0, np.uint8)
  tensors = {}
  for name, info in header.items():
    if info['dtype'] not in DTYPES:
      raise ConfigError(f'{path}: tensor {name} has dtype {info["dtype"]}, which jaxformer does not read.')
    start, end = info['data_offsets']
    tensors[name] = data[start:end].view(DTYPES[info['dtype']]).reshape(info['shape'])
  return tensors


def read_dir(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory: model.safetensors, or the shards its index names."""
  index = os.path.join(directory, INDEX_NAME)
  if os.path.isfile(index):
    with open(index, encoding='utf-8') as f:
      weight_map = json.load(f)['weight_map']
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      path = os.path.join(directory, shard)
      if not os.path.isfile(path):
        raise ConfigError(f'{index} names the shard {shard}, which is missing from {directory}.')
      tensors.update(read_file(path))
    return tensors
  path = os.path.join(directory, WEIGHTS_NAME)
  if not os.path.isfile(path):
    found = [f for f in os.listdir(directory) if f.endswith(('.bin', '.pt', '.h5', '.msgpack'))]
    hint = (f' (it has {", ".join(sorted(found))}: convert them to safetensors with transformers first)' if found
            else '')
    raise ConfigError(f'{directory} has no {WEIGHTS_NAME} or {INDEX_NAME}{hint}.')
  return read_file(path)


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes one .safetensors file (tensors in name order, 8-byte aligned header as the reference writer does)."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _NAMES:
      raise ConfigError(f'cannot write tensor {name} of dtype {a.dtype} to safetensors.')
    header[name] = {'dtype': _NAMES[a.dtype], 'shape': list(a.shape), 'data_offsets': [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    header['__metadata__'] = metadata
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())
  os.replace(tmp, path)
