"""Checksums that let a restore prove it read back what was saved.

Orbax stores arrays without checksumming their values: a flipped byte in an array file can restore
as a slightly different number with no error. So every save records, per array of the state, two
32-bit sums of its bits, computed by a jitted function on the devices where the array lives
(sharding-agnostic: several hosts compute the same numbers, each reducing only its own shards
before a scalar all-reduce); every restore recomputes them on what it read.

For an array of n 32-bit words x_i (narrower dtypes widened, 64-bit ones split in two words):
  s1 = sum_i (2 i + 1) * x_i            mod 2^32
  s2 = sum_i (2 h(i) + 1) * h(x_i)      mod 2^32,   h = murmur3's 32-bit finalizer (a bijection)
Each weight is odd, hence invertible mod 2^32: changing any one word changes both sums. Several
changed words escape s1 only if their weighted differences cancel mod 2^32; the scrambled s2 makes
an accidental double cancellation about as likely as a 64-bit collision (not a cryptographic
guarantee: it detects storage damage, not tampering).

JSON records (md4's metadata, the data stream's state) are checked with SHA-256 of their canonical
text.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp


def leaf_name(path: tuple[Any, ...]) -> str:
  """A leaf's key path as Orbax names it in a checkpoint: "opt_state.1.0.mu.net.embed.embedding"."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey.
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts)


def layout(tree: Any) -> dict[str, str]:
  """{leaf name: "dtype[d0,d1,...]"} of a pytree of arrays or ShapeDtypeStructs."""
  return {leaf_name(path): f"{jnp.dtype(leaf.dtype).name}[{','.join(map(str, leaf.shape))}]"
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fmix32(x: jax.Array) -> jax.Array:
  """murmur3's finalizer: a bijection of uint32 that spreads every input bit over the output."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of x as uint32 words, x's shape (plus a trailing 2 for 64-bit dtypes)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  size = jnp.dtype(x.dtype).itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _sums(x: jax.Array) -> jax.Array:
  """uint32[2]: (s1, s2) of one array. Positions come from iotas of its own shape (no reshape), so
  a sharded array is reduced where it lives."""
  words = _words(x)
  position = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(
        stride % 2**32)
    stride *= words.shape[axis]
  odd = lambda v: v * jnp.uint32(2) + jnp.uint32(1)
  s1 = jnp.sum(odd(position) * words, dtype=jnp.uint32)
  s2 = jnp.sum(odd(_fmix32(position)) * _fmix32(words), dtype=jnp.uint32)
  return jnp.stack([s1, s2])


# Jitted per array, not per tree: compiled once per (shape, dtype, sharding), which the arrays of a
# state share (a block's kernels, params and their moments and EMA), and reused by every save and by
# restores of any subset of the state.
_leaf_sums = jax.jit(_sums)


def checksums(tree: Any) -> dict[str, str]:
  """{leaf name: "s1:s2" in hex} of every array of `tree` (None leaves skipped)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = jax.device_get([_leaf_sums(leaf) for _, leaf in leaves])
  return {leaf_name(path): f"{int(s[0]):08x}:{int(s[1]):08x}"
          for (path, _), s in zip(leaves, sums)}


def json_digest(record: Any) -> str:
  """SHA-256 of a JSON-able record's canonical text (sorted keys, no spaces)."""
  text = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=True)
  return hashlib.sha256(text.encode()).hexdigest()


@jax.jit
def _finite(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def non_finite_leaves(tree: Any) -> list[str]:
  """Names of the floating-point arrays of `tree` holding a NaN or an infinity."""
  floats = jax.tree.map(lambda x: x if jnp.issubdtype(x.dtype, jnp.floating) else None, tree)
  finite = jax.device_get(_finite(floats))
  return [leaf_name(path) for path, ok in jax.tree_util.tree_flatten_with_path(finite)[0]
          if not bool(ok)]
