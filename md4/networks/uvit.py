"""U-ViT image denoiser: the released code's ImageNet 64x64 network.

ResNet blocks at full resolution whose GroupNorms take their scale and shift from the conditioning
vector, then a DiT (Peebles & Xie 2023) in the middle: p x p patches (a strided conv) plus a learned
position table initialised to 2D sin-cos features, adaLN-zero blocks with LayerNorm, biased
query/key/value projections and a gelu MLP, a final adaLN layer back to patches; then ResNet blocks
that take the full-resolution activations through skip connections.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from md4 import sharding
from md4.networks import remat
from md4.networks.blocks import BlockSpec, FinalLayer, block_class, mlp_width
from md4.networks.layers import (
    ConditionEmbedding,
    check_common_fields,
    check_inputs,
    check_positive,
)
from md4.networks.unet import Conv, ResNetEnds, check_image_inputs

Array = jax.Array

_DIT_NORM_EPS = 1e-6  # Flax's LayerNorm default, which the released DiT uses.


def depth_to_space(x: Array, p: int) -> Array:
  """[B, H/p, W/p, p*p*F] -> [B, H, W, F]: each token's features are its p x p patch, row-major."""
  b, hp, wp, d = x.shape
  f = d // (p * p)
  x = x.reshape(b, hp, wp, p, p, f).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hp * p, wp * p, f)


def sincos_position_table(rows: int, cols: int, dim: int) -> np.ndarray:
  """2D sin-cos features of a rows x cols grid of tokens in row-major order.

  The first dim/2 features encode the column, the last dim/2 the row; each half is sines then
  cosines of position * 10000^(-i / (dim/4)), i < dim/4 (the released DiT's initial table).

  Returns:
    float32[rows * cols, dim]; dim must be divisible by 4.
  """
  omega = 1.0 / 10_000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def encode(pos):
    args = pos.astype(np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)

  row, col = np.divmod(np.arange(rows * cols), cols)
  return np.concatenate([encode(col), encode(row)], axis=1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class UViTConfig:
  """Configuration of `UViT`. The defaults are the released code's ImageNet 64x64 network of the
  paper's best likelihood (24 ResBlocks, 12 transformer layers).

  Attributes:
    vocab_size: values per channel (256 for 8-bit pixels); id vocab_size is the mask.
    num_channels: image channels C.
    features: width of the full-resolution ResBlocks, of each channel token's embedding and of
      the conditioning vector.
    num_res_blocks: ResBlocks before the transformer; num_res_blocks + 1 after it.
    norm_groups: GroupNorm groups; features must be divisible by it.
    patch_size: side of the square patches turned into transformer tokens; H and W must be
      divisible by it.
    num_layers: transformer blocks.
    num_heads: attention heads; d_model must be divisible by it.
    d_model: transformer width; divisible by 4 (the 2D sin-cos table).
    mlp_ratio: transformer MLP hidden width as a multiple of d_model.
    dropout_rate: dropout rate of ResBlocks and transformer blocks, only with train=True.
    time_conditioning: condition on t; if False the output does not depend on t at all.
    num_classes: class labels for conditioning; 0 = unconditional.
    null_class: one more class embedding, label num_classes = "no class" (see
      transformer.TransformerConfig.null_class); needs num_classes > 0.
    dtype: compute dtype ("float32", "bfloat16", "float16" or a jnp dtype); parameters and
      logits are float32 regardless.
    remat: the rematerialisation policy of each ResBlock and transformer block in the backward
      pass, a name in md4.networks.remat.REMAT_POLICIES ("none": none). Under
      "attention_and_mlp" the transformer blocks keep their tagged branch outputs and the ResBlocks,
      which tag nothing, keep nothing.
    attention_impl: the attention kernel, a name in md4.networks.attention.ATTENTION_IMPLS
      (None: attention.default_impl's choice for the backend; "cudnn": fused flash attention on
      NVIDIA GPUs, bf16/fp16).
  """

  vocab_size: int = 256
  num_channels: int = 3
  features: int = 256
  num_res_blocks: int = 24
  norm_groups: int = 32
  patch_size: int = 2
  num_layers: int = 12
  num_heads: int = 12
  d_model: int = 768
  mlp_ratio: float = 4.0
  dropout_rate: float = 0.1
  time_conditioning: bool = True
  num_classes: int = 0
  null_class: bool = False
  dtype: Any = jnp.float32
  remat: str = "none"
  attention_impl: str | None = None

  def __post_init__(self):
    check_positive(vocab_size=self.vocab_size, num_channels=self.num_channels,
                   features=self.features, norm_groups=self.norm_groups,
                   patch_size=self.patch_size, num_heads=self.num_heads,
                   d_model=self.d_model, mlp_ratio=self.mlp_ratio)
    if self.num_res_blocks < 0 or self.num_layers < 0:
      raise ValueError(
          f"num_res_blocks and num_layers must be >= 0, got {self.num_res_blocks!r} and "
          f"{self.num_layers!r}"
      )
    if self.features % self.norm_groups:
      raise ValueError(
          f"features={self.features} must be divisible by norm_groups={self.norm_groups}"
      )
    remat.check_remat(self.remat)
    if self.d_model % self.num_heads or self.d_model % 4:
      raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads} "
                       "and by 4 (the 2D sin-cos position table)")
    dtype = check_common_fields(num_classes=self.num_classes, dropout_rate=self.dropout_rate,
                                dtype=self.dtype, attention_impl=self.attention_impl,
                                cond_dim=self.features, null_class=self.null_class)
    object.__setattr__(self, "dtype", dtype)

  def block_spec(self) -> BlockSpec:
    """The DiT block: LayerNorm, silu before adaLN, biased q/k/v, a gelu MLP, no RoPE."""
    return BlockSpec(
        num_heads=self.num_heads, mlp_dim=mlp_width(self.mlp_ratio, self.d_model, 1),
        mlp_type="gelu", norm="layernorm", norm_eps=_DIT_NORM_EPS, cond_activation="silu",
        qkv_bias=True, rope=None, dropout_rate=self.dropout_rate, dropout="channel",
        attention_dropout=True, dtype=self.dtype, attention_impl=self.attention_impl)


