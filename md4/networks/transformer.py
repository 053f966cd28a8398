"""Bidirectional transformer denoiser for token sequences, conditioned by adaLN-zero.

The defaults build the network of the paper's released code (google-deepmind/md4) layer for layer:
parameter-free LayerNorm under adaLN-zero, a sigmoid-gated ("glu") MLP 8d/3 wide rounded up to a
multiple of 32 with depth-scaled initialisation, a 64-wide conditioning vector, interleaved RoPE,
dropout on the attention probabilities, channel-wise dropout on the residual branches and a
zero-initialised, bias-free output layer. Other choices are options: RMSNorm, SwiGLU, a conditioning
vector as wide as the model, element-wise dropout, RoPE on half-split feature pairs.

Also home to the pieces the image networks reuse: input checks, the conditioning embedding (time
and class label -> one vector), the transformer block and the final adaLN layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from md4 import sharding
from md4.networks import attention, remat

Array = jax.Array

NORMS = ("layernorm", "rmsnorm")
MLP_TYPES = ("glu", "swiglu", "gelu")
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


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Everything that shapes a TransformerBlock (hashable: a static module attribute).

  Attributes:
    num_heads: attention heads; the stream width must be divisible by it.
    mlp_dim: hidden width of the MLP.
    mlp_type: "glu" (sigmoid gate), "swiglu" (silu gate), or "gelu": the ViT MLP (Dense with bias,
      gelu, Dense with bias) with its own element-wise dropout after the gelu and after the output.
    norm: "layernorm" or "rmsnorm".
    norm_eps: the norms' epsilon.
    cond_activation: "sigmoid" or "silu", applied to the conditioning vector before adaLN.
    qkv_bias: biases on the query, key and value projections.
    rope: "interleaved", "halves" or None (no rotary embedding).
    mlp_init_scale: variance scale of the MLP kernels' fan-in truncated-normal init.
    dropout_rate: rate of every dropout in the block.
    dropout: "channel" or "element": the kind of dropout on the attention branch's output, and on
      the gated MLPs' output.
    attention_dropout: dropout on the attention probabilities.
    dtype: compute dtype; the residual stream stays float32.
    attention_impl: see SelfAttention.
    causal: causal attention (an autoregressive model).
  """

  num_heads: int
  mlp_dim: int
  mlp_type: str = "glu"
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  cond_activation: str = "sigmoid"
  qkv_bias: bool = False
  rope: str | None = "interleaved"
  mlp_init_scale: float = 1.0
  dropout_rate: float = 0.0
  dropout: str = "channel"
  attention_dropout: bool = True
  dtype: Any = jnp.float32
  attention_impl: str | None = None
  causal: bool = False


class SelfAttention(nn.Module):
  """Multi-head self-attention, bidirectional unless `causal`.

  Goes through md4.networks.attention.attend with the implementation named by attention_impl (for
  instance cuDNN's fused flash-attention kernel on NVIDIA GPUs, "cudnn"); when dropout on the
  attention probabilities is active (training, dropout_rate > 0) the probabilities are formed
  explicitly instead, since the fused kernels have no dropout.

  Attributes:
    num_heads: number of heads; the input width must be divisible by it.
    qkv_bias: biases on the query, key and value projections (the output projection has none).
    rope_layout: see apply_rope.
    dropout_rate: dropout on the attention probabilities (0: none).
    deterministic: disables dropout.
    dtype: compute dtype.
    attention_impl: a name in md4.networks.attention.ATTENTION_IMPLS.
    causal: each position attends only to itself and earlier ones.
  """

  num_heads: int
  qkv_bias: bool = False
  rope_layout: str = "interleaved"
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32
  attention_impl: str | None = None
  causal: bool = False

  @nn.compact
  def __call__(self, x: Array, angles: Array | None = None) -> Array:
    """x: [B, L, D]; angles: float32[L, D / num_heads / 2] for RoPE, or None. Returns [B, L, D]."""
    d = x.shape[-1]
    head_dim = d // self.num_heads
    q, k, v = (
        nn.DenseGeneral((self.num_heads, head_dim), use_bias=self.qkv_bias, dtype=self.dtype,
                        dot_general=attention.matmul_dot_general, name=n)(x)
        for n in ("query", "key", "value")
    )
    if angles is not None:
      q, k = apply_rope(q, angles, self.rope_layout), apply_rope(k, angles, self.rope_layout)
    if self.dropout_rate > 0 and not self.deterministic:
      probs = attention.attention_probs(q, k, self.causal)
      probs = nn.Dropout(self.dropout_rate, deterministic=False)(probs)
      out = attention.apply_probs(probs, v)
    else:
      out = attention.attend(q, k, v, impl=self.attention_impl, causal=self.causal)
    return nn.DenseGeneral(d, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                           dot_general=attention.matmul_dot_general, name="out")(out)


