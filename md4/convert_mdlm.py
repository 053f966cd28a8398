"""Importing MDLM's released checkpoints (kuleshov-group/mdlm; Sahoo et al. 2024).

Two layouts convert, both holding models/dit.py's DIT under "backbone.":
  a Hugging Face directory (kuleshov-group/mdlm-owt): config.json (vocab_size, hidden_dim,
    cond_dim, n_blocks, n_heads, time_conditioning, ...) and model.safetensors, whose keys are
    "backbone." + DIT's parameter names, with the rotary buffer backbone.rotary_emb.inv_freq;
  a PyTorch Lightning checkpoint (.ckpt) of kuleshov-group/mdlm's trainer: ckpt["state_dict"] with
    the same keys, ckpt["ema"]["shadow_params"] the EMA weights as a list in the order of the
    module's parameters (the state dict's order less its buffers), ckpt["global_step"]. It is read
    without PyTorch (md4/torch_checkpoint.py).

The vocabulary. MDLM's OpenWebText tokenizer is GPT-2's, 50257 tokens; having no mask token it
appends one, mask_index = 50257, so its network's embedding and output have 50258 rows, the mask
last. This project's model.vocab_size is the data's vocabulary, 50257 (model.extra_tokens 0), the
mask id vocab_size = 50257: the same id. md4/networks/dit.py builds vocab_size + 1 rows for the
embedding and the output layer, the tensors are copied row for row (no reordering), and the
network returns the SUBS log-probabilities of the 50257 real tokens (the mask's column, -1e6
before normalisation, dropped). Linear weights are transposed ([out, in] -> Flax's [in, out]);
the rotary buffer is checked against 1 / 10^4^(2i / head_dim) and not stored (the network computes
it). Every tensor must be used and every parameter filled with the shapes the config builds, or
the conversion fails naming the tensor.

What does not carry over: the optimizer state (the converted state starts a fresh optimizer), and
the time conditioning of MDLM's time-conditioned models (fed sigma(t), where this project's DIT
would be fed t): a checkpoint with time_conditioning true is refused.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, NamedTuple

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from md4 import checkpoint, model, paths
from md4.config import Config
from md4.data.pipeline import DatasetSpec
from md4.networks.dit import rope_inv_freq
from md4.standalone import Description
from md4.state import TrainState, stream_key

PREFIX = "backbone."
INV_FREQ = "rotary_emb.inv_freq"
# MDLM's name (without "backbone.") -> this project's path; "T" marks a torch Linear weight.
_FIXED = {
    "vocab_embed.embedding": ("vocab_embed", False),
    "sigma_map.mlp.0.weight": ("sigma_map_0/kernel", True),
    "sigma_map.mlp.0.bias": ("sigma_map_0/bias", False),
    "sigma_map.mlp.2.weight": ("sigma_map_2/kernel", True),
    "sigma_map.mlp.2.bias": ("sigma_map_2/bias", False),
    "output_layer.norm_final.weight": ("norm_final/weight", False),
    "output_layer.linear.weight": ("output_linear/kernel", True),
    "output_layer.linear.bias": ("output_linear/bias", False),
    "output_layer.adaLN_modulation.weight": ("final_adaLN_modulation/kernel", True),
    "output_layer.adaLN_modulation.bias": ("final_adaLN_modulation/bias", False),
}
_BLOCK = {
    "norm1.weight": ("norm1/weight", False),
    "attn_qkv.weight": ("attn_qkv/kernel", True),
    "attn_out.weight": ("attn_out/kernel", True),
    "norm2.weight": ("norm2/weight", False),
    "mlp.0.weight": ("mlp_0/kernel", True),
    "mlp.0.bias": ("mlp_0/bias", False),
    "mlp.2.weight": ("mlp_2/kernel", True),
    "mlp.2.bias": ("mlp_2/bias", False),
    "adaLN_modulation.weight": ("adaLN_modulation/kernel", True),
    "adaLN_modulation.bias": ("adaLN_modulation/bias", False),
}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


class MDLMCheckpoint(NamedTuple):
  params: dict[str, np.ndarray]  # DIT's names (no "backbone."), the rotary buffer included.
  ema: dict[str, np.ndarray] | None  # The EMA weights of a .ckpt; None for a hub directory.
  step: int  # The .ckpt's global_step; 0 for a hub directory (it records none).
  config: dict[str, Any]  # The hub's config.json; {} for a .ckpt.
  source: str


def _our_path(name: str) -> tuple[str, bool] | None:
  if name in _FIXED:
    return _FIXED[name]
  match = _BLOCK_RE.fullmatch(name)
  if match and match.group(2) in _BLOCK:
    path, transpose = _BLOCK[match.group(2)]
    return f"blocks_{match.group(1)}/{path}", transpose
  return None


def _backbone(tensors: Mapping[str, Any], source: str) -> dict[str, Any]:
  found = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
  if not found:
    raise ValueError(f"{source} holds no 'backbone.' tensor: not an MDLM checkpoint (its keys "
                     f"begin {sorted(tensors)[:3]})")
  return found


def _read_hub(directory: str) -> MDLMCheckpoint:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  paths = {n: os.path.join(directory, n) for n in ("config.json", "model.safetensors")}
  missing = [n for n, p in paths.items() if not os.path.isfile(p)]
  if missing:
    raise ValueError(f"--from_mdlm={directory} lacks {', '.join(missing)}: an MDLM Hugging Face "
                     "directory holds config.json and model.safetensors")
  with open(paths["config.json"]) as f:
    config = json.load(f)
  return MDLMCheckpoint(_backbone(load_file(paths["model.safetensors"]), directory), None, 0,
                        config, directory)


def _read_lightning(path: str) -> MDLMCheckpoint:
  from md4 import torch_checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = torch_checkpoint.load(path)
  if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
    raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
  names = list(ckpt["state_dict"])
  params = {k: v.numpy() for k, v in _backbone(ckpt["state_dict"], path).items()}
  ema = None
  ema_state = ckpt.get("ema")
  shadow = ema_state.get("shadow_params") if isinstance(ema_state, dict) else None
  if shadow:
    # The EMA follows the module's parameters in order: the state dict less its buffers.
    order = [k for k in names if not k.endswith(INV_FREQ)]
    if len(order) != len(shadow):
      raise ValueError(f"{path}: {len(shadow)} EMA tensors for {len(order)} parameters in the "
                       "state dict; cannot pair them")
    ema = {}
    for name, tensor in zip(order, shadow):
      if tuple(tensor.shape) != tuple(ckpt["state_dict"][name].shape):
        raise ValueError(f"{path}: the EMA tensor paired with {name} has shape {tensor.shape}, "
                         f"the parameter {ckpt['state_dict'][name].shape}")
      if name.startswith(PREFIX):
        ema[name[len(PREFIX):]] = tensor.numpy()
    if INV_FREQ in params:
      ema[INV_FREQ] = params[INV_FREQ]
  return MDLMCheckpoint(params, ema, int(ckpt.get("global_step", 0) or 0), {}, path)


def read_mdlm(path: str) -> MDLMCheckpoint:
  """An MDLM checkpoint: a Hugging Face directory or a Lightning .ckpt (module docstring)."""
  if os.path.isdir(path):
    return _read_hub(path)
  if os.path.isfile(path):
    return _read_lightning(path)
  raise ValueError(f"--from_mdlm={path} does not exist: give an MDLM Hugging Face directory "
                   "(config.json, model.safetensors) or a Lightning .ckpt")


def check_config(hub: Mapping[str, Any], cfg: Config) -> None:
  """Raises ValueError unless the hub's config.json describes the network cfg builds."""
  if cfg.model.network != "dit":
    raise ValueError(f"an MDLM checkpoint converts into model.network='dit' (configs/mdlm), not "
                     f"{cfg.model.network!r}")
  net = cfg.model.net
  want = {"vocab_size": cfg.model.vocab_size + 1, "hidden_dim": net.get("d_model", 768),
          "n_heads": net.get("num_heads", 12), "n_blocks": net.get("num_layers", 12),
          "cond_dim": net.get("cond_dim", 128),
          "time_conditioning": net.get("time_conditioning", False)}
  if hub.get("time_conditioning"):
    raise ValueError("the MDLM checkpoint is time-conditioned (its network is fed sigma(t)); "
                     "this project's DIT converts only time_conditioning false (MDLM's "
                     "OpenWebText model)")
  bad = [f"{k}={hub[k]!r} (config: {v!r})" for k, v in want.items() if k in hub and hub[k] != v]
  if bad:
    raise ValueError(f"the MDLM config.json differs from this config's network: {', '.join(bad)} "
                     "(vocab_size counts the mask: model.vocab_size + 1)")


