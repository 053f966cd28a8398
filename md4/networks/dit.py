"""MDLM's denoiser (Sahoo et al. 2024): the DIT of kuleshov-group/mdlm models/dit.py, with MDLM's
SUBS parameterisation of its output (diffusion.py `_subs_parameterization`).

Layer for layer, as models/dit.py computes it (names in brackets are its parameter names, which
md4/convert_mdlm.py maps onto this module's):
  tokens -> embedding [vocab_embed.embedding], vocab_size + 1 rows (the mask id vocab_size last);
  conditioning c = silu(MLP(sinusoid(sigma))) [sigma_map.mlp.0, .mlp.2]: a 256-wide sinusoidal
    embedding, cos before sin, frequencies exp(-log(10^4) i / 128), then Linear(256, cond_dim),
    SiLU, Linear(cond_dim, cond_dim); with time_conditioning off (MDLM's OpenWebText model) sigma
    is 0 whatever t is;
  num_layers blocks [blocks.i], each: shift, scale, gate (attention), shift, scale, gate (MLP) =
    six chunks of Linear(cond_dim, 6 d_model)(c) [adaLN_modulation];
    x += gate * attn_out(attention(rope(qkv(LN(x) (1 + scale) + shift)))) with LN a LayerNorm of
    eps 1e-5 with a learned scale and no bias [norm1.weight], qkv and attn_out bias-free Linears
    [attn_qkv, attn_out] (qkv's output laid out as (3, heads, head_dim)), rotary position
    embedding on q and k in non-interleaved halves (pairs i, i + head_dim / 2; base 10^4), full
    bidirectional softmax attention with scale 1/sqrt(head_dim);
    x += gate * MLP(LN(x) (1 + scale) + shift), MLP = Linear(d, 4d) [mlp.0], tanh-GELU, Linear(4d,
    d) [mlp.2], both with biases [norm2.weight];
    dropout (training only) on both residual branches before the gate, element-wise;
  output: shift, scale = Linear(cond_dim, 2 d_model)(c) [output_layer.adaLN_modulation] (shift
    first), LN [output_layer.norm_final], Linear(d_model, vocab_size + 1) with bias
    [output_layer.linear].
Then SUBS: the mask's logit gets -1e6, the logits are normalised (log-softmax over all
vocab_size + 1 entries), and at unmasked positions every entry is -1e6 but the given token's, 0.
The mask's column is dropped: the network returns float32[B, L, vocab_size] log-probabilities of
x, this project's denoiser contract (after SUBS the mask's probability is exp(-1e6) = 0 in float32).

MDLM's own code runs the blocks under bfloat16 autocast on GPUs; here they run in `dtype`
(float32 by default), LayerNorms and the residual stream always in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax.ad_checkpoint import checkpoint_name

from md4 import sharding
from md4.networks import attention, remat
from md4.networks.layers import canonical_dtype, check_inputs, check_positive

Array = jax.Array

SUBS_NEG_INF = -1e6  # MDLM's neg_infinity (diffusion.py).
FREQUENCY_EMBEDDING_SIZE = 256  # TimestepEmbedder's default.
MAX_PERIOD = 10_000.0
ROPE_BASE = 10_000.0
LN_EPS = 1e-5  # torch.nn.functional.layer_norm's default.


@dataclasses.dataclass(frozen=True)
class DITConfig:
  """Configuration of `DIT`. The defaults are MDLM's small model (configs/model/small.yaml).

  Attributes:
    vocab_size: number of real tokens; token id vocab_size is the mask (MDLM's mask_index).
    num_layers: blocks (MDLM's n_blocks).
    num_heads: attention heads; d_model must be divisible by 2 * num_heads (RoPE halves).
    d_model: width of the residual stream (MDLM's hidden_size).
    cond_dim: width of the conditioning vector.
    mlp_ratio: the MLP is mlp_ratio * d_model wide.
    dropout_rate: residual-branch dropout in training (MDLM: 0.1).
    time_conditioning: False (MDLM's OpenWebText model): the conditioning is that of sigma = 0,
      whatever t; True: of t itself (MDLM's time-conditioned models are fed sigma(t) instead; such
      checkpoints are not converted).
    num_classes: 0 only (MDLM's DIT is unconditional); present for the networks' common interface.
    dtype: compute dtype of the matrix products ("float32", "bfloat16", "float16").
    remat: the blocks' rematerialisation policy (md4.networks.remat.REMAT_POLICIES).
    attention_impl: the attention kernel, a name in md4.networks.attention.ATTENTION_IMPLS.
  """

  vocab_size: int
  num_layers: int = 12
  num_heads: int = 12
  d_model: int = 768
  cond_dim: int = 128
  mlp_ratio: int = 4
  dropout_rate: float = 0.1
  time_conditioning: bool = False
  num_classes: int = 0
  dtype: Any = "float32"
  remat: str = "none"
  attention_impl: str | None = None

  def __post_init__(self):
    check_positive(vocab_size=self.vocab_size, num_layers=self.num_layers,
                   num_heads=self.num_heads, d_model=self.d_model, cond_dim=self.cond_dim,
                   mlp_ratio=self.mlp_ratio)
    if self.d_model % (2 * self.num_heads):
      raise ValueError(f"d_model={self.d_model} must be divisible by 2 * num_heads="
                       f"{2 * self.num_heads} (rotary halves per head)")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
    if self.num_classes != 0:
      raise ValueError(f"MDLM's DIT is unconditional: num_classes must be 0, got "
                       f"{self.num_classes!r}")
    remat.check_remat(self.remat)
    object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
    attention.check_impl(self.attention_impl, self.dtype)


def timestep_embedding(sigma: Array, dim: int = FREQUENCY_EMBEDDING_SIZE) -> Array:
  """float32[B, dim]: [cos(sigma f_i), sin(sigma f_i)], f_i = exp(-log(10^4) i / (dim / 2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
  args = sigma.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_inv_freq(head_dim: int) -> Array:
  """float32[head_dim / 2]: 1 / 10^4^(2i / head_dim), the buffer rotary_emb.inv_freq."""
  return 1.0 / ROPE_BASE ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x: Array, positions: Array) -> Array:
  """x: float[B, L, H, D] rotated by position in non-interleaved halves (pairs i, i + D/2)."""
  freqs = positions.astype(jnp.float32)[:, None] * rope_inv_freq(x.shape[-1])[None]
  cos, sin = jnp.cos(freqs)[None, :, None], jnp.sin(freqs)[None, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class LayerNorm(nn.Module):
  """LayerNorm without bias, with a learned scale ("weight"), in float32."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * weight


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1.0 + scale[:, None]) + shift[:, None]


# torch.nn.Linear's default initialisation: uniform in +-1/sqrt(fan_in).
_TORCH_LINEAR = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Block(nn.Module):
  """One DDiTBlock (see the module docstring)."""
  config: DITConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, c: Array, positions: Array) -> Array:
    cfg = self.config
    b, length, d = x.shape
    dense = lambda features, name, bias=True, init=_TORCH_LINEAR: nn.Dense(
        features, use_bias=bias, dtype=cfg.dtype, kernel_init=init, name=name)
    mod = dense(6 * d, "adaLN_modulation", init=nn.initializers.zeros)(c).astype(jnp.float32)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)

    h = _modulate(LayerNorm(name="norm1")(x), shift_msa, scale_msa)
    qkv = dense(3 * d, "attn_qkv", bias=False)(h).reshape(b, length, 3, cfg.num_heads, -1)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = apply_rope(q, positions), apply_rope(k, positions)
    a = attention.attend(q, k, v, impl=cfg.attention_impl).reshape(b, length, d)
    a = dense(d, "attn_out", bias=False)(a).astype(jnp.float32)
    a = checkpoint_name(a, remat.ATTENTION_OUT)
    x = x + gate_msa[:, None] * drop(a)

    h = _modulate(LayerNorm(name="norm2")(x), shift_mlp, scale_mlp)
    h = nn.gelu(dense(cfg.mlp_ratio * d, "mlp_0")(h), approximate=True)
    h = checkpoint_name(dense(d, "mlp_2")(h).astype(jnp.float32), remat.MLP_OUT)
    return x + gate_mlp[:, None] * drop(h)


def subs(logits: Array, z: Array, mask_id: int) -> Array:
  """MDLM's SUBS parameterisation: float32[B, L, V + 1] log-probabilities, from logits of the same
  shape and the input z: int[B, L] (mask id = mask_id = V)."""
  logits = logits.astype(jnp.float32).at[..., mask_id].add(SUBS_NEG_INF)
  logp = jax.nn.log_softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(z, logits.shape[-1], dtype=jnp.bool_)
  carried = jnp.where(onehot, 0.0, SUBS_NEG_INF)
  return jnp.where((z != mask_id)[..., None], carried, logp)


class DIT(nn.Module):
  """MDLM's DIT with SUBS: (z, t) -> float32[B, L, vocab_size] log-probabilities of x."""
  config: DITConfig

  @nn.compact
  def __call__(self, z: Array, t: Array, *, cond: Array | None = None,
               train: bool = False) -> Array:
    """Log-probabilities of x.

    Args:
      z: int32[B, L] tokens in [0, vocab_size]; vocab_size is the mask id.
      t: float32[B] diffusion time in [0, 1] (read only with time_conditioning).
      cond: None (MDLM's DIT is unconditional).
      train: enables dropout (needs the 'dropout' rng).

    Returns:
      float32[B, L, vocab_size]: SUBS log-probabilities (see the module docstring).
    """
    cfg = self.config
    check_inputs(z, t, cond, num_classes=0, z_ndim=2, z_desc="int32[B, L]")
    v1 = cfg.vocab_size + 1
    embedding = self.param("vocab_embed", nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=1, out_axis=0), (v1, cfg.d_model), jnp.float32)
    # Split along the batch, so that XLA does not follow the parameters' split of the width into
    # the activations (md4/sharding.py).
    x = sharding.constrain_batch(jnp.take(jnp.asarray(embedding), z, axis=0))
    sigma = t if cfg.time_conditioning else jnp.zeros_like(t)
    h = nn.Dense(cfg.cond_dim, dtype=cfg.dtype, kernel_init=_TORCH_LINEAR,
                 name="sigma_map_0")(timestep_embedding(sigma))
    h = nn.Dense(cfg.cond_dim, dtype=cfg.dtype, kernel_init=_TORCH_LINEAR,
                 name="sigma_map_2")(nn.silu(h))
    c = nn.silu(h.astype(jnp.float32))
    positions = jnp.arange(z.shape[1])
    block = remat.remat_class(Block, cfg.remat)
    for i in range(cfg.num_layers):
      x = block(cfg, deterministic=not train, name=f"blocks_{i}")(x, c, positions)
      x = sharding.constrain_batch(x)
    mod = nn.Dense(2 * cfg.d_model, dtype=cfg.dtype, kernel_init=nn.initializers.zeros,
                   name="final_adaLN_modulation")(c).astype(jnp.float32)
    shift, scale = jnp.split(mod, 2, axis=-1)
    h = _modulate(LayerNorm(name="norm_final")(x), shift, scale)
    logits = nn.Dense(v1, dtype=cfg.dtype, kernel_init=nn.initializers.zeros,
                      name="output_linear")(h)
    return subs(logits, z, cfg.vocab_size)[..., :cfg.vocab_size]
