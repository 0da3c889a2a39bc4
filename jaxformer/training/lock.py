"""One training run per workdir: DIR/train.lock holds the holder's host and pid while train.py runs.

A second train.py on the same workdir refuses with one line naming the holder. A lock left by a process that no
longer exists on this host (kill -9, a crash) is stale: it is replaced, with one line saying so. A lock from
another host cannot be checked from here; the message says how to remove it if that run is gone. eval.py only
reads and takes no lock. In multi-process runs only process 0 takes it.
"""
from __future__ import annotations

import json
import os
import socket
import time

from jaxformer.errors import WorkdirError, file_system_error

LOCK_FILE = 'train.lock'


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """Context manager: acquire on enter (WorkdirError if held by a live run), release on exit."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.enabled = enabled
    self.held = False

  def _create(self) -> bool:
    """Creates the lock file atomically; False if it already exists."""
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      json.dump({'host': socket.gethostname(), 'pid': os.getpid(), 'since': time.strftime('%Y-%m-%d %H:%M:%S')}, f)
    return True

  def acquire(self) -> None:
    if not self.enabled:
      return
    workdir = os.path.dirname(self.path)
    try:
      os.makedirs(workdir, exist_ok=True)
      if self._create():
        self.held = True
        return
      try:
        with open(self.path) as f:
          holder = json.load(f)
      except (OSError, ValueError):
        holder = {}  # being written right now, or garbage: treat as held unless it stays unreadable
      host, pid = holder.get('host'), holder.get('pid')
      if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        print(f'note: removed a stale lock of process {pid} (no longer running) in {self.path}', flush=True)
        os.remove(self.path)
        if self._create():
          self.held = True
          return
    except OSError as e:
      raise (file_system_error(e) or e) from None
    raise WorkdirError(
        f'--workdir={workdir} is in use by another train.py (host {host}, pid {pid}, since {holder.get("since")}); '
        f'wait for it to finish or use another --workdir.',
        hint=f'if that run is gone (e.g. on another machine), delete {self.path}.')

  def release(self) -> None:
    if self.held:
      self.held = False
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
