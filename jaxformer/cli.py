"""What train.py and eval.py share: recipe loading, misspelt --config.* keys as one clear line, quiet logging, and
the boundary where a user error (bad config, data, checkpoint, workdir) becomes one line on stderr.

This module imports only light packages at the top: train.py --help must stay fast, so jax and the rest of
jaxformer are imported when a command actually runs (see `train` and `evaluate`).
"""
from __future__ import annotations

import difflib
import errno
import logging as std_logging
import importlib.util
import os
import re
import sys
import threading
from typing import Any, Callable, NoReturn, Sequence

import ml_collections
from absl import flags, logging

from jaxformer.errors import USER_ERROR_EXIT, UserError, file_system_error


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Loads a recipe like config_flags does: `path[:arg]`, calling get_config() (or get_config(arg))."""
  path, _, arg = path.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config={path}: no such file; recipes live in configs/ (e.g. configs/gpt_tiny.py).')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if repo not in sys.path:
    sys.path.insert(0, repo)
  spec = importlib.util.spec_from_file_location('_jaxformer_recipe', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  keys = []
  for key, value in config.items():
    full = f'{prefix}{key}'
    keys.append(full)
    if isinstance(value, ml_collections.ConfigDict):
      keys += leaf_keys(value, full + '.')
  return keys


def unknown_override(config: ml_collections.ConfigDict, argv: Sequence[str], flag: str = 'config') -> str | None:
  """The error line for the first --config.<key>=... whose key is not in `config`, or None if all exist."""
  keys = leaf_keys(config)
  known = set(keys)
  for arg in argv[1:]:
    if not arg.startswith(f'--{flag}.'):
      continue
    key = arg[len(flag) + 3:].split('=', 1)[0]
    if key in known:
      continue
    parent, _, leaf = key.rpartition('.')
    if parent in known or not parent:  # a wrong last component: compare with its siblings
      siblings = [k for k in keys if k.rpartition('.')[0] == parent]
      close = difflib.get_close_matches(leaf, [k.rpartition('.')[2] for k in siblings], n=3, cutoff=0.5)
      close = [f'{parent}.{c}' if parent else c for c in close]
    else:  # a wrong section: the same key in the closest section, else whole keys of the same depth
      siblings = [k for k in keys if '.' not in k]
      section = difflib.get_close_matches(parent, [k for k in keys if k.count('.') == parent.count('.')], n=1,
                                          cutoff=0.6)
      if section and f'{section[0]}.{leaf}' in known:
        close = [f'{section[0]}.{leaf}']
      else:
        close = difflib.get_close_matches(key, [k for k in keys if k.count('.') == key.count('.')], n=3, cutoff=0.6)
    if close:
      hint = f'did you mean {" or ".join(f"--{flag}.{c}" for c in close)}?'
    else:
      hint = f'valid keys here: {", ".join(siblings[:24])}'
    return f'unknown config key --{flag}.{key}; {hint}'
  return None


def check_overrides(argv: Sequence[str], flag: str = 'config') -> None:
  """Exits with status 2 and one line on stderr when a --config.<key> override names no key of the recipe."""
  path = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(f'--{flag}='):
      path = arg.split('=', 1)[1]
    elif arg == f'--{flag}' and i + 1 < len(argv):
      path = argv[i + 1]
  if path is None:
    return
  try:
    config = load_config_file(path)
  except FileNotFoundError as e:
    fail(UserError(str(e)))
  except ValueError as e:  # the recipe rejects its argument (configs/default.apply_variant): the user's input
    fail(UserError(f'--config={path}: {e}'))
  message = unknown_override(config, argv, flag)
  if message:
    fail(UserError(message))


def explicit_overrides(argv: Sequence[str], flag: str = 'config') -> list[str]:
  """The dotted keys given as --config.<key>=... on the command line (eval.py: these win over the saved config)."""
  return [arg[len(flag) + 3:].split('=', 1)[0] for arg in argv[1:] if arg.startswith(f'--{flag}.')]


def quiet_logging() -> None:
  """Library noise off unless --verbosity was given: absl at WARNING (our data warnings stay visible); orbax's
  records dropped (it logs every file at INFO, its failures with tracebacks: those reach the user as our one-line
  errors, and its "read only" warnings describe what we asked for); TFDS's "Downloading and preparing" (nothing
  is downloaded) and TensorFlow/TensorStore C++ logs below ERROR. Our own messages are printed, so they show."""
  if flags.FLAGS['verbosity'].present:
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  std_logging.getLogger('tensorflow_datasets').setLevel(std_logging.ERROR)
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(_not_library_noise)
  std_logging.getLogger('absl').addFilter(_not_library_noise)  # also when absl's handler is not installed


def _not_library_noise(record: std_logging.LogRecord) -> bool:
  """False for orbax's records (its failures reach the user as our one-line errors; its read-only warnings
  describe what we asked for)."""
  return f'{os.sep}orbax{os.sep}' not in record.pathname


def fail(error: UserError) -> NoReturn:
  """Prints a user error as `error: <message>` (+ `hint: <hint>`) on stderr and exits with status 2."""
  # from here on nothing but these lines: background writers failing for the same cause (orbax's async checkpoint
  # threads on a full disk) would log tracebacks of their own before os._exit below; what they raise is held by
  # `guarded` (_HeldBackgroundErrors) and dropped by os._exit
  std_logging.disable(std_logging.CRITICAL)
  print(f'error: {error}', file=sys.stderr, flush=True)
  if error.hint:
    print(f'hint: {error.hint}', file=sys.stderr, flush=True)
  sys.stdout.flush()
  # os._exit, not sys.exit: after a fatal user error, background writers (orbax's async save, tensorboardX's atexit
  # flush) hitting the same cause (e.g. the full disk) would print their own tracebacks on the way out. Finished
  # checkpoints are already on disk; there is nothing left to write.
  os._exit(USER_ERROR_EXIT)


# TensorStore (orbax's array writer) reports file-system failures as ValueErrors (or wrapped): a status code and the
# errno in the text ('... No space left on device [os_error_code='28']').
_TENSORSTORE_STATUS = {'RESOURCE_EXHAUSTED': errno.ENOSPC, 'PERMISSION_DENIED': errno.EACCES}


def _tensorstore_errno(text: str) -> int | None:
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return int(code.group(1))
  return next((n for status, n in _TENSORSTORE_STATUS.items() if text.startswith(status + ':')), None)


def _file_system_cause(e: BaseException) -> UserError | None:
  """The UserError for a full disk / permission problem anywhere in e's chain of causes, else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and (user_error := file_system_error(e)) is not None:
      return user_error
    if not isinstance(e, OSError) and (code := _tensorstore_errno(str(e))) is not None:
      path = re.search(r'"(/[^"]+)"', str(e))
      user_error = file_system_error(OSError(code, os.strerror(code), path.group(1) if path else None))
      if user_error is not None:
        return user_error
    e = e.__cause__ or e.__context__
  return None


