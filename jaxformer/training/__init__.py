"""Training: optimizer, losses and sharded steps, orbax checkpoints and the training loop.

`run(config, workdir)` is the entry point (train.py is a thin CLI around it).
"""
from jaxformer.training.loop import run

__all__ = ['run']
