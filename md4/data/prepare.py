"""`md4 prepare DATASET`: one entry point for turning each dataset's public files into what the
loaders read. Each preparer writes its output beside the final place and renames it when complete.
"""

from __future__ import annotations

from typing import Callable, Sequence

from md4 import paths
from md4.data import documents, images, text8


def _text8(data_dir: str, sources: Sequence[str] | None, **options) -> dict:
  if options:
    raise ValueError(f"text8 takes no tokenizer options: {sorted(options)}")
  if sources and len(sources) != 1:
    raise ValueError(f"text8 takes one --source (text8.zip), got {list(sources)}")
  return text8.prepare(data_dir, sources[0] if sources else None)


def _documents(name: str):
  def run(data_dir, sources, **options):
    if not sources:
      raise ValueError(f"{name} is prepared from local files of its public dump: give them with "
                       "--source=FILES (parquet, jsonl or txt files, directories or globs)")
    return documents.prepare_documents(name, sources, data_dir, **options)
  return run


def _images(name: str):
  def run(data_dir, sources, **options):
    if options:
      raise ValueError(f"{name} takes no tokenizer options: {sorted(options)}")
    if name == "cifar10" and sources:
      raise ValueError("cifar10 is downloaded by its tfds builder: give no --source")
    if sources and len(sources) != 1:
      raise ValueError(f"{name} takes one --source (the folder of its manual download)")
    return images.prepare_images(name, data_dir, manual_dir=sources[0] if sources else None)
  return run


PREPARERS: dict[str, Callable[..., dict]] = {
    "text8": _text8,
    "openwebtext": _documents("openwebtext"),
    "fineweb_edu": _documents("fineweb_edu"),
    **{name: _images(name) for name in images.SOURCES},
}


def prepare(name: str, data_dir: str, *, sources: Sequence[str] | None = None, **options) -> dict:
  """Prepares dataset `name` under data_dir; returns a summary (sizes, files).

  data_dir and sources may be relative or start with `~` (md4.paths.resolve); globs stay globs.
  options: for openwebtext and fineweb_edu, prepare_documents' keyword arguments (tokenizer,
  seq_length, heldout_fraction, seed).
  """
  if name not in PREPARERS:
    raise ValueError(f"unknown dataset {name!r} to prepare; valid: {', '.join(PREPARERS)}")
  sources = [paths.resolve(s) for s in sources] if sources else sources
  return PREPARERS[name](paths.resolve(data_dir), sources, **options)