class UViT(nn.Module):
  """ResBlocks + patch transformer (DiT) + ResBlocks; returns per-pixel, per-channel logits.

  Attributes:
    config: the UViTConfig.
  """

  config: UViTConfig

  @nn.compact
  def __call__(
      self, z: Array, t: Array, *, cond: Array | None = None, train: bool = False
  ) -> Array:
    """Computes logits.

    Args:
      z: int32[B, H, W, C] channel tokens in [0, vocab_size]; vocab_size is the mask id.
        H and W must be divisible by patch_size; the position table fixes them at init.
      t: float32[B] diffusion time in [0, 1].
      cond: int32[B] class labels in [0, num_classes) (num_classes: the null class, with
        null_class); required iff num_classes > 0.
      train: enables dropout (needs the 'dropout' rng).

    Returns:
      float32[B, H, W, C, vocab_size] logits.
    """
    cfg = self.config
    check_inputs(z, t, cond, num_classes=cfg.num_classes, z_ndim=4, z_desc="int32[B, H, W, C]",
                 null_class=cfg.null_class)
    check_image_inputs(z, cfg.num_channels)
    p = cfg.patch_size
    if z.shape[1] % p or z.shape[2] % p:
      raise ValueError(f"image height and width must be divisible by patch_size={p}, "
                       f"got z of shape {z.shape}")
    c = ConditionEmbedding(cfg.features, cfg.time_conditioning, cfg.num_classes,
                           cfg.null_class, name="cond_embed")(t, cond)
    ends = ResNetEnds(cfg, train, "norm")
    h = ends.down(z, c)

    patches = Conv(cfg.d_model, (p, p), strides=p, padding="VALID", dtype=cfg.dtype,
                      name="patch_embed")(h)
    b, hp, wp, _ = patches.shape
    table = self.param("pos_embed", lambda key, shape: jnp.asarray(
        sincos_position_table(hp, wp, cfg.d_model)), (hp * wp, cfg.d_model))
    tokens = patches.reshape(b, hp * wp, cfg.d_model).astype(jnp.float32) + table
    block = block_class(cfg.remat)
    spec = cfg.block_spec()
    for i in range(cfg.num_layers):
      tokens = block(spec, deterministic=not train, name=f"block_{i}")(tokens, c, None)
      tokens = sharding.constrain_batch(tokens)
    patches = FinalLayer(p * p * cfg.features, "layernorm", _DIT_NORM_EPS, "silu", use_bias=True,
                         dtype=cfg.dtype, name="patch_out")(tokens, c)
    h = depth_to_space(patches.reshape(b, hp, wp, -1), p).astype(jnp.float32)
    return ends.up(h, c)
