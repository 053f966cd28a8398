"""Exact random draws for the samplers: uniforms resolved to 2^-48, Exp(1), categorical, Bernoulli.

Categorical draws use an exponential race, argmax_v(log p_v - log E_v) with E_v ~ Exp(1) computed as
-log1p(-u) from a uniform u that carries 48 random bits near 0. The float32 Gumbel-max trick cannot
draw a token whose probability is below about 4e-9 of the largest (its noise spans only ~19.4 nats),
which silently lowers the temperature (MD4 paper, appendix G; Zheng et al. 2024); this draw keeps
tokens down to about 1e-14 of the largest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

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
  """argmax over the last axis of logits - log E: a draw from softmax(logits).

  -inf logits never win.
  """
  return jnp.argmax(logits - log_exponential_from_bits(hi, lo), axis=-1).astype(jnp.int32)


def categorical(key: Array, logits: Array) -> Array:
  """int32[*A] draw from softmax(logits: float32[*A, V]) that keeps small probabilities."""
  bits = jax.random.bits(key, (2,) + logits.shape, jnp.uint32)
  return categorical_from_bits(logits, bits[0], bits[1])


def bernoulli(key: Array, p: Array) -> Array:
  """bool draw with P(True) = p, exact for p down to 2^-48."""
  return fine_uniform(key, p.shape)[0] < p


def draw_tokens(key: Array, logp: Array, positions: Array, num_positions: int) -> Array:
  """int32[B, K]: a token drawn from exp(logp) at each flat position of each row.

  Each draw takes its random bits from fold_in(key of its row, row * num_positions + position), so
  a position's token does not depend on which other positions are drawn with it: reading the network
  out at the revealed positions only, or at all of them, draws the same tokens.

  Args:
    key: the step's token key, one for every row, or key[B]: one for each row (rows on different
      steps of a sampler; each row then draws what it would with its step's key alone).
    logp: float32[B, K, V] log-probabilities.
    positions: int32[B, K] flat positions in [0, num_positions).
    num_positions: N, the positions of a row.
  """
  b, k = positions.shape
  flat = (jnp.arange(b, dtype=jnp.int32)[:, None] * num_positions + positions).ravel()
  row_keys = jnp.repeat(jnp.broadcast_to(key, (b,)), k, total_repeat_length=b * k)
  keys = jax.vmap(jax.random.fold_in)(row_keys, flat)
  # One vmap over the flattened positions compiles in about half the time of two nested ones.
  bits = jax.vmap(lambda k: jax.random.bits(k, (2, logp.shape[-1]), jnp.uint32))(keys)
  bits = bits.reshape(logp.shape[:-1] + bits.shape[1:])
  return categorical_from_bits(logp, bits[..., 0, :], bits[..., 1, :])
