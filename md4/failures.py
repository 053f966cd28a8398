"""When storage or a process fails: the errors md4 raises, their causes in plain words, and the log
that keeps the details off the terminal.

The CLI prints one line, `md4 <command>: error: ...`, and exits 1. The traceback, and what Orbax's
and TensorStore's background threads report while a read or a write fails (dozens of "Event loop is
closed" from callbacks left running), go to an error log in the workdir, named in that line:
W/md4_errors.log (W/md4_errors.process_I.log for process I > 0 of a multi-process run), appended,
one dated header per event. A workdir that cannot be written (no permission, no space) gets its log
in the system's temporary directory instead.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import traceback
from typing import TextIO


class StorageError(Exception):
  """A checkpoint or another file of the workdir could not be read or written. The message is
  complete (what, where, the cause in plain words, the last good step); the cause's traceback
  belongs in the error log."""


class CheckpointUnreadable(StorageError):
  """A checkpoint that cannot be restored as it was saved: missing or unreadable files, arrays that
  differ from their checksums, non-finite parameters."""

  def __init__(self, step: int, directory: str, reason: str):
    super().__init__(f"the checkpoint at step {step} in {directory} cannot be restored: {reason}")
    self.step, self.directory, self.reason = step, directory, reason


class SaveFailed(StorageError):
  """Writing a checkpoint failed; what it had written is removed (or named if that failed too)."""


# TensorStore reports an OS error inside its message: "... File too large [os_error_code='27']".
_TS_OS_ERROR = re.compile(r"os_error_code='?(\d+)")
_MAX_CAUSE_CHARS = 300


def _chain(error: BaseException) -> list[BaseException]:
  """error, then what caused it (explicitly or implicitly), outermost first."""
  out = []
  while error is not None and error not in out:
    out.append(error)
    error = error.__cause__ or error.__context__
  return out


def describe(error: BaseException) -> str:
  """The cause of `error` in a few words: an OS error as its text and file ("no space left on device:
  /w/x"); otherwise the innermost message of the chain (where TensorStore and Orbax put the
  specific failure), its first line, shortened."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno is not None:
      text = os.strerror(e.errno).lower()
      return f"{text}: {e.filename}" if e.filename else text
  innermost = _chain(error)[-1]
  message = str(innermost).strip().splitlines()[0] if str(innermost).strip() else ""
  match = _TS_OS_ERROR.search(str(innermost))
  words = f"{os.strerror(int(match.group(1))).lower()}: " if match else ""
  if len(message) > _MAX_CAUSE_CHARS:
    message = message[:_MAX_CAUSE_CHARS] + "..."
  return f"{words}{type(innermost).__name__}: {message}" if message else type(innermost).__name__


def summary(error: BaseException) -> str:
  """An error in one line: the message of a StorageError or of a trainer's hook failure (complete
  already), an OSError's cause and file, anything else its type and the first line of its text."""
  train = sys.modules.get("md4.train")  # Only the trainer raises HookError; do not import it.
  if isinstance(error, StorageError) or (train is not None and isinstance(error, train.HookError)):
    return str(error)
  if isinstance(error, OSError):
    return describe(error)
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def is_out_of_space(error: BaseException) -> bool:
  """Whether the chain holds a full disk or quota (from Python or TensorStore)."""
  codes = (errno.ENOSPC, errno.EDQUOT)
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in codes:
      return True
    match = _TS_OS_ERROR.search(str(e))
    if match and int(match.group(1)) in codes:
      return True
  return False


class ErrorLog:
  """The error log of one command on one workdir; the file is created on the first write."""

  def __init__(self, workdir: str, command: str):
    self.workdir, self.command = workdir, command
    self.path: str | None = None
    self._lock = threading.Lock()

  def _name(self) -> str:
    index = _process_index()
    return "md4_errors.log" if index == 0 else f"md4_errors.process_{index}.log"

  def _open(self) -> TextIO:
    if self.path is not None:
      return open(self.path, "a")
    candidates = [os.path.join(self.workdir, self._name()),
                  os.path.join(tempfile.gettempdir(), f"md4_errors.{os.getpid()}.log")]
    for path in candidates:
      try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "a")
      except OSError:
        continue
      self.path = path
      return f
    raise OSError(f"cannot write an error log in {self.workdir} nor in {tempfile.gettempdir()}")

  def write(self, title: str, body: str) -> str | None:
    """Appends a dated entry; returns the log's path, or None if no file could be written."""
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
      with self._lock, self._open() as f:
        f.write(f"==== {stamp} {self.command} (host {socket.gethostname()}, pid {os.getpid()}): "
                f"{title}\n{body.rstrip()}\n\n")
    except OSError:
      return None
    return self.path

  def record(self, error: BaseException) -> str | None:
    """Appends error's traceback (with its causes); returns the log's path (None if unwritable)."""
    return self.write(f"{type(error).__name__}",
                      "".join(traceback.format_exception(error)))

  def capture_background_errors(self) -> None:
    """Sends to this log, instead of the terminal: exceptions nobody can raise (callbacks of
    TensorStore futures after their event loop closed), exceptions of threads, and the ERROR records
    libraries log through absl/logging."""
    def unraisable(info):
      if info.exc_value is not None:
        self.write(f"unraisable {info.exc_type.__name__} in {info.object!r}",
                   "".join(traceback.format_exception(info.exc_value)))

    def thread_error(args):
      if args.exc_value is not None:
        self.write(f"{args.exc_type.__name__} in thread {getattr(args.thread, 'name', '?')}",
                   "".join(traceback.format_exception(args.exc_value)))

    sys.unraisablehook = unraisable
    threading.excepthook = thread_error
    log = self

    class _ToErrorLog(logging.Filter):
      def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
          return True
        log.write(f"{record.levelname} from {record.name} ({record.pathname}:{record.lineno})",
                  logging.Formatter().format(record))
        return False

    from absl import logging as absl_logging  # The handler Orbax's and JAX's records go through.
    absl_logging.get_absl_handler().addFilter(_ToErrorLog())


def _process_index() -> int:
  """This process's index in a multi-process run (0 otherwise), without starting a backend."""
  try:
    import jax
    return jax.process_index() if jax.distributed.is_initialized() else 0
  except Exception:  # pylint: disable=broad-except
    return 0

