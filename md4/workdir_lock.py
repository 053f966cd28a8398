"""One writer per workdir: a lock file with its holder's host, pid, start time and a heartbeat.

`md4 train` holds W/md4.lock while it runs (in a multi-process run, process 0 holds it for all). A
second run on the same workdir is refused in one line naming the holder. A lock whose holder died is
taken over, with a message: on the same host when its pid is gone; on any host when its heartbeat,
rewritten every HEARTBEAT_S seconds by a thread, is older than STALE_S seconds (hosts' clocks must
agree to well within that, as NTP keeps them). A holder that has missed two heartbeats is probably
dead (a node that failed, whose job was requeued elsewhere): the new run waits for its lock to go
stale, up to STALE_S, instead of refusing.

No flock: advisory locks do not work on every shared filesystem clusters use. The lock file is
created with O_CREAT | O_EXCL, which is atomic on local filesystems and NFS v3 and later. A takeover
renames the stale file away first (only one contender's rename succeeds) and checks that what it
moved was the stale lock it judged. The heartbeat thread also checks that the file is still its own
and records a loss; `check`, which the trainer calls before every save, reads the file itself too:
a holder that was suspended for longer than STALE_S and whose lock was taken over stops at its next
save rather than write beside the new run, even if its heartbeat thread has not run since it
resumed.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

LOCK_NAME = "md4.lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0
_READ_RETRIES = 20  # A lock file just created by a contender may still be empty for a moment.


class WorkdirInUse(ValueError):
  """Another live process holds the workdir's lock."""


def _now_text(t: float) -> str:
  return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def describe_holder(holder: dict[str, Any]) -> str:
  return (f"{holder.get('command', 'md4')} on host {holder.get('host', '?')}, pid "
          f"{holder.get('pid', '?')}, running since {holder.get('started_text', '?')}")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process: alive.
    return True
  return True


class WorkdirLock:
  """Holds W/md4.lock from acquire() to release() (or the end of a `with` block)."""

  def __init__(self, workdir: str, command: str = "md4 train", *,
               log: Callable[[str], None] = print):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self.command = command
    self._log = log
    self._token = uuid.uuid4().hex
    self._started = time.time()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.lost: str | None = None  # Set by the heartbeat when another process took the lock.

  def _content(self) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
            "started": self._started, "started_text": _now_text(self._started),
            "heartbeat": time.time(), "token": self._token}

  def _read(self, path: str | None = None) -> dict[str, Any] | None:
    """The holder recorded in the lock file; None if there is no file; {} if it is unreadable."""
    for _ in range(_READ_RETRIES):
      try:
        with open(path or self.path) as f:
          text = f.read()
      except FileNotFoundError:
        return None
      try:
        holder = json.loads(text)
        if isinstance(holder, dict):
          return holder
      except json.JSONDecodeError:
        pass
      time.sleep(0.05)
    return {}

  def _create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(self._content(), f)
    except OSError:  # No space for even this: leave no empty lock behind.
      os.remove(self.path)
      raise
    return True

  def _stale_reason(self, holder: dict[str, Any]) -> str | None:
    """Why the lock of `holder` no longer protects a live run; None if it may."""
    if not holder:
      try:
        age = time.time() - os.path.getmtime(self.path)
      except FileNotFoundError:
        return "its lock file is gone"
      return f"its lock file is unreadable and {age:.0f} s old" if age > STALE_S else None
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
      return "that process is gone"
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > STALE_S:
      return f"its last heartbeat is {age:.0f} s old (stale after {STALE_S:.0f} s)"
    return None

  def acquire(self) -> None:
    """Takes the lock, or a stale one over (saying so); raises WorkdirInUse otherwise."""
    os.makedirs(self.workdir, exist_ok=True)
    waited = False
    while True:
      if self._create():
        self._start_heartbeat()
        return
      holder = self._read()
      if holder is None:  # Released between our two steps.
        continue
      reason = self._stale_reason(holder)
      if reason is not None:
        self._take_over(holder, reason)
        continue
      if not holder:
        raise WorkdirInUse(f"the workdir {self.workdir} is locked by {self.path}, which is "
                           f"unreadable: if no md4 train runs on {self.workdir}, delete that file")
      beat = time.time() - float(holder.get("heartbeat", time.time()))
      if beat <= 2 * HEARTBEAT_S:
        raise WorkdirInUse(
            f"the workdir {self.workdir} is in use by {describe_holder(holder)} (last heartbeat "
            f"{beat:.0f} s ago): wait for it to end or use another --workdir; its lock {self.path} "
            "is taken over automatically once that process is gone")
      if not waited:
        self._log(f"the lock of {self.workdir} is held by {describe_holder(holder)}, whose "
                  f"heartbeat stopped {beat:.0f} s ago: waiting until it is {STALE_S:.0f} s old to "
                  "take it over")
        waited = True
      time.sleep(HEARTBEAT_S / 2)

  def _take_over(self, holder: dict[str, Any], reason: str) -> None:
    """Removes the stale lock of `holder`, unless a contender replaced it meanwhile."""
    aside = f"{self.path}.stale-{self._token}"
    try:
      os.rename(self.path, aside)  # Of several contenders, one renames it.
    except FileNotFoundError:
      return
    moved = self._read(aside)
    if moved and moved.get("token") != holder.get("token"):
      # A contender replaced the stale lock between our read and our rename: give it back.
      os.rename(aside, self.path)
      return
    os.remove(aside)
    self._log(f"took over the lock of {self.workdir} from {describe_holder(holder)}: {reason}")

  def _start_heartbeat(self) -> None:
    self._thread = threading.Thread(target=self._beat, name="md4 workdir lock", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      self.heartbeat()

  def _lost_to(self, holder: dict[str, Any] | None) -> bool:
    """Whether the lock file, read as `holder`, is no longer ours (recorded in self.lost). An
    unreadable file ({}: being replaced) is not taken for a loss."""
    if holder == {}:
      return False
    if holder is None or holder.get("token") != self._token:
      self.lost = describe_holder(holder) if holder else "nobody (its file was removed)"
      self._stop.set()
      return True
    return False

  def heartbeat(self) -> None:
    """Rewrites the heartbeat (atomically: a reader sees the old or the new file), or records that
    another process holds the lock now."""
    holder = self._read()
    if holder == {} or self._lost_to(holder):  # Unreadable for a moment: try at the next beat.
      return
    tmp = f"{self.path}.{self._token}.tmp"
    try:
      with open(tmp, "w") as f:
        json.dump(self._content(), f)
      os.replace(tmp, self.path)
    except OSError:  # A full disk must not kill the run: the next beat tries again.
      pass

  def check(self) -> None:
    """Raises WorkdirInUse if another process has taken the lock over (read from the file now: the
    heartbeat thread may not have run since this process resumed from a suspension)."""
    if self.lost is None:
      self._lost_to(self._read())
    if self.lost is not None:
      raise WorkdirInUse(f"the lock of {self.workdir} was taken over by {self.lost} (this process "
                         f"looked dead to it for over {STALE_S:.0f} s): stopping without writing "
                         "beside it")

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    holder = self._read()
    if holder and holder.get("token") == self._token:
      os.remove(self.path)

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
