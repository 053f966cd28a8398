"""Single-resolution UNet denoiser over image pixels: the released code's CIFAR-10 network.

No down- or upsampling, as in VDM's CIFAR-10 model: each channel token is embedded and the
channels' embeddings concatenated per pixel, then a stack of ResNet blocks whose activations are
saved on the way "down" and concatenated back in on the way "up", with two ResNet blocks and a
self-attention block over all pixels between them in the middle.

Also home to what the UViT (uvit.py) shares: the pixel embedding, the ResNet block (conditioned
additively here, through modulated GroupNorms there) and the full-resolution ends of the network.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from md4 import sharding
from md4.networks import attention, remat
from md4.networks.layers import (
    ConditionEmbedding,
    check_common_fields,
    check_inputs,
    check_positive,
)

Array = jax.Array

# nn.Conv whose kernel (split along its output channels by FSDP, md4/sharding.py) is gathered whole
# where it is used: XLA:TPU otherwise splits the convolution by that split and lays out the
# activations around it, which took the MNIST UNet's temporaries from 260 to 584 MiB per chip.
Conv = nn.map_variables(nn.Conv, "params", trans_in_fn=sharding.gathered, init=True)


def check_image_inputs(z: Array, num_channels: int) -> None:
  """Raises ValueError unless z (already known to be rank 4) has num_channels channels."""
  if z.shape[-1] != num_channels:
    raise ValueError(f"z must have {num_channels} channels (int32[B, H, W, C]), got {z.shape}")


class PixelEmbedding(nn.Module):
  """Embeds every channel token and concatenates the channels' embeddings per pixel.

  One table (vocab_size + 1 rows, the last for the mask) is shared by the channels;
  concatenation keeps which channel a token came from.

  Attributes:
    vocab_size: real tokens per channel; id vocab_size is the mask.
    features: embedding width per channel token.
  """

  vocab_size: int
  features: int

  @nn.compact
  def __call__(self, z: Array) -> Array:
    """z: int32[B, H, W, C]. Returns float32[B, H, W, C * features]."""
    x = nn.Embed(self.vocab_size + 1, self.features, name="embed")(z)
    return x.reshape(*z.shape[:-1], -1)


class GroupNorm(nn.Module):
  """GroupNorm; in "norm" mode with a conditioning vector, its scale and shift come from it.

  "add" mode, or no conditioning: a GroupNorm with learned scale and bias. "norm" mode with c: a
  parameter-free GroupNorm times (1 + scale) plus shift, from a zero-initialised Dense of c.

  Attributes:
    groups: number of groups.
    cond_mode: "add" or "norm".
    dtype: compute dtype.
  """

  groups: int
  cond_mode: str = "add"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array | None) -> Array:
    """x: [B, H, W, F]; c: float32[B, Dc] or None. Returns [B, H, W, F]."""
    if self.cond_mode == "norm" and c is not None:
      scale, shift = jnp.split(
          nn.Dense(2 * x.shape[-1], kernel_init=nn.initializers.zeros, name="modulation")(c)[
              :, None, None, :], 2, axis=-1)
      h = nn.GroupNorm(self.groups, use_bias=False, use_scale=False, dtype=self.dtype,
                       name="norm")(x)
      return h * (1.0 + scale) + shift
    return nn.GroupNorm(self.groups, dtype=self.dtype, name="norm")(x)


class ResBlock(nn.Module):
  """Pre-activation ResNet block; the second conv is zero-initialised, so the block starts as (a
  projection of) the identity.

  Conditioning: in "add" mode a bias-free, zero-initialised Dense of c is added after the first
  conv; in "norm" mode c sets the scale and shift of both GroupNorms (see GroupNorm).

  Attributes:
    features: output channels.
    norm_groups: GroupNorm groups.
    cond_mode: "add" or "norm".
    dropout_rate: dropout before the second conv.
    deterministic: disables dropout (an attribute, so nn.remat sees it as static).
    dtype: compute dtype; the output is float32.
  """

  features: int
  norm_groups: int
  cond_mode: str = "add"
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array | None) -> Array:
    """x: [B, H, W, F_in]; c: float32[B, Dc] or None. Returns float32[B, H, W, features]."""
    norm = lambda name: GroupNorm(self.norm_groups, self.cond_mode, self.dtype, name=name)
    h = nn.swish(norm("norm_0")(x, c))
    h = Conv(self.features, (3, 3), dtype=self.dtype, name="conv_0")(h)
    if c is not None and self.cond_mode == "add":
      h = h + nn.Dense(self.features, use_bias=False, kernel_init=nn.initializers.zeros,
                       dtype=self.dtype, name="cond_proj")(c)[:, None, None, :]
    h = nn.swish(norm("norm_1")(h, c))
    h = nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(h)
    h = Conv(self.features, (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype,
                name="conv_1")(h)
    if x.shape[-1] != self.features:
      x = nn.Dense(self.features, dtype=self.dtype, name="skip")(x)
    return x.astype(jnp.float32) + h.astype(jnp.float32)


class AttentionBlock(nn.Module):
  """Residual self-attention over all pixels of one resolution, with biases on every projection
  (no position encoding: the surrounding convolutions already carry position).

  Attributes:
    num_heads: attention heads.
    norm_groups: GroupNorm groups.
    dtype: compute dtype.
    attention_impl: see blocks.SelfAttention.
  """

  num_heads: int
  norm_groups: int
  dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: float32[B, H, W, F]. Returns float32[B, H, W, F]."""
    b, height, width, f = x.shape
    h = nn.GroupNorm(self.norm_groups, dtype=self.dtype, name="norm")(x).reshape(b, -1, f)
    head_dim = f // self.num_heads
    q, k, v = (nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                               dot_general=attention.matmul_dot_general, name=n)(h)
               for n in ("query", "key", "value"))
    out = attention.attend(q, k, v, impl=self.attention_impl)
    out = nn.DenseGeneral(f, axis=(-2, -1), dtype=self.dtype,
                          dot_general=attention.matmul_dot_general, name="out")(out)
    return x + out.reshape(b, height, width, f).astype(jnp.float32)


