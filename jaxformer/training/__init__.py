"""Training library: losses and the jitted, sharded steps (step.py), optimizers (optimizer.py), orbax checkpoint
I/O (checkpoint.py), where a run's parameters come from (state.py), the workdir lock and metric writers.

The training loop itself is an application: jaxformer/apps/train.py (`run(config, workdir)`).
"""
