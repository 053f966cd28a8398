"""Scaled dot-product attention by implementation name: one place for every attention kernel.

`attend(q, k, v, impl=..., causal=...)` computes softmax(q k^T / sqrt(H)) v per head, with the
implementation chosen by name (`ATTENTION_IMPLS`). Every implementation computes the same function;
they differ in speed and memory on each backend, and in which dtypes and shapes they accept.
Dropout on the attention probabilities needs them formed explicitly (`attention_probs`), which
the networks do themselves when it is active.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _xla(q: Array, k: Array, v: Array, causal: bool) -> Array:
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


def _cudnn(q: Array, k: Array, v: Array, causal: bool) -> Array:
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


# name -> (q, k, v: [B, L, N, H], causal) -> [B, L, N, H]. None: jax.nn.dot_product_attention's own
# choice for the backend.
_IMPLS: dict[str | None, Callable[[Array, Array, Array, bool], Array]] = {
    None: lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal),
    "xla": _xla,
    "cudnn": _cudnn,
}
ATTENTION_IMPLS: tuple[str | None, ...] = tuple(_IMPLS)
# Implementations that run in half precision only.
HALF_PRECISION_ONLY = ("cudnn",)


def check_impl(impl: str | None, dtype: jnp.dtype) -> None:
  """Raises ValueError naming an unknown implementation, or one that cannot take `dtype`."""
  if impl not in _IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
  if impl in HALF_PRECISION_ONLY and jnp.dtype(dtype) == jnp.float32:
    raise ValueError(f"attention_impl={impl!r} needs dtype bfloat16 or float16, got float32")


def attend(q: Array, k: Array, v: Array, *, impl: str | None = None, causal: bool = False
           ) -> Array:
  """softmax(q k^T / sqrt(H)) v for each head.

  Args:
    q, k, v: [B, L, N, H] queries, keys and values (N heads of width H).
    impl: a name in ATTENTION_IMPLS.
    causal: each position attends only to itself and earlier ones.

  Returns:
    [B, L, N, H] in v's dtype.
  """
  return _IMPLS[impl](q, k, v, causal)


def attention_probs(q: Array, k: Array, causal: bool = False) -> Array:
  """float32[B, N, L, L]: the attention probabilities, for dropout on them.

  q, k: [B, L, N, H].
  """
  scores = jnp.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(q.shape[-1])
  if causal:
    length = q.shape[1]
    scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores, -jnp.inf)
  return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
