"""ancestral, euler and mean: steps on a time grid, exact as the number of steps grows; the
grid and the loop that maskgit and remdm run on it too.

Reveal first: with a state-independent schedule, whether a masked position is revealed on a step
does not depend on the network's output, so these samplers draw every position's reveal step first,
call the network for each row only on its steps that reveal something (a batch call serves each
row's next such step), and read it out only at the revealed positions (`_sample_reveal_first`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from md4 import readout
from md4.samplers import AnySchedule, DenoiseFn, SampleResult, SamplerOptions
from md4.samplers.draws import bernoulli, categorical, draw_tokens, fine_uniform
from md4.samplers.logprobs import log_probs, log_probs_at
from md4.schedules import rate

Array = jax.Array

TIME_GRIDS = ("uniform", "cosine")


def time_grid(num_steps: int, kind: str = "uniform") -> Array:
  """float32[num_steps + 1] from 0 to 1. "cosine" t_i = cos(pi/2 (1 - i/N)) takes small steps near
  t = 1, where the first tokens are revealed."""
  i = jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps
  if kind == "uniform":
    return i
  if kind == "cosine":
    return jnp.where(i == 0, 0.0, jnp.cos(0.5 * jnp.pi * (1.0 - i)))
  raise ValueError(f"unknown time grid {kind!r}; valid: {', '.join(TIME_GRIDS)}")


def step_probs(method: str, schedule: AnySchedule, t: Array, s: Array) -> Array:
  """Per-value unmasking probability r_v for a masked token over [s, t): float32[V] or float32[]."""
  if method == "euler":
    r = rate(schedule, t) * (t - s)
  else:
    a_t = schedule.alpha(t)
    r = (schedule.alpha(s) - a_t) / (1.0 - a_t)
  # The last step reveals everything, so no mask id is left (the decoder at t = 0).
  return jnp.where(s == 0.0, 1.0, r)


def run_grid(denoise_fn: DenoiseFn, rng: Array, init: Array, vocab_size: int,
             opts: SamplerOptions, step, model_time=None) -> SampleResult:
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
    call = lambda: (log_probs(denoise_fn, z, model_time(t), vocab_size, opts.top_p), calls + 1)
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


def _revealed(key: Array, z: Array, r: Array, mask_id: int) -> tuple[Array, Array]:
  """(bool[B, N]: the masked positions of z: int32[B, *S] revealed with probability r, the step's
  token key). The coins come from the same key and draw as the state-dependent step's."""
  k_unmask, k_token = jax.random.split(key)
  u = fine_uniform(k_unmask, z.shape)[0]
  return ((z == mask_id) & (u < r)).reshape(z.shape[0], -1), k_token


def reveal_step(key: Array, z: Array, logp: Array, r: Array, mask_id: int) -> Array:
  """The reveal-first step with every position's log-probabilities logp: float32[B, *S, V] at
  hand: the same coins and token draws as `_sample_reveal_first`, so the same samples."""
  reveal, k_token = _revealed(key, z, r, mask_id)
  b, n = reveal.shape
  every = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  token = draw_tokens(k_token, logp.reshape(b, n, logp.shape[-1]), every, n)
  return jnp.where(reveal, token, z.reshape(b, n)).reshape(z.shape)


def reveal_steps(rng: Array, init: Array, schedule: AnySchedule, mask_id: int,
                 opts: SamplerOptions) -> Array:
  """int32[B, N]: the step j on which each masked position of init: int32[B, *S] is revealed, the
  first whose coin (`_revealed` with the step's key fold_in(rng, j)) comes up; num_steps at the
  positions init keeps. The last step's r is 1, so every masked position gets a step below
  num_steps."""
  grid = time_grid(opts.num_steps, opts.time_grid_kind)

  def body(j, step):
    i = opts.num_steps - j
    r = step_probs(opts.method, schedule, grid[i], grid[i - 1])
    coin, _ = _revealed(jax.random.fold_in(rng, j), init, r, mask_id)  # False where init keeps.
    return jnp.where((step == opts.num_steps) & coin, j, step)

  unset = jnp.full((init.shape[0], math.prod(init.shape[1:])), opts.num_steps, jnp.int32)
  return jax.lax.fori_loop(0, opts.num_steps, body, unset)


