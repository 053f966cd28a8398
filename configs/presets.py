"""Presets shared by every config file: `get_config(arg)` hands its arg to `apply`.

  md4 train --config=configs/md4/text8.py:tiny          # seconds per step, for tests
  md4 train --config=configs/md4/openwebtext.py:medium  # a file's own preset (MD4-M)
  md4 train --config=configs/md4/openwebtext.py:medium,tiny

arg=None is the file's own setting (the paper's, for configs/md4 and configs/genmd4). An arg is one
preset name or several joined by commas, applied left to right. "tiny" exists everywhere and is
defined once, here; a file may add presets of its own (a dict of name -> function changing the
config in place). An unknown name raises ValueError listing the valid ones.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import ml_collections

from md4 import networks
from md4.config import NET_RUNTIME_FIELDS

Preset = Callable[[ml_collections.ConfigDict], None]

# Sizes of the tiny networks, per network: only the fields that set the size are replaced, so the
# paper config's other choices (dropout, time conditioning, classes, MLP type) still run in tests.
_TINY_NETS = {
    "transformer": dict(num_layers=1, num_heads=2, d_model=16, mlp_ratio=2.0, cond_dim=8),
    "dit": dict(num_layers=1, num_heads=2, d_model=16, mlp_ratio=2, cond_dim=8),
    "unet": dict(features=16, num_res_blocks=1, num_heads=1, norm_groups=4),
    "uvit": dict(features=16, num_res_blocks=1, norm_groups=4, num_layers=1, num_heads=1,
                 d_model=16, mlp_ratio=2.0),
}


def tiny(config: ml_collections.ConfigDict) -> None:
  """Shrinks `config` in place to seconds per step on one CPU core (tests, smoke runs).

  Keeps the dataset, the schedule, GenMD4 or not, the network type and its non-size fields; shrinks
  the network, the batch, the text length and every loop count.
  """
  network = config.model.network
  if network not in _TINY_NETS:
    raise ValueError(f"the tiny preset has no size for network {network!r}; it knows: "
                     f"{', '.join(_TINY_NETS)}")
  config.model.net = dict(config.model.net, **_TINY_NETS[network])
  if config.model.net.get("embed_dim"):  # A separate embedding width stays separate, but small.
    config.model.net.embed_dim = 8
  if network in ("transformer", "dit"):
    config.data.seq_length = 16  # Text only: image shapes come from the dataset.
  config.optimizer.warmup_steps = 2
  config.train.batch_size = 8
  config.train.grad_accum_steps = 1
  config.train.mesh_fsdp = 1
  config.train.num_steps = 6
  config.train.log_every = 2
  config.train.eval_every = 0
  config.train.sample_every = 0
  config.train.checkpoint_every = 3
  config.train.progress_bar = False
  config.eval.batch_size = 8
  config.eval.max_examples = 16
  config.sample.num_samples = 2
  config.sample.num_steps = 4


def apply(config: ml_collections.ConfigDict, arg: str | None,
          presets: Mapping[str, Preset] | None = None) -> ml_collections.ConfigDict:
  """Applies the presets named in `arg` (None or "": none) to `config` and returns it.

  Args:
    config: the file's own config, changed in place.
    arg: None, a preset name, or names joined by commas ("medium,tiny").
    presets: the file's own presets, besides "tiny".

  Raises:
    ValueError: naming an unknown preset and listing the valid ones.
  """
  table: dict[str, Preset] = {"tiny": tiny, **(presets or {})}
  # The network's options that change how a step computes, not what its parameters mean, listed
  # with their defaults so that the command line can set them (an override cannot add a key to
  # model.net): --config.model.net.remat=dots, --config.model.net.attention_impl=splash.
  net_config = networks.NETWORKS[config.model.network][1]
  fields = {f.name: f.default for f in dataclasses.fields(net_config)}
  for name in NET_RUNTIME_FIELDS:
    if name in fields and name not in config.model.net:
      default = fields[name]  # None (attention_impl) is typed, so that a string may replace it.
      config.model.net[name] = (ml_collections.FieldReference(None, field_type=str)
                                if default is None else default)
  if not arg:
    return config
  for name in str(arg).split(","):
    name = name.strip()
    if name not in table:
      raise ValueError(f"unknown config preset {name!r}; valid presets: {', '.join(sorted(table))} "
                       "(or none, for the default setting)")
    table[name](config)
  return config
