"""The denoiser's output as the samplers read it: float32 log-probabilities, top-p filtered if
asked."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from md4.readout import SplitDenoiser

Array = jax.Array


def top_p_filter(logits: Array, top_p: float) -> Array:
  """Log-probabilities renormalised over the nucleus, -inf outside it.

  The nucleus: the fewest most-likely tokens with mass >= top_p; ties with the smallest kept
  probability are kept too. logits: float32[*A, V].
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  sorted_logp = jnp.sort(logp, axis=-1)[..., ::-1]
  mass_before = jnp.cumsum(jnp.exp(sorted_logp), axis=-1) - jnp.exp(sorted_logp)
  # The smallest kept log-probability: the last sorted entry whose preceding mass is below top_p.
  num_kept = jnp.maximum((mass_before < top_p).sum(-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(sorted_logp, num_kept - 1, axis=-1)
  return jax.nn.log_softmax(jnp.where(logp >= threshold, logp, -jnp.inf), axis=-1)


def _normalise(logits: Array, top_p: float | None) -> Array:
  """float32 log-probabilities over the last axis, top-p filtered when top_p is set."""
  logits = logits.astype(jnp.float32)
  if top_p is not None:
    return top_p_filter(logits, top_p)
  return jax.nn.log_softmax(logits, axis=-1)


def log_probs(denoise_fn, z: Array, t: Array, vocab_size: int, top_p: float | None) -> Array:
  """float32[B, *S, V] log-probabilities of denoise_fn(z: int32[B, *S], t) at every position; t is a
  scalar or float32[B]."""
  logits = denoise_fn(z, jnp.broadcast_to(t, z.shape[:1]).astype(jnp.float32))
  if logits.shape != z.shape + (vocab_size,):
    raise ValueError(f"denoise_fn returned logits of shape {logits.shape}; expected "
                     f"{z.shape + (vocab_size,)}")
  return _normalise(logits, top_p)


def log_probs_at(den: SplitDenoiser, h, positions: Array, vocab_size: int,
                 top_p: float | None) -> Array:
  """float32[B, K, V] log-probabilities at positions: int32[B, K] from the features h."""
  logits = den.logits(h, positions)
  if logits.shape != positions.shape + (vocab_size,):
    raise ValueError(f"denoise_fn returned logits of shape {logits.shape} at positions of shape "
                     f"{positions.shape}; expected {positions.shape + (vocab_size,)}")
  return _normalise(logits, top_p)
