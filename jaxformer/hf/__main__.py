"""python -m jaxformer.hf export --workdir=W --output=DIR [--checkpoint_step=N] [--adapter]: the command line of
jaxformer/apps/export.py (an application; the jaxformer.hf library below it knows nothing of training runs)."""
import sys

from jaxformer.apps import export

if __name__ == '__main__':
  export.main(sys.argv[1:])
