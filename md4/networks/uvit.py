"""U-ViT style image denoiser (the paper's ImageNet 64x64 backbone shape).

ResBlocks at full resolution, a 2x2 (patch_size) space-to-depth into a transformer of the
blocks from transformer.py, depth-to-space back, and ResBlocks that take the full-resolution
activations through skip connections. Token positions use 2D RoPE (half of each head's
rotation pairs turn with the row, half with the column), so no position table fixes the
image size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from md4.networks.transformer import (
    MLP_TYPES,
    ConditionEmbedding,
    FinalLayer,
    block_class,
    check_common_fields,
    check_inputs,
    check_positive,
    rope_angles_2d,
)
from md4.networks.unet import ResNetEnds, check_image_inputs

Array = jax.Array


def space_to_depth(x: Array, p: int) -> Array:
  """[B, H, W, F] -> [B, H/p, W/p, p*p*F], each p x p patch flattened into channels."""
  b, h, w, f = x.shape
  x = x.reshape(b, h // p, p, w // p, p, f).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * f)


def depth_to_space(x: Array, p: int) -> Array:
  """Inverse of space_to_depth: [B, H/p, W/p, p*p*F] -> [B, H, W, F]."""
  b, hp, wp, d = x.shape
  f = d // (p * p)
  x = x.reshape(b, hp, wp, p, p, f).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hp * p, wp * p, f)


@dataclasses.dataclass(frozen=True)
class UViTConfig:
  """Configuration of `UViT`.

  Attributes:
    vocab_size: values per channel (256 for 8-bit pixels); id vocab_size is the mask.
    num_channels: image channels C.
    features: width of the full-resolution ResBlocks and of each channel token's embedding.
    num_res_blocks: ResBlocks before the transformer; num_res_blocks + 1 after it.
    norm_groups: GroupNorm groups; features must be divisible by it.
    patch_size: side of the square patches turned into transformer tokens; H and W must be
      divisible by it.
    num_layers: transformer blocks.
    num_heads: attention heads; d_model / num_heads must be divisible by 4 (2D RoPE).
    d_model: transformer width, also of the conditioning vector.
    mlp_ratio: transformer MLP hidden width as a multiple of d_model.
    mlp_type: "swiglu" (silu gate) or "glu" (sigmoid gate).
    dropout_rate: dropout rate of ResBlocks and transformer branches, only with train=True.
    time_conditioning: condition on t; if False the output does not depend on t at all.
    num_classes: class labels for conditioning; 0 = unconditional.
    dtype: compute dtype ("float32", "bfloat16", "float16" or a jnp dtype); parameters and
      logits are float32 regardless.
    remat: rematerialise each ResBlock and transformer block in the backward pass.
    rope_base: RoPE wavelength base.
    attention_impl: jax.nn.dot_product_attention implementation: None or "xla" (portable),
      "cudnn" (fused flash attention on NVIDIA GPUs; needs bf16/fp16 dtype).
  """

  vocab_size: int = 256
  num_channels: int = 3
  features: int = 128
  num_res_blocks: int = 2
  norm_groups: int = 32
  patch_size: int = 2
  num_layers: int = 12
  num_heads: int = 12
  d_model: int = 768
  mlp_ratio: float = 4.0
  mlp_type: str = "swiglu"
  dropout_rate: float = 0.0
  time_conditioning: bool = True
  num_classes: int = 0
  dtype: Any = jnp.float32
  remat: bool = False
  rope_base: float = 10_000.0
  attention_impl: str | None = None

  def __post_init__(self):
    check_positive(vocab_size=self.vocab_size, num_channels=self.num_channels,
                   features=self.features, norm_groups=self.norm_groups,
                   patch_size=self.patch_size, num_heads=self.num_heads,
                   d_model=self.d_model, mlp_ratio=self.mlp_ratio, rope_base=self.rope_base)
    if self.num_res_blocks < 0 or self.num_layers < 0:
      raise ValueError(
          f"num_res_blocks and num_layers must be >= 0, got {self.num_res_blocks!r} and "
          f"{self.num_layers!r}"
      )
    if self.features % self.norm_groups:
      raise ValueError(
          f"features={self.features} must be divisible by norm_groups={self.norm_groups}"
      )
    if self.d_model % (4 * self.num_heads):
      raise ValueError(
          f"d_model={self.d_model} must be divisible by 4 * num_heads={4 * self.num_heads} "
          "(2D RoPE splits each head's rotation pairs between rows and columns)"
      )
    if self.mlp_type not in MLP_TYPES:
      raise ValueError(f"mlp_type must be one of {MLP_TYPES}, got {self.mlp_type!r}")
    dtype = check_common_fields(num_classes=self.num_classes, dropout_rate=self.dropout_rate,
                                dtype=self.dtype, attention_impl=self.attention_impl)
    object.__setattr__(self, "dtype", dtype)

  @property
  def mlp_dim(self) -> int:
    """Transformer MLP hidden width."""
    return int(round(self.mlp_ratio * self.d_model))


class UViT(nn.Module):
  """ResBlocks + patch transformer + ResBlocks; returns per-pixel, per-channel logits.

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
        H and W must be divisible by patch_size.
      t: float32[B] diffusion time in [0, 1].
      cond: int32[B] class labels in [0, num_classes); required iff num_classes > 0.
      train: enables dropout (needs the 'dropout' rng).

    Returns:
      float32[B, H, W, C, vocab_size] logits.
    """
    cfg = self.config
    check_inputs(z, t, cond, num_classes=cfg.num_classes, z_ndim=4, z_desc="int32[B, H, W, C]")
    check_image_inputs(z, cfg.num_channels)
    p = cfg.patch_size
    if z.shape[1] % p or z.shape[2] % p:
      raise ValueError(f"image height and width must be divisible by patch_size={p}, "
                       f"got z of shape {z.shape}")
    c = ConditionEmbedding(cfg.d_model, cfg.time_conditioning, cfg.num_classes,
                           name="cond_embed")(t, cond)
    ends = ResNetEnds(cfg, train)
    h = ends.down(z, c)

    patches = space_to_depth(h, p)
    b, hp, wp, _ = patches.shape
    tokens = nn.Dense(cfg.d_model, dtype=cfg.dtype, name="patch_in")(
        patches.reshape(b, hp * wp, -1)
    ).astype(jnp.float32)
    angles = rope_angles_2d(hp, wp, cfg.d_model // cfg.num_heads, cfg.rope_base)
    block = block_class(cfg.remat)
    for i in range(cfg.num_layers):
      tokens = block(
          num_heads=cfg.num_heads,
          mlp_dim=cfg.mlp_dim,
          mlp_type=cfg.mlp_type,
          dropout_rate=cfg.dropout_rate,
          deterministic=not train,
          dtype=cfg.dtype,
          attention_impl=cfg.attention_impl,
          name=f"block_{i}",
      )(tokens, c, angles)
    patches = FinalLayer(p * p * cfg.features, dtype=cfg.dtype, name="patch_out")(tokens, c)
    h = depth_to_space(patches.reshape(b, hp, wp, -1), p).astype(jnp.float32)

    return ends.up(h, c)
