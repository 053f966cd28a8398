"""maskgit: MaskGIT's confidence-ordered parallel decoding (Chang et al. 2022) on the time grid;
fast, NOT a sampler of the model's law (md4.sampling.sample says what it computes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from md4.samplers import AnySchedule, DenoiseFn, SampleResult, SamplerOptions
from md4.samplers.draws import categorical, log_exponential_from_bits
from md4.samplers.grid import run_grid

Array = jax.Array


def sample(denoise_fn: DenoiseFn, rng: Array, init: Array, schedule: AnySchedule, vocab_size: int,
           opts: SamplerOptions) -> SampleResult:
  """MaskGIT's confidence-ordered decoding on the time grid; md4.sampling.sample says what it
  computes."""
  b = init.shape[0]
  temperature = opts.temperature
  num_masked_init = (init == vocab_size).reshape(b, -1).sum(-1)
  masked_at_1 = 1.0 - schedule.alpha(1.0)

  def step(j, t, s, z, logp):
    k_token, k_noise = jax.random.split(jax.random.fold_in(rng, j))
    masked = (z == vocab_size).reshape(b, -1)
    logp = logp.reshape(masked.shape + (vocab_size,))
    if temperature == 0.0:
      token = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    else:
      token = categorical(k_token, logp / temperature)
    confidence = jnp.take_along_axis(logp, token[..., None], axis=-1)[..., 0]
    # The fraction of the row's initial masks still masked after the step; 0 at s = 0 so that the
    # last step reveals everything (alpha(0) = 1 - eps would leave a few masks in long rows).
    ratio = jnp.where(s == 0.0, 0.0, (1.0 - schedule.alpha(s)) / masked_at_1)
    if temperature > 0.0:
      bits = jax.random.bits(k_noise, (2,) + confidence.shape, jnp.uint32)
      gumbel = -log_exponential_from_bits(bits[0], bits[1])
      confidence = confidence + temperature * ratio * gumbel
    # Finite for every masked position, so a masked position always ranks before a visible one.
    confidence = jnp.where(masked, jnp.maximum(confidence, jnp.finfo(jnp.float32).min), -jnp.inf)
    num_left = jnp.round(num_masked_init * ratio).astype(jnp.int32)
    num_reveal = jnp.maximum(masked.sum(-1) - num_left, 0)
    order = jnp.argsort(confidence, axis=-1, descending=True, stable=True)
    rank = jnp.argsort(order, axis=-1)
    reveal = masked & (rank < num_reveal[:, None])
    return jnp.where(reveal, token, z.reshape(b, -1)).reshape(z.shape)

  return run_grid(denoise_fn, rng, init, vocab_size, opts, step)
