"""remdm: ancestral steps plus ReMDM remasking of tokens decoded earlier (Wang, Schiff, Sahoo,
Kuleshov 2025); md4.sampling.sample states the step's probabilities and the two strategies."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from md4.samplers import AnySchedule, DenoiseFn, SampleResult, SamplerOptions
from md4.samplers.draws import bernoulli
from md4.samplers.grid import reveal_step, run_grid

Array = jax.Array


# Remasking draws its coins from fold_in(rng, _REMASK_STREAM) so that the unmasking draws keep the
# ancestral sampler's keys: with remask_eta = 0, "cap" returns bitwise the ancestral samples (and
# "loop" those of the ancestral steps on its warped times; see md4.sampling.sample).
_REMASK_STREAM = 2**32 - 1


def _remdm_model_time(opts: SamplerOptions):
  """The loop strategy's time warp t -> tau(t): steps use alpha(tau), the network sees tau."""
  if opts.remask_strategy == "cap":
    return lambda t: t
  t_on, t_off = opts.remask_t_on, opts.remask_t_off

  def tau(t):
    # Below t_off the rest of the schedule, alpha(t_on) .. alpha(0), is compressed into [0, t_off].
    late = t * (t_on / t_off) if t_off > 0.0 else jnp.zeros_like(t)
    return jnp.where(t > t_on, t, jnp.where(t >= t_off, t_on, late))

  return tau


def sample(denoise_fn: DenoiseFn, rng: Array, init: Array, schedule: AnySchedule, vocab_size: int,
           opts: SamplerOptions) -> SampleResult:
  """Ancestral steps plus ReMDM remasking; md4.sampling.sample states the step's probabilities."""
  tau = _remdm_model_time(opts)
  generated = init == vocab_size  # Only tokens this run decodes may be remasked.
  remask_rng = jax.random.fold_in(rng, _REMASK_STREAM)

  def step(j, t, s, z, logp):
    a_t, a_s = schedule.alpha(tau(t)), schedule.alpha(tau(s))
    sigma = jnp.minimum(opts.remask_eta, jnp.clip((1.0 - a_s) / a_t, 0.0, 1.0))
    if opts.remask_strategy == "loop":
      sigma = jnp.where((t > opts.remask_t_off) & (t <= opts.remask_t_on), sigma, 0.0)
    sigma = jnp.where(s == 0.0, 0.0, sigma)
    # With sigma = 0 this is the ancestral r = (a_s - a_t)/(1 - a_t), by the same float ops, and
    # the coins and token draws are the ancestral sampler's (draw_tokens keys each position).
    r = jnp.where(s == 0.0, 1.0, (a_s - (1.0 - sigma) * a_t) / (1.0 - a_t))
    z_new = reveal_step(jax.random.fold_in(rng, j), z, logp, r, vocab_size)
    remask = bernoulli(jax.random.fold_in(remask_rng, j), jnp.broadcast_to(sigma, z.shape))
    return jnp.where(generated & (z != vocab_size) & remask, vocab_size, z_new)

  return run_grid(denoise_fn, rng, init, vocab_size, opts, step, model_time=tau)
