"""The errors caused by the user's input, which train.py and eval.py print as one line (exit code 2), and the
config checks that raise them.

Everything that is the user's to fix -- the config, the data, a checkpoint, the workdir, the file system (permissions,
a full disk) -- raises a UserError whose message names the problem and the fix; `hint` is an optional second line.
ConfigError, DataError, WorkdirError and NonFiniteError live here; CheckpointError (training/checkpoint.py) and
EvalError (evaluation.py) beside the code that raises them. Anything else is a bug in jaxformer and keeps its
traceback. At the bottom of the import graph (imports nothing from the project), so every module that owns a
registry of choices can validate against it and every module can raise these.
"""
from __future__ import annotations

import difflib
import errno
import os
from typing import Any, Iterable

USER_ERROR_EXIT = 2  # exit status of train.py / eval.py for a UserError (argparse's convention for bad input)

# OSError errnos that are the file system's state, not a bug: reported as one line naming the path.
_FILE_SYSTEM_ERRNOS = {
    errno.ENOSPC: 'no space left on the device',
    errno.EDQUOT: 'disk quota exceeded',
    errno.EACCES: 'permission denied',
    errno.EPERM: 'operation not permitted',
    errno.EROFS: 'read-only file system',
}


class UserError(Exception):
  """A problem with the user's input. The message is one line naming the file/key and the fix."""

  def __init__(self, message: str, hint: str | None = None):
    super().__init__(message)
    self.hint = hint


class WorkdirError(UserError):
  """The workdir cannot be used: locked by another run, not writable, or holding a different run."""


class NonFiniteError(UserError):
  """The loss or gradient norm stopped being finite; the message names the step and the good checkpoints."""


def file_system_error(e: OSError) -> UserError | None:
  """An OSError caused by the file system's state (full, read-only, no permission) as a UserError, else None."""
  what = _FILE_SYSTEM_ERRNOS.get(e.errno)
  if what is None:
    return None
  path = e.filename or ''
  where = f' writing {path}' if path else ''
  fix = ('free some space or use a --workdir on another disk' if e.errno in (errno.ENOSPC, errno.EDQUOT)
         else 'use a --workdir you can write to')
  return UserError(f'{what}{where} ({os.strerror(e.errno)}); {fix}.')


class ConfigError(UserError, ValueError):
  """A config value that cannot work. The message names the key and the fix."""


class DataError(UserError, ValueError):
  """A data problem (source, split, file, tokenizer). The message is one line naming the file or key and the fix."""


class DataFileNotFoundError(DataError, FileNotFoundError):
  """A file or path named by the config does not exist."""


def check_choice(key: str, value: Any, choices: Iterable[str]) -> None:
  """Raises ConfigError unless `value` is one of `choices` (a registry's names, in its order)."""
  choices = tuple(choices)
  if value not in choices:
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f' (did you mean {close[0]!r}?)' if close else ''
    raise ConfigError(f'{key}={value!r} is not a valid choice{hint}; use one of: {", ".join(choices)}.')


def check_positive(key: str, value: Any, allow_zero: bool = False) -> None:
  ok = isinstance(value, int) and (value >= 0 if allow_zero else value > 0)
  if not ok:
    raise ConfigError(f'{key}={value!r} must be a {"non-negative" if allow_zero else "positive"} integer.')


def check_fraction(key: str, value: Any, upper_inclusive: bool = False) -> None:
  ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
  if not ok:
    raise ConfigError(f'{key}={value!r} must be in [0, 1{"]" if upper_inclusive else ")"}.')
