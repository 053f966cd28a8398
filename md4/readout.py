"""Denoisers split into the network body and its output layer, read out at chosen positions only.

A sampler that knows which masked positions a step reveals before it calls the network
(md4.sampling: ancestral, euler, mean and first_hitting with a state-independent schedule) runs the
body once and the output layer only at those positions: for MD4-S the 768 x 50257 output layer is
about a quarter of the network's FLOPs per position, and the softmax, top-p and token draw over
50257 values cost as much again on a CPU. Shapes are static under jit, so a step's positions are read out in chunks of
static size (`for_revealed`): a lax loop with as many iterations as the row that reveals the most
needs, so nothing is dropped, and only one chunk's read-out is compiled (a lax.switch over bucket
sizes compiles one per size: for MD4-S on XLA:CPU about a second each, mostly the token draw).
"""

from __future__ import annotations

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


# Positions read out per loop iteration, over all rows: enough rows for the output layer's matrix
# product to be compute-bound (it reads the whole V x D matrix each time), few enough that a step
# revealing one token per row computes little beyond it.
READ_OUT_ROWS = 64


def chunk_size(batch: int, n: int) -> int:
  """Positions of each row read out per iteration: READ_OUT_ROWS / batch rounded up to a power of
  two, at most n."""
  per_row = -(-READ_OUT_ROWS // batch)
  return min(1 << (per_row - 1).bit_length(), n)


def revealed_in_order(mask: Array, chunk: int) -> tuple[Array, Array]:
  """Each row's True positions of mask: bool[B, N] first, in increasing order.

  Returns order: int32[B, N'] (N' = N rounded up to a multiple of chunk; entries past the row's
  count are 0) and count: int32[B], the True entries of each row.
  """
  b, n = mask.shape
  width = -(-n // chunk) * chunk
  rank = jnp.cumsum(mask, axis=-1) - 1
  slot = jnp.where(mask, rank, width)  # Not revealed: dropped.
  order = jnp.zeros((b, width), jnp.int32).at[jnp.arange(b)[:, None], slot].set(
      jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)), mode="drop")
  return order, mask.sum(-1)


def for_revealed(mask: Array, read_out: Callable[[Array, Array, Any], Any], carry: Any) -> Any:
  """carry = read_out(positions, valid, carry) over the True positions of mask: bool[B, N], each
  row's in increasing order, chunk_size(B, N) of each row at a time (positions: int32[B, chunk],
  valid: bool[B, chunk], False on the padding of rows with fewer left). A lax loop of as many
  iterations as the fullest row needs, compiled once: every True position is read out, and a row
  with fewer costs the padding only up to the fullest row's count rounded up to the chunk.
  """
  b, n = mask.shape
  chunk = chunk_size(b, n)
  order, count = revealed_in_order(mask, chunk)
  offsets = jnp.arange(chunk, dtype=jnp.int32)

  def body(i, carry):
    start = i * chunk
    positions = jax.lax.dynamic_slice_in_dim(order, start, chunk, axis=1)
    return read_out(positions, start + offsets < count[:, None], carry)

  return jax.lax.fori_loop(0, -(-count.max() // chunk), body, carry)
