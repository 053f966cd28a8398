"""Samplers for masked diffusion: ancestral, euler, mean and first_hitting, with nucleus (top-p) filtering.

Conditioning is by initialisation: positions of `init` equal to the mask id are generated, all others
are kept. A whole sampling run is one lax loop, so it compiles once.

Categorical draws use an exponential race, argmax_v(log p_v - log E_v) with E_v ~ Exp(1) computed as
-log1p(-u) from a uniform u that carries 48 random bits near 0. The float32 Gumbel-max trick cannot
draw a token whose probability is below about 4e-9 of the largest (its noise spans only ~19.4 nats),
which silently lowers the temperature (MD4 paper, appendix G; Zheng et al. 2024); this draw keeps
tokens down to about 1e-14 of the largest.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from md4.elbo import check_schedule, check_tokens
from md4.schedules import Schedule, StateDependentPoly, rate

Array = jax.Array
AnySchedule = Schedule | StateDependentPoly
DenoiseFn = Callable[[Array, Array], Array]

METHODS = ("ancestral", "euler", "mean", "first_hitting")
TIME_GRIDS = ("uniform", "cosine")

_TWO_M24 = 2.0**-24


def uniform_from_bits(hi: Array, lo: Array) -> tuple[Array, Array]:
  """u and 1 - u, both float32 in (0, 1) and resolved to 2^-48 near 0, from two uint32 words.

  Uses the top 24 bits of each word so every step is exact in float32.
  """
  hi = (hi >> 8).astype(jnp.float32)
  lo = (lo >> 8).astype(jnp.float32)
  u = (hi + (lo + 0.5) * _TWO_M24) * _TWO_M24
  w = ((2.0**24 - 1.0 - hi) + (2.0**24 - 0.5 - lo) * _TWO_M24) * _TWO_M24
  return u, w


def fine_uniform(key: Array, shape: tuple[int, ...]) -> tuple[Array, Array]:
  """(u, 1 - u) of `shape`; see uniform_from_bits."""
  bits = jax.random.bits(key, (2,) + tuple(shape), jnp.uint32)
  return uniform_from_bits(bits[0], bits[1])


def log_exponential_from_bits(hi: Array, lo: Array) -> Array:
  """log E with E ~ Exp(1), accurate in both tails (small E needs u near 0, large E needs 1 - u)."""
  u, w = uniform_from_bits(hi, lo)
  e = jnp.where(u < 0.5, -jnp.log1p(-u), -jnp.log(w))
  return jnp.log(e)


def categorical_from_bits(logits: Array, hi: Array, lo: Array) -> Array:
  """argmax over the last axis of logits - log E: a draw from softmax(logits). -inf logits never win."""
  return jnp.argmax(logits - log_exponential_from_bits(hi, lo), axis=-1).astype(jnp.int32)


def categorical(key: Array, logits: Array) -> Array:
  """int32[*A] draw from softmax(logits: float32[*A, V]) that keeps small probabilities."""
  bits = jax.random.bits(key, (2,) + logits.shape, jnp.uint32)
  return categorical_from_bits(logits, bits[0], bits[1])


def bernoulli(key: Array, p: Array) -> Array:
  """bool draw with P(True) = p, exact for p down to 2^-48."""
  return fine_uniform(key, p.shape)[0] < p


def top_p_filter(logits: Array, top_p: float) -> Array:
  """Log-probabilities renormalised over the nucleus, -inf outside it: the fewest most-likely tokens with mass >= top_p.

  Ties with the smallest kept probability are kept too. logits: float32[*A, V].
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  sorted_logp = jnp.sort(logp, axis=-1)[..., ::-1]
  mass_before = jnp.cumsum(jnp.exp(sorted_logp), axis=-1) - jnp.exp(sorted_logp)
  # The smallest kept log-probability: the last sorted entry whose preceding mass is below top_p.
  num_kept = jnp.maximum((mass_before < top_p).sum(-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(sorted_logp, num_kept - 1, axis=-1)
  return jax.nn.log_softmax(jnp.where(logp >= threshold, logp, -jnp.inf), axis=-1)


def time_grid(num_steps: int, kind: str = "uniform") -> Array:
  """float32[num_steps + 1] from 0 to 1. "cosine" t_i = cos(pi/2 (1 - i/N)) takes small steps near
  t = 1, where the first tokens are revealed."""
  i = jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps
  if kind == "uniform":
    return i
  if kind == "cosine":
    return jnp.where(i == 0, 0.0, jnp.cos(0.5 * jnp.pi * (1.0 - i)))
  raise ValueError(f"unknown time grid {kind!r}; valid: {', '.join(TIME_GRIDS)}")


class SampleResult(NamedTuple):
  samples: Array  # int32[B, *S], no mask id left.
  num_calls: Array  # int32[], network evaluations made.


def _step_probs(method: str, schedule: AnySchedule, t: Array, s: Array) -> Array:
  """Per-value unmasking probability r_v for a masked token over [s, t): float32[V] or float32[]."""
  if method == "euler":
    r = rate(schedule, t) * (t - s)
  else:
    a_t = schedule.alpha(t)
    r = (schedule.alpha(s) - a_t) / (1.0 - a_t)
  # The last step reveals everything, so no mask id is left (the decoder at t = 0).
  return jnp.where(s == 0.0, 1.0, r)


def _grid_step(key: Array, method: str, z: Array, logp: Array, r: Array, mask_id: int) -> Array:
  """One step of ancestral / euler / mean. logp: float32[B, *S, V]; r: float32[V] or []."""
  k_unmask, k_token = jax.random.split(key)
  masked = z == mask_id
  if method == "mean":
    token = categorical(k_token, logp)
    r_token = r if r.ndim == 0 else r[token]
    unmask = bernoulli(k_unmask, jnp.broadcast_to(r_token, z.shape))
  else:
    r_v = jnp.broadcast_to(r, logp.shape[-1:])
    p_unmask = jnp.minimum((jnp.exp(logp) * r_v).sum(-1), 1.0)  # min: euler's clip to a probability
    token = categorical(k_token, logp + jnp.log(r_v))
    unmask = bernoulli(k_unmask, p_unmask)
  return jnp.where(masked & unmask, token, z)


def _logp(denoise_fn, z, t, vocab_size, top_p):
  logits = denoise_fn(z, jnp.broadcast_to(t, z.shape[:1]).astype(jnp.float32))
  if logits.shape != z.shape + (vocab_size,):
    raise ValueError(f"denoise_fn returned logits of shape {logits.shape}; expected "
                     f"{z.shape + (vocab_size,)}")
  logits = logits.astype(jnp.float32)
  if top_p is not None:
    return top_p_filter(logits, top_p)
  return jax.nn.log_softmax(logits, axis=-1)


def _sample_grid(denoise_fn, rng, init, schedule, vocab_size, num_steps, method, top_p, grid_kind,
                 reuse_unchanged):
  grid = time_grid(num_steps, grid_kind)

  def body(j, carry):
    z, logp, changed, calls = carry
    i = num_steps - j
    t, s = grid[i], grid[i - 1]
    call = lambda: (_logp(denoise_fn, z, t, vocab_size, top_p), calls + 1)
    if reuse_unchanged:
      logp, calls = jax.lax.cond(changed, call, lambda: (logp, calls))
    else:
      logp, calls = call()
    r = _step_probs(method, schedule, t, s)
    z_new = _grid_step(jax.random.fold_in(rng, j), method, z, logp, r, vocab_size)
    return z_new, logp, jnp.any(z_new != z), calls

  logp0 = jnp.zeros(init.shape + (vocab_size,), jnp.float32)
  z, _, _, calls = jax.lax.fori_loop(
      0, num_steps, body, (init, logp0, jnp.array(True), jnp.array(0, jnp.int32)))
  return SampleResult(z, calls)


def _sample_first_hitting(denoise_fn, rng, init, schedule, vocab_size, top_p):
  """Exact: draws the time at which the next masked token is revealed, one network call per token.

  With n masked tokens at time t, all stay masked until s with probability ((1 - a_s)/(1 - a_t))^n;
  inverting at a uniform u gives 1 - a_s = (1 - a_t) u^(1/n). Then one masked position, chosen
  uniformly, is revealed with a token drawn from mu(z, s).
  """
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
    logp = _logp(denoise_fn, z, s, vocab_size, top_p).reshape(b, masked.shape[1], vocab_size)
    pos = categorical(k_pos, jnp.where(masked, 0.0, -jnp.inf))
    logp_pos = jnp.take_along_axis(logp, pos[:, None, None], axis=1)[:, 0]
    token = categorical(k_token, logp_pos)
    z_flat = z.reshape(flat_shape)
    current = jnp.take_along_axis(z_flat, pos[:, None], axis=1)[:, 0]
    new = jnp.where(n > 0, token, current)
    z_flat = z_flat.at[jnp.arange(b), pos].set(new)
    return z_flat.reshape(z.shape), s, calls + 1

  z, _, calls = jax.lax.while_loop(
      cond, body, (init, jnp.ones((b,), jnp.float32), jnp.array(0, jnp.int32)))
  return SampleResult(z, calls)


def sample_with_info(denoise_fn: DenoiseFn, rng: Array, init: Array, schedule: AnySchedule, *,
                     vocab_size: int, num_steps: int, method: str = "ancestral",
                     top_p: float | None = None, time_grid_kind: str = "uniform",
                     reuse_unchanged: bool = False) -> SampleResult:
  """Samples and the number of network calls made. Arguments as for `sample`."""
  check_tokens(init, vocab_size, allow_mask=True, name="init")
  check_schedule(schedule, vocab_size)
  if method not in METHODS:
    raise ValueError(f"unknown sampling method {method!r}; valid: {', '.join(METHODS)}")
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
  if time_grid_kind not in TIME_GRIDS:
    raise ValueError(f"unknown time grid {time_grid_kind!r}; valid: {', '.join(TIME_GRIDS)}")
  init = jnp.asarray(init, jnp.int32)
  if method == "first_hitting":
    if schedule.state_dependent:
      raise ValueError("first_hitting needs a state-independent schedule: with StateDependentPoly "
                       "the time of the next unmasking depends on the unknown token values; use "
                       "ancestral, euler or mean")
    return _sample_first_hitting(denoise_fn, rng, init, schedule, vocab_size, top_p)
  return _sample_grid(denoise_fn, rng, init, schedule, vocab_size, num_steps, method, top_p,
                      time_grid_kind, reuse_unchanged)


def sample(denoise_fn: DenoiseFn, rng: Array, init: Array, schedule: AnySchedule, *,
           vocab_size: int, num_steps: int, method: str = "ancestral", top_p: float | None = None,
           time_grid_kind: str = "uniform", reuse_unchanged: bool = False) -> Array:
  """Fills the masked positions of init: int32[B, *S] and returns int32[B, *S] with no mask id.

  Args:
    denoise_fn: (z: int32[B, *S], t: float32[B]) -> float32[B, *S, vocab_size] logits of x.
    rng: PRNG key.
    init: int32[B, *S]; entries equal to vocab_size are generated, all others are kept.
    schedule: from md4.schedules; StateDependentPoly unmasks each value v at its own rate.
    vocab_size: V (the mask id).
    num_steps: steps of the time grid (first_hitting ignores it: it takes one step per masked token).
    method: "ancestral" (exact step probabilities (a_s - a_t)/(1 - a_t) mu), "euler" (rate * dt,
      clipped to a probability), "mean" (draw x0 from mu, then reveal it with the step probability),
      "first_hitting" (exact unmasking times, one network call per token).
    top_p: nucleus filtering of the denoiser's distribution (None = off).
    time_grid_kind: "uniform" or "cosine" (see time_grid).
    reuse_unchanged: skip the network call on a step whose input did not change since the last call.
      Valid only when denoise_fn ignores t (a time-free denoiser).
  """
  return sample_with_info(denoise_fn, rng, init, schedule, vocab_size=vocab_size,
                          num_steps=num_steps, method=method, top_p=top_p,
                          time_grid_kind=time_grid_kind, reuse_unchanged=reuse_unchanged).samples
