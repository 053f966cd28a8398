"""Bidirectional transformer denoiser for token sequences, conditioned by adaLN-zero.

The defaults build the network of the paper's released code (google-deepmind/md4) layer for layer:
parameter-free LayerNorm under adaLN-zero, a sigmoid-gated ("glu") MLP 8d/3 wide rounded up to a
multiple of 32 with depth-scaled initialisation, a 64-wide conditioning vector, interleaved RoPE,
dropout on the attention probabilities, channel-wise dropout on the residual branches and a
zero-initialised, bias-free output layer. Other choices are options: RMSNorm, SwiGLU, a conditioning
vector as wide as the model, element-wise dropout, RoPE on half-split feature pairs.

Its layers live in md4/networks/blocks.py (the block and the final layer, shared with the U-ViT)
and md4/networks/layers.py (checks, conditioning, RoPE, norms, shared by the networks).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from md4 import sharding
from md4.networks import remat
from md4.networks.blocks import (
    MLP_TYPES,
    BlockSpec,
    FinalLayer,
    block_class,
    mlp_width,
    output_projection,
)
from md4.networks.layers import (
    COND_ACTIVATIONS,
    DROPOUT_KINDS,
    NORMS,
    ROPE_LAYOUTS,
    ConditionEmbedding,
    check_choice,
    check_common_fields,
    check_inputs,
    check_positive,
    rope_angles,
)

Array = jax.Array


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