class ResNetEnds:
  """The full-resolution ends that UNet and UViT share, built inside the caller's compact method (so
  parameters keep the caller's names): pixel embedding, input conv and the down ResBlocks, whose
  outputs are kept as skips; then the up ResBlocks that consume them and the logits head (norm,
  swish, zero-initialised 3x3 conv to C * vocab_size per pixel).

  cfg: a UNetConfig or UViTConfig (vocab_size, num_channels, features, num_res_blocks,
  norm_groups, dropout_rate, dtype, remat). cond_mode: the ResBlocks' and the head's conditioning.
  """

  def __init__(self, cfg: Any, train: bool, cond_mode: str):
    self.cfg = cfg
    self.cond_mode = cond_mode
    self._block_cls = remat.remat_class(ResBlock, cfg.remat)
    self._train = train
    self.skips: list[Array] = []

  def res_block(self, name: str) -> nn.Module:
    cfg = self.cfg
    return self._block_cls(cfg.features, cfg.norm_groups, self.cond_mode, cfg.dropout_rate,
                           deterministic=not self._train, dtype=cfg.dtype, name=name)

  def down(self, z: Array, c: Array | None) -> Array:
    """z: int32[B, H, W, C] -> float32[B, H, W, features], keeping each stage's output."""
    cfg = self.cfg
    x = PixelEmbedding(cfg.vocab_size, cfg.features, name="pixel_embed")(z)
    h = Conv(cfg.features, (3, 3), dtype=cfg.dtype, name="conv_in")(x).astype(jnp.float32)
    # Split along the batch (the kernels are split along their output channels: md4/sharding.py).
    h = sharding.constrain_batch(h)
    self.skips = [h]
    for i in range(cfg.num_res_blocks):
      h = sharding.constrain_batch(self.res_block(f"down_{i}")(h, c))
      self.skips.append(h)
    return h

  def up(self, h: Array, c: Array | None) -> Array:
    """float32[B, H, W, features] -> float32[B, H, W, C, vocab_size] logits."""
    cfg = self.cfg
    for i in range(cfg.num_res_blocks + 1):
      h = self.res_block(f"up_{i}")(jnp.concatenate([h, self.skips.pop()], axis=-1), c)
      h = sharding.constrain_batch(h)
    h = nn.swish(GroupNorm(cfg.norm_groups, self.cond_mode, cfg.dtype, name="out_norm")(h, c))
    h = Conv(cfg.num_channels * cfg.vocab_size, (3, 3), kernel_init=nn.initializers.zeros,
                dtype=cfg.dtype, name="out_conv")(h)
    return h.reshape(*h.shape[:-1], cfg.num_channels, cfg.vocab_size).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Configuration of `UNet`. The defaults are the released code's CIFAR-10 network.

  Attributes:
    vocab_size: values per channel (256 for 8-bit pixels); id vocab_size is the mask.
    num_channels: image channels C.
    features: width of every block, of each channel token's embedding and of the conditioning
      vector.
    num_res_blocks: ResBlocks on the way down; the way up has num_res_blocks + 1, and the
      middle two.
    attention: a self-attention block over all pixels between the two middle ResBlocks.
    num_heads: heads of that attention block; features must be divisible by it.
    norm_groups: GroupNorm groups; features must be divisible by it.
    dropout_rate: ResBlock dropout rate, active only with train=True.
    time_conditioning: condition on t; if False the output does not depend on t at all.
    num_classes: class labels for conditioning; 0 = unconditional.
    null_class: one more class embedding, label num_classes = "no class" (see
      transformer.TransformerConfig.null_class); needs num_classes > 0.
    dtype: compute dtype ("float32", "bfloat16", "float16" or a jnp dtype); parameters and
      logits are float32 regardless.
    remat: the rematerialisation policy of each ResBlock in the backward pass, a name in
      md4.networks.remat.REMAT_POLICIES ("none": none). ResBlocks tag no values, so
      "attention_and_mlp" keeps nothing in them, as "full".
    attention_impl: the attention kernel, a name in md4.networks.attention.ATTENTION_IMPLS
      (None: attention.default_impl's choice for the backend; "cudnn": fused flash attention on
      NVIDIA GPUs, bf16/fp16).
  """

  vocab_size: int = 256
  num_channels: int = 3
  features: int = 128
  num_res_blocks: int = 32
  attention: bool = True
  num_heads: int = 1
  norm_groups: int = 32
  dropout_rate: float = 0.1
  time_conditioning: bool = True
  num_classes: int = 0
  null_class: bool = False
  dtype: Any = jnp.float32
  remat: str = "none"
  attention_impl: str | None = None

  def __post_init__(self):
    check_positive(vocab_size=self.vocab_size, num_channels=self.num_channels,
                   features=self.features, num_heads=self.num_heads,
                   norm_groups=self.norm_groups)
    if self.num_res_blocks < 0:
      raise ValueError(f"num_res_blocks must be >= 0, got {self.num_res_blocks!r}")
    remat.check_remat(self.remat)
    for divisor in ("num_heads", "norm_groups"):
      if self.features % getattr(self, divisor):
        raise ValueError(
            f"features={self.features} must be divisible by {divisor}={getattr(self, divisor)}"
        )
    dtype = check_common_fields(num_classes=self.num_classes, dropout_rate=self.dropout_rate,
                                dtype=self.dtype, attention_impl=self.attention_impl,
                                cond_dim=self.features, null_class=self.null_class)
    object.__setattr__(self, "dtype", dtype)


class UNet(nn.Module):
  """Single-resolution UNet; returns per-pixel, per-channel logits of the clean image.

  Attributes:
    config: the UNetConfig.
  """

  config: UNetConfig

  @nn.compact
  def __call__(
      self, z: Array, t: Array, *, cond: Array | None = None, train: bool = False
  ) -> Array:
    """Computes logits.

    Args:
      z: int32[B, H, W, C] channel tokens in [0, vocab_size]; vocab_size is the mask id.
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
    c = ConditionEmbedding(cfg.features, cfg.time_conditioning, cfg.num_classes,
                           cfg.null_class, name="cond_embed")(t, cond)
    ends = ResNetEnds(cfg, train, "add")
    h = ends.down(z, c)
    h = ends.res_block("mid_0")(h, c)
    if cfg.attention:
      h = AttentionBlock(cfg.num_heads, cfg.norm_groups, cfg.dtype, cfg.attention_impl,
                         name="mid_attn")(h)
    h = ends.res_block("mid_1")(h, c)
    return ends.up(h, c)
