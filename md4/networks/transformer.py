"""Bidirectional transformer denoiser for token sequences, conditioned by adaLN-zero.

Also home to the pieces the image networks reuse: input checks, the conditioning embedding
(time and class label -> one vector), rotary position embeddings and the transformer block.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

MLP_TYPES = ("swiglu", "glu")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = (None, "xla", "cudnn")

# t in [0, 1] is stretched to [0, 1000], the range of step indices that sinusoid periods
# of 2*pi .. 2*pi*1e4 are made for; the fastest features then tell apart times ~1e-3 apart.
_TIME_SCALE = 1000.0
_TIME_FREQ_DIM = 256


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


def check_common_fields(
    *, num_classes: int, dropout_rate: float, dtype: Any, attention_impl: str | None
) -> jnp.dtype:
  """Validates the fields every network config shares; returns the canonical dtype."""
  if num_classes < 0:
    raise ValueError(f"num_classes must be >= 0, got {num_classes!r}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
  dtype = canonical_dtype(dtype)
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
  if attention_impl == "cudnn" and dtype == jnp.float32:
    raise ValueError("attention_impl='cudnn' needs dtype bfloat16 or float16, got float32")
  return dtype


def check_inputs(
    z: Array, t: Array, cond: Array | None, *, num_classes: int, z_ndim: int, z_desc: str
) -> None:
  """Checks shapes of the denoiser inputs (static, so this is free under jit).

  Args:
    z: int[B, *S] tokens, checked to have rank `z_ndim`.
    t: float[B] diffusion times.
    cond: int[B] class labels, required iff num_classes > 0.
    num_classes: number of classes of the network (0 = unconditional).
    z_ndim: expected rank of z.
    z_desc: how the expected z shape is written in the error message.
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


# ------------------------------------------------------------------------ conditioning


def sinusoidal_embedding(x: Array, dim: int, max_period: float = 10_000.0) -> Array:
  """Sinusoidal features of a scalar per example.

  Args:
    x: float[B].
    dim: even number of features.
    max_period: longest period of the sinusoids.

  Returns:
    float32[B, dim], cosines then sines.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = x.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class ConditionEmbedding(nn.Module):
  """Embeds diffusion time and/or a class label into one conditioning vector.

  Returns None when neither is enabled, so an unconditioned network never touches t.
  Runs in float32: it is tiny, and adaLN scales are sensitive to rounding.

  Attributes:
    features: size of the conditioning vector.
    time_conditioning: whether t enters the vector.
    num_classes: size of the class embedding table (0 = no class conditioning).
  """

  features: int
  time_conditioning: bool
  num_classes: int

  @nn.compact
  def __call__(self, t: Array, cond: Array | None) -> Array | None:
    """t: float32[B]; cond: int32[B] or None. Returns float32[B, features] or None."""
    c = None
    if self.time_conditioning:
      c = sinusoidal_embedding(t * _TIME_SCALE, _TIME_FREQ_DIM)
      c = nn.Dense(self.features, name="time_dense_0")(c)
      c = nn.Dense(self.features, name="time_dense_1")(nn.silu(c))
    if self.num_classes > 0:
      y = nn.Embed(self.num_classes, self.features, name="class_embed")(cond)
      c = y if c is None else c + y
    return c


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """adaLN modulation; x: [B, L, D], shift/scale: [B, 1, D]."""
  return x * (1.0 + scale) + shift


# --------------------------------------------------------------------------------- RoPE


def rope_angles(positions: Array, rotary_dim: int, base: float = 10_000.0) -> Array:
  """Rotation angles for rotary position embeddings.

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


def rope_angles_2d(height: int, width: int, head_dim: int, base: float = 10_000.0) -> Array:
  """2D RoPE: half the rotation pairs turn with the row index, half with the column.

  Tokens are in row-major order. head_dim must be divisible by 4.

  Returns:
    float32[height * width, head_dim // 2].
  """
  rows = jnp.repeat(jnp.arange(height), width)
  cols = jnp.tile(jnp.arange(width), height)
  return jnp.concatenate(
      [rope_angles(rows, head_dim // 2, base), rope_angles(cols, head_dim // 2, base)], axis=-1
  )


def apply_rope(x: Array, angles: Array) -> Array:
  """Rotates feature pairs (i, i + H/2) of x by angles.

  Args:
    x: [B, L, N, H] queries or keys.
    angles: float32[L, H // 2].

  Returns:
    [B, L, N, H] in x's dtype.
  """
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


# ------------------------------------------------------------------------------- layers


class SelfAttention(nn.Module):
  """Non-causal multi-head self-attention through jax.nn.dot_product_attention.

  Going through dot_product_attention rather than our own einsums lets a config switch to
  cuDNN's fused flash-attention kernel on NVIDIA GPUs (attention_impl="cudnn").

  Attributes:
    num_heads: number of heads; the input width must be divisible by it.
    dtype: compute dtype.
    attention_impl: dot_product_attention's `implementation`: None or "xla" (portable),
      "cudnn" (NVIDIA GPUs, bf16/fp16 only).
  """

  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array, angles: Array | None = None) -> Array:
    """x: [B, L, D]; angles: float32[L, D / num_heads / 2] for RoPE, or None. Returns [B, L, D]."""
    d = x.shape[-1]
    head_dim = d // self.num_heads
    q, k, v = (
        nn.DenseGeneral((self.num_heads, head_dim), use_bias=False, dtype=self.dtype, name=n)(x)
        for n in ("query", "key", "value")
    )
    if angles is not None:
      q, k = apply_rope(q, angles), apply_rope(k, angles)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=False,
                                       implementation=self.attention_impl)
    return nn.DenseGeneral(d, axis=(-2, -1), use_bias=False, dtype=self.dtype, name="out")(out)


