"""Layers and checks the networks share.

Checks of config fields and denoiser inputs (every network); the conditioning embedding (time and
class label -> one vector: the text transformer, the UNet and the U-ViT); adaLN modulation, rotary
position embeddings, norms and residual-branch dropout, which the transformer block and the final
layer (md4/networks/blocks.py) are made of.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from md4.networks import attention

Array = jax.Array

NORMS = ("layernorm", "rmsnorm")
ROPE_LAYOUTS = ("interleaved", "halves")
DROPOUT_KINDS = ("channel", "element")
COND_ACTIVATIONS = ("sigmoid", "silu")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

# t in [0, 1] is stretched to [0, 1000], the range of step indices that sinusoid periods of
# 2*pi .. 2*pi*1e4 are made for; the fastest features then tell apart times ~1e-3 apart.
TIME_SCALE = 1000.0


# ----------------------------------------------------------------------------- checks


def canonical_dtype(dtype: Any) -> jnp.dtype:
  """Returns `dtype` as a jnp.dtype, accepting strings ("bfloat16") or dtype objects."""
  try:
    canonical = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}") from e
  if canonical.name not in COMPUTE_DTYPES:
    raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
  return canonical


def check_positive(**values: float) -> None:
  """Raises ValueError naming the first config field that is not > 0."""
  for name, value in values.items():
    if value <= 0:
      raise ValueError(f"{name} must be > 0, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
  """Raises ValueError naming the field, its value and the valid values."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_common_fields(
    *, num_classes: int, dropout_rate: float, dtype: Any, attention_impl: str | None,
    cond_dim: int, null_class: bool = False
) -> jnp.dtype:
  """Validates the fields every network config shares; returns the canonical dtype."""
  if num_classes < 0:
    raise ValueError(f"num_classes must be >= 0, got {num_classes!r}")
  if null_class and num_classes == 0:
    raise ValueError("null_class=True needs num_classes > 0: the null class is the extra label "
                     "num_classes ('no class') of a class-conditional network; got num_classes=0")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
  if cond_dim < 4 or cond_dim % 2:
    raise ValueError(f"the conditioning width must be even and >= 4 (sin and cos halves of the "
                     f"time features), got {cond_dim!r}")
  dtype = canonical_dtype(dtype)
  attention.check_impl(attention_impl, dtype)
  return dtype


def check_inputs(
    z: Array, t: Array, cond: Array | None, *, num_classes: int, z_ndim: int, z_desc: str,
    null_class: bool = False
) -> None:
  """Checks shapes of the denoiser inputs (static, so this is free under jit), and the label values
  when they are concrete (an eager call: a traced value cannot be read).

  Args:
    z: int[B, *S] tokens, checked to have rank `z_ndim`.
    t: float[B] diffusion times.
    cond: int[B] class labels in [0, num_classes), or [0, num_classes] with null_class; required
      iff num_classes > 0.
    num_classes: number of classes of the network (0 = unconditional).
    z_ndim: expected rank of z.
    z_desc: how the expected z shape is written in the error message.
    null_class: whether label num_classes (the null class, "no class") is valid.
  """
  if z.ndim != z_ndim:
    raise ValueError(f"z must be {z_desc}, got shape {z.shape}")
  if not jnp.issubdtype(z.dtype, jnp.integer):
    raise ValueError(f"z must hold integer token ids, got dtype {z.dtype}")
  batch = z.shape[0]
  if jnp.shape(t) != (batch,):
    raise ValueError(f"t must have shape ({batch},) to match z, got {jnp.shape(t)}")
  if num_classes == 0:
    if cond is not None:
      raise ValueError(
          "cond was given but the network is unconditional (num_classes=0); "
          f"got cond with shape {jnp.shape(cond)}"
      )
    return
  if cond is None:
    raise ValueError(f"cond (int32[B] class labels) is required: num_classes={num_classes}")
  if jnp.shape(cond) != (batch,):
    raise ValueError(f"cond must have shape ({batch},) to match z, got {jnp.shape(cond)}")
  if not jnp.issubdtype(jnp.result_type(cond), jnp.integer):
    raise ValueError(f"cond must hold integer class labels, got dtype {jnp.result_type(cond)}")
  if not isinstance(cond, jax.core.Tracer):
    # Under jit an out-of-range id would be gathered silently (NaN or a clamped row).
    limit = num_classes + int(null_class)
    values = np.asarray(cond)  # numpy: jnp ops would be staged (tracers) inside a trace.
    if values.size and (int(values.min()) < 0 or int(values.max()) >= limit):
      what = (f"[0, {num_classes}] ({num_classes} is the null class)" if null_class else
              f"[0, {num_classes}) (label {num_classes} is the null class only with "
              "null_class=True)")
      raise ValueError(f"cond labels must be in {what}; got values in "
                       f"[{int(values.min())}, {int(values.max())}]")


