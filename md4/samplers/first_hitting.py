"""first_hitting: exact; draws the time of each unmasking, one network call per token (a
state-independent schedule only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from md4 import readout
from md4.samplers import AnySchedule, DenoiseFn, SampleResult, SamplerOptions
from md4.samplers.draws import categorical, fine_uniform
from md4.samplers.logprobs import log_probs_at

Array = jax.Array


def sample(denoise_fn: DenoiseFn, rng: Array, init: Array, schedule: AnySchedule, vocab_size: int,
           opts: SamplerOptions) -> SampleResult:
  """Exact: draws the time at which the next masked token is revealed, one network call per token.

  With n masked tokens at time t, all stay masked until s with probability ((1 - a_s)/(1 - a_t))^n;
  inverting at a uniform u gives 1 - a_s = (1 - a_t) u^(1/n). Then one masked position, chosen
  uniformly, is revealed with a token drawn from mu(z, s). Neither s nor the position depends on mu,
  so the network is read out at that one position of each row only.
  """
  den = readout.as_split(denoise_fn)
  b = init.shape[0]
  flat_shape = (b, -1)

  def cond(carry):
    return jnp.any(carry[0] == vocab_size)

  def body(carry):
    z, t, calls = carry
    key = jax.random.fold_in(rng, calls)
    k_time, k_pos, k_token = jax.random.split(key, 3)
    masked = (z == vocab_size).reshape(flat_shape)
    n = masked.sum(-1)
    log_u = jnp.log(fine_uniform(k_time, (b,))[0])
    a_s = 1.0 - (1.0 - schedule.alpha(t)) * jnp.exp(log_u / jnp.maximum(n, 1))
    s = jnp.where(n > 0, schedule.inverse(a_s), t)
    pos = categorical(k_pos, jnp.where(masked, 0.0, -jnp.inf))
    h = den.features(z, s)
    token = categorical(k_token, log_probs_at(den, h, pos[:, None], vocab_size, opts.top_p)[:, 0])
    z_flat = z.reshape(flat_shape)
    current = jnp.take_along_axis(z_flat, pos[:, None], axis=1)[:, 0]
    new = jnp.where(n > 0, token, current)
    z_flat = z_flat.at[jnp.arange(b), pos].set(new)
    return z_flat.reshape(z.shape), s, calls + 1

  z, _, calls = jax.lax.while_loop(
      cond, body, (init, jnp.ones((b,), jnp.float32), jnp.array(0, jnp.int32)))
  return SampleResult(z, calls)