def convert_params(tensors: Mapping[str, np.ndarray], cfg: Config, spec: DatasetSpec) -> dict:
  """MDLM's DIT tensors (names without "backbone.") as this project's {"net": ...} parameters."""
  network = model.build_network(cfg, spec)
  expected = flax.traverse_util.flatten_dict(jax.eval_shape(
      lambda: model.init_params(jax.random.key(0), network, cfg.model, spec))["net"], sep="/")
  head_dim = network.config.d_model // network.config.num_heads
  out, unused = {}, []
  for name, value in tensors.items():
    if name == INV_FREQ:
      value = np.asarray(value, np.float32)
      ours = np.asarray(rope_inv_freq(head_dim))
      if value.shape != ours.shape or not np.allclose(value, ours, rtol=1e-6, atol=0):
        raise ValueError(f"the checkpoint's {INV_FREQ} (shape {value.shape}) is not the rotary "
                         f"frequencies of heads of {head_dim}: num_heads differs from the config?")
      continue
    target = _our_path(name)
    if target is None or target[0] not in expected:
      unused.append(name)
      continue
    path, transpose = target
    value = np.asarray(value, np.float32)
    value = value.T if transpose else value
    if value.shape != tuple(expected[path].shape):
      raise ValueError(f"MDLM tensor {name} has shape {value.shape}"
                       f"{' (transposed)' if transpose else ''}, but this config's {path} needs "
                       f"{tuple(expected[path].shape)}: a checkpoint of another config?")
    out[path] = value
  if unused:
    raise ValueError(f"the MDLM checkpoint has {len(unused)} tensor(s) this config's network does "
                     f"not: {', '.join(sorted(unused)[:5])} (more blocks than num_layers?)")
  missing = sorted(set(expected) - set(out))
  if missing:
    raise ValueError(f"the MDLM checkpoint lacks {len(missing)} tensor(s) this config's network "
                     f"needs, e.g. {', '.join(missing[:5])}")
  return {"net": flax.traverse_util.unflatten_dict(out, sep="/")}


