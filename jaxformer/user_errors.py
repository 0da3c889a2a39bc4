"""The family of errors caused by the user's input, which train.py and eval.py print as one line (exit code 2).

Everything that is the user's to fix — the config, the data, a checkpoint, the workdir, the file system (permissions,
a full disk) — raises a UserError (ConfigError, DataError, CheckpointError, EvalError, WorkdirError, NonFiniteError
are subclasses) whose message names the problem and the fix; `hint` is an optional second line. Anything else is a
bug in jaxformer and keeps its traceback. Imports nothing from the project: every module can raise these.
"""
from __future__ import annotations

import errno
import os

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