# ------------------------------------------------------------------------ conditioning


def timestep_embedding(x: Array, dim: int, max_period: float = 10_000.0) -> Array:
  """Sinusoidal features of a scalar per example, sines then cosines.

  Frequencies run geometrically from 1 to 1/max_period, both ends included.

  Args:
    x: float[B].
    dim: even number of features, >= 4.
    max_period: longest period of the sinusoids.

  Returns:
    float32[B, dim].
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
  args = x.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ConditionEmbedding(nn.Module):
  """Embeds diffusion time and/or a class label into one conditioning vector.

  With time: sinusoidal features of 1000 t, concatenated with the class embedding if any, then
  Dense(4 features), swish, Dense(features). Without time: the class embedding alone. Returns None
  when neither is enabled, so an unconditioned network never touches t. Runs in float32: it is tiny,
  and adaLN scales are sensitive to rounding.

  Attributes:
    features: size of the conditioning vector.
    time_conditioning: whether t enters the vector.
    num_classes: number of classes (0 = no class conditioning).
    null_class: one more table row, for label num_classes: "no class" (classifier-free guidance).
  """

  features: int
  time_conditioning: bool
  num_classes: int
  null_class: bool = False

  @nn.compact
  def __call__(self, t: Array, cond: Array | None) -> Array | None:
    """t: float32[B]; cond: int32[B] or None. Returns float32[B, features] or None."""
    y = None
    if self.num_classes > 0:
      y = nn.Embed(self.num_classes + int(self.null_class), self.features,
                   name="class_embed")(cond)
    if not self.time_conditioning:
      return y
    c = timestep_embedding(t * TIME_SCALE, self.features)
    if y is not None:
      c = jnp.concatenate([c, y], axis=-1)
    c = nn.swish(nn.Dense(4 * self.features, name="time_hidden")(c))
    return nn.Dense(self.features, name="time_out")(c)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """adaLN modulation; x: [B, L, D], shift/scale: [B, 1, D]."""
  return x * (1.0 + scale) + shift


def cond_activation(name: str):
  """The nonlinearity applied to the conditioning vector before each adaLN projection."""
  return {"sigmoid": nn.sigmoid, "silu": nn.silu}[name]


# --------------------------------------------------------------------------------- RoPE


def rope_angles(positions: Array, rotary_dim: int, base: float = 10_000.0) -> Array:
  """Rotation angles for rotary position embeddings: pair i turns at base^(-2i / rotary_dim).

  Args:
    positions: int or float[L] position of each token.
    rotary_dim: even number of features rotated (rotary_dim / 2 rotation pairs).
    base: wavelength base.

  Returns:
    float32[L, rotary_dim // 2].
  """
  half = rotary_dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  return positions.astype(jnp.float32)[:, None] * inv_freq[None, :]


def apply_rope(x: Array, angles: Array, layout: str = "interleaved") -> Array:
  """Rotates feature pairs of x by angles.

  Args:
    x: [B, L, N, H] queries or keys.
    angles: float32[L, H // 2]; pair i turns by angles[:, i].
    layout: which features pair up: "interleaved" pairs (2i, 2i + 1), as the released code
      (and LLaMA); "halves" pairs (i, i + H/2).

  Returns:
    [B, L, N, H] in x's dtype.
  """
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  xf = x.astype(jnp.float32)
  if layout == "interleaved":
    pairs = xf.reshape(x.shape[:-1] + (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)
  else:
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


# ------------------------------------------------------------------------------- layers


def make_norm(kind: str, eps: float, *, learned_scale: bool, dtype: Any, name: str) -> nn.Module:
  """A LayerNorm or RMSNorm without bias; its scale is learned only when `learned_scale` (under
  adaLN the (1 + scale) modulation already provides it)."""
  if kind == "layernorm":
    return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=learned_scale, dtype=dtype,
                        name=name)
  return nn.RMSNorm(epsilon=eps, use_scale=learned_scale, dtype=dtype, name=name)


def branch_dropout(rate: float, kind: str, deterministic: bool) -> nn.Dropout:
  """Dropout of a residual branch's output [B, L, D]: "element"-wise, or "channel"-wise (one mask
  per example and feature, shared by all positions)."""
  return nn.Dropout(rate, broadcast_dims=(1,) if kind == "channel" else (),
                    deterministic=deterministic)
