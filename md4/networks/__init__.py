"""Denoiser backbones: (z, t, cond) -> logits; they know nothing of diffusion.

Every network is called as `module.apply(variables, z, t, cond=None, train=False,
rngs={'dropout': key})` and returns float32[B, *S, vocab_size] logits.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from md4.networks.dit import DIT, DITConfig
from md4.networks.transformer import Transformer, TransformerConfig
from md4.networks.unet import UNet, UNetConfig
from md4.networks.uvit import UViT, UViTConfig

NETWORKS: dict[str, tuple[type[nn.Module], type]] = {
    "transformer": (Transformer, TransformerConfig),
    "dit": (DIT, DITConfig),  # MDLM's (md4/networks/dit.py).
    "unet": (UNet, UNetConfig),
    "uvit": (UViT, UViTConfig),
}


def build_network(name: str, **kwargs) -> nn.Module:
  """Builds network `name` from its config fields, e.g. build_network("unet", features=64).

  Raises:
    ValueError: naming an unknown network, unknown or missing config fields, or a bad value.
  """
  if name not in NETWORKS:
    raise ValueError(f"unknown network {name!r}; valid networks: {sorted(NETWORKS)}")
  module_cls, config_cls = NETWORKS[name]
  fields = dataclasses.fields(config_cls)
  valid = [f.name for f in fields]
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(f"unknown field(s) {unknown} for network {name!r}; valid fields: {valid}")
  missing = [
      f.name for f in fields
      if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
      and f.name not in kwargs
  ]
  if missing:
    raise ValueError(f"network {name!r} needs field(s) {missing}")
  return module_cls(config=config_cls(**kwargs))


__all__ = [
    "DIT",
    "DITConfig",
    "NETWORKS",
    "Transformer",
    "TransformerConfig",
    "UNet",
    "UNetConfig",
    "UViT",
    "UViTConfig",
    "build_network",
]
