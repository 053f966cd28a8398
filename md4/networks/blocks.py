"""The transformer block (self-attention and an MLP under adaLN-zero) and the final adaLN layer,
shared by the text transformer (md4/networks/transformer.py) and the U-ViT's middle
(md4/networks/uvit.py): BlockSpec (the block's options), SelfAttention, Mlp, TransformerBlock and its
rematerialised class (block_class), FinalLayer and its output projection, the MLP width rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from md4.networks import attention, remat
from md4.networks.layers import apply_rope, branch_dropout, cond_activation, make_norm, modulate

Array = jax.Array

MLP_TYPES = ("glu", "swiglu", "gelu")


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
