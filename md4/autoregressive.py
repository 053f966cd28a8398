"""The exact negative log-likelihood of an autoregressive model (the judges of sample quality).

p(x) = prod_i p(x_i | x_<i). A causal network reads the sequence shifted right with a start token
in front, [BOS, x_1, ..., x_{L-1}], and its logits at position i are those of x_i: one call scores
the whole sequence, exactly (no bound, no sampling).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def shift_right(x: Array, bos: int) -> Array:
  """x: int32[B, L] -> int32[B, L]: BOS, then x without its last token."""
  start = jnp.full(x.shape[:1] + (1,), bos, x.dtype)
  return jnp.concatenate([start, x[:, :-1]], axis=1)


def nll(logits_fn: Callable[[Array], Array], x: Array, *, bos: int,
        weights: Array | None = None) -> Array:
  """-log p(x) in nats per sequence.

  Args:
    logits_fn: int32[B, L] inputs -> float[B, L, V] logits of the next tokens (a causal network).
    x: int32[B, L] tokens in [0, V).
    bos: the start token's id.
    weights: float32[B, L] per-position weights (0 for padding), or None for all ones.

  Returns:
    float32[B].
  """
  logp = jax.nn.log_softmax(logits_fn(shift_right(x, bos)).astype(jnp.float32), axis=-1)
  token_logp = jnp.take_along_axis(logp, x[..., None], axis=-1)[..., 0]
  if weights is not None:
    token_logp = token_logp * weights
  return -jnp.sum(token_logp, axis=1)
