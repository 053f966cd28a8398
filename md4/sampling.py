"""Samplers for masked diffusion, top-p filtering, long generation and classifier-free guidance.

Methods (`sample`, `sample_with_info`):
  - ancestral, euler, mean: steps on a time grid; exact as the number of steps grows.
  - first_hitting: exact; draws the time of each unmasking, one network call per token.
  - maskgit: MaskGIT's confidence-ordered parallel decoding; fast, NOT a sampler of the model's law.
  - remdm: ancestral steps plus ReMDM remasking of tokens decoded earlier (Wang et al. 2025).
`sample_blocks` generates sequences longer than the model's length block by block
(semi-autoregressive, as MDLM); `guided_logits` / `guided_denoiser` combine a conditional and an
unconditional denoiser (classifier-free guidance).

Conditioning is by initialisation: positions of `init` equal to the mask id are generated, all others
are kept. A whole sampling run is one lax loop, so it compiles once.

Reveal first: with a state-independent schedule, ancestral, euler, mean and first_hitting decide
which masked positions a step reveals before they call the network (that choice does not depend on
the network's output; see `_sample_reveal_first`), skip the call on a step that reveals nothing in
any row, and read the network out only at the revealed positions (md4.readout: a denoiser split
into body and output layer; a plain (z, t) -> logits callable works too, read out by gathering).

Categorical draws use an exponential race, argmax_v(log p_v - log E_v) with E_v ~ Exp(1) computed as
-log1p(-u) from a uniform u that carries 48 random bits near 0. The float32 Gumbel-max trick cannot
draw a token whose probability is below about 4e-9 of the largest (its noise spans only ~19.4 nats),
which silently lowers the temperature (MD4 paper, appendix G; Zheng et al. 2024); this draw keeps
tokens down to about 1e-14 of the largest.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from md4 import readout
from md4.elbo import check_schedule, check_tokens
from md4.readout import SplitDenoiser
from md4.schedules import Schedule, StateDependentPoly, rate

Array = jax.Array
AnySchedule = Schedule | StateDependentPoly
# (z: int32[B, *S], t: float32[B]) -> float32[B, *S, V] logits, or a readout.SplitDenoiser.
DenoiseFn = Callable[[Array, Array], Array] | SplitDenoiser

METHODS = ("ancestral", "euler", "mean", "first_hitting", "maskgit", "remdm")
TIME_GRIDS = ("uniform", "cosine")
REMASK_STRATEGIES = ("cap", "loop")
# Methods that need one alpha(t) for every token, so not GenMD4's state-dependent schedule.
STATE_INDEPENDENT_ONLY = ("first_hitting", "maskgit", "remdm")
# Methods that, with a state-independent schedule, draw the positions a step reveals before the
# network call, call it only on steps that reveal something and read it out only there.
REVEAL_FIRST = ("ancestral", "euler", "mean", "first_hitting")


def reveals_first(method: str, state_dependent: bool) -> bool:
  """Whether `method` reveals first (REVEAL_FIRST) under a schedule that is state-dependent or not."""
  return method in REVEAL_FIRST and not state_dependent

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
  """One step of ancestral / euler / mean for a state-dependent schedule, whose unmasking
  probability depends on the token: logp: float32[B, *S, V]; r: float32[V]."""
  k_unmask, k_token = jax.random.split(key)
  masked = z == mask_id
  if method == "mean":
    token = categorical(k_token, logp)
    unmask = bernoulli(k_unmask, r[token])
  else:
    p_unmask = jnp.minimum((jnp.exp(logp) * r).sum(-1), 1.0)  # min: euler's clip to a probability
    token = categorical(k_token, logp + jnp.log(r))
    unmask = bernoulli(k_unmask, p_unmask)
  return jnp.where(masked & unmask, token, z)


def _normalise(logits: Array, top_p: float | None) -> Array:
  """float32 log-probabilities over the last axis, top-p filtered when top_p is set."""
  logits = logits.astype(jnp.float32)
  if top_p is not None:
    return top_p_filter(logits, top_p)
  return jax.nn.log_softmax(logits, axis=-1)


def _logp(denoise_fn, z, t, vocab_size, top_p):
  logits = denoise_fn(z, jnp.broadcast_to(t, z.shape[:1]).astype(jnp.float32))
  if logits.shape != z.shape + (vocab_size,):
    raise ValueError(f"denoise_fn returned logits of shape {logits.shape}; expected "
                     f"{z.shape + (vocab_size,)}")
  return _normalise(logits, top_p)


def _logp_at(den: SplitDenoiser, h, positions: Array, vocab_size: int, top_p) -> Array:
  """float32[B, K, V] log-probabilities at positions: int32[B, K] from the features h."""
  logits = den.logits(h, positions)
  if logits.shape != positions.shape + (vocab_size,):
    raise ValueError(f"denoise_fn returned logits of shape {logits.shape} at positions of shape "
                     f"{positions.shape}; expected {positions.shape + (vocab_size,)}")
  return _normalise(logits, top_p)


def draw_tokens(key: Array, logp: Array, positions: Array, num_positions: int) -> Array:
  """int32[B, K]: a token drawn from exp(logp) at each flat position of each row.

  Each draw takes its random bits from fold_in(key, row * num_positions + position), so a position's
  token does not depend on which other positions are drawn with it: reading the network out at the
  revealed positions only, or at all of them, draws the same tokens.

  Args:
    key: the step's token key.
    logp: float32[B, K, V] log-probabilities.
    positions: int32[B, K] flat positions in [0, num_positions).
    num_positions: N, the positions of a row.
  """
  flat = (jnp.arange(logp.shape[0], dtype=jnp.int32)[:, None] * num_positions + positions).ravel()
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(flat)
  # One vmap over the flattened positions compiles in about half the time of two nested ones.
  bits = jax.vmap(lambda k: jax.random.bits(k, (2, logp.shape[-1]), jnp.uint32))(keys)
  bits = bits.reshape(logp.shape[:-1] + bits.shape[1:])
  return categorical_from_bits(logp, bits[..., 0, :], bits[..., 1, :])


def _revealed(key: Array, z: Array, r: Array, mask_id: int) -> tuple[Array, Array]:
  """(bool[B, N]: the masked positions of z: int32[B, *S] revealed with probability r, the step's
  token key). The coins come from the same key and draw as the state-dependent step's."""
  k_unmask, k_token = jax.random.split(key)
  u = fine_uniform(k_unmask, z.shape)[0]
  return ((z == mask_id) & (u < r)).reshape(z.shape[0], -1), k_token


