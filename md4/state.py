"""What a run holds between steps, the named random streams, and which parameters serve inference.

Shared by the trainer, the checkpoints and the readers of checkpoints (eval, sample, judges), so that
reading a checkpoint does not import the trainer.
"""

from __future__ import annotations

import zlib
from typing import Any

import flax
import jax

from md4.config import Config


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32[]
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array  # uint32[2]: raw key data, so checkpoints hold plain arrays.


# Every random draw of a run comes from one of these streams of train.seed. A stream's key depends on
# its name only, so adding a stream changes no other.
STREAMS = ("init", "eval", "sample_hook", "sample")


def fold_in_name(key: jax.Array, name: str) -> jax.Array:
  """A key derived from `key` by a name (its CRC-32) rather than by a split, so that the draws made
  from `key`'s other derivations are the same whether or not this one exists."""
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def stream_key(seed: int, name: str) -> jax.Array:
  """The key of stream `name` (one of STREAMS) of `seed`."""
  if name not in STREAMS:
    raise ValueError(f"unknown random stream {name!r}; valid: {', '.join(STREAMS)}")
  return fold_in_name(jax.random.key(seed), name)


# What inference reads: "eval" follows cfg.eval.use_ema, "sample" cfg.sample.use_ema.
USES = ("eval", "sample")


def inference_params(state: Any, cfg: Config, use: str) -> Any:
  """The EMA or the raw parameters of `state` (anything with .params and .ema_params), as cfg says
  for `use` (one of USES): the one place this choice is made."""
  if use not in USES:
    raise ValueError(f"unknown use {use!r}; valid: {', '.join(USES)}")
  use_ema = cfg.eval.use_ema if use == "eval" else cfg.sample.use_ema
  return state.ema_params if use_ema else state.params
