"""What a config builds, without building it: `md4 info --config=FILE[:presets]`.

Parameter shapes come from jax.eval_shape and FLOPs from XLA's cost analysis of the lowered (not
compiled) computation, so nothing of the model's size is ever allocated; no dataset is read (the
data's spec comes from the config, or from a model's own record with `md4 info --workdir=DIR`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import flax.traverse_util
import jax
import jax.numpy as jnp

from md4 import model
from md4.config import Config
from md4.data import pipeline
from md4.data.pipeline import DatasetSpec
from md4.networks import TransformerConfig


class ModuleCount(NamedTuple):
  name: str  # "block_0..11" for a run of identical numbered modules.
  copies: int
  each: int  # Parameters of one copy.


class Info(NamedTuple):
  network: str
  network_config: Any  # The network's own frozen config dataclass.
  num_params: int
  modules: list[ModuleCount]
  spec: DatasetSpec
  flops_per_token: float  # Forward + backward of the network, per token of one example.
  formula_flops_per_token: float | None  # 6 N + 12 L S d, for the transformer.
  matmul_weights_per_token: int | None  # The N of that formula.
  passes_per_example: int  # Network passes per training example (GenMD4 with 2 masks: 2).
  model_vocab_size: int  # The dataset's vocabulary plus model.extra_tokens.


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def module_counts(params) -> list[ModuleCount]:
  """Parameter counts per top-level module of params["net"] (then "schedule"), by name with numbers
  in numeric order, runs of numbered modules of equal size (block_0, block_1, ...) on one line."""
  natural = lambda name: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
  entries = [(name, _count(params["net"][name])) for name in sorted(params["net"], key=natural)]
  if "schedule" in params:
    entries.append(("schedule", _count(params["schedule"])))
  out: list[ModuleCount] = []
  for name, n in entries:
    match = re.fullmatch(r"(.*)_(\d+)", name)
    if out and match:
      prev = re.fullmatch(r"(.*)_(\d+)(?:\.\.(\d+))?", out[-1].name)
      if (prev and prev.group(1) == match.group(1) and out[-1].each == n
          and int(prev.group(3) or prev.group(2)) + 1 == int(match.group(2))):
        out[-1] = ModuleCount(f"{prev.group(1)}_{prev.group(2)}..{match.group(2)}",
                              out[-1].copies + 1, n)
        continue
    out.append(ModuleCount(name, 1, n))
  return out


def transformer_weights_per_token(cfg: TransformerConfig) -> int:
  """Weights of the matrix products each token goes through: attention and MLP kernels, the output
  layer and the embedding projection (lookups and the per-example conditioning path excluded)."""
  d = cfg.d_model
  mlp = (2 if cfg.mlp_type == "gelu" else 3) * d * cfg.mlp_dim
  return cfg.num_layers * (4 * d * d + mlp) + d * cfg.vocab_size + cfg.embed_dim * d


def network_grad(cfg: Config, spec: DatasetSpec | None = None):
  """(the network, its parameter shapes, the lowered gradient of a loss of its output on one
  example): the network's forward and backward pass, lowered from shapes (nothing allocated).

  spec: the model's data (default: what the config describes, pipeline.config_spec).
  """
  spec = pipeline.config_spec(cfg) if spec is None else spec
  network = model.build_network(cfg, spec)
  params = jax.eval_shape(lambda: model.init_params(jax.random.key(0), network, cfg.model, spec))
  z = jax.ShapeDtypeStruct((1,) + spec.example_shape, jnp.int32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  cond = jax.ShapeDtypeStruct((1,), jnp.int32) if model.is_conditional(cfg) else None

  def loss(net_params, z, t, cond):
    logits = network.apply({"params": net_params}, z, t, cond=cond)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0])

  return network, params, jax.jit(jax.grad(loss)).lower(params["net"], z, t, cond)


def describe(cfg: Config, spec: DatasetSpec | None = None) -> Info:
  """Counts parameters and training FLOPs of cfg's model from shapes alone.

  spec: the model's data (default: what the config describes, pipeline.config_spec).
  """
  spec = pipeline.config_spec(cfg) if spec is None else spec
  network, params, lowered = network_grad(cfg, spec)
  cost = lowered.cost_analysis()
  tokens = spec.tokens_per_example
  formula = weights = None
  if isinstance(network.config, TransformerConfig):
    weights = transformer_weights_per_token(network.config)
    c = network.config
    formula = 6 * weights + 12 * c.num_layers * spec.example_shape[0] * c.d_model
  passes = cfg.model.network_masks if cfg.model.state_dependent else 1
  return Info(cfg.model.network, network.config, _count(params), module_counts(params), spec,
              float(cost["flops"]) / tokens, formula, weights, passes, cfg.model.vocab_size)


def render(info: Info, config_name: str) -> str:
  """The report `md4 info` prints; its line `parameters: N` holds the exact count."""
  spec = info.spec
  net = ", ".join(f"{f.name}={getattr(info.network_config, f.name)!r}"
                  for f in dataclasses.fields(info.network_config) if f.name != "dtype")
  lines = [f"config: {config_name}",
           f"network: {info.network} ({net})",
           f"parameters: {info.num_params}"]
  width = max(len(m.name) for m in info.modules)
  for m in info.modules:
    total = m.copies * m.each
    lines.append(f"  {m.name:<{width}}  {total:>13,}" + (f"  ({m.copies} x {m.each:,})"
                                                          if m.copies > 1 else ""))
  classes = f", {spec.num_classes} classes" if spec.num_classes else ""
  extra = info.model_vocab_size - spec.vocab_size
  extra = f" (the model's: {info.model_vocab_size}, {extra} never in the data)" if extra else ""
  lines += [f"dataset: {spec.kind}, vocabulary {spec.vocab_size}{extra}, example shape "
            f"{spec.example_shape}{classes}",
            f"tokens per example: {spec.tokens_per_example} ({spec.unit}s)",
            f"model FLOPs per training token: {info.flops_per_token:.4g} (XLA's count of the "
            "network's forward and backward pass on one example)"]
  if info.formula_flops_per_token is not None:
    lines.append(f"  formula 6 N + 12 L S d: {info.formula_flops_per_token:.4g} (N = "
                 f"{info.matmul_weights_per_token:,} weights applied per token)")
  if info.passes_per_example > 1:
    lines.append(f"  GenMD4 trains on {info.passes_per_example} masked copies of each example: "
                 f"{info.passes_per_example * info.flops_per_token:.4g} per data token")
  return "\n".join(lines)
