"""Classifier-free guidance (Ho & Salimans 2021): a conditional and an unconditional denoiser
combined into one, p_u^(1 - w) p_c^w renormalised, for any sampler."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from md4.readout import SplitDenoiser
from md4.samplers import DenoiseFn

Array = jax.Array


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
