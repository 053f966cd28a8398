"""`md4 export`: a model as a directory to copy or upload to a model hub, read by every command that
reads a model (md4.inference), in place of a workdir.

  DIR/config.json        {"format": "md4", "format_version": 1, "md4_version", "step",
                          "params": "ema" or "raw", "config": the whole config,
                          "description": the data's spec and decoding (md4.standalone),
                          "origin": where a converted model came from, or null}
  DIR/model.safetensors  the parameters: one float32 tensor per leaf, named by its path in the
                         parameter tree ("net/block_0/attn/query/kernel", "schedule/raw_power")
  DIR/tokenizer/         the tokenizer files the description names, if any
  DIR/README.md          a model card: what the model is, how it was trained, its evaluation numbers
                         (from the workdir's metrics.jsonl) and the commands that use it

The directory is written beside its final place and renamed when complete, so a failed export
leaves nothing behind; an existing DIR is never overwritten.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shutil
import uuid
from typing import Any, Mapping, NamedTuple

import flax.traverse_util
import numpy as np

from md4 import paths
from md4.config import Config
from md4.standalone import Description, copy_tokenizer_files

FORMAT = "md4"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
PARAMS = ("ema", "raw")  # Which parameters an export holds: the EMA (default) or the raw ones.


def md4_version() -> str:
  try:
    return importlib.metadata.version("md4")
  except importlib.metadata.PackageNotFoundError:  # Run from a checkout that is not installed.
    return "unknown (not installed)"


def is_exported(path: str) -> bool:
  """Whether path is a directory written by `md4 export` (its config.json says format "md4")."""
  config = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config):
    return False
  try:
    with open(config) as f:
      return json.load(f).get("format") == FORMAT
  except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
    return False


class Exported(NamedTuple):
  """What an exported directory's config.json records."""
  step: int
  params: str  # "ema" or "raw".
  config: dict[str, Any]
  description: Description
  origin: str | None
  md4_version: str


def read_record(path: str) -> Exported:
  path = paths.resolve(path)
  where = os.path.join(path, CONFIG_FILE)
  with open(where) as f:
    record = json.load(f)
  if record.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{where} has format version {record.get('format_version')}; this md4 "
                     f"reads {FORMAT_VERSION}")
  missing = [k for k in ("step", "params", "config", "description") if k not in record]
  if missing:
    raise ValueError(f"{where} lacks {', '.join(missing)}: not written by md4 export")
  return Exported(int(record["step"]), record["params"], record["config"],
                  Description.from_json(record["description"], where), record.get("origin"),
                  record.get("md4_version", "unknown"))