def _sample_reveal_first(denoise_fn, rng, init, schedule, vocab_size, opts):
  """ancestral, euler and mean for a state-independent schedule: every position's reveal step is
  drawn first (one coin per position and step, `reveal_steps`), then each row calls the network
  only at its own steps that reveal something, read out at the positions they reveal.

  With a state-independent schedule, whether a masked position is revealed on the step from t to s
  does not depend on the network's output mu:
    ancestral: it becomes v with probability r mu_v, r = (a_s - a_t)/(1 - a_t), and stays masked
      with probability 1 - r; summed over v (sum mu = 1), it is revealed with probability r, and
      given that, v ~ mu.
    euler: the same with r = rate(t) (t - s), clipped to a probability (u < r for r >= 1 always).
    mean: v ~ mu and, independently, revealed with probability r (the ancestral r).
  So the step's law is that of one coin per position, then a token from mu(z_t, t) at each revealed
  position; ancestral and mean are one sampler here (they differ for a state-dependent schedule).
  A row's z does not change on a step that reveals none of its positions, so the row skips it:
  call k of the batch runs each row's k-th revealing step, at that step's t, with that step's
  token key (draws.draw_tokens: the tokens a step-by-step loop would draw from the same logits).
  num_calls is the most revealing steps of any row (at most num_steps).
  """
  den = readout.as_split(denoise_fn)
  b, n = init.shape[0], math.prod(init.shape[1:])
  num_steps = opts.num_steps
  grid = time_grid(num_steps, opts.time_grid_kind)
  step = reveal_steps(rng, init, schedule, vocab_size, opts)
  # Each row's revealing steps in order: order[:, k] is its k-th, count its number.
  revealing = jnp.zeros((b, num_steps + 1), bool).at[jnp.arange(b)[:, None], step].set(True)
  order, count = readout.revealed_in_order(revealing[:, :num_steps], 1)
  token_keys = jax.vmap(lambda j: jax.random.split(jax.random.fold_in(rng, j))[1])(
      jnp.arange(num_steps))

  def read_out(positions, valid, carry):
    z_flat, h, keys = carry
    logp = log_probs_at(den, h, positions, vocab_size, opts.top_p)
    token = draw_tokens(keys, logp, positions, n)
    rows = jnp.arange(b)[:, None]
    z_flat = z_flat.at[rows, jnp.where(valid, positions, n)].set(token, mode="drop")
    return z_flat, h, keys

  def body(k, z):
    # A row with fewer revealing steps than k has order[:, k] = 0: a valid step it reveals nothing
    # on (`active`), whose t and keys are never read out.
    j, active = order[:, k], k < count
    reveal = (step == j[:, None]) & active[:, None]
    keys = token_keys[j]
    h = den.features(z, grid[num_steps - j])
    z_flat, _, _ = readout.for_revealed(reveal, read_out, (z.reshape(b, n), h, keys))
    return z_flat.reshape(z.shape)

  calls = count.max()
  z = jax.lax.fori_loop(0, calls, body, init)
  return SampleResult(z, calls.astype(jnp.int32))


def sample(denoise_fn: DenoiseFn, rng: Array, init: Array, schedule: AnySchedule, vocab_size: int,
           opts: SamplerOptions) -> SampleResult:
  """ancestral, euler or mean (opts.method): revealing first under a state-independent schedule;
  under a state-dependent one, each step's unmasking probability depends on the token, so the
  network is called on every step (with opts.reuse_unchanged, on every step whose input changed)."""
  if not schedule.state_dependent:
    return _sample_reveal_first(denoise_fn, rng, init, schedule, vocab_size, opts)

  def step(j, t, s, z, logp):
    r = step_probs(opts.method, schedule, t, s)
    return _grid_step(jax.random.fold_in(rng, j), opts.method, z, logp, r, vocab_size)

  return run_grid(denoise_fn, rng, init, vocab_size, opts, step)
