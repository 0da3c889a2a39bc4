"""The applications: what train.py, eval.py and `python -m jaxformer.hf` run, on top of the library.

  train.py      run(config, workdir): resolve, build or restore the state, the training loop
  evaluate.py   run(config, workdir, mode=...): restore a checkpoint, one short function per eval.py mode
  export.py     export(workdir, output): a training run -> a Hugging Face directory

Nothing below this package imports it (tests/test_layering.py).
"""
