"""Importing checkpoints written by the paper's released code (google-deepmind/md4).

The released trainers save an Orbax checkpoint per step, `WORKDIR/checkpoints/STEP/train_state`,
holding their TrainState: `params` and `ema_params` (the MD4 or GenMD4 module's parameters, the
network under "classifier", GenMD4's exponents as "noise_schedule/w", class embeddings as
"cond_embeddings"), `opt_state`, `step`, `rng`. The sharded trainer (md4/sharded_train.py) creates
its transformer's parameters boxed in flax's `LogicallyPartitioned` (`nn.with_logical_partitioning`,
with the same module names); a state saved with its boxes holds each boxed array under a further
key, "value" (`kernel/value`), which `unbox` removes. `convert_params` maps a parameter tree onto
this project's, tensor by tensor, by explicit rules per network (`RULES`); every released tensor
must be used and every one of ours filled, with the shapes of the network the config builds, or it
fails naming the tensor. `convert_checkpoint` writes the result as a checkpoint of this project
that `md4 eval` and `md4 sample` read.

The paper configs build the released networks layer for layer, so converted parameters give the
released logits (to float32 round-off). What does not carry over: the optimizer's moments (the
converted state starts a fresh optimizer at the released step) and, for GenMD4, the released code's
treatment of t near 0 (it cuts t at 1e-3 and sets alpha(t) = 1 - (1 - 1e-4) t^w; this project
squeezes alpha as every schedule, see md4/schedules.py): the exponents w are the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Callable, Mapping, NamedTuple

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from md4 import checkpoint, model, paths
from md4.state import TrainState, stream_key
from md4.config import Config
from md4.data.pipeline import DatasetSpec
from md4.standalone import Description
from md4.networks import TransformerConfig, UNetConfig, UViTConfig

Params = Any

_CLASSIFIER = "classifier"


@dataclasses.dataclass(frozen=True)
class Rule:
  """One tensor: our path <- the released path; `reshape` for kernels whose head axes we keep
  separate (the released attention kernels are [d, d] where ours are [d, heads, head_dim])."""
  ours: str
  theirs: str
  reshape: bool = False


def _dense(ours: str, theirs: str, bias: bool = True, reshape: bool = False) -> list[Rule]:
  rules = [Rule(f"{ours}/kernel", f"{theirs}/kernel", reshape)]
  if bias:
    rules.append(Rule(f"{ours}/bias", f"{theirs}/bias", reshape))
  return rules


def _cond_embed(num_classes: int) -> list[Rule]:
  rules = (_dense("net/cond_embed/time_hidden", f"{_CLASSIFIER}/CondEmbedding_0/dense0")
           + _dense("net/cond_embed/time_out", f"{_CLASSIFIER}/CondEmbedding_0/Dense_0"))
  if num_classes:  # The released MD4 module embeds labels outside its classifier.
    rules.append(Rule("net/cond_embed/class_embed/embedding", "cond_embeddings/embedding"))
  return rules


def transformer_rules(cfg: TransformerConfig) -> list[Rule]:
  """The released text network: classifier/{CondEmbedding_0, [Embed_0], Transformer_0}."""
  t = f"{_CLASSIFIER}/Transformer_0"
  rules = _cond_embed(cfg.num_classes)
  if cfg.embed_dim:  # Released: embed outside the transformer, which projects with its Dense_0.
    rules += [Rule("net/embed/embedding", f"{_CLASSIFIER}/Embed_0/embedding")]
    rules += _dense("net/embed_proj", f"{t}/Dense_0")
    final_adaln, final_proj = f"{t}/Dense_1", f"{t}/Dense_2"
  else:
    rules += [Rule("net/embed/embedding", f"{t}/Embed_0/embedding")]
    final_adaln, final_proj = f"{t}/Dense_0", f"{t}/Dense_1"
  for i in range(cfg.num_layers):
    ours, theirs = f"net/block_{i}", f"{t}/TransformerBlock_{i}"
    rules += _dense(f"{ours}/adaln", f"{theirs}/Dense_0")
    for mine, released in (("query", "wq"), ("key", "wk"), ("value", "wv"), ("out", "wo")):
      rules += _dense(f"{ours}/attn/{mine}", f"{theirs}/attention/{released}", bias=False,
                      reshape=True)
    for mine, released in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
      rules += _dense(f"{ours}/mlp/{mine}", f"{theirs}/feed_forward/{released}", bias=False)
  rules += _dense("net/final/adaln", final_adaln)
  rules += _dense("net/final/proj", final_proj, bias=False)
  return rules


def _group_norm(ours: str, theirs: str) -> list[Rule]:
  return [Rule(f"{ours}/norm/scale", f"{theirs}/scale"),
          Rule(f"{ours}/norm/bias", f"{theirs}/bias")]


def _pixel_in(u: str) -> list[Rule]:
  return ([Rule("net/pixel_embed/embed/embedding", f"{_CLASSIFIER}/Embed_0/embedding")]
          + _dense("net/conv_in", f"{u}/Conv_0"))


def unet_rules(cfg: UNetConfig) -> list[Rule]:
  """The released CIFAR-10 UNet: ResBlock_k numbered in creation order (down, middle, up)."""
  u = f"{_CLASSIFIER}/UNet5DWrapper_0/UNet_0"
  rules = _cond_embed(cfg.num_classes) + _pixel_in(u)
  n = cfg.num_res_blocks
  blocks = ([f"down_{i}" for i in range(n)] + ["mid_0", "mid_1"]
            + [f"up_{i}" for i in range(n + 1)])
  for k, name in enumerate(blocks):
    ours, theirs = f"net/{name}", f"{u}/ResBlock_{k}"
    rules += _group_norm(f"{ours}/norm_0", f"{theirs}/GroupNorm_0")
    rules += _dense(f"{ours}/conv_0", f"{theirs}/Conv_0")
    rules += _dense(f"{ours}/cond_proj", f"{theirs}/Dense_0", bias=False)
    rules += _group_norm(f"{ours}/norm_1", f"{theirs}/GroupNorm_1")
    rules += _dense(f"{ours}/conv_1", f"{theirs}/Conv_1")
    if name.startswith("up_"):  # Concatenated skips: 2F channels in, a projection on the skip.
      rules += _dense(f"{ours}/skip", f"{theirs}/Dense_1")
  attn = f"{u}/SelfAttention_0"
  rules += _group_norm("net/mid_attn", f"{attn}/GroupNorm_0")
  for proj in ("query", "key", "value", "out"):
    rules += _dense(f"net/mid_attn/{proj}", f"{attn}/MultiHeadDotProductAttention_0/{proj}")
  rules += _group_norm("net/out_norm", f"{u}/GroupNorm_0")
  rules += _dense("net/out_conv", f"{u}/Conv_1")
  return rules


def uvit_rules(cfg: UViTConfig) -> list[Rule]:
  """The released ImageNet 64x64 U-ViT: CondGroupNorm ResBlocks around DiT_0."""
  u = f"{_CLASSIFIER}/UNet5DWrapper_0/UNet_0"
  dit = f"{u}/DiT_0"
  rules = _cond_embed(cfg.num_classes) + _pixel_in(u)
  n = cfg.num_res_blocks
  for k, name in enumerate([f"down_{i}" for i in range(n)] + [f"up_{i}" for i in range(n + 1)]):
    ours, theirs = f"net/{name}", f"{u}/ResBlock_{k}"
    rules += _dense(f"{ours}/norm_0/modulation", f"{theirs}/CondGroupNorm_0/Dense_0")
    rules += _dense(f"{ours}/conv_0", f"{theirs}/Conv_0")
    rules += _dense(f"{ours}/norm_1/modulation", f"{theirs}/CondGroupNorm_1/Dense_0")
    rules += _dense(f"{ours}/conv_1", f"{theirs}/Conv_1")
    if name.startswith("up_"):
      rules += _dense(f"{ours}/skip", f"{theirs}/Dense_0")
  rules += _dense("net/patch_embed", f"{dit}/x_embedder/proj")
  rules += [Rule("net/pos_embed", f"{dit}/pos_embed")]
  for i in range(cfg.num_layers):
    ours, theirs = f"net/block_{i}", f"{dit}/blocks_{i}"
    rules += _dense(f"{ours}/adaln", f"{theirs}/Dense_0")
    for mine, released in (("query", "wq"), ("key", "wk"), ("value", "wv")):
      rules += _dense(f"{ours}/attn/{mine}", f"{theirs}/attn/{released}", reshape=True)
    rules += _dense(f"{ours}/attn/out", f"{theirs}/attn/wo", bias=False, reshape=True)
    rules += _dense(f"{ours}/mlp/fc1", f"{theirs}/mlp/fc1") + _dense(f"{ours}/mlp/fc2",
                                                                      f"{theirs}/mlp/fc2")
  rules += _dense("net/patch_out/adaln", f"{dit}/final_layer/Dense_0")
  rules += _dense("net/patch_out/proj", f"{dit}/final_layer/linear")
  rules += _dense("net/out_norm/modulation", f"{u}/CondGroupNorm_0/Dense_0")
  rules += _dense("net/out_conv", f"{u}/Conv_1")
  return rules


RULES: dict[str, Callable[[Any], list[Rule]]] = {
    "transformer": transformer_rules,
    "unet": unet_rules,
    "uvit": uvit_rules,
}


def _released_differences(net_cfg: Any) -> list[str]:
  """Options of ours that the released code's networks do not have, yet that leave every shape
  as it is (shape differences are found tensor by tensor)."""
  diffs = []

  def want(field: str, value: Any, why: str = "") -> None:
    if getattr(net_cfg, field) != value:
      diffs.append(f"{field}={getattr(net_cfg, field)!r} (released: {value!r}{why})")

  want("time_conditioning", True)
  if isinstance(net_cfg, TransformerConfig):
    want("norm", "layernorm")
    want("norm_eps", 1e-5)
    want("rope", "interleaved")
    want("rope_base", 10_000.0)
    if net_cfg.mlp_type in ("glu", "swiglu"):
      want("cond_activation", {"glu": "sigmoid", "swiglu": "silu"}[net_cfg.mlp_type],
           ", the activation of its MLP gate")
    else:
      diffs.append(f"mlp_type={net_cfg.mlp_type!r} (released: 'glu' or 'swiglu')")
  else:
    want("norm_groups", 32, ", Flax's GroupNorm default")
  if isinstance(net_cfg, UNetConfig):
    want("attention", True)
  return diffs


def convert_params(reference: Mapping[str, Any], cfg: Config, spec: DatasetSpec) -> Params:
  """The released code's `params` (or `ema_params`) tree as this project's parameters.

  Args:
    reference: nested dict of arrays with the released module names (see the module docstring).
    cfg: the config whose network receives them (a paper config, or one with the same network).
    spec: the dataset spec the network is built for.

  Returns:
    {"net": ..., ["schedule": {"raw_power": float32[V]}]} of float32 numpy arrays, shaped as
    md4.model.init_params makes them.

  Raises:
    ValueError: naming the network options the released code has not, a released tensor that is
      missing or has the wrong shape, or released tensors no rule uses.
  """
  network = model.build_network(cfg, spec)
  diffs = _released_differences(network.config)
  if diffs:
    raise ValueError(f"model.network={cfg.model.network!r} with " + "; ".join(diffs) + ": the "
                     "released code has no such network, so it cannot have written this checkpoint")
  rules = RULES[cfg.model.network](network.config)
  if cfg.model.state_dependent:
    rules = rules + [Rule("schedule/raw_power", "noise_schedule/w")]
  expected = flax.traverse_util.flatten_dict(
      jax.eval_shape(lambda: model.init_params(jax.random.key(0), network, cfg.model, spec)),
      sep="/")
  theirs = flax.traverse_util.flatten_dict(dict(reference), sep="/")

  missing = [r.theirs for r in rules if r.theirs not in theirs]
  if missing:
    hint = ""
    if "noise_schedule/w" in missing:
      hint = " (a checkpoint of MD4, while the config is GenMD4's?)"
    raise ValueError(f"the released checkpoint lacks {len(missing)} tensor(s) this config's "
                     f"network needs, e.g. {', '.join(missing[:5])}{hint}")
  unused = sorted(set(theirs) - {r.theirs for r in rules})
  if unused:
    hint = (" (a GenMD4 checkpoint, while the config is MD4's?)" if "noise_schedule/w" in unused
            else "")
    raise ValueError(f"the released checkpoint has {len(unused)} tensor(s) this config's network "
                     f"does not: {', '.join(unused[:5])}{hint}; is it a checkpoint of another "
                     "config (layers, blocks, class conditioning)?")
  out = {}
  for rule in rules:
    want = expected[rule.ours].shape
    value = np.asarray(theirs[rule.theirs], np.float32)
    if rule.reshape and value.size == math.prod(want):
      value = value.reshape(want)
    if value.shape != tuple(want):
      raise ValueError(f"released tensor {rule.theirs} has shape {value.shape}, but this config's "
                       f"{rule.ours} needs {tuple(want)}: a checkpoint of another config?")
    out[rule.ours] = value
  unfilled = sorted(set(expected) - set(out))
  if unfilled:  # Our rules must cover our whole network; a gap here is a bug in RULES.
    raise AssertionError(f"no conversion rule fills {unfilled}")
  return flax.traverse_util.unflatten_dict(out, sep="/")


def _is_box(node: Any) -> bool:
  """A saved flax partitioning box: a mapping whose only key is "value", holding an array."""
  return (isinstance(node, Mapping) and list(node) == ["value"]
          and not isinstance(node["value"], Mapping))


def unbox(tree: Any) -> Any:
  """The tree with every saved partitioning box (nn.Partitioned, nn.LogicallyPartitioned: the
  array under "value") replaced by its array; other nodes as they are."""
  if _is_box(tree):
    return tree["value"]
  if isinstance(tree, Mapping):
    return {k: unbox(v) for k, v in tree.items()}
  return tree


class ReferenceCheckpoint(NamedTuple):
  params: Params
  ema_params: Params | None  # None when the released run kept no EMA (ema_rate 0).
  step: int
  directory: str


def find_train_state(path: str, step: int | None = None) -> str:
  """The `train_state` directory of a released checkpoint.

  path may be the released workdir, its `checkpoints` directory, one step's directory, or the
  `train_state` directory itself, relative or absolute; with several steps, the latest (or `step`)
  is taken.
  """
  p = pathlib.Path(paths.resolve(path))
  if not p.is_dir():
    raise ValueError(f"--from_reference={path} is not a directory")
  if (p / "checkpoints").is_dir():
    p = p / "checkpoints"
  steps = sorted(int(d.name) for d in p.iterdir() if d.name.isdigit() and d.is_dir())
  if steps:
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ValueError(f"no step {step} in {p}; steps there: {steps}")
    p = p / str(step)
  if (p / "train_state").is_dir():
    p = p / "train_state"
  if not (p / "_METADATA").exists() and not (p / "checkpoint").exists():
    raise ValueError(f"{path} holds no checkpoint of the released code: expected "
                     "WORKDIR/checkpoints/STEP/train_state (an Orbax PyTree checkpoint)")
  return str(p)


def read_reference_checkpoint(path: str, step: int | None = None) -> ReferenceCheckpoint:
  """Reads params, ema_params and step of a released checkpoint as numpy arrays, on the host."""
  directory = find_train_state(path, step)
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(directory).item_metadata.tree
  if "params" not in tree:
    raise ValueError(f"{directory} has no 'params': not a TrainState of the released code "
                     f"(it holds {sorted(tree)})")
  keep = {"params", "ema_params", "step"}

  def select(kept: Callable, skipped: Callable) -> dict:
    return {k: jax.tree.map(kept if k in keep else skipped, v) for k, v in tree.items()}

  # The optimizer state (twice the parameters) and the rest are skipped, never read.
  restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
      item=select(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype) if hasattr(m, "shape")
                  else m, lambda _: ocp.PLACEHOLDER),
      restore_args=select(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          lambda _: ocp.PLACEHOLDER)))
  ema = restored.get("ema_params")
  ema = unbox(ema) if ema and jax.tree.leaves(ema) else None
  return ReferenceCheckpoint(unbox(restored["params"]), ema,
                             int(np.asarray(restored.get("step", 0))), directory)


class ConvertResult(NamedTuple):
  step: int
  num_params: int
  source: str
  checkpoint_dir: str
  has_ema: bool


def convert_checkpoint(source: str, cfg: Config, spec: DatasetSpec, workdir: str,
                       step: int | None = None,
                       description: Description | None = None) -> ConvertResult:
  """Converts the released checkpoint at `source` and writes it as step S of a checkpoint of this
  project in `workdir` (S: the released step), recording `description` (md4.standalone: the data's
  spec and decoding, so the checkpoint needs no dataset) and where it came from. Refuses a workdir
  that already holds checkpoints."""
  from md4 import train  # The trainer's optimizer; imported only to write.

  workdir = paths.resolve(workdir)
  existing = checkpoint.Checkpointer(workdir, cfg, read_only=True).latest_step() \
      if os.path.isdir(os.path.join(workdir, "checkpoints")) else None
  if existing is not None:
    raise ValueError(f"{workdir} already holds checkpoints (latest step {existing}); convert into "
                     "an empty --workdir")
  ref = read_reference_checkpoint(source, step)
  params = convert_params(ref.params, cfg, spec)
  ema = convert_params(ref.ema_params, cfg, spec) if ref.ema_params is not None else params
  setup = train.make_setup(cfg, spec)
  params, ema = jax.tree.map(jnp.asarray, (params, ema))
  state = TrainState(step=jnp.asarray(ref.step, jnp.int32), params=params,
                     opt_state=setup.tx.init(params), ema_params=ema,
                     rng=jax.random.key_data(stream_key(cfg.train.seed, "init")))
  origin = (f"Converted by md4 convert from the released code's checkpoint {ref.directory} (step "
            f"{ref.step})")
  checkpointer = checkpoint.Checkpointer(workdir, cfg, description=description, origin=origin)
  checkpointer.save(state, {})  # No data stream: a resumed run starts its stream afresh.
  return ConvertResult(ref.step, sum(x.size for x in jax.tree.leaves(params)), ref.directory,
                       checkpointer.directory, ref.ema_params is not None)
