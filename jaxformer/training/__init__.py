"""Training: optimizer, losses and sharded steps, orbax checkpoints and the training loop.

`run(config, workdir)` is the entry point (train.py is a thin CLI around it).
"""


def __getattr__(name: str):
  # `run` is imported on first use, not with the package: jaxformer.config imports training.optimizer (for the
  # optimizer and schedule registries), and the loop imports jaxformer.config, so an eager import would be a cycle.
  if name == 'run':
    from jaxformer.training.loop import run
    return run
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['run']
