"""The typed configuration: frozen dataclasses, the one schema and the one place for defaults.

Config files (configs/) are ml_collections ConfigDicts built from these defaults (`base_config()`),
changed where a setting differs. The entry point reads the ConfigDict once and converts it with
`from_configdict`, which fails on an unknown key, naming it; nothing below main.py sees a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, Mapping

import flax.core
import ml_collections


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = "shakespeare"  # A name in md4.data.pipeline.DATASETS.
  data_dir: str = ""  # Where `md4 prepare` wrote a real dataset; unused by the embedded ones.
  seq_length: int = 256  # Tokens per example, for text.
  num_workers: int = 0  # Loader worker processes (0: load in the main process).
  # Images only (md4/data/pixels.py); 0 keeps the dataset's own. image_size: the side, a divisor of
  # the dataset's (k x k blocks averaged); channels: 1 or 3; levels: values per channel, 2..256
  # (level = floor(v * levels / 256)); the model's vocabulary is the number of levels.
  image_size: int = 0
  channels: int = 0
  levels: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  network: str = "transformer"  # A name in md4.networks.NETWORKS.
  # The network's own fields (md4.networks.*Config), less vocab_size and dtype, which are set from
  # model.vocab_size and train.compute_dtype.
  net: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  vocab_size: int = 27  # The dataset's plus extra_tokens; the mask id is vocab_size.
  # Vocabulary entries beyond the dataset's, which never occur in the data (the released GenMD4
  # OpenWebText model has 2: 50259 = GPT-2's 50257 + 2). Samples never contain them.
  extra_tokens: int = 0
  schedule: str = "linear"  # md4.schedules.get_schedule name (MD4).
  eps: float = 1e-4
  state_dependent: bool = False  # GenMD4: learnable per-token exponents, alpha_v = 1 - t^{w_v}.
  power_init: float = 1.0  # GenMD4's initial w_v (held as softplus(raw) > 0).
  network_masks: int = 2  # GenMD4: masks per example in the network's gradient (1 or 2).
  # "diffusion" (MD4, GenMD4) or "autoregressive": a causal transformer (model.net.causal=True,
  # time_conditioning=False) with its exact likelihood, such as a judge of sample quality.
  objective: str = "diffusion"
  # Positions per chunk of the output layer in the training loss and the bound (the transformer
  # only): the logits of all positions, [B, L, V], are never held at once, and each chunk's are
  # recomputed in the backward pass. 0: all positions at once. Same value and gradient either way.
  logits_chunk: int = 0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  lr: float = 3e-4  # Peak learning rate.
  warmup_steps: int = 2000  # Linear warmup from 0.
  decay: str = "cosine"  # "cosine" (to min_lr_ratio * lr at train.num_steps) or "constant".
  min_lr_ratio: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  adam_eps: float = 1e-8
  weight_decay: float = 0.0  # AdamW decoupled decay, on matrices only (not norms, biases, w_v).
  grad_clip_norm: float = 1.0  # Global-norm clipping; 0 turns it off.
  ema_decay: float = 0.9999  # 0 turns the EMA off (then EMA params = params).


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  seed: int = 0
  batch_size: int = 64  # Global, over all devices and processes.
  num_steps: int = 100_000
  grad_accum_steps: int = 1  # Microbatches per step; gradients are averaged.
  # Probability that an example's label is replaced by the null class (model.net.null_class) in a
  # training step: one model learns the conditional and the unconditional denoiser (classifier-free
  # guidance). Evaluation always uses the true labels.
  label_drop: float = 0.0
  compute_dtype: str = "float32"  # "float32" or "bfloat16"; parameters stay float32.
  mesh_fsdp: int = 1  # Devices along the fsdp axis (parameters sharded); the rest form "data".
  log_every: int = 100
  # Log train/grad_norm, the global gradient norm averaged over each log window. Off by default: on
  # XLA:CPU it adds a reduction per parameter array to the step, ~12% to its compile time and up
  # to ~1% to its run time (BENCHMARKS.md, "Where the time went").
  log_grad_norm: bool = False
  eval_every: int = 5000  # 0: no periodic evaluation.
  eval_batches: int = 8  # Batches in a periodic evaluation (md4 eval covers the whole split).
  sample_every: int = 5000  # 0: no periodic samples.
  checkpoint_every: int = 5000
  keep_checkpoints: int = 3
  progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  split: str = "valid"
  batch_size: int = 64
  num_time_samples: int = 1  # Draws of (t, z_t) per example (K).
  timesteps: int = 0  # 0: the continuous-time bound; T: the T-step discrete-time bound.
  max_examples: int = 0  # 0: the whole split.
  use_ema: bool = True


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  num_samples: int = 8
  num_steps: int = 256
  method: str = "ancestral"
  top_p: float = 1.0  # 1.0: no nucleus filtering.
  time_grid: str = "uniform"
  reuse_unchanged: bool = False  # Skip network calls on unchanged steps (time-free networks only).
  temperature: float = 1.0  # maskgit only: candidates' and confidence noise's temperature.
  # remdm only (md4.sampling.sample): remasking probability, "cap" or "loop", the loop's window.
  remask_eta: float = 0.0
  remask_strategy: str = "cap"
  remask_t_on: float = 0.55
  remask_t_off: float = 0.05
  # Classifier-free guidance: log p_u + w (log p_c - log p_u), renormalised, with p_u the null-class
  # model. 0: the unconditional model, 1: the conditional one (no guidance), > 1: guided.
  guidance_scale: float = 1.0
  use_ema: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()
  sample: SampleConfig = SampleConfig()


def base_config() -> ml_collections.ConfigDict:
  """The defaults as a ConfigDict, for config files to start from."""
  return ml_collections.ConfigDict(dataclasses.asdict(Config()))


def _convert(cls: type, values: Mapping[str, Any], path: str):
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = [k for k in values if k not in names]
  if unknown:
    where = f"{path}." if path else ""
    raise ValueError(f"unknown config key {where}{unknown[0]!r}; valid keys{' in ' + path if path else ''}: "
                     f"{', '.join(names)}")
  kwargs = {}
  for name, value in values.items():
    hint, key = hints[name], f"{path}.{name}" if path else name
    if dataclasses.is_dataclass(hint):
      if not isinstance(value, Mapping):
        raise ValueError(f"config key {key} must be a group of keys, got {value!r}")
      kwargs[name] = _convert(hint, value, key)
    elif hint is float and isinstance(value, int) and not isinstance(value, bool):
      kwargs[name] = float(value)
    elif hint in (int, float, str, bool) and not isinstance(value, hint):
      raise ValueError(f"config key {key} must be {hint.__name__}, got {value!r}")
    elif isinstance(value, Mapping):
      kwargs[name] = flax.core.FrozenDict(value)
    else:
      kwargs[name] = value
  return cls(**kwargs)


def from_configdict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Config:
  """The typed Config; raises ValueError naming an unknown key or a value of the wrong type."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  cfg = _convert(Config, config, "")
  validate(cfg)
  return cfg