def _reveal_step(key: Array, z: Array, logp: Array, r: Array, mask_id: int) -> Array:
  """The reveal-first step with every position's log-probabilities logp: float32[B, *S, V] at
  hand: the same coins and token draws as `_sample_reveal_first`, so the same samples."""
  reveal, k_token = _revealed(key, z, r, mask_id)
  b, n = reveal.shape
  every = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  token = draw_tokens(k_token, logp.reshape(b, n, logp.shape[-1]), every, n)
  return jnp.where(reveal, token, z.reshape(b, n)).reshape(z.shape)


def _sample_reveal_first(denoise_fn, rng, init, schedule, vocab_size, opts):
  """ancestral, euler and mean for a state-independent schedule: the positions revealed first (one
  coin each), then the network, read out at those positions only, skipped on a step where no row
  reveals anything. num_calls counts the calls made.

  With a state-independent schedule, whether a masked position is revealed on the step from t to s
  does not depend on the network's output mu:
    ancestral: it becomes v with probability r mu_v, r = (a_s - a_t)/(1 - a_t), and stays masked
      with probability 1 - r; summed over v (sum mu = 1), it is revealed with probability r, and
      given that, v ~ mu.
    euler: the same with r = rate(t) (t - s), clipped to a probability (u < r for r >= 1 always).
    mean: v ~ mu and, independently, revealed with probability r (the ancestral r).
  So the step's law is that of one coin per position, then a token from mu at each revealed
  position; ancestral and mean are one sampler here (they differ for a state-dependent schedule).
  """
  den = readout.as_split(denoise_fn)
  b, n = init.shape[0], math.prod(init.shape[1:])
  grid = time_grid(opts.num_steps, opts.time_grid_kind)

  def read_out(positions, valid, carry):
    z_flat, h, k_token = carry
    logp = _logp_at(den, h, positions, vocab_size, opts.top_p)
    token = draw_tokens(k_token, logp, positions, n)
    rows = jnp.arange(b)[:, None]
    z_flat = z_flat.at[rows, jnp.where(valid, positions, n)].set(token, mode="drop")
    return z_flat, h, k_token

  def body(j, carry):
    z, calls = carry
    i = opts.num_steps - j
    t, s = grid[i], grid[i - 1]
    r = _step_probs(opts.method, schedule, t, s)
    reveal, k_token = _revealed(jax.random.fold_in(rng, j), z, r, vocab_size)

    def call():
      h = den.features(z, jnp.full((b,), t, jnp.float32))
      z_flat, _, _ = readout.for_revealed(reveal, read_out, (z.reshape(b, n), h, k_token))
      return z_flat.reshape(z.shape), calls + 1

    return jax.lax.cond(jnp.any(reveal), call, lambda: (z, calls))

  z, calls = jax.lax.fori_loop(0, opts.num_steps, body, (init, jnp.array(0, jnp.int32)))
  return SampleResult(z, calls)


