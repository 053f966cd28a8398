"""Rematerialisation policies, chosen by name in every network config's `remat` field.

Rematerialising a block (jax.checkpoint, through flax's nn.remat) keeps only some of its
intermediate values from the forward pass for the backward pass and recomputes the others there:
less activation memory for more compute. A policy says which values are kept:

  "none": no rematerialisation; the backward pass reads every value it needs from memory.
  "full": keep nothing inside a block but its inputs; the backward pass recomputes the whole block.
  "dots": keep the outputs of matrix multiplications (dense layers, convolutions and the attention
    scores and weighted values), recompute the cheap element-wise work between them.
  "dots_no_batch": keep the outputs of the matrix multiplications without batch dimensions, the
    dense layers'; recompute the attention einsums, whose [B, heads, L, L] scores grow with the
    square of the sequence length, and the convolutions (jax's policy saves neither).
  "attention_and_mlp": keep the two values a transformer block tags with checkpoint_name, the
    attention branch's and the MLP branch's outputs ([B, L, D] each, before their gates), and
    recompute the rest. Blocks without those tags (the image networks' ResBlocks) keep nothing,
    as under "full".

The policy changes memory and speed only: rematerialised blocks compute the same values, so logits
and gradients agree with "none" to float rounding.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax

# The names a TransformerBlock gives its branch outputs with jax.ad_checkpoint.checkpoint_name.
ATTENTION_OUT = "attention_out"
MLP_OUT = "mlp_out"

# Name -> the jax.checkpoint policy deciding which values a rematerialised block keeps; None under
# "full" is nn.remat's default, keeping nothing. "none" is not rematerialised at all.
_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention_and_mlp": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, MLP_OUT),
}
REMAT_POLICIES: tuple[str, ...] = ("none",) + tuple(_POLICIES)


def check_remat(name: str) -> None:
  """Raises ValueError unless `name` is one of REMAT_POLICIES, listing them."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {name!r}")


def remat_class(module_cls: type[nn.Module], name: str) -> type[nn.Module]:
  """`module_cls` rematerialised under policy `name` (module_cls itself for "none").

  The module's __call__ arguments must be arrays or None: flax's nn.remat traces them all, so
  anything static (such as `deterministic`) has to be a module attribute.
  """
  check_remat(name)
  if name == "none":
    return module_cls
  return nn.remat(module_cls, policy=_POLICIES[name])