class _HeldBackgroundErrors:
  """While a command runs, errors that background threads report are held, not printed, until it ends:
  threading.excepthook (Python threads), sys.excepthook and sys.unraisablehook (what C++ threads calling back into
  Python report through, e.g. TensorStore's writes for orbax: "call_soon_threadsafe ... Event loop is closed").
  A command that fails with a user error drops them (the same fault, e.g. a full disk, seen from the async
  checkpoint writer, which would put tracebacks around the one-line error); any other ending prints them as Python
  would have. The main thread's own uncaught exception is raised after the hooks are restored, so it prints."""

  _HOOKS = ((threading, 'excepthook'), (sys, 'excepthook'), (sys, 'unraisablehook'))

  def __init__(self) -> None:
    self.held: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
    self.previous = [getattr(owner, name) for owner, name in self._HOOKS]

  def _holder(self, previous: Callable[..., Any]) -> Callable[..., None]:
    return lambda *args: self.held.append((previous, args))

  def __enter__(self) -> _HeldBackgroundErrors:
    for (owner, name), previous in zip(self._HOOKS, self.previous):
      setattr(owner, name, self._holder(previous))
    return self

  def __exit__(self, *exc: Any) -> None:
    for (owner, name), previous in zip(self._HOOKS, self.previous):
      setattr(owner, name, previous)
    for hook, args in self.held:
      hook(*args)


def guarded(fn: Callable[[], Any]) -> Any:
  """Runs fn behind the user-error boundary: a UserError, a file-system OSError (disk full, permissions) or a
  missing file is one line and exit status 2; anything else is a bug and keeps its traceback. Exceptions in
  background threads are held until fn ends (`_HeldBackgroundErrors`)."""
  with _HeldBackgroundErrors():
    return _guarded(fn)


def _guarded(fn: Callable[[], Any]) -> Any:
  try:
    return fn()
  except UserError as e:
    fail(e)
  except FileNotFoundError as e:
    fail(UserError(str(e)))
  except Exception as e:  # noqa: BLE001 - re-raised unless the file system caused it (orbax wraps its OSErrors)
    user_error = _file_system_cause(e)
    if user_error is None:
      raise
    fail(user_error)
  except KeyboardInterrupt:  # Ctrl-C before training installed its handler (or a second one): nothing to save
    print('interrupted.', file=sys.stderr, flush=True)
    sys.exit(130)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """train.py's one call: jaxformer.apps.train.run (apps/align.run for align.method=grpo / rloo / ppo) behind the
  user-error boundary. Ctrl-C saves a checkpoint (like
  SIGTERM) and then exits with status 130."""
  from jaxformer import align  # late: keeps train.py --help fast
  from jaxformer.apps import align as align_app
  from jaxformer.apps import train as train_app
  method = align.METHODS.get(str(config.align.method)) if 'align' in config else None
  app = align_app if method is not None and method.online else train_app  # the online align methods' loop
  result = guarded(lambda: app.run(config, workdir))
  if result.get('stopped_by') == 'SIGINT':
    sys.exit(130)
  return result


def evaluate(config: ml_collections.ConfigDict, workdir: str, argv: Sequence[str], **kwargs: Any) -> dict[str, Any]:
  """eval.py's one call: jaxformer.apps.evaluate.run behind the user-error boundary; argv gives the overrides."""
  from jaxformer.apps import evaluate as eval_app  # late: keeps eval.py --help fast
  return guarded(lambda: eval_app.run(config, workdir, overrides=explicit_overrides(argv), **kwargs))