class GatedMlp(nn.Module):
  """Gated MLP: swiglu = silu(x W_g) * (x W_u); glu = sigmoid(x W_g) * (x W_u); then W_o.

  Attributes:
    hidden_dim: width of the gated hidden layer.
    mlp_type: "swiglu" or "glu".
    dtype: compute dtype.
  """

  hidden_dim: int
  mlp_type: str = "swiglu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, L, D]. Returns [B, L, D]."""
    activation = {"swiglu": nn.silu, "glu": nn.sigmoid}[self.mlp_type]
    gate = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype, name="gate")(x)
    up = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype, name="up")(x)
    return nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, name="down")(
        activation(gate) * up
    )


class TransformerBlock(nn.Module):
  """Pre-RMSNorm transformer block: RoPE self-attention, then a gated MLP.

  Given a conditioning vector c, both pre-norms are adaLN-modulated (shift, scale) and both
  branches gated, all from one Dense of silu(c). That Dense is zero-initialised, so gates
  are 0 and the block is exactly the identity at init (adaLN-zero, as in DiT).
  Dropout acts on each branch's output before it joins the residual stream.

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the MLP.
    mlp_type: "swiglu" or "glu".
    dropout_rate: residual-branch dropout rate.
    deterministic: disables dropout (an attribute, not an argument, so nn.remat sees it
      as static).
    dtype: compute dtype; the residual stream stays float32.
    attention_impl: see SelfAttention.
  """

  num_heads: int
  mlp_dim: int
  mlp_type: str = "swiglu"
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array, c: Array | None, angles: Array | None) -> Array:
    """Applies the block.

    Args:
      x: float32[B, L, D] residual stream.
      c: float32[B, Dc] conditioning vector, or None for an unconditioned block.
      angles: float32[L, D / num_heads / 2] RoPE angles, or None for no RoPE.

    Returns:
      float32[B, L, D].
    """
    d = x.shape[-1]
    conditioned = c is not None
    if conditioned:
      mod = nn.Dense(6 * d, kernel_init=nn.initializers.zeros, name="adaln")(nn.silu(c))
      shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod[:, None, :], 6, -1)

    # With adaLN the (1 + scale) modulation already provides the learned norm scale.
    h = nn.RMSNorm(use_scale=not conditioned, dtype=self.dtype, name="attn_norm")(x)
    if conditioned:
      h = modulate(h, shift_a, scale_a)
    h = SelfAttention(self.num_heads, self.dtype, self.attention_impl, name="attn")(h, angles)
    h = nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(h)
    x = x + (gate_a * h if conditioned else h).astype(jnp.float32)

    h = nn.RMSNorm(use_scale=not conditioned, dtype=self.dtype, name="mlp_norm")(x)
    if conditioned:
      h = modulate(h, shift_m, scale_m)
    h = GatedMlp(self.mlp_dim, self.mlp_type, dtype=self.dtype, name="mlp")(h)
    h = nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(h)
    return x + (gate_m * h if conditioned else h).astype(jnp.float32)


class FinalLayer(nn.Module):
  """Final RMSNorm (adaLN shift/scale, zero-initialised, when conditioned) and projection.

  Attributes:
    out_features: output width.
    dtype: compute dtype of the projection.
  """

  out_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array | None) -> Array:
    """x: float32[B, L, D]; c: float32[B, Dc] or None. Returns [B, L, out_features] in dtype."""
    conditioned = c is not None
    h = nn.RMSNorm(use_scale=not conditioned, dtype=self.dtype, name="norm")(x)
    if conditioned:
      mod = nn.Dense(2 * x.shape[-1], kernel_init=nn.initializers.zeros, name="adaln")(
          nn.silu(c)
      )
      shift, scale = jnp.split(mod[:, None, :], 2, -1)
      h = modulate(h, shift, scale)
    return nn.Dense(self.out_features, dtype=self.dtype, name="proj")(h)