class ConvertResult(NamedTuple):
  step: int
  num_params: int
  source: str
  checkpoint_dir: str
  has_ema: bool


def convert_checkpoint(source: str, cfg: Config, spec: DatasetSpec, workdir: str,
                       description: Description | None = None) -> ConvertResult:
  """Converts the MDLM checkpoint at `source` and writes it as a checkpoint of this project in
  `workdir` (its step: the .ckpt's, 0 for a hub directory), recording `description`
  (md4.standalone: the data's spec and decoding) and where it came from. Refuses a workdir holding
  checkpoints. Without EMA weights (a hub directory) the EMA parameters are the weights given."""
  from md4 import train  # The trainer's optimizer; imported only to write.

  workdir = paths.resolve(workdir)
  existing = checkpoint.Checkpointer(workdir, cfg, read_only=True).latest_step() \
      if os.path.isdir(os.path.join(workdir, "checkpoints")) else None
  if existing is not None:
    raise ValueError(f"{workdir} already holds checkpoints (latest step {existing}); convert into "
                     "an empty --workdir")
  ref = read_mdlm(source)
  check_config(ref.config, cfg)
  params = convert_params(ref.params, cfg, spec)
  ema = convert_params(ref.ema, cfg, spec) if ref.ema is not None else params
  setup = train.make_setup(cfg, spec)
  params, ema = jax.tree.map(jnp.asarray, (params, ema))
  state = TrainState(step=jnp.asarray(ref.step, jnp.int32), params=params,
                     opt_state=setup.tx.init(params), ema_params=ema,
                     rng=jax.random.key_data(stream_key(cfg.train.seed, "init")))
  origin = f"Converted by md4 convert from MDLM's checkpoint {ref.source} (step {ref.step})"
  checkpointer = checkpoint.Checkpointer(workdir, cfg, description=description, origin=origin)
  checkpointer.save(state, {})  # No data stream: a resumed run starts its stream afresh.
  return ConvertResult(ref.step, sum(x.size for x in jax.tree.leaves(params)), ref.source,
                       checkpointer.directory, ref.ema is not None)