def _run_grid(denoise_fn, rng, init, vocab_size, opts, step, model_time=None):
  """The loop of every grid sampler: for j = 0 .. num_steps - 1, with t = grid[num_steps - j] and
  s = grid[num_steps - j - 1], one network call at model_time(t) (default t), then
  z <- step(j, t, s, z: int32[B, *S], logp: float32[B, *S, V]).
  """
  num_steps = opts.num_steps
  grid = time_grid(num_steps, opts.time_grid_kind)
  model_time = (lambda t: t) if model_time is None else model_time

  def body(j, carry):
    z, logp, changed, calls = carry
    i = num_steps - j
    t, s = grid[i], grid[i - 1]
    call = lambda: (_logp(denoise_fn, z, model_time(t), vocab_size, opts.top_p), calls + 1)
    if opts.reuse_unchanged:
      logp, calls = jax.lax.cond(changed, call, lambda: (logp, calls))
    else:
      logp, calls = call()
    z_new = step(j, t, s, z, logp)
    return z_new, logp, jnp.any(z_new != z), calls

  logp0 = jnp.zeros(init.shape + (vocab_size,), jnp.float32)
  z, _, _, calls = jax.lax.fori_loop(
      0, num_steps, body, (init, logp0, jnp.array(True), jnp.array(0, jnp.int32)))
  return SampleResult(z, calls)


def _sample_grid(denoise_fn, rng, init, schedule, vocab_size, opts):
  if not schedule.state_dependent:
    return _sample_reveal_first(denoise_fn, rng, init, schedule, vocab_size, opts)

  def step(j, t, s, z, logp):
    r = _step_probs(opts.method, schedule, t, s)
    return _grid_step(jax.random.fold_in(rng, j), opts.method, z, logp, r, vocab_size)

  return _run_grid(denoise_fn, rng, init, vocab_size, opts, step)


def _sample_first_hitting(denoise_fn, rng, init, schedule, vocab_size, top_p):
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
    token = categorical(k_token, _logp_at(den, h, pos[:, None], vocab_size, top_p)[:, 0])
    z_flat = z.reshape(flat_shape)
    current = jnp.take_along_axis(z_flat, pos[:, None], axis=1)[:, 0]
    new = jnp.where(n > 0, token, current)
    z_flat = z_flat.at[jnp.arange(b), pos].set(new)
    return z_flat.reshape(z.shape), s, calls + 1

  z, _, calls = jax.lax.while_loop(
      cond, body, (init, jnp.ones((b,), jnp.float32), jnp.array(0, jnp.int32)))
  return SampleResult(z, calls)


