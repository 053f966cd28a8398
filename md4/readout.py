"""Denoisers split into the network body and its output layer, read out at chosen positions only.

A sampler that knows which masked positions a step reveals before it calls the network (md4.sampling:
ancestral, euler, mean and first_hitting with a state-independent schedule) runs the body once and
the output layer only at those positions: for MD4-S the 768 x 50257 output layer is about a quarter
of the network's FLOPs per position, and the softmax, top-p and token draw over 50257 values cost as
much again on a CPU. Shapes are static under jit, so a step's positions go into a bucket of static
size, the smallest of `bucket_sizes(n)` that holds the largest count of any row, padded; the body
runs outside the buckets (once per call), only the cheap read-out is compiled once per bucket size.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class SplitDenoiser(NamedTuple):
  """A denoiser in two parts: `features(z, t)` runs the network body once; `logits(h, positions)`
  applies the output layer to those features at the given positions only.

  features: (z: int32[B, *S], t: float32[B]) -> h, a pytree of arrays with leading axis B.
  logits: (h, positions: int32[B, K]) -> float32[B, K, V], the logits at flat positions (indices
    into the flattened *S) of each row, equal to those rows of the full logits; positions=None
    gives float32[B, *S, V] at every position.
  Calling it, (z, t) -> logits(features(z, t), None), makes it a plain denoise_fn too.
  """

  features: Callable[[Array, Array], Any]
  logits: Callable[[Any, Array | None], Array]

  def __call__(self, z: Array, t: Array) -> Array:
    return self.logits(self.features(z, t), None)


def as_split(denoise_fn: Callable[[Array, Array], Array] | SplitDenoiser) -> SplitDenoiser:
  """denoise_fn as a SplitDenoiser. A plain (z, t) -> float32[B, *S, V] callable becomes one whose
  features are its full logits and whose read-out gathers rows of them: the network runs whole, but
  a sampler still skips the softmax and draws at positions it does not reveal."""
  if isinstance(denoise_fn, SplitDenoiser):
    return denoise_fn

  def features(z, t):
    logits = denoise_fn(z, t)
    if logits.shape[:-1] != z.shape:
      raise ValueError(f"denoise_fn returned logits of shape {logits.shape}; expected {z.shape} + "
                       "(vocab_size,)")
    return logits

  def logits(h, positions):
    if positions is None:
      return h
    flat = h.reshape(h.shape[0], -1, h.shape[-1])
    return jnp.take_along_axis(flat, positions[..., None], axis=1)

  return SplitDenoiser(features, logits)


def map_logits(denoise_fn, fn: Callable[[Array], Array]):
  """The denoiser whose logits are fn(logits), of the same kind (plain or split). fn must act on
  each position's logits alone (the last axis), e.g. masking token ids."""
  if isinstance(denoise_fn, SplitDenoiser):
    inner = denoise_fn.logits
    return SplitDenoiser(denoise_fn.features, lambda h, positions: fn(inner(h, positions)))
  return lambda z, t: fn(denoise_fn(z, t))


def bucket_sizes(n: int) -> tuple[int, ...]:
  """The static bucket sizes for rows of n positions: 1, 2, 4, ... below n, then n. The bucket
  of a step is at most twice the count it holds (never less), and only log2(n) + 1 read-outs are
  compiled."""
  sizes, k = [], 1
  while k < n:
    sizes.append(k)
    k *= 2
  return tuple(sizes) + (n,)


def bucket_positions(mask: Array, size: int) -> tuple[Array, Array]:
  """The first `size` positions of each row where mask is True, in increasing order.

  mask: bool[B, N] with at most `size` True entries per row. Returns positions int32[B, size]
  (padded with 0) and valid bool[B, size] (False on the padding).
  """
  b, n = mask.shape
  rank = jnp.cumsum(mask, axis=-1) - 1
  rows = jnp.arange(b)[:, None]
  slot = jnp.where(mask, rank, size)  # Positions past the bucket, and unmasked ones, are dropped.
  positions = jnp.zeros((b, size), jnp.int32).at[rows, slot].set(
      jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)), mode="drop")
  valid = jnp.arange(size) < mask.sum(-1, keepdims=True)
  return positions, valid


def by_bucket(mask: Array, read_out: Callable[..., Array], *operands) -> Array:
  """read_out(positions, valid, *operands) for the smallest bucket that holds every row's True
  entries of mask: bool[B, N]; one lax.switch branch per size in bucket_sizes(N)."""
  sizes = bucket_sizes(mask.shape[1])
  index = jnp.searchsorted(jnp.asarray(sizes), mask.sum(-1).max())

  def branch(size, *ops):
    return read_out(*bucket_positions(mask, size), *ops)

  return jax.lax.switch(index, [functools.partial(branch, k) for k in sizes], *operands)