def flatten(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{path: float32 array} of a parameter tree, paths joined by "/"."""
  return {k: np.asarray(v, np.float32)
          for k, v in flax.traverse_util.flatten_dict(dict(params), sep="/").items()}


def read_params(path: str, expected: Mapping[str, Any]) -> dict[str, Any]:
  """The parameters in path/model.safetensors as a tree shaped like `expected` (a tree of arrays or
  ShapeDtypeStructs), every tensor checked by name and shape.

  Raises:
    ValueError: naming a missing, extra or misshapen tensor.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  file = os.path.join(paths.resolve(path), WEIGHTS_FILE)
  if not os.path.isfile(file):
    raise ValueError(f"{path} lacks {WEIGHTS_FILE}, the model's parameters")
  tensors = load_file(file)
  want = {k: tuple(v.shape) for k, v in
          flax.traverse_util.flatten_dict(dict(expected), sep="/").items()}
  missing = sorted(set(want) - set(tensors))
  extra = sorted(set(tensors) - set(want))
  if missing or extra:
    raise ValueError(f"{file} does not hold this config's parameters: missing "
                     f"{missing[:5] or 'none'}, extra {extra[:5] or 'none'}")
  for name, shape in want.items():
    if tensors[name].shape != shape:
      raise ValueError(f"{file}: tensor {name} has shape {tensors[name].shape}, this config's "
                       f"network needs {shape}")
  return flax.traverse_util.unflatten_dict(tensors, sep="/")


class Source(NamedTuple):
  """Where an export's model comes from."""
  directory: str  # The workdir (or exported directory) read.
  step: int
  config: Config
  description: Description
  origin: str | None
  metrics: list[dict[str, Any]]  # The workdir's metrics.jsonl records ([] if none).


def write(to: str, source: Source, params: Mapping[str, Any], which: str) -> str:
  """Writes the export of `params` (the `which` of PARAMS) from `source` to directory `to`; returns
  its absolute path.

  Raises:
    ValueError: `to` exists, or `which` is not one of PARAMS.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from md4 import config as config_lib  # pylint: disable=g-import-not-at-top
  if which not in PARAMS:
    raise ValueError(f"--params={which!r} is invalid; valid: {', '.join(PARAMS)}")
  to = paths.resolve(to)
  if os.path.exists(to):
    raise ValueError(f"--to={to} exists; export into a new directory")
  tmp = f"{to}.tmp-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    tensors = flatten(params)
    save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": FORMAT})
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "md4_version": md4_version(),
              "step": source.step, "params": which, "config": config_lib.to_dict(source.config),
              "description": source.description.to_json(), "origin": source.origin}
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(record, f, indent=1)
    copy_tokenizer_files(source.description, source.directory, tmp)
    num_params = sum(int(t.size) for t in tensors.values())
    with open(os.path.join(tmp, CARD_FILE), "w") as f:
      f.write(model_card(source, which, num_params, os.path.basename(to)))
    os.replace(tmp, to)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return to


def _what(cfg: Config) -> str:
  m = cfg.model
  if m.objective == "autoregressive":
    return "an autoregressive model (a causal transformer; exact likelihood)"
  if m.state_dependent:
    return "GenMD4: masked diffusion with a learned per-token schedule (alpha_v = 1 - t^w_v)"
  return f"MD4: masked (absorbing-state) diffusion, {m.schedule} schedule"


def describe_data(description: Description) -> str:
  """The model's data in words: "images 28x28x1, 2 levels per channel, 10 classes"."""
  spec = description.spec
  classes = f", {spec.num_classes} classes" if spec.num_classes else ""
  if spec.kind == "image":
    h, w, c = spec.example_shape
    return f"images {h}x{w}x{c}, {spec.vocab_size} levels per channel{classes}"
  return f"text: {spec.example_shape[0]} {spec.unit}s per example, vocabulary {spec.vocab_size}"


def _evaluation(metrics: list[dict[str, Any]], cfg: Config) -> list[str]:
  evals = [r for r in metrics if any(k.startswith("eval/bits_per_") for k in r)]
  if not evals:
    return ["No evaluation is recorded in the workdir's metrics.jsonl; `md4 eval` computes one."]
  last = evals[-1]
  name = next(k for k in last if k.startswith("eval/bits_per_") and not k.endswith("_se"))
  unit = name[len("eval/bits_per_"):]
  line = f"- step {last['step']}: {last[name]:.4f}"
  if f"{name}_se" in last:
    line += f" ± {last[name + '_se']:.4f}"
  line += f" bits/{unit}"
  if "eval/perplexity" in last and math.isfinite(float(last["eval/perplexity"])):
    line += f" (perplexity {last['eval/perplexity']:.4g})"
  if "eval/num_examples" in last:
    line += f" over {int(last['eval/num_examples'])} held-out examples"
  what = ("the exact negative log-likelihood" if cfg.model.objective == "autoregressive" else
          "an upper bound on the negative log-likelihood")
  return [f"The training run's final evaluation, from its metrics.jsonl ({what}):", "", line]


def _eval_command(name: str, dataset: str) -> str:
  from md4.data import pipeline  # pylint: disable=g-import-not-at-top
  if dataset in pipeline.EMBEDDED:
    return f"md4 eval   --workdir={name}                  # on the embedded {dataset} data"
  return (f"md4 eval   --workdir={name} --config.data.data_dir=DIR   # needs {dataset} prepared "
          "in DIR (md4 prepare)")


def model_card(source: Source, which: str, num_params: int, name: str) -> str:
  """The README.md of an export."""
  cfg = source.config
  t, o = cfg.train, cfg.optimizer
  net = ", ".join(f"{k}={v!r}" for k, v in sorted(cfg.model.net.items()))
  if source.origin:
    trained = [f"{source.origin}. The parameters are those of step {source.step}."]
  else:
    trained = [f"Trained with md4 (`md4 train`) to step {source.step} of {t.num_steps}: batch "
               f"{t.batch_size}, AdamW at learning rate {o.lr:g} ({o.warmup_steps} warm-up steps, "
               f"{o.decay} decay), weight decay {o.weight_decay:g}, gradient clipping "
               f"{o.grad_clip_norm:g}, EMA decay {o.ema_decay:g}, seed {t.seed}, "
               f"{t.compute_dtype} compute."]
  files = [f"- `{CONFIG_FILE}`: the whole config, the data's spec and decoding, the md4 version",
           f"- `{WEIGHTS_FILE}`: the {'EMA' if which == 'ema' else 'raw (not EMA)'} parameters "
           f"({num_params:,})"]
  for relative in source.description.decode.get("files", {}).values():
    files.append(f"- `{relative}`: the tokenizer")
  lines = [
      f"# {name}", "",
      f"{_what(cfg)}, exported by md4 {md4_version()}.", "",
      "## Model", "",
      f"- network: {cfg.model.network} ({net}), vocabulary {cfg.model.vocab_size} plus the mask",
      f"- parameters: {num_params:,}",
      f"- data: {source.description.dataset}: {describe_data(source.description)}",
      "",
      "## Training", "", *trained, "",
      "## Evaluation", "", *_evaluation(source.metrics, cfg), "",
      "## Use", "",
      "With md4 installed (`pip install -e .` in its checkout), from the directory holding this "
      "one:",
      "", "```bash",
      f"md4 sample --workdir={name}                  # {cfg.sample.num_samples} samples, "
      f"{cfg.sample.method} sampler, {cfg.sample.num_steps} steps",
      f"md4 info   --workdir={name}",
      _eval_command(name, source.description.dataset),
      "```", "",
      "## Files", "", *files, ""]
  return "\n".join(lines)