def _sample_maskgit(denoise_fn, rng, init, schedule, vocab_size, opts):
  """MaskGIT's confidence-ordered decoding on the time grid; see `sample` for what it computes."""
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

  return _run_grid(denoise_fn, rng, init, vocab_size, opts, step)


# Remasking draws its coins from fold_in(rng, _REMASK_STREAM) so that the unmasking draws keep the
# ancestral sampler's keys: with remask_eta = 0, "cap" returns bitwise the ancestral samples (and
# "loop" those of the ancestral steps on its warped times; see `sample`).
_REMASK_STREAM = 2**32 - 1


def _remdm_model_time(opts):
  """The loop strategy's time warp t -> tau(t): steps use alpha(tau), the network sees tau."""
  if opts.remask_strategy == "cap":
    return lambda t: t
  t_on, t_off = opts.remask_t_on, opts.remask_t_off

  def tau(t):
    # Below t_off the rest of the schedule, alpha(t_on) .. alpha(0), is compressed into [0, t_off].
    late = t * (t_on / t_off) if t_off > 0.0 else jnp.zeros_like(t)
    return jnp.where(t > t_on, t, jnp.where(t >= t_off, t_on, late))

  return tau


def _sample_remdm(denoise_fn, rng, init, schedule, vocab_size, opts):
  """Ancestral steps plus ReMDM remasking; see `sample` for the step's probabilities."""
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
    z_new = _reveal_step(jax.random.fold_in(rng, j), z, logp, r, vocab_size)
    remask = bernoulli(jax.random.fold_in(remask_rng, j), jnp.broadcast_to(sigma, z.shape))
    return jnp.where(generated & (z != vocab_size) & remask, vocab_size, z_new)

  return _run_grid(denoise_fn, rng, init, vocab_size, opts, step, model_time=tau)


class SamplerOptions(NamedTuple):
  """Everything that selects and tunes a sampler; built and checked by `check_options`."""
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


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_options(state_dependent: bool, *, num_steps: int, method: str = "ancestral",
                  top_p: float | None = None, time_grid_kind: str = "uniform",
                  reuse_unchanged: bool = False, temperature: float = 1.0, remask_eta: float = 0.0,
                  remask_strategy: str = "cap", remask_t_on: float = 0.55,
                  remask_t_off: float = 0.05) -> SamplerOptions:
  """The sampler's options (arguments as for `sample`; state_dependent: a GenMD4 schedule), checked
  without a network, so a config can be checked before training. Raises ValueError naming the
  argument, its value and the valid values."""
  if method not in METHODS:
    raise ValueError(f"unknown sampling method {method!r}; valid: {', '.join(METHODS)}")
  if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
    raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
  if time_grid_kind not in TIME_GRIDS:
    raise ValueError(f"unknown time grid {time_grid_kind!r}; valid: {', '.join(TIME_GRIDS)}")
  if not _is_real(temperature) or temperature < 0.0:
    raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
  if temperature != 1.0 and method != "maskgit":
    raise ValueError(f"temperature={temperature!r} applies to method='maskgit' only, got "
                     f"method={method!r}; leave temperature at 1.0")
  if not _is_real(remask_eta) or not 0.0 <= remask_eta <= 1.0:
    raise ValueError(f"remask_eta must be a float in [0, 1], got {remask_eta!r}")
  if remask_eta != 0.0 and method != "remdm":
    raise ValueError(f"remask_eta={remask_eta!r} applies to method='remdm' only, got "
                     f"method={method!r}; set method='remdm' or remask_eta=0")
  if remask_strategy not in REMASK_STRATEGIES:
    raise ValueError(f"unknown remask_strategy {remask_strategy!r}; valid: "
                     f"{', '.join(REMASK_STRATEGIES)}")
  if not (_is_real(remask_t_on) and _is_real(remask_t_off)
          and 0.0 <= remask_t_off < remask_t_on <= 1.0):
    raise ValueError("remask_t_on and remask_t_off must satisfy "
                     "1 >= remask_t_on > remask_t_off >= 0, "
                     f"got remask_t_on={remask_t_on!r}, remask_t_off={remask_t_off!r}")
  if reuse_unchanged and reveals_first(method, state_dependent):
    raise ValueError(f"reuse_unchanged applies to maskgit, remdm and GenMD4's grid samplers; "
                     f"{method} with a state-independent schedule calls the network only on steps "
                     "that reveal a token already")
  if state_dependent and method in STATE_INDEPENDENT_ONLY:
    why = {"first_hitting": "the time of the next unmasking depends on the unknown token values",
           "maskgit": "its reveal counts need one alpha(t) for every token",
           "remdm": "its remasking probabilities need one alpha(t) for every token"}[method]
    raise ValueError(f"{method} needs a state-independent schedule: with StateDependentPoly {why}; "
                     "use ancestral, euler or mean")
  return SamplerOptions(method, num_steps, top_p, time_grid_kind, reuse_unchanged,
                        float(temperature), float(remask_eta), remask_strategy,
                        float(remask_t_on), float(remask_t_off))


