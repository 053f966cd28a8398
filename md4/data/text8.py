"""Character vocabulary of text8: 26 lower-case letters and the space.

Shared by the embedded Shakespeare demo corpus (`md4.data.demo`) and the real text8
pipeline, so that ids mean the same thing everywhere: 'a'..'z' are 0..25, ' ' is 26.
The diffusion mask id is `VOCAB_SIZE` (27); `decode` can render it for printing
partially masked sequences.

Pure functions of their arguments: no I/O, no state.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

VOCAB: str = "abcdefghijklmnopqrstuvwxyz "
VOCAB_SIZE: int = len(VOCAB)  # 27
MASK_ID: int = VOCAB_SIZE  # the absorbing-state id used by the diffusion (see DESIGN.md)

# Byte value -> id, 255 where the byte is not in the vocabulary (all of VOCAB is ASCII).
_INVALID = 255
_BYTE_TO_ID = np.full(256, _INVALID, dtype=np.uint8)
_BYTE_TO_ID[np.frombuffer(VOCAB.encode("ascii"), dtype=np.uint8)] = np.arange(
    VOCAB_SIZE, dtype=np.uint8
)


def encode(text: str) -> np.ndarray:
  """Maps a text8 string to ids.

  Args:
    text: a string over `VOCAB` (lower-case a-z and space).

  Returns:
    uint8[len(text)] ids in [0, VOCAB_SIZE).

  Raises:
    ValueError: naming the first character outside the vocabulary and its position.
  """
  if not isinstance(text, str):
    raise ValueError(f"encode expects a str, got {type(text).__name__}: {text!r:.80}")
  # Non-ASCII characters are never in the vocabulary; encode them as a byte that maps
  # to _INVALID so that one vectorised lookup finds the first bad position.
  raw = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)
  # errors="replace" writes one '?' per non-ASCII character, so raw[i] <-> text[i].
  ids = _BYTE_TO_ID[raw]
  bad = np.flatnonzero(ids == _INVALID)
  if bad.size:
    pos = int(bad[0])
    raise ValueError(
        f"character {text[pos]!r} at position {pos} is not in the text8 vocabulary "
        f"{VOCAB!r} (lower-case a-z and space)"
    )
  return ids


def decode(ids, *, mask_char: str | None = None) -> str:
  """Maps ids back to a string.

  Args:
    ids: integer array-like of shape [L] with values in [0, VOCAB_SIZE), or also equal
      to MASK_ID (27) when `mask_char` is given.
    mask_char: a single character used to render MASK_ID, e.g. '_'; None (the default)
      makes MASK_ID an error like any other out-of-range id.

  Returns:
    The decoded string of length L.

  Raises:
    ValueError: if ids is not 1-D integer data, or holds an id outside the vocabulary
      (naming the first one and its position), or mask_char is not one character.
  """
  arr = np.asarray(ids)
  if arr.ndim != 1:
    raise ValueError(f"decode expects ids of shape [L], got shape {arr.shape}")
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"decode expects integer ids, got dtype {arr.dtype}")
  if mask_char is not None and (not isinstance(mask_char, str) or len(mask_char) != 1):
    raise ValueError(f"mask_char must be a single character, got {mask_char!r}")
  arr = arr.astype(np.int64)
  top = VOCAB_SIZE + (mask_char is not None)  # ids allowed: [0, top)
  bad = np.flatnonzero((arr < 0) | (arr >= top))
  if bad.size:
    pos = int(bad[0])
    hint = "" if mask_char is not None else f" (pass mask_char= to render the mask id {MASK_ID})"
    raise ValueError(
        f"id {int(arr[pos])} at position {pos} is outside [0, {top}){hint}"
    )
  table = VOCAB + (mask_char or "")
  return "".join(table[i] for i in arr.tolist())


class Text8Splits(NamedTuple):
  """Train / validation / test character ids, each uint8[n_split]."""

  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray


def split_ids(ids: np.ndarray) -> Text8Splits:
  """Splits a corpus as text8 is split (90M / 5M / 5M of its 100M characters).

  Args:
    ids: uint8[N] character ids, N >= 20.

  Returns:
    Text8Splits of views into `ids`: the first N*9//10 characters, the next N//20, and
    the rest (N - N*9//10 - N//20, which is N//20 or at most 2 more).

  Raises:
    ValueError: if ids is not 1-D or has fewer than 20 characters (an empty split).
  """
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.shape[0] < 20:
    raise ValueError(f"split_ids expects ids of shape [N] with N >= 20, got shape {ids.shape}")
  n = ids.shape[0]
  n_train, n_valid = n * 9 // 10, n // 20
  return Text8Splits(
      train=ids[:n_train], valid=ids[n_train:n_train + n_valid], test=ids[n_train + n_valid:]
  )
