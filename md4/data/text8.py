"""Character vocabulary of text8: 26 lower-case letters and the space.

Shared by the embedded Shakespeare demo corpus (`md4.data.demo`) and the real text8
pipeline, so that ids mean the same thing everywhere: 'a'..'z' are 0..25, ' ' is 26.
The diffusion mask id is `VOCAB_SIZE` (27); `decode` can render it for printing
partially masked sequences.

Pure functions of their arguments: no I/O, no state.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
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


# ---------------------------------------------------------------------- the text8 dataset

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
SPLITS = ("train", "valid", "test")


def _download(url: str, path: str) -> str:
  import urllib.request

  import tqdm

  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = path + ".partial"
  with urllib.request.urlopen(url) as response, open(partial, "wb") as f:
    total = int(response.headers.get("Content-Length") or 0) or None
    with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {url}") as bar:
      while chunk := response.read(1 << 20):
        f.write(chunk)
        bar.update(len(chunk))
  os.replace(partial, path)
  return path


def _read_text(source: str) -> str:
  """The corpus from text8.zip (member "text8") or from the extracted plain file."""
  if not os.path.exists(source):
    raise ValueError(f"text8 source {source!r} does not exist (give the path of text8.zip)")
  if zipfile.is_zipfile(source):
    with zipfile.ZipFile(source) as zf:
      if "text8" not in zf.namelist():
        raise ValueError(f"{source} has no member 'text8' (members: {zf.namelist()[:5]})")
      data = zf.read("text8")
  else:
    with open(source, "rb") as f:
      data = f.read()
  try:
    return data.decode("ascii")
  except UnicodeDecodeError as e:
    raise ValueError(f"{source} is not text8: byte {e.start} is not ASCII") from None


def prepare(data_dir: str, source: str | None = None) -> dict:
  """Writes data_dir/text8/{train,valid,test}.npy (uint8 ids) and meta.json.

  source: a local text8.zip (or the extracted file); None downloads TEXT8_URL into
  data_dir/downloads/. Splits: the first 90M, next 5M and last 5M characters (split_ids). The
  output appears only when complete (written beside it, then renamed).
  """
  import tqdm

  if source is None:
    source = _download(TEXT8_URL, os.path.join(data_dir, "downloads", "text8.zip"))
  text = _read_text(source)
  splits = split_ids(encode(text))
  out = os.path.join(data_dir, "text8")
  tmp = f"{out}.tmp-{os.getpid()}"
  os.makedirs(tmp, exist_ok=True)
  for name in tqdm.tqdm(SPLITS, desc="writing text8 splits"):
    np.save(os.path.join(tmp, f"{name}.npy"), getattr(splits, name))
  meta = {"source": os.path.abspath(source), "num_chars": len(text),
          **{f"{name}_chars": int(len(getattr(splits, name))) for name in SPLITS}}
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  if os.path.exists(out):
    shutil.rmtree(out)
  os.replace(tmp, out)
  return meta


def prepared_file(data_dir: str, split: str) -> str:
  """The path of a prepared split's ids: data_dir/text8/<split>.npy."""
  return os.path.join(data_dir, "text8", f"{split}.npy")


def read_prepared(data_dir: str) -> Text8Splits:
  """The prepared splits, memory-mapped."""
  if not os.path.exists(os.path.join(data_dir, "text8", "meta.json")):
    raise ValueError(f"dataset 'text8' is not prepared in {data_dir!r}: run `md4 prepare text8 "
                     f"--data_dir={data_dir}` (--source=PATH/text8.zip to use a local copy)")
  return Text8Splits(*(np.load(prepared_file(data_dir, name), mmap_mode="r") for name in SPLITS))
