"""Paths as people type them: `~` expanded and relative paths made absolute, once, where taken.

Orbax reads a relative checkpoint path as no checkpoint at all (its metadata comes back empty), and
a path kept relative changes meaning when a process changes directory; so every path a command or
a public function is given goes through `resolve` before it is used or recorded.
"""

from __future__ import annotations

import os


def resolve(path: str | os.PathLike) -> str:
  """`path` with `~` (and `~user`) expanded, absolute against the working directory, normalised.

  Raises:
    ValueError: for an empty path.
  """
  text = os.fspath(path)
  if not text:
    raise ValueError("an empty path was given where a file or directory is needed")
  return os.path.abspath(os.path.expanduser(text))


def resolve_optional(path: str | os.PathLike | None) -> str | None:
  """`resolve(path)`, or None for None or an empty string (a path that was not given)."""
  return resolve(path) if path else None
