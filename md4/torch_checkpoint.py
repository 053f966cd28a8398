"""Reading a file written by torch.save (a PyTorch Lightning .ckpt) without PyTorch.

torch.save writes a zip archive: `PREFIX/data.pkl`, a pickle (protocol 2) of the saved object in
which each tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and each
storage a persistent id ("storage", torch.<Type>Storage, key, location, numel) whose bytes are the
record `PREFIX/data/KEY` (little-endian, as `PREFIX/byteorder` says); plus `PREFIX/version`.
`load` reads it with a restricted unpickler: tensors become lazy views of their records (read only
when asked for, so a checkpoint's optimizer state costs nothing), dicts, lists and OrderedDicts stay
as they are, and any other class the pickle names (Lightning's and omegaconf's objects, a
tokenizer) becomes an inert `Opaque` record of its arguments: nothing the file names is imported or
run.
"""

from __future__ import annotations

import builtins
import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class Opaque:
  """Stands for an object of a class that is not read (its module and name, args and state)."""

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return super().__new__(cls)

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs, self.state = args, kwargs, None

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f"Opaque({type(self).__module__}.{type(self).__qualname__})"


class _StorageType:
  def __init__(self, name: str):
    if name not in _STORAGE_DTYPES:
      raise ValueError(f"torch storage type {name} is not one this reader knows "
                       f"({', '.join(_STORAGE_DTYPES)})")
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class LazyTensor:
  """A tensor of the file: shape, dtype, and `numpy()` reading its bytes on demand."""

  def __init__(self, storage: tuple, offset: int, size: tuple, stride: tuple):
    self._archive, self._record, self.dtype = storage
    self.shape, self._offset, self._stride = tuple(size), int(offset), tuple(stride)

  def numpy(self) -> np.ndarray:
    raw = np.frombuffer(self._archive.read(self._record), self.dtype)
    item = self.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        raw[self._offset:], self.shape, [s * item for s in self._stride]).copy()

  def __repr__(self):
    return f"LazyTensor({self.dtype}, {self.shape})"


def _rebuild_tensor(storage, offset, size, stride, *rest):
  del rest  # requires_grad, backward hooks, metadata: nothing to read.
  return LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, *rest):
  del rest
  return data


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file, encoding="utf-8")
    self._archive, self._prefix = archive, prefix

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "builtins" and name in ("set", "frozenset", "tuple", "list", "dict", "slice",
                                         "complex", "bytearray"):
      return getattr(builtins, name)
    return type(name, (Opaque,), {"__module__": module, "__qualname__": name})

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r} in a torch file")
    storage_type, key = pid[1], pid[2]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"persistent id {pid!r} names no torch storage type")
    return (self._archive, f"{self._prefix}data/{key}", storage_type.dtype)


def load(path: str) -> Any:
  """The object torch.save wrote to `path`, tensors as LazyTensor (see the module docstring).

  Raises:
    ValueError: if the file is not a torch.save zip archive (the legacy pre-1.6 format included)
      or its byte order is not little-endian.
  """
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a torch.save zip archive (a PyTorch >= 1.6 checkpoint)")
  archive = zipfile.ZipFile(path)
  pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise ValueError(f"{path} holds no torch data.pkl record: not a file of torch.save")
  prefix = pickles[0][:-len("data.pkl")]
  if f"{prefix}byteorder" in archive.namelist():
    order = archive.read(f"{prefix}byteorder").decode()
    if order != "little":
      raise ValueError(f"{path} was written on a {order}-endian machine; this reader reads "
                       "little-endian files only")
  with archive.open(pickles[0]) as f:
    return _Unpickler(f, archive, prefix).load()
