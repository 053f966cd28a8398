"""Scaled dot-product attention by implementation name: one place for every attention kernel.

`attend(q, k, v, impl=..., causal=...)` computes softmax(q k^T / sqrt(H)) v per head, with the
implementation chosen by name (`ATTENTION_IMPLS`). Every implementation computes the same function;
they differ in speed and memory on each backend, and in which dtypes and shapes they accept.
impl=None picks one for the backend at trace time (`default_impl`). Dropout on the attention
probabilities needs them formed explicitly (`attention_probs`, then `apply_probs`), which the
networks do themselves when it is active.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from md4 import sharding

Array = jax.Array


def matmul_dot_general(x: Array, kernel: Array, dimension_numbers, precision=None,
                       preferred_element_type=None) -> Array:
  """flax DenseGeneral's contraction of x's trailing axes with the kernel's leading axes (the head
  projections, [B, L, D] x [D, N, H] and [B, L, N, H] x [N, H, D]) as one 2D matrix product.

  The same sums as lax.dot_general; on XLA:CPU the multi-axis form transposes the kernels in the
  backward pass (about 16 weight copies per block per step), the 2D form does not. A drop-in for
  DenseGeneral's `dot_general`, so parameter shapes, names and initialisation stay DenseGeneral's.
  """
  (x_axes, k_axes), (x_batch, k_batch) = dimension_numbers
  n = len(x_axes)
  if (tuple(x_batch) or tuple(k_batch) or tuple(k_axes) != tuple(range(n))
      or tuple(x_axes) != tuple(range(x.ndim - n, x.ndim))):
    raise ValueError(f"matmul_dot_general contracts x's last axes with the kernel's first ones; "
                     f"got dimension numbers {dimension_numbers}")
  size = math.prod(kernel.shape[:n])
  out = jnp.matmul(x.reshape(x.shape[:x.ndim - n] + (size,)), kernel.reshape(size, -1),
                   precision=precision, preferred_element_type=preferred_element_type)
  return out.reshape(x.shape[:x.ndim - n] + kernel.shape[n:])


def _causal_mask(scores: Array) -> Array:
  length = scores.shape[-1]
  return jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores, -jnp.inf)


def attention_probs(q: Array, k: Array, causal: bool = False) -> Array:
  """float32[B, N, L, L]: the attention probabilities, for dropout on them.

  q, k: [B, L, N, H]. Heads become a batch axis and the scores one batched matmul: on XLA:CPU this
  compiles to fewer copies and transposes than an einsum over [B, L, N, H] or
  jax.nn.dot_product_attention (BENCHMARKS.md, "Attention on XLA:CPU").
  """
  scores = jnp.matmul(q.swapaxes(1, 2), k.swapaxes(1, 2).swapaxes(2, 3)) / math.sqrt(q.shape[-1])
  if causal:
    scores = _causal_mask(scores)
  return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)


def apply_probs(probs: Array, v: Array) -> Array:
  """[B, L, N, H] in v's dtype: probs: [B, N, L, L] applied to the values v: [B, L, N, H]."""
  return jnp.matmul(probs.astype(v.dtype), v.swapaxes(1, 2)).swapaxes(1, 2)


def _matmul(q: Array, k: Array, v: Array, causal: bool) -> Array:
  return apply_probs(attention_probs(q, k, causal), v)


def _xla(q: Array, k: Array, v: Array, causal: bool) -> Array:
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