def _sample_first_hitting_opts(denoise_fn, rng, init, schedule, vocab_size, opts):
  return _sample_first_hitting(denoise_fn, rng, init, schedule, vocab_size, opts.top_p)


_SAMPLERS = {
    "ancestral": _sample_grid,
    "euler": _sample_grid,
    "mean": _sample_grid,
    "first_hitting": _sample_first_hitting_opts,
    "maskgit": _sample_maskgit,
    "remdm": _sample_remdm,
}


def sample_with_info(denoise_fn: DenoiseFn, rng: Array, init: Array, schedule: AnySchedule, *,
                     vocab_size: int, num_steps: int, method: str = "ancestral",
                     top_p: float | None = None, time_grid_kind: str = "uniform",
                     reuse_unchanged: bool = False, temperature: float = 1.0,
                     remask_eta: float = 0.0, remask_strategy: str = "cap",
                     remask_t_on: float = 0.55, remask_t_off: float = 0.05) -> SampleResult:
  """Samples and the number of network calls made. Arguments as for `sample`."""
  check_tokens(init, vocab_size, allow_mask=True, name="init")
  check_schedule(schedule, vocab_size)
  opts = check_options(schedule.state_dependent, method=method, num_steps=num_steps, top_p=top_p,
                       time_grid_kind=time_grid_kind, reuse_unchanged=reuse_unchanged,
                       temperature=temperature, remask_eta=remask_eta,
                       remask_strategy=remask_strategy, remask_t_on=remask_t_on,
                       remask_t_off=remask_t_off)
  init = jnp.asarray(init, jnp.int32)
  return _SAMPLERS[method](denoise_fn, rng, init, schedule, vocab_size, opts)