class Mlp(nn.Module):
  """The block's MLP; see BlockSpec.mlp_type.

  Gated: gate(x W_g) * (x W_u), then W_o, no biases; gate = sigmoid ("glu") or silu ("swiglu").
  "gelu": gelu(x W_1 + b_1) W_2 + b_2, with element-wise dropout after the gelu and the output.

  Attributes:
    hidden_dim: hidden width.
    mlp_type: "glu", "swiglu" or "gelu".
    init_scale: variance scale of the kernels' fan-in truncated-normal initialisation.
    dropout_rate: the "gelu" MLP's own dropout rate.
    deterministic: disables dropout.
    dtype: compute dtype.
  """

  hidden_dim: int
  mlp_type: str = "glu"
  init_scale: float = 1.0
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, L, D]. Returns [B, L, D]."""
    init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
    dense = lambda n, f, bias: nn.Dense(f, use_bias=bias, kernel_init=init, dtype=self.dtype,
                                        name=n)
    if self.mlp_type == "gelu":
      drop = nn.Dropout(self.dropout_rate, deterministic=self.deterministic)
      h = drop(nn.gelu(dense("fc1", self.hidden_dim, True)(x)))
      return drop(dense("fc2", x.shape[-1], True)(h))
    gate = {"glu": nn.sigmoid, "swiglu": nn.silu}[self.mlp_type]
    h = gate(dense("gate", self.hidden_dim, False)(x)) * dense("up", self.hidden_dim, False)(x)
    return dense("down", x.shape[-1], False)(h)


class TransformerBlock(nn.Module):
  """Pre-norm transformer block: self-attention, then an MLP.

  Given a conditioning vector c, both pre-norms are adaLN-modulated (shift, scale) and both
  branches gated, all from one Dense of act(c) (act = spec.cond_activation). That Dense is
  zero-initialised, so gates are 0 and the block is exactly the identity at init (adaLN-zero, as
  in DiT). Without c the norms learn their own scale. The two branch outputs, before their gates,
  are tagged remat.ATTENTION_OUT and remat.MLP_OUT for the "attention_and_mlp" remat policy.

  Attributes:
    spec: the BlockSpec.
    deterministic: disables dropout (an attribute, not an argument, so nn.remat sees it as static).
  """

  spec: BlockSpec
  deterministic: bool = True

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
    s = self.spec
    d = x.shape[-1]
    conditioned = c is not None
    if conditioned:
      mod = nn.Dense(6 * d, kernel_init=nn.initializers.zeros, name="adaln")(
          cond_activation(s.cond_activation)(c))
      shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod[:, None, :], 6, -1)
    rate = s.dropout_rate

    h = make_norm(s.norm, s.norm_eps, learned_scale=not conditioned, dtype=s.dtype,
                  name="attn_norm")(x)
    if conditioned:
      h = modulate(h, shift_a, scale_a)
    h = SelfAttention(s.num_heads, s.qkv_bias, s.rope or "interleaved",
                      rate if s.attention_dropout else 0.0, self.deterministic, s.dtype,
                      s.attention_impl, s.causal, name="attn")(h, angles if s.rope else None)
    h = checkpoint_name(h, remat.ATTENTION_OUT)
    h = branch_dropout(rate, s.dropout, self.deterministic)(h)
    x = x + (gate_a * h if conditioned else h).astype(jnp.float32)

    h = make_norm(s.norm, s.norm_eps, learned_scale=not conditioned, dtype=s.dtype,
                  name="mlp_norm")(x)
    if conditioned:
      h = modulate(h, shift_m, scale_m)
    h = Mlp(s.mlp_dim, s.mlp_type, s.mlp_init_scale, rate, self.deterministic, s.dtype,
            name="mlp")(h)
    h = checkpoint_name(h, remat.MLP_OUT)
    if s.mlp_type != "gelu":  # The ViT MLP drops out inside.
      h = branch_dropout(rate, s.dropout, self.deterministic)(h)
    return x + (gate_m * h if conditioned else h).astype(jnp.float32)


class FinalLayer(nn.Module):
  """Final norm (adaLN shift/scale, zero-initialised, when conditioned) and a zero-initialised
  projection, so every output starts at 0 (uniform logits).

  Attributes:
    out_features: output width.
    norm: "layernorm" or "rmsnorm".
    norm_eps: the norm's epsilon.
    cond_activation: "sigmoid" or "silu", applied to c before the adaLN projection.
    use_bias: a bias on the projection.
    dtype: compute dtype of the projection.
  """

  out_features: int
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  cond_activation: str = "sigmoid"
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array | None, positions: Array | None = None,
               project: bool = True) -> Array:
    """The layer's output at every position, or at `positions` only.

    Args:
      x: float32[B, L, D].
      c: float32[B, Dc] or None.
      positions: int32[B, K] or None: the output at these positions of each row only (the norm and
        modulation act per position, so these are the full output's rows, bitwise).
      project: False returns the features the projection takes ([B, L or K, D]); `project_features`
        applies the projection to them.

    Returns:
      [B, L or K, out_features] in dtype, or the features.
    """
    conditioned = c is not None
    h = make_norm(self.norm, self.norm_eps, learned_scale=not conditioned, dtype=self.dtype,
                  name="norm")(x)
    if conditioned:
      mod = nn.Dense(2 * x.shape[-1], kernel_init=nn.initializers.zeros, name="adaln")(
          cond_activation(self.cond_activation)(c))
      shift, scale = jnp.split(mod[:, None, :], 2, -1)
      h = modulate(h, shift, scale)
    if positions is not None:
      h = jnp.take_along_axis(h, positions[..., None], axis=1)
    if not project:
      return h
    return output_projection(self.out_features, self.use_bias, self.dtype, name="proj")(h)


def output_projection(out_features: int, use_bias: bool, dtype: Any, name: str | None = None
                      ) -> nn.Dense:
  """FinalLayer's zero-initialised projection (also applied alone by `project_features`)."""
  return nn.Dense(out_features, use_bias=use_bias, kernel_init=nn.initializers.zeros, dtype=dtype,
                  name=name)


def block_class(remat_policy: str) -> type[TransformerBlock]:
  """TransformerBlock, rematerialised in the backward pass under the named policy (a name in
  md4.networks.remat.REMAT_POLICIES; "none": not at all)."""
  return remat.remat_class(TransformerBlock, remat_policy)


def mlp_width(ratio: float, d_model: int, multiple: int) -> int:
  """ratio * d_model rounded down, then up to a multiple of `multiple` (the released code's rule,
  int(8d/3) rounded up to a multiple of 32). The 1e-6 absorbs the float error of ratios such as
  8/3, so 8/3 * 768 counts as 2048."""
  width = math.floor(ratio * d_model + 1e-6)
  return multiple * math.ceil(width / multiple)


# -------------------------------------------------------------------------- transformer


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Configuration of `Transformer`. The defaults are the released code's text network.

  Attributes:
    vocab_size: number of real tokens; token id vocab_size is the mask.
    num_layers: transformer blocks.
    num_heads: attention heads; d_model must be divisible by 2 * num_heads (RoPE pairs).
    d_model: width of the residual stream.
    mlp_ratio, mlp_multiple: the MLP is mlp_width(mlp_ratio, d_model, mlp_multiple) wide.
    mlp_type: "glu" (sigmoid gate), "swiglu" (silu gate) or "gelu" (ungated ViT MLP).
    norm: "layernorm" or "rmsnorm" (no bias; a learned scale only without conditioning).
    norm_eps: the norms' epsilon.
    cond_dim: width of the conditioning vector (time, class) feeding every adaLN projection;
      0 means d_model.
    cond_activation: "sigmoid" or "silu", applied to the conditioning vector before each adaLN
      projection (the released code uses its MLP gate's activation there).
    embed_dim: 0: tokens are embedded straight to d_model; else to embed_dim, then projected to
      d_model by a Dense with bias (the released code's text8 network: 64).
    rope: "interleaved" (pairs 2i, 2i + 1) or "halves" (pairs i, i + H/2).
    depth_scaled_init: MLP kernels drawn with variance scale 2 / num_layers instead of 1.
    qkv_bias: biases on the query, key and value projections.
    output_bias: a bias on the output layer.
    dropout_rate: the rate of every dropout below; 0 disables them all.
    dropout: "channel" or "element": residual branch dropout (one mask per example and feature,
      or per element).
    attention_dropout: also drop attention probabilities (element-wise).
    embed_dropout: also drop token embeddings (element-wise).
    time_conditioning: condition on t; if False the output does not depend on t at all.
    num_classes: class labels for conditioning; 0 = unconditional.
    null_class: one more class embedding, label num_classes = "no class", which a model trained
      with label dropout (train.label_drop) reads as the unconditional model (classifier-free
      guidance); needs num_classes > 0.
    dtype: compute dtype ("float32", "bfloat16", "float16" or a jnp dtype); parameters and
      logits are float32 regardless.
    remat: the rematerialisation policy of each block in the backward pass, a name in
      md4.networks.remat.REMAT_POLICIES: "none", "full", "dots", "dots_no_batch" or
      "attention_and_mlp". It trades memory for compute; logits and gradients agree with "none"
      to float rounding.
    rope_base: RoPE wavelength base.
    attention_impl: the attention kernel, a name in md4.networks.attention.ATTENTION_IMPLS
      (None: attention.default_impl's choice for the backend; "cudnn": fused flash attention on
      NVIDIA GPUs, bf16/fp16).
    causal: causal attention, for an autoregressive model (model.objective="autoregressive"),
      such as the demo's judge of sample quality; the diffusion models are bidirectional.
  """

  vocab_size: int
  num_layers: int = 12
  num_heads: int = 12
  d_model: int = 768
  mlp_ratio: float = 8 / 3
  mlp_multiple: int = 32
  mlp_type: str = "glu"
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  cond_dim: int = 64
  cond_activation: str = "sigmoid"
  embed_dim: int = 0
  rope: str = "interleaved"
  depth_scaled_init: bool = True
  qkv_bias: bool = False
  output_bias: bool = False
  dropout_rate: float = 0.0
  dropout: str = "channel"
  attention_dropout: bool = True
  embed_dropout: bool = True
  time_conditioning: bool = True
  num_classes: int = 0
  null_class: bool = False
  dtype: Any = jnp.float32
  remat: str = "none"
  rope_base: float = 10_000.0
  attention_impl: str | None = None
  causal: bool = False

  def __post_init__(self):
    check_positive(vocab_size=self.vocab_size, num_heads=self.num_heads, d_model=self.d_model,
                   mlp_ratio=self.mlp_ratio, mlp_multiple=self.mlp_multiple,
                   norm_eps=self.norm_eps, rope_base=self.rope_base)
    if self.num_layers < 0 or self.embed_dim < 0 or self.cond_dim < 0:
      raise ValueError(f"num_layers, embed_dim and cond_dim must be >= 0, got {self.num_layers!r}, "
                       f"{self.embed_dim!r} and {self.cond_dim!r}")
    for name, choices in (("mlp_type", MLP_TYPES), ("norm", NORMS), ("rope", ROPE_LAYOUTS),
                          ("dropout", DROPOUT_KINDS), ("cond_activation", COND_ACTIVATIONS)):
      check_choice(name, getattr(self, name), choices)
    remat.check_remat(self.remat)
    if self.d_model % (2 * self.num_heads):
      raise ValueError(
          f"d_model={self.d_model} must be divisible by 2 * num_heads={2 * self.num_heads} "
          "(RoPE rotates pairs of head features)"
      )
    dtype = check_common_fields(num_classes=self.num_classes, dropout_rate=self.dropout_rate,
                                dtype=self.dtype, attention_impl=self.attention_impl,
                                cond_dim=self.conditioning_dim, null_class=self.null_class)
    object.__setattr__(self, "dtype", dtype)

  @property
  def mlp_dim(self) -> int:
    """MLP hidden width."""
    return mlp_width(self.mlp_ratio, self.d_model, self.mlp_multiple)

  @property
  def conditioning_dim(self) -> int:
    """Width of the conditioning vector."""
    return self.cond_dim or self.d_model

  def block_spec(self) -> BlockSpec:
    return BlockSpec(
        num_heads=self.num_heads, mlp_dim=self.mlp_dim, mlp_type=self.mlp_type, norm=self.norm,
        norm_eps=self.norm_eps, cond_activation=self.cond_activation, qkv_bias=self.qkv_bias,
        rope=self.rope,
        mlp_init_scale=2.0 / max(self.num_layers, 1) if self.depth_scaled_init else 1.0,
        dropout_rate=self.dropout_rate, dropout=self.dropout,
        attention_dropout=self.attention_dropout, dtype=self.dtype,
        attention_impl=self.attention_impl, causal=self.causal)


class Transformer(nn.Module):
  """Transformer over a token sequence: bidirectional, it returns logits of the clean tokens (the
  diffusion denoiser); causal (config.causal), logits of each next token.

  Attributes:
    config: the TransformerConfig.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(
      self, z: Array, t: Array, *, cond: Array | None = None, train: bool = False,
      positions: Array | None = None, features: bool = False
  ) -> Array:
    """Computes logits (or the output layer's input features).

    Args:
      z: int32[B, L] tokens in [0, vocab_size]; vocab_size is the mask id.
      t: float32[B] diffusion time in [0, 1].
      cond: int32[B] class labels in [0, num_classes) (num_classes: the null class, with
        null_class); required iff num_classes > 0.
      train: enables dropout (needs the 'dropout' rng).
      positions: int32[B, K] or None: the output at these positions only (the rows of the full
        output, bitwise), so the vocabulary-wide output layer runs on K positions instead of L.
      features: return the output layer's input, [B, L or K, d_model], instead of logits;
        `project_features` turns them into the logits.

    Returns:
      float32[B, L or K, vocab_size] logits, or the features.
    """
    cfg = self.config
    check_inputs(z, t, cond, num_classes=cfg.num_classes, z_ndim=2, z_desc="int32[B, L]",
                 null_class=cfg.null_class)
    c = ConditionEmbedding(cfg.conditioning_dim, cfg.time_conditioning, cfg.num_classes,
                           cfg.null_class, name="cond_embed")(t, cond)
    # The residual stream is float32 so bf16 rounding does not pile up across layers.
    x = nn.Embed(cfg.vocab_size + 1, cfg.embed_dim or cfg.d_model, name="embed")(z)
    if cfg.embed_dim:
      x = nn.Dense(cfg.d_model, dtype=cfg.dtype, name="embed_proj")(x).astype(jnp.float32)
    if cfg.embed_dropout:
      x = nn.Dropout(cfg.dropout_rate, deterministic=not train)(x)
    # Split along the batch, so that XLA does not follow the parameters' split of the width into
    # the activations (md4/sharding.py).
    x = sharding.constrain_batch(x)
    angles = rope_angles(jnp.arange(z.shape[1]), cfg.d_model // cfg.num_heads, cfg.rope_base)
    block = block_class(cfg.remat)
    spec = cfg.block_spec()
    for i in range(cfg.num_layers):
      x = block(spec, deterministic=not train, name=f"block_{i}")(x, c, angles)
      x = sharding.constrain_batch(x)
    out = FinalLayer(cfg.vocab_size, cfg.norm, cfg.norm_eps, cfg.cond_activation,
                     cfg.output_bias, dtype=cfg.dtype, name="final")(x, c, positions,
                                                                     project=not features)
    return out if features else out.astype(jnp.float32)


def project_features(config: TransformerConfig, params: Any, h: Array) -> Array:
  """The output layer alone: float32[..., vocab_size] logits of h: [..., d_model], the features of
  Transformer(..., features=True) under the network parameters `params` (the "params" collection).
  Equal to the network's logits at those positions, bitwise: the same layer computes both."""
  layer = output_projection(config.vocab_size, config.output_bias, config.dtype)
  return layer.apply({"params": params["final"]["proj"]}, h).astype(jnp.float32)
