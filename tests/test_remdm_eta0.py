"""ReMDM at remask_eta = 0, as md4/sampling.py and docs/samplers.md state it: "cap" is bitwise the
ancestral sampler (tests/test_samplers_beyond.py checks that), "loop" is not: it is bitwise the
ancestral steps on its warped times tau(t) of the grid, written out here step by step from the
sampler's own pieces (the same keys, the same step)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import sampling, schedules
from md4.samplers import grid as grid_lib, remdm

V, L, B, STEPS = 5, 16, 64, 16
T_ON, T_OFF = 0.55, 0.05
TABLE = jax.random.normal(jax.random.key(0), (2, L, V))


def denoise_fn(z, t):
  """A denoiser that reads t (so the time the network is called at shows in the samples)."""
  del z
  return TABLE[0][None] + 4.0 * t[:, None, None] * TABLE[1][None]


def _run(key, init, schedule, grid, **kw):
  return sampling.sample_with_info(denoise_fn, key, init, schedule, vocab_size=V, num_steps=STEPS,
                                   time_grid_kind=grid, **kw).samples


def _warped_ancestral(key, init, schedule, grid_kind):
  opts = sampling.check_options(False, num_steps=STEPS, method="remdm", remask_eta=0.0,
                                remask_strategy="loop", remask_t_on=T_ON, remask_t_off=T_OFF,
                                time_grid_kind=grid_kind)
  tau = remdm._remdm_model_time(opts)  # pylint: disable=protected-access
  grid = grid_lib.time_grid(STEPS, grid_kind)
  z = init
  for j in range(STEPS):
    t, s = grid[STEPS - j], grid[STEPS - j - 1]
    logp = jax.nn.log_softmax(denoise_fn(z, jnp.full((B,), tau(t))), axis=-1)
    a_t, a_s = schedule.alpha(tau(t)), schedule.alpha(tau(s))
    r = jnp.where(s == 0.0, 1.0, (a_s - a_t) / (1.0 - a_t))
    step = grid_lib.reveal_step
    z = step(jax.random.fold_in(key, j), z, logp, r, V)
  return z


@pytest.mark.parametrize("schedule_name,grid", [
    ("linear", "uniform"), pytest.param("cosine", "cosine", marks=pytest.mark.slow)])
def test_loop_at_eta_zero_is_ancestral_on_its_warped_times_not_the_ancestral_sampler(
    schedule_name, grid):
  schedule = schedules.get_schedule(schedule_name)
  init = jnp.full((B, L), V, jnp.int32)
  key = jax.random.key(7)
  loop = _run(key, init, schedule, grid, method="remdm", remask_eta=0.0, remask_strategy="loop",
              remask_t_on=T_ON, remask_t_off=T_OFF)
  np.testing.assert_array_equal(loop, _warped_ancestral(key, init, schedule, grid))
  ancestral = _run(key, init, schedule, grid, method="ancestral")
  cap = _run(key, init, schedule, grid, method="remdm", remask_eta=0.0, remask_strategy="cap")
  np.testing.assert_array_equal(cap, ancestral)
  assert int((np.asarray(loop) != np.asarray(ancestral)).sum()) > 0
