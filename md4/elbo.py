"""The negative ELBO of masked diffusion and the training surrogate whose gradient is unbiased for it.

Generative model (what the bound is a bound of): z_1 ~ prior, where each token is masked with
probability 1 - a1 and otherwise uniform over the vocabulary (a1 = the schedule's alpha(1) = eps);
reverse steps from t to s unmask a masked token to v with probability
(alpha_v(s) - alpha_v(t)) / (1 - alpha_v(t)) * mu_v(z_t, t); at t = 0 tokens still masked are decoded
uniformly. With the eps squeeze the two end terms are exact, deterministic and O(eps L log V):
  reconstruction  sum_i (1 - alpha_{x_i}(0)) log V
  prior           sum_i KL(q(z_1i | x_i) || p(z_1i)).
The diffusion term is estimated by Monte Carlo over (t, z_t):
  continuous time  integral_0^1 E sum_{i masked} sum_v gamma_v(t) [mu_iv - delta(x_i, v)(log mu_iv + 1)]
                   with gamma_v = -alpha_v' / (1 - alpha_v); for a state-independent schedule this is
                   gamma(t) sum_{i masked} -log mu_i(x_i);
  T-step discrete  T E_i sum_{i masked} KL(q(z_s | z_t, x) || p(z_s | z_t)) over t = i/T, s = (i-1)/T.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from md4 import readout
from md4.schedules import Schedule, StateDependentPoly, rate

Array = jax.Array
AnySchedule = Schedule | StateDependentPoly
DenoiseFn = Callable[[Array, Array], Array]


def check_tokens(x: Array, vocab_size: int, *, allow_mask: bool = False, name: str = "x") -> None:
  """Raises ValueError unless x: int[B, *S] holds ids in [0, vocab_size) ([0, vocab_size] with masks).

  Values are checked only when x is concrete; under jit only dtype and rank can be checked.
  """
  if not isinstance(vocab_size, int) or vocab_size < 1:
    raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
  if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
    raise ValueError(f"{name} must hold integer token ids, got dtype {jnp.result_type(x)}")
  if jnp.ndim(x) < 2:
    raise ValueError(f"{name} must have shape [batch, *positions], got shape {jnp.shape(x)}")
  if isinstance(x, jax.core.Tracer):
    return
  top = vocab_size if allow_mask else vocab_size - 1
  values = np.asarray(x)  # Host-side: jnp ops here would be staged out under an outer jit.
  lo, hi = int(values.min()), int(values.max())
  if lo < 0 or hi > top:
    bad = lo if lo < 0 else hi
    raise ValueError(f"{name} holds the id {bad}, outside [0, {top}] for vocab_size={vocab_size}"
                     + (" (the mask id is vocab_size)" if allow_mask else ""))


def check_schedule(schedule: AnySchedule, vocab_size: int) -> None:
  if not isinstance(schedule, (Schedule, StateDependentPoly)):
    raise ValueError(f"schedule must come from md4.schedules, got {schedule!r}")
  if schedule.state_dependent and schedule.vocab_size != vocab_size:
    raise ValueError(f"StateDependentPoly has {schedule.vocab_size} exponents but vocab_size is "
                     f"{vocab_size}")


def sample_times(rng: Array, batch_size: int, *, antithetic: bool = True) -> Array:
  """t: float32[B] uniform on [0, 1); antithetic = one uniform shifted by k/B (stratified)."""
  if antithetic:
    u = jax.random.uniform(rng, ())
    return jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
  return jax.random.uniform(rng, (batch_size,))


def _per_example(values: Array, x: Array) -> Array:
  """Broadcasts per-example values: float32[B] over the positions of x: int[B, *S]."""
  return jnp.broadcast_to(values.reshape((x.shape[0],) + (1,) * (x.ndim - 1)), x.shape)


def _per_token(values: Array, schedule: AnySchedule, x: Array) -> Array:
  """Selects schedule values at each token's own value.

  values: float32[B] (state-independent) or float32[B, V]; x: int[B, *S] -> float32[B, *S].
  """
  if not schedule.state_dependent:
    return _per_example(values, x)
  lead = (x.shape[0],) + (1,) * (x.ndim - 1)
  return jnp.take_along_axis(values.reshape(lead + (-1,)), x[..., None], axis=-1)[..., 0]


def _typed(rng: Array) -> Array:
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)


def example_keys(rng: Array, batch_size: int) -> Array:
  """Typed keys [B]: rng split B ways, or rng itself when it already holds one key per example."""
  rng = _typed(rng)
  if rng.shape == ():
    return jax.random.split(rng, batch_size)
  if rng.shape == (batch_size,):
    return rng
  raise ValueError(f"rng must be one key or one key per example ({batch_size}), got key shape "
                   f"{rng.shape}")


def forward_mask(keys: Array, x: Array, keep_prob: Array, mask_id: int) -> Array:
  """z_t: each token of x: int[B, *S] stays with probability keep_prob (broadcastable), else mask_id.

  keys: one typed key per example, so an example's mask does not depend on its batch.
  """
  u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:]))(keys)
  return jnp.where(u < keep_prob, x, mask_id).astype(jnp.int32)


def end_terms(x: Array, schedule: AnySchedule, vocab_size: int) -> Array:
  """Reconstruction (t = 0) plus prior (t = 1) terms in nats: float32[B]."""
  b = x.shape[0]
  log_v = math.log(vocab_size)
  a0 = _per_token(schedule.alpha(jnp.zeros((b,))), schedule, x)
  alpha1 = schedule.alpha(jnp.ones((b,)))
  a1 = _per_token(alpha1, schedule, x)
  # The prior keeps a token unmasked (then uniform) with the vocabulary-average alpha(1).
  a1_bar = _per_example(alpha1.mean(-1) if schedule.state_dependent else alpha1, x)
  prior = a1 * (jnp.log(a1) + log_v - jnp.log(a1_bar)) + (1.0 - a1) * (
      jnp.log1p(-a1) - jnp.log1p(-a1_bar))
  return ((1.0 - a0) * log_v + prior).reshape(b, -1).sum(-1)


def _masked_sum(masked: Array, per_pos: Array) -> Array:
  b = masked.shape[0]
  return jnp.where(masked, per_pos, 0.0).reshape(b, -1).sum(-1)


def _scale(weight: Array, total: Array) -> Array:
  # An infinite weight (t = 0 exactly, where dalpha may diverge) meets nothing masked: 0, not nan.
  return jnp.where(total == 0.0, 0.0, weight * total)


def _position_sums(logp, x, masked, t, s, schedule, timesteps):
  """The sum over the masked positions of x: int[B, *S] of the diffusion term's per-position part,
  float32[B]; a state-independent schedule's per-example weight is applied by `_weighted`.

  logp: float32[B, *S, V]; t, s: float32[B] (s only in discrete time).
  """
  logp_x = jnp.take_along_axis(logp, x[..., None], axis=-1)[..., 0]
  if not schedule.state_dependent:
    return _masked_sum(masked, -logp_x)
  b = x.shape[0]
  lead = (b,) + (1,) * (x.ndim - 1) + (-1,)
  if timesteps is None:
    g = rate(schedule, t).reshape(lead)
    g_x = jnp.take_along_axis(g, x[..., None], axis=-1)[..., 0]
    return _masked_sum(masked, (g * jnp.exp(logp)).sum(-1) - g_x * (logp_x + 1.0))
  a_t, a_s = schedule.alpha(t), schedule.alpha(s)
  r = ((a_s - a_t) / (1.0 - a_t)).reshape(lead)  # step unmasking probability per token value
  r_x = jnp.take_along_axis(r, x[..., None], axis=-1)[..., 0]
  stay_model = 1.0 - (r * jnp.exp(logp)).sum(-1)
  kl = -r_x * logp_x + (1.0 - r_x) * (jnp.log1p(-r_x) - jnp.log(stay_model))
  return _masked_sum(masked, kl)


def _weighted(total, t, s, schedule, timesteps):
  """The diffusion term from `_position_sums`' float32[B]: times gamma(t) (continuous) or T times the
  step's unmasking probability (discrete) for a state-independent schedule, whose weight is the
  same at every position; T times the sum for a state-dependent one in discrete time."""
  if schedule.state_dependent:
    return total if timesteps is None else timesteps * total
  if timesteps is None:
    return _scale(rate(schedule, t), total)
  a_t, a_s = schedule.alpha(t), schedule.alpha(s)
  return timesteps * ((a_s - a_t) / (1.0 - a_t)) * total


def _times_and_keys(x, rng, antithetic, times):
  """t: float32[B] and one mask key per example.

  From one key: t is stratified across the batch (if antithetic). From per-example keys: each
  example's t comes from its own key unless `times` is given (the trainer passes t stratified over
  the global batch, so that microbatching and sharding change nothing).
  """
  b = x.shape[0]
  if times is not None:
    if jnp.shape(times) != (b,):
      raise ValueError(f"times must have shape ({b},), got {jnp.shape(times)}")
    return jnp.asarray(times, jnp.float32), example_keys(rng, b)
  rng = _typed(rng)
  if rng.shape == ():
    k_t, k_z = jax.random.split(rng)
    return sample_times(k_t, b, antithetic=antithetic), example_keys(k_z, b)
  keys = example_keys(rng, b)
  t = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0)))(keys)
  return t, jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)


def _draw(x, rng, schedule, vocab_size, timesteps, antithetic, times=None):
  """One draw of (t, s, z_t): t, s: float32[B]; z: int32[B, *S]."""
  t, keys = _times_and_keys(x, rng, antithetic, times)
  s = None
  if timesteps is not None:
    i = jnp.clip(jnp.ceil(t * timesteps), 1, timesteps)
    t, s = i / timesteps, (i - 1.0) / timesteps
  z = forward_mask(keys, x, _per_token(schedule.alpha(t), schedule, x), vocab_size)
  return t, s, z


def _check_logits(logits, shape, vocab_size, what):
  if logits.shape != shape + (vocab_size,):
    raise ValueError(f"{what} returned logits of shape {logits.shape}; expected "
                     f"{shape + (vocab_size,)} (x's shape plus vocab_size)")


def _sums(denoise_fn, z, t, x, vocab_size, fn, chunk=None):
  """fn(logp: float32[B, *S', V], x: int[B, *S'], z: int[B, *S']) -> a tuple of float32[B] sums over
  those positions, summed over all positions of x: int[B, *S] (z_t: int32[B, *S]).

  Without a chunk the denoiser is called once and fn sees every position. With one, denoise_fn must
  be a readout.SplitDenoiser whose features are [B, *S, D] (the transformer's, model.denoiser): its
  output layer is applied to `chunk` positions at a time (flattened: *S' = (chunk,)) in a scan
  whose body is rematerialised, so one chunk's logits live at a time, forward and backward, and
  fn's sums are added up.
  """
  if chunk is None:
    logits = denoise_fn(z, t)
    _check_logits(logits, x.shape, vocab_size, "denoise_fn")
    return fn(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), x, z)
  if not isinstance(denoise_fn, readout.SplitDenoiser):
    raise ValueError("logits_chunk needs a denoiser split at its output layer "
                     "(readout.SplitDenoiser, as model.denoiser makes the transformer)")
  h = denoise_fn.features(z, t)
  b, n = x.shape[0], math.prod(x.shape[1:])
  if not isinstance(h, jax.Array) or h.shape[:-1] != x.shape:
    raise ValueError(f"logits_chunk needs features of x's shape {x.shape} plus a feature "
                     f"dimension; the denoiser's are {jax.tree.map(jnp.shape, h)}")
  if chunk < 1 or n % chunk:
    raise ValueError(f"logits_chunk={chunk} must divide the {n} positions of each example")
  split = lambda v: v.reshape((b, n // chunk, chunk) + v.shape[x.ndim:]).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_sums(h_c, x_c, z_c):
    logits = denoise_fn.logits(h_c, None)
    _check_logits(logits, x_c.shape, vocab_size, "the denoiser's output layer")
    return fn(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), x_c, z_c)

  inputs = (split(h), split(x), split(z))
  first = jax.tree.map(lambda v: v[0], inputs)
  zeros = jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), jax.eval_shape(chunk_sums, *first))
  add = lambda total, chunk: (jax.tree.map(jnp.add, total, chunk_sums(*chunk)), None)
  return jax.lax.scan(add, zeros, inputs)[0]


def _check_all(x, schedule, vocab_size, timesteps=None, num_samples=1):
  check_tokens(x, vocab_size)
  check_schedule(schedule, vocab_size)
  if timesteps is not None and (not isinstance(timesteps, int) or timesteps < 1):
    raise ValueError(f"timesteps must be None (continuous time) or an int >= 1, got {timesteps!r}")
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")


def nelbo(denoise_fn: DenoiseFn, x: Array, rng: Array, schedule: AnySchedule, *, vocab_size: int,
          num_samples: int = 1, timesteps: int | None = None, antithetic: bool = True,
          times: Array | None = None, logits_chunk: int | None = None) -> Array:
  """Unbiased Monte Carlo estimate of the negative ELBO in nats per example: float32[B].

  Args:
    denoise_fn: (z_t: int32[B, *S], t: float32[B]) -> float32[B, *S, vocab_size] logits of x
      (a plain callable, or a readout.SplitDenoiser).
    x: int32[B, *S] data, ids in [0, vocab_size).
    rng: one PRNG key, or one key per example (key shape [B]): then each example's draws depend
      on its own key alone, whatever batch it sits in.
    schedule: from md4.schedules (state-independent or StateDependentPoly).
    vocab_size: V; the mask id is V.
    num_samples: draws of (t, z_t) averaged per example.
    timesteps: None for the continuous-time bound, or T for the T-step discrete-time bound.
    antithetic: stratify t across the batch (lower variance, still unbiased per example); applies
      when rng is one key.
    times: optional float32[B] times to use instead of drawing them (num_samples must be 1).
    logits_chunk: None, or C: the logits formed C positions at a time and never all at once (the
      same value and gradient, to float rounding); needs a readout.SplitDenoiser whose features
      have x's shape plus a feature dimension (model.denoiser's transformer).
  """
  _check_all(x, schedule, vocab_size, timesteps, num_samples)
  if times is not None and num_samples != 1:
    raise ValueError("times can be given only with num_samples=1")

  def one(key):
    t, s, z = _draw(x, key, schedule, vocab_size, timesteps, antithetic, times)
    (total,) = _sums(denoise_fn, z, t, x, vocab_size, lambda logp, x, z: (
        _position_sums(logp, x, z == vocab_size, t, s, schedule, timesteps),), logits_chunk)
    return _weighted(total, t, s, schedule, timesteps)

  rng = _typed(rng)
  if rng.shape == ():
    keys = jax.random.split(rng, num_samples)
  else:  # [num_samples, B]: sample j of example b from fold_in(key_b, j).
    keys = jax.vmap(lambda j: jax.vmap(lambda k: jax.random.fold_in(k, j))(rng))(
        jnp.arange(num_samples))
  # One sample is called directly: the gradient of convolutions inside a loop is ~20x slower on
  # XLA:CPU.
  diffusion = one(keys[0]) if num_samples == 1 else jax.lax.map(one, keys).mean(0)
  return diffusion + end_terms(x, schedule, vocab_size)


def _log_keep_prob(x, z, t, schedule, vocab_size):
  """log q(z_t | x): float32[B]."""
  a = _per_token(schedule.alpha(t), schedule, x)
  return _masked_sum(z == vocab_size, jnp.log1p(-a)) + _masked_sum(z != vocab_size, jnp.log(a))


def training_loss(denoise_fn: DenoiseFn, x: Array, rng: Array, schedule: AnySchedule, *,
                  vocab_size: int, antithetic: bool = True, network_masks: int = 2,
                  times: Array | None = None, logits_chunk: int | None = None) -> Array:
  """Per-example surrogate: float32[B]; its value estimates nelbo and its gradient is unbiased.

  For a state-independent schedule this is `nelbo` with one sample. For StateDependentPoly (GenMD4) two
  masks z1, z2 are drawn at the same t; the gradient w.r.t. the exponents gets the pathwise term plus
  the leave-one-out REINFORCE term 1/2 (f1 - f2) grad(log q(z1|x) - log q(z2|x)).

  Args as for `nelbo`, and
    network_masks: GenMD4 only: 2 averages the network-gradient term over both masks (what the paper's
      code does: in effect twice the batch), 1 uses z1 alone, z2 serving only as the baseline.
  """
  _check_all(x, schedule, vocab_size)
  if not schedule.state_dependent:
    return nelbo(denoise_fn, x, rng, schedule, vocab_size=vocab_size, antithetic=antithetic,
                 times=times, logits_chunk=logits_chunk)
  if network_masks not in (1, 2):
    raise ValueError(f"network_masks must be 1 or 2, got {network_masks!r}")
  b = x.shape[0]
  t, keys = _times_and_keys(x, rng, antithetic, times)
  keep = _per_token(schedule.alpha(t), schedule, x)
  z1 = forward_mask(jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), x, keep, vocab_size)
  z2 = forward_mask(jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys), x, keep, vocab_size)

  def both_sums(logp, x, z):  # logp, x, z: [2B, ...], the two masked copies stacked.
    logp1, logp2 = logp[:b], logp[b:]
    if network_masks == 1:
      logp2 = jax.lax.stop_gradient(logp2)
    return (_position_sums(logp1, x[:b], z[:b] == vocab_size, t, None, schedule, None),
            _position_sums(logp2, x[b:], z[b:] == vocab_size, t, None, schedule, None))

  # One network call on the stacked batch: better device utilisation than two calls.
  sum1, sum2 = _sums(denoise_fn, jnp.concatenate([z1, z2]), jnp.concatenate([t, t]),
                     jnp.concatenate([x, x]), vocab_size, both_sums, logits_chunk)
  ends = end_terms(x, schedule, vocab_size)
  f1 = _weighted(sum1, t, None, schedule, None) + ends
  f2 = _weighted(sum2, t, None, schedule, None) + ends
  value = f1 if network_masks == 1 else 0.5 * (f1 + f2)
  score = _log_keep_prob(x, z1, t, schedule, vocab_size) - _log_keep_prob(
      x, z2, t, schedule, vocab_size)
  rloo = 0.5 * jax.lax.stop_gradient(f1 - f2) * score
  return value + rloo - jax.lax.stop_gradient(rloo)


def bits_per_token(nelbo_nats: Array, num_tokens: int | Array) -> Array:
  """Nats per example -> bits per token (char, dim): nelbo / (num_tokens ln 2)."""
  return nelbo_nats / (num_tokens * math.log(2.0))


def perplexity(nelbo_nats: Array, num_tokens: int | Array) -> Array:
  """Nats per example -> perplexity exp(nelbo / num_tokens)."""
  return jnp.exp(nelbo_nats / num_tokens)