def sample(denoise_fn: DenoiseFn, rng: Array, init: Array, schedule: AnySchedule, *,
           vocab_size: int, num_steps: int, method: str = "ancestral", top_p: float | None = None,
           time_grid_kind: str = "uniform", reuse_unchanged: bool = False,
           temperature: float = 1.0, remask_eta: float = 0.0, remask_strategy: str = "cap",
           remask_t_on: float = 0.55, remask_t_off: float = 0.05) -> Array:
  """Fills the masked positions of init: int32[B, *S] and returns int32[B, *S] with no mask id.

  Args:
    denoise_fn: (z: int32[B, *S], t: float32[B]) -> float32[B, *S, vocab_size] logits of x, or a
      readout.SplitDenoiser (model.denoiser gives one), which the REVEAL_FIRST methods read out
      only at the positions they reveal.
    rng: PRNG key.
    init: int32[B, *S]; entries equal to vocab_size are generated, all others are kept.
    schedule: from md4.schedules; StateDependentPoly unmasks each value v at its own rate (only the
      ancestral, euler and mean methods accept it).
    vocab_size: V (the mask id).
    num_steps: steps of the time grid (first_hitting ignores it: it takes one step per masked token).
    method: one of METHODS:
      "ancestral": exact step probabilities (a_s - a_t)/(1 - a_t) mu.
      "euler": rate * dt, clipped to a probability.
      "mean": draw x0 from mu, then reveal it with the step probability.
      "first_hitting": exact unmasking times, one network call per token.
      "maskgit": MaskGIT's confidence-ordered parallel decoding (Chang et al. 2022). NOT a sampler
        of the model's law: it reveals the positions whose drawn tokens are most probable first,
        which favours confident tokens (at temperature 0 it is a deterministic greedy decoder). On
        the step from t to s of the grid, every masked position draws a candidate
        x ~ softmax(log mu / temperature) (the argmax of mu at temperature 0) with the confidence
        c = log mu(x) + temperature * rho(s) * G, G ~ Gumbel(0, 1), rho(s) = (1 - a_s)/(1 - a_1)
        (the scheduled fraction still masked after the step; rho(0) = 0). The row then reveals its
        most confident masked positions, with their candidates, until round(M rho(s)) stay masked
        (M: the row's masked positions in init; round half to even; the last step reveals all).
        MaskGIT draws tokens at temperature 1 and uses a separate choice temperature (4.5) for the
        noise; here `temperature` sets both. With the linear schedule and the uniform grid,
        rho = 1 - (j + 1)/num_steps after step j, MaskGIT's annealing of the noise; with the cosine
        schedule the counts follow MaskGIT's cosine mask schedule. Network calls: num_steps.
      "remdm": ancestral steps with remasking (ReMDM: Wang, Schiff, Sahoo, Kuleshov 2025,
        "Remasking Discrete Diffusion Models with Inference-Time Scaling", arXiv:2503.00307).
        On a step from t to s, with x drawn from mu(z_t) for each position:
          z_t = m:  z_s = x with probability (a_s - (1 - sigma_t) a_t)/(1 - a_t),
                    z_s = m with probability (1 - a_s - sigma_t a_t)/(1 - a_t);
          z_t = x decoded by this run: z_s = m with probability sigma_t, else x;
          tokens given in init never change.
        Any 0 <= sigma_t <= sigma_max = min(1, (1 - a_s)/a_t) keeps these probabilities valid and
        the forward process's per-token marginal (x with probability a_s); sigma_t = 0 is the
        ancestral step. With remask_eta = 0, "cap" gives bitwise the ancestral samples; "loop"
        does not: it still warps time, so it gives the ancestral steps on the warped times tau(t)
        of the grid (the network called at tau(t), nothing revealed inside the window, where alpha
        is held), bitwise. remask_strategy:
          "cap": sigma_t = min(remask_eta, sigma_max) on every step.
          "loop": three phases by the step's upper time t: t > t_on, ancestral (sigma 0);
            t_off < t <= t_on, alpha held at a(t_on) (so a_s = a_t) with
            sigma_t = min(remask_eta, sigma_max): the masked fraction stays put while tokens are
            remasked and redrawn; t <= t_off, ancestral on a(t t_on / t_off), the rest of the
            schedule compressed into [0, t_off]. The network is called at the warped time.
        The last step reveals everything. Not exact even with the exact denoiser: positions are
        drawn independently given z_t, and remasking changes several at once with a probability
        per step that does not shrink with the step size. On the 3-token toy of the tests (exact
        denoiser, linear schedule, uniform grid) the total variation to p is 0.0007 for ancestral
        at 400 steps; about 0.008 at 400 steps and 0.004 at 1600 for "cap" with remask_eta in
        [0.1, 1] (detectable with 10^4 samples); about 0.04 at both for "loop" with remask_eta = 1.
    top_p: nucleus filtering of the denoiser's distribution (None = off).
    time_grid_kind: "uniform" or "cosine" (see time_grid).
    reuse_unchanged: skip the network call on a step whose input did not change since the last call.
      Valid only when denoise_fn ignores t (a time-free denoiser), and for maskgit, remdm and the
      grid samplers under a state-dependent schedule: the others (REVEAL_FIRST) call the network
      only on steps that reveal something anyway.
    temperature: maskgit only (float >= 0; other methods raise unless it is 1.0).
    remask_eta: remdm only (float in [0, 1]; other methods raise unless it is 0).
    remask_strategy: "cap" or "loop" (read by remdm only).
    remask_t_on, remask_t_off: the loop's window, 1 >= t_on > t_off >= 0 (read by remdm's "loop"
      only; checked always). The defaults 0.55 and 0.05 are the ReMDM scripts' t_on and t_off, but
      ReMDM holds alpha at a separate alpha_on (0.9 there), reached at t_on by rescaling the first
      phase, where this loop holds a(t_on) (0.45 for the linear schedule at 0.55): for ReMDM's
      plateau, pick t_on with a(t_on) = 0.9.
  """
  return sample_with_info(denoise_fn, rng, init, schedule, vocab_size=vocab_size,
                          num_steps=num_steps, method=method, top_p=top_p,
                          time_grid_kind=time_grid_kind, reuse_unchanged=reuse_unchanged,
                          temperature=temperature, remask_eta=remask_eta,
                          remask_strategy=remask_strategy, remask_t_on=remask_t_on,
                          remask_t_off=remask_t_off).samples


