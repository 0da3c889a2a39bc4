"""Train a Transformer from a config file.

  python train.py --config=configs/gpt_tiny.py --workdir=/tmp/gpt_tiny [--config.section.key=value ...]

Running again on the same workdir resumes from its newest checkpoint. SIGTERM saves a checkpoint and exits 0.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxformer import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe file, e.g. configs/gpt_tiny.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics.jsonl, tensorboard/, config.json.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.quiet_logging()
  cli.train(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.check_overrides(sys.argv)
  app.run(main)