def block_class(remat: bool) -> type[TransformerBlock]:
  """TransformerBlock, rematerialised in the backward pass when `remat` (saves memory)."""
  return nn.remat(TransformerBlock) if remat else TransformerBlock


# -------------------------------------------------------------------------- transformer


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Configuration of `Transformer`.

  Attributes:
    vocab_size: number of real tokens; id vocab_size is the mask, so inputs are in
      [0, vocab_size] and logits have vocab_size entries.
    num_layers: transformer blocks.
    num_heads: attention heads; d_model / num_heads must be even (RoPE pairs).
    d_model: width of the residual stream, also of the conditioning vector.
    mlp_ratio: MLP hidden width as a multiple of d_model.
    dropout_rate: residual-branch dropout rate, active only with train=True.
    mlp_type: "swiglu" (silu gate) or "glu" (sigmoid gate).
    time_conditioning: condition on t through adaLN-zero; if False the output does not
      depend on t at all.
    num_classes: class labels for conditioning; 0 = unconditional.
    dtype: compute dtype ("float32", "bfloat16", "float16" or a jnp dtype); parameters and
      logits are float32 regardless.
    remat: rematerialise each block in the backward pass.
    rope_base: RoPE wavelength base.
    attention_impl: jax.nn.dot_product_attention implementation: None or "xla" (portable),
      "cudnn" (fused flash attention on NVIDIA GPUs; needs bf16/fp16 dtype).
  """

  vocab_size: int
  num_layers: int = 12
  num_heads: int = 12
  d_model: int = 768
  mlp_ratio: float = 4.0
  dropout_rate: float = 0.0
  mlp_type: str = "swiglu"
  time_conditioning: bool = True
  num_classes: int = 0
  dtype: Any = jnp.float32
  remat: bool = False
  rope_base: float = 10_000.0
  attention_impl: str | None = None

  def __post_init__(self):
    check_positive(vocab_size=self.vocab_size, num_heads=self.num_heads,
                   d_model=self.d_model, mlp_ratio=self.mlp_ratio, rope_base=self.rope_base)
    if self.num_layers < 0:
      raise ValueError(f"num_layers must be >= 0, got {self.num_layers!r}")
    if self.mlp_type not in MLP_TYPES:
      raise ValueError(f"mlp_type must be one of {MLP_TYPES}, got {self.mlp_type!r}")
    if self.d_model % (2 * self.num_heads):
      raise ValueError(
          f"d_model={self.d_model} must be divisible by 2 * num_heads={2 * self.num_heads} "
          "(RoPE rotates pairs of head features)"
      )
    dtype = check_common_fields(num_classes=self.num_classes, dropout_rate=self.dropout_rate,
                                dtype=self.dtype, attention_impl=self.attention_impl)
    object.__setattr__(self, "dtype", dtype)

  @property
  def mlp_dim(self) -> int:
    """MLP hidden width."""
    return int(round(self.mlp_ratio * self.d_model))


class Transformer(nn.Module):
  """Bidirectional transformer over a token sequence; returns logits of the clean tokens.

  Attributes:
    config: the TransformerConfig.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(
      self, z: Array, t: Array, *, cond: Array | None = None, train: bool = False
  ) -> Array:
    """Computes logits.

    Args:
      z: int32[B, L] tokens in [0, vocab_size]; vocab_size is the mask id.
      t: float32[B] diffusion time in [0, 1].
      cond: int32[B] class labels in [0, num_classes); required iff num_classes > 0.
      train: enables dropout (needs the 'dropout' rng).

    Returns:
      float32[B, L, vocab_size] logits.
    """
    cfg = self.config
    check_inputs(z, t, cond, num_classes=cfg.num_classes, z_ndim=2, z_desc="int32[B, L]")
    c = ConditionEmbedding(cfg.d_model, cfg.time_conditioning, cfg.num_classes,
                           name="cond_embed")(t, cond)
    # The residual stream is float32 so bf16 rounding does not pile up across layers.
    x = nn.Embed(cfg.vocab_size + 1, cfg.d_model, name="embed")(z)
    angles = rope_angles(jnp.arange(z.shape[1]), cfg.d_model // cfg.num_heads, cfg.rope_base)
    block = block_class(cfg.remat)
    for i in range(cfg.num_layers):
      x = block(
          num_heads=cfg.num_heads,
          mlp_dim=cfg.mlp_dim,
          mlp_type=cfg.mlp_type,
          dropout_rate=cfg.dropout_rate,
          deterministic=not train,
          dtype=cfg.dtype,
          attention_impl=cfg.attention_impl,
          name=f"block_{i}",
      )(x, c, angles)
    logits = FinalLayer(cfg.vocab_size, dtype=cfg.dtype, name="final")(x, c)
    return logits.astype(jnp.float32)