def sample_blocks(denoise_fn: DenoiseFn, rng: Array, init: Array, schedule: AnySchedule, *,
                  vocab_size: int, seq_length: int, window: int, num_steps: int,
                  **options) -> SampleResult:
  """Generates sequences of any length N with a model of length L, left to right in blocks (MDLM).

  Block 0 is positions [0, L), sampled as `sample` does. Block b >= 1 feeds the model the L
  positions from i_b = min(b (L - window), N - L): the last `window` tokens already generated, then
  the next L - window positions; when fewer positions remain, the last block takes a longer window
  so that its input is still exactly L tokens (the last L of the sequence). Within each block the
  masked positions are sampled with `method` and the given tokens of init are kept, so prompts and
  infilling work anywhere. N <= L is one block, padded with masked positions that are sampled and
  dropped (so the result follows the model's marginal of the first N positions).

  The law sampled: block b's new tokens follow the model's conditional given that block's window
  and its given tokens, so the sequence follows the product over blocks of these conditionals
  (exactly for first_hitting; as num_steps grows for ancestral, euler and mean, and slowly for
  remdm "cap"; not for maskgit nor remdm "loop"). The window truncates the context (nothing before
  it is seen), and a token given in a later block does not influence earlier blocks.

  Args:
    init: int32[B, N]; entries equal to vocab_size are generated, all others are kept.
    seq_length: L, the length the model takes.
    window: tokens of context carried into each later block, an int in [0, L - 1]; 0 makes blocks
      independent (except the last, whose window is widened as above).
    num_steps, **options: the sampler's arguments as for `sample` (method, top_p, ...); they apply
      within each block.

  Returns:
    SampleResult with samples int32[B, N] and num_calls, the network calls of all blocks. The block
    loop is a lax loop over one block sampler of shape [B, L], so it compiles once.
  """
  if jnp.ndim(init) != 2 or 0 in jnp.shape(init):  # Before check_tokens, which needs values.
    raise ValueError("init must be int32[batch, N] with N >= 1 (one sequence per row), got shape "
                     f"{jnp.shape(init)}")
  check_tokens(init, vocab_size, allow_mask=True, name="init")
  check_schedule(schedule, vocab_size)
  opts = check_options(schedule.state_dependent, num_steps=num_steps, **options)
  if not isinstance(seq_length, int) or isinstance(seq_length, bool) or seq_length < 1:
    raise ValueError(f"seq_length must be an int >= 1 (the model's length), got {seq_length!r}")
  if not isinstance(window, int) or isinstance(window, bool) or not 0 <= window < seq_length:
    raise ValueError(f"window must be an int in [0, seq_length - 1] = [0, {seq_length - 1}], got "
                     f"{window!r}")
  init = jnp.asarray(init, jnp.int32)
  sampler = _SAMPLERS[opts.method]
  n = init.shape[1]
  if n <= seq_length:
    padded = jnp.pad(init, ((0, 0), (0, seq_length - n)), constant_values=vocab_size)
    out = sampler(denoise_fn, jax.random.fold_in(rng, 0), padded, schedule, vocab_size, opts)
    return SampleResult(out.samples[:, :n], out.num_calls)
  stride = seq_length - window
  num_blocks = 1 + -(-(n - seq_length) // stride)

  def body(b, carry):
    seq, calls = carry
    start = jnp.minimum(b * stride, n - seq_length)
    block = jax.lax.dynamic_slice_in_dim(seq, start, seq_length, axis=1)
    out = sampler(denoise_fn, jax.random.fold_in(rng, b), block, schedule, vocab_size, opts)
    seq = jax.lax.dynamic_update_slice_in_dim(seq, out.samples, start, axis=1)
    return seq, calls + out.num_calls

  seq, calls = jax.lax.fori_loop(0, num_blocks, body, (init, jnp.array(0, jnp.int32)))
  return SampleResult(seq, calls)


def guided_logits(cond_logits: Array, uncond_logits: Array, scale: float | Array) -> Array:
  """Classifier-free guidance (Ho & Salimans 2021): float32[..., V] log-probs of p_u^(1-w) p_c^w/Z.

  = log_softmax(u) + w (log_softmax(c) - log_softmax(u)), renormalised over the last axis, with
  w = scale: 0 gives the unconditional distribution, 1 the conditional one, w > 1 sharpens towards
  what the condition makes likelier. A token that either model gives probability 0 (a -inf logit)
  gets probability 0.

  Args:
    cond_logits, uncond_logits: float[..., V] of the same shape.
    scale: w, a float or a float32[] array.
  """
  if jnp.shape(cond_logits) != jnp.shape(uncond_logits):
    raise ValueError(f"cond_logits has shape {jnp.shape(cond_logits)} but uncond_logits has shape "
                     f"{jnp.shape(uncond_logits)}; they must match")
  if isinstance(scale, numbers.Real) and not math.isfinite(scale):
    raise ValueError(f"scale must be a finite float, got {scale!r}")
  log_c = jax.nn.log_softmax(jnp.asarray(cond_logits, jnp.float32), axis=-1)
  log_u = jax.nn.log_softmax(jnp.asarray(uncond_logits, jnp.float32), axis=-1)
  # -inf - -inf is nan; zeroing both sides first keeps the result (and its gradient) finite.
  ok = jnp.isfinite(log_c) & jnp.isfinite(log_u)
  log_c, log_u = jnp.where(ok, log_c, 0.0), jnp.where(ok, log_u, 0.0)
  mixed = jnp.where(ok, log_u + scale * (log_c - log_u), -jnp.inf)
  return jax.nn.log_softmax(mixed, axis=-1)


def guided_denoiser(cond_fn: DenoiseFn, uncond_fn: DenoiseFn, scale: float | Array) -> DenoiseFn:
  """The DenoiseFn (z, t) -> guided_logits(cond_fn(z, t), uncond_fn(z, t), scale).

  Each call evaluates both networks, so a sampler's num_calls counts pairs of network calls. Given
  two readout.SplitDenoisers it is one too, read out at the same positions of both.
  """
  if isinstance(scale, numbers.Real) and not math.isfinite(scale):
    raise ValueError(f"scale must be a finite float, got {scale!r}")
  if isinstance(cond_fn, SplitDenoiser) and isinstance(uncond_fn, SplitDenoiser):
    return SplitDenoiser(
        lambda z, t: (cond_fn.features(z, t), uncond_fn.features(z, t)),
        lambda h, positions: guided_logits(cond_fn.logits(h[0], positions),
                                           uncond_fn.logits(h[1], positions), scale))
  return lambda z, t: guided_logits(cond_fn(z, t), uncond_fn(z, t), scale)
