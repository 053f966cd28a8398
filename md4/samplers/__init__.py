"""The samplers behind md4.sampling.sample, and the types they share.

One module per family: `grid` (ancestral, euler, mean; the time grid and its loop), `first_hitting`,
`maskgit`, `remdm`; `draws` (exact random draws) and `logprobs` (the denoiser's log-probabilities,
top-p) serve them all. Every sampler is called as
sample(denoise_fn, rng, init, schedule, vocab_size, opts: SamplerOptions) -> SampleResult, after
md4.sampling has checked its arguments.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

from md4.readout import SplitDenoiser
from md4.schedules import Schedule, StateDependentPoly

Array = jax.Array
AnySchedule = Schedule | StateDependentPoly
# (z: int32[B, *S], t: float32[B]) -> float32[B, *S, V] logits, or a readout.SplitDenoiser.
DenoiseFn = Callable[[Array, Array], Array] | SplitDenoiser


class SamplerOptions(NamedTuple):
  """Everything that selects and tunes a sampler; built and checked by sampling.check_options."""
  method: str
  num_steps: int
  top_p: float | None
  time_grid_kind: str
  reuse_unchanged: bool
  temperature: float
  remask_eta: float
  remask_strategy: str
  remask_t_on: float
  remask_t_off: float


class SampleResult(NamedTuple):
  samples: Array  # int32[B, *S], no mask id left.
  num_calls: Array  # int32[], network evaluations made.
