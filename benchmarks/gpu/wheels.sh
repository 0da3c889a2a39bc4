#!/usr/bin/env bash
# Builds .whl/: the Python 3.12 wheels that the lent GPU machines' image lacks for jaxformer (it has jax 0.11.2,
# flax, optax, orbax-checkpoint, sacrebleu, sentencepiece, absl-py, etils, protobuf, pyarrow, ... but not these),
# and .data/: a copy of ../shared/data, which does not travel to the device. Both are git-ignored; name them in
# the device call's `carry`. Run here, where the package index is reachable. ~10 MB of wheels + ~6 MB of data.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PY312:-}" ]; then  # the device image's Python is 3.12: wheels must match it
  if python3.12 -V >/dev/null 2>&1; then PY312=python3.12; else PY312=/root/.pyenv/versions/3.12.1/bin/python; fi
fi
rm -rf .whl && mkdir -p .whl
"$PY312" -m pip wheel -q --no-deps -w .whl \
  "ml-collections>=1.1.0,<2" "tensorflow-datasets==4.9.10" "array-record>=0.8.6,<0.9" "tensorboardX>=2.6.5,<3" \
  dm-tree immutabledict promise simple-parsing docstring-parser tensorflow-metadata googleapis-common-protos \
  termcolor toml "jinja2>=3.1" markupsafe
rm -rf .data && mkdir -p .data && cp -r ../shared/data/tinyshakespeare ../shared/data/multi30k .data/
du -sh .whl .data