def _cudnn(q: Array, k: Array, v: Array, causal: bool) -> Array:
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def _splash(q: Array, k: Array, v: Array, causal: bool) -> Array:
  """The splash attention kernel of jax's Pallas TPU ops: flash attention, tiled so the [L, L]
  scores of a head never exist whole, forward or backward. Compiled for a TPU; elsewhere (tests on
  the CPU) run by the Pallas interpreter. Each device runs it on its slice of the batch."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  _, length, heads, head_dim = q.shape
  block = SPLASH_BLOCK
  if length % block:
    raise ValueError(f"attention_impl='splash' needs a sequence length that is a multiple of "
                     f"{block}, got {length}")
  mask = (splash.CausalMask if causal else splash.FullMask)((length, length))
  kernel = splash.make_splash_mha(
      splash.MultiHeadMask([mask] * heads), head_shards=1, q_seq_shards=1,
      block_sizes=splash.BlockSizes(block, block, block, block, block, block, block, block),
      interpret=sharding.target_platform() != "tpu")
  # The kernel takes one example's [N, L, H] and does not scale the scores.
  scale = 1.0 / math.sqrt(head_dim)
  per_example = lambda q, k, v: kernel((q * scale).astype(q.dtype), k, v)
  heads_first = lambda a: a.swapaxes(1, 2)
  run = lambda q, k, v: heads_first(jax.vmap(per_example)(heads_first(q), heads_first(k),
                                                          heads_first(v)))
  return sharding.per_device(run)(q, k, v)


# Tile of the splash kernel along queries and keys: its default, and the least it takes (the TPU's
# 128 lanes).
SPLASH_BLOCK = 128

# Implementations that run in half precision only.
HALF_PRECISION_ONLY = ("cudnn",)
# cuDNN's fused (flash) attention in bfloat16/float16: head widths that are multiples of 8 up to 128
# (256 from Hopper on; 128 keeps one rule), on GPUs of compute capability 8.0 (Ampere) and later.
_CUDNN_MAX_HEAD_DIM = 128
_CUDNN_MIN_CAPABILITY = 8.0


def default_impl(backend: str, dtype: jnp.dtype, head_dim: int,
                 gpu_capability: float | None = None, length: int | None = None) -> str:
  """The implementation that impl=None runs: the fastest measured for the backend, among those
  that accept the dtype and shape (on a TPU: splash, which needs whole tiles of SPLASH_BLOCK
  positions, chosen for its memory, whose [L, L] scores it never holds: no TPU was measured).

  Args:
    backend: the platform compiled for ("cpu", "gpu" or "tpu"; sharding.target_platform()).
    dtype: the queries' dtype.
    head_dim: H, the width of each head.
    gpu_capability: the GPU's CUDA compute capability (e.g. 9.0), or None when unknown.
    length: L, the sequence length, or None when unknown.
  """
  if backend == "cpu":
    return "matmul"
  if backend == "gpu":
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    shape_ok = head_dim % 8 == 0 and head_dim <= _CUDNN_MAX_HEAD_DIM
    device_ok = gpu_capability is not None and gpu_capability >= _CUDNN_MIN_CAPABILITY
    return "cudnn" if half and shape_ok and device_ok else "xla"
  if backend == "tpu" and length is not None and length % SPLASH_BLOCK == 0:
    return "splash"
  return "xla"


def _gpu_capability() -> float | None:
  capability = getattr(jax.devices()[0], "compute_capability", None)
  try:
    return float(capability)
  except (TypeError, ValueError):  # ROCm reports an architecture name, not a number.
    return None


def chosen_impl(dtype: jnp.dtype, head_dim: int, length: int | None = None) -> str:
  """What impl=None runs for the platform being compiled for (that of the mesh in context, a TPU
  slice's when md4 compile compiles for one; else this process's backend) and its device."""
  backend = sharding.target_platform()
  capability = _gpu_capability() if backend == jax.default_backend() == "gpu" else None
  return default_impl(backend, dtype, head_dim, capability, length)


def _auto(q: Array, k: Array, v: Array, causal: bool) -> Array:
  return _IMPLS[chosen_impl(q.dtype, q.shape[-1], q.shape[1])](q, k, v, causal)


# name -> (q, k, v: [B, L, N, H], causal) -> [B, L, N, H]. None: `default_impl`'s choice for the
# backend and dtype at trace time.
_IMPLS: dict[str | None, Callable[[Array, Array, Array, bool], Array]] = {
    None: _auto,
    "matmul": _matmul,
    "xla": _xla,
    "cudnn": _cudnn,
    "splash": _splash,
}
ATTENTION_IMPLS: tuple[str | None, ...] = tuple(_IMPLS)


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
    impl: a name in ATTENTION_IMPLS; None: default_impl's choice for the backend.
    causal: each position attends only to itself and earlier ones.

  Returns:
    [B, L, N, H] in v's dtype.
  """
  return _IMPLS[impl](q, k, v, causal)