# Every numeric field's valid values: (key, test, the valid values in words). Checked before
# anything runs, so a typo fails at once rather than at the first hook that reads it.
_RANGES: tuple[tuple[str, Any, str], ...] = (
    ("data.seq_length", lambda v: v >= 1, ">= 1"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("data.image_size", lambda v: v >= 0, ">= 0 (0: the dataset's own)"),
    ("data.channels", lambda v: v in (0, 1, 3), "0 (the dataset's own), 1 or 3"),
    ("data.levels", lambda v: v == 0 or 2 <= v <= 256, "0 (the dataset's 256) or 2 to 256"),
    ("model.vocab_size", lambda v: v >= 2, ">= 2"),
    ("model.extra_tokens", lambda v: v >= 0, ">= 0"),
    ("model.eps", lambda v: 0.0 <= v < 0.5, "in [0, 0.5)"),
    ("model.power_init", lambda v: v > 0.0 and math.isfinite(v), "> 0 (GenMD4's w_v = softplus(raw) > 0)"),
    ("model.network_masks", lambda v: v in (1, 2), "1 or 2"),
    ("model.logits_chunk", lambda v: v >= 0, ">= 0 (0: the whole sequence at once)"),
    ("optimizer.lr", lambda v: v >= 0.0 and math.isfinite(v), ">= 0"),
    ("optimizer.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optimizer.min_lr_ratio", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    ("optimizer.b1", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("optimizer.b2", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("optimizer.adam_eps", lambda v: v > 0.0, "> 0"),
    ("optimizer.weight_decay", lambda v: v >= 0.0 and math.isfinite(v), ">= 0"),
    ("optimizer.grad_clip_norm", lambda v: v >= 0.0, ">= 0 (0 turns clipping off)"),
    ("optimizer.ema_decay", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    ("train.batch_size", lambda v: v >= 1, ">= 1"),
    ("train.num_steps", lambda v: v >= 1, ">= 1"),
    ("train.grad_accum_steps", lambda v: v >= 1, ">= 1"),
    ("train.label_drop", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("train.mesh_fsdp", lambda v: v >= 1, ">= 1"),
    ("train.log_every", lambda v: v >= 1, ">= 1"),
    ("train.eval_every", lambda v: v >= 0, ">= 0 (0: no periodic evaluation)"),
    ("train.eval_batches", lambda v: v >= 1, ">= 1"),
    ("train.sample_every", lambda v: v >= 0, ">= 0 (0: no periodic samples)"),
    ("train.checkpoint_every", lambda v: v >= 1, ">= 1"),
    ("train.keep_checkpoints", lambda v: v >= 1, ">= 1"),
    ("eval.batch_size", lambda v: v >= 1, ">= 1"),
    ("eval.num_time_samples", lambda v: v >= 1, ">= 1"),
    ("eval.timesteps", lambda v: v >= 0, ">= 0 (0: the continuous-time bound)"),
    ("eval.max_examples", lambda v: v >= 0, ">= 0 (0: the whole split)"),
    ("sample.num_samples", lambda v: v >= 1, ">= 1"),
    ("sample.num_steps", lambda v: v >= 1, ">= 1"),
    ("sample.top_p", lambda v: 0.0 < v <= 1.0, "in (0, 1] (1: no nucleus filtering)"),
    ("sample.guidance_scale", lambda v: v >= 0.0 and math.isfinite(v),
     ">= 0 (0: the unconditional model, 1: the conditional one, > 1: guided)"),
)

# String fields with a fixed set of values, checked here; registries that live in other modules
# (datasets, networks, schedules, samplers) are checked by md4.checks.check_config.
_CHOICES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model.objective", ("diffusion", "autoregressive")),
    ("optimizer.decay", ("cosine", "constant")),
    ("train.compute_dtype", ("float32", "bfloat16")),
)


def get(cfg: Config, key: str) -> Any:
  """The value of a dotted key, e.g. get(cfg, "train.batch_size")."""
  group, name = key.split(".")
  return getattr(getattr(cfg, group), name)


def validate(cfg: Config) -> None:
  """Checks the values that the dataclasses' types cannot; raises ValueError naming the key, the
  value and the valid values."""
  for key, ok, valid in _RANGES:
    value = get(cfg, key)
    if not ok(value):
      raise ValueError(f"{key}={value!r} is invalid; valid: {valid}")
  for key, choices in _CHOICES:
    value = get(cfg, key)
    if value not in choices:
      raise ValueError(f"{key}={value!r} is invalid; valid: {', '.join(map(repr, choices))}")
  if cfg.train.batch_size % cfg.train.grad_accum_steps:
    raise ValueError(f"train.batch_size={cfg.train.batch_size} must be a multiple of "
                     f"train.grad_accum_steps={cfg.train.grad_accum_steps}")
  if {"vocab_size", "dtype"} & set(cfg.model.net):
    raise ValueError("model.net must not set vocab_size or dtype: they come from model.vocab_size "
                     "and train.compute_dtype")
  _validate_objective(cfg)
  _validate_logits_chunk(cfg)


def _validate_logits_chunk(cfg: Config) -> None:
  chunk = cfg.model.logits_chunk
  if not chunk:
    return
  if cfg.model.network != "transformer" or cfg.model.objective != "diffusion":
    raise ValueError(f"model.logits_chunk={chunk} applies to the diffusion transformer (its output "
                     f"layer runs alone); this config has model.network={cfg.model.network!r}, "
                     f"model.objective={cfg.model.objective!r} (0: off)")
  if cfg.data.seq_length % chunk:
    raise ValueError(f"model.logits_chunk={chunk} must divide data.seq_length="
                     f"{cfg.data.seq_length}")


def _validate_objective(cfg: Config) -> None:
  m = cfg.model
  causal = bool(m.net.get("causal", False))
  if m.objective == "diffusion" and causal:
    raise ValueError("model.net.causal=True: a causal network cannot denoise; it needs "
                     "model.objective='autoregressive'")
  if m.objective == "autoregressive":
    problems = [
        (m.network == "transformer" and causal,
         "model.network='transformer' with model.net.causal=True"),
        (not m.net.get("time_conditioning", True), "model.net.time_conditioning=False"),
        (not m.state_dependent, "model.state_dependent=False"),
        (cfg.train.sample_every == 0, "train.sample_every=0 (the samplers are diffusion samplers)"),
    ]
    missing = [what for ok, what in problems if not ok]
    if missing:
      raise ValueError("model.objective='autoregressive' needs " + ", ".join(missing))


def to_dict(cfg: Config) -> dict[str, Any]:
  """Plain JSON-ready dict (for checkpoints and logs)."""
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=dict))


# The keys that fix the shapes and meaning of a checkpoint's parameters: a checkpoint whose values
# differ here belongs to another model and is refused. The schedule and eps say what the network's
# inputs z_t mean at each t; GenMD4 (state_dependent) learns its schedule, so model.schedule is
# recorded only for MD4.
STATE_DEFINING_KEYS = ("model.network", "model.net", "model.vocab_size", "model.extra_tokens",
                       "model.state_dependent", "model.schedule", "model.eps", "model.objective")


# Network options that change how a step computes, not what the parameters mean: a run may resume
# under other values (rematerialise to fit a bigger batch, another attention kernel, other dropout).
NET_RUNTIME_FIELDS = ("remat", "attention_impl", "dropout_rate", "dropout", "attention_dropout",
                      "embed_dropout")


def state_fingerprint(cfg: Config) -> dict[str, Any]:
  flat = to_dict(cfg)
  out = {}
  for key in STATE_DEFINING_KEYS:
    group, name = key.split(".")
    out[key] = flat[group][name]
  out["model.net"] = {k: v for k, v in out["model.net"].items() if k not in NET_RUNTIME_FIELDS}
  if cfg.model.state_dependent:
    out["model.schedule"] = "learned (GenMD4)"
  return out


# Settings whose change between a checkpoint and a resumed run is allowed: the parameters keep their
# meaning. A change of the optimizer's structure resets its state (md4.checkpoint says so).
TRAINING_KEYS = ("optimizer.lr", "optimizer.warmup_steps", "optimizer.decay", "optimizer.min_lr_ratio",
                 "optimizer.b1", "optimizer.b2", "optimizer.adam_eps", "optimizer.weight_decay",
                 "optimizer.grad_clip_norm", "optimizer.ema_decay", "train.grad_accum_steps",
                 "train.num_steps", "train.label_drop")


def training_settings(cfg: Config) -> dict[str, Any]:
  return {key: get(cfg, key) for key in TRAINING_KEYS}
