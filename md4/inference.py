"""A model for inference from where it lives: a training workdir (its Orbax checkpoints) or a
directory written by `md4 export`. Every command that reads a model (eval, sample, info, export,
the judges) opens it here, so each accepts either wherever it takes a workdir.

A model records its config and its description (md4.standalone: the data's spec and how ids
decode), so sampling and zero-shot evaluation need nothing else. Checkpoints written before
descriptions were recorded fall back to the config's dataset, loaded as before.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from md4 import checkpoint, export, model, paths, sharding
from md4 import config as config_lib
from md4.config import Config
from md4.data import pipeline
from md4.data.base import Dataset, DatasetSpec
from md4.standalone import Decoder, Description
from md4.state import TrainState


class ModelDir(NamedTuple):
  """What a model directory records, read without touching its parameters."""
  path: str  # Absolute.
  exported: bool  # Written by md4 export (else a workdir).
  step: int
  config: dict[str, Any]  # As recorded.
  description: Description | None  # None: a checkpoint written before descriptions were recorded.
  origin: str | None  # Where a converted model came from, in words.
  params: str  # What inference reads: "checkpoint" (params and EMA), or an export's "ema"/"raw".


def open_model(path: str, step: int | None = None) -> ModelDir:
  """The model in path: a workdir (checkpoint `step`, default the latest) or an exported directory.

  Raises:
    ValueError: path holds neither, or an exported model is asked for another step than its own.
  """
  path = paths.resolve(path)
  if export.is_exported(path):
    record = export.read_record(path)
    if step is not None and step != record.step:
      raise ValueError(f"{path} is an exported model of step {record.step}; "
                       f"--checkpoint_step={step} applies to workdirs")
    return ModelDir(path, True, record.step, record.config, record.description, record.origin,
                    record.params)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    record = checkpoint.read_record(path, step)
    return ModelDir(path, False, record.step, record.config, record.description, record.origin,
                    "checkpoint")
  raise ValueError(f"no checkpoint in {os.path.join(path, 'checkpoints')}: {path} holds no run "
                   f"(train first: md4 train --workdir={path}) and no exported model (md4 export "
                   f"writes {export.CONFIG_FILE} and {export.WEIGHTS_FILE})")


def recorded_config(model_dir: ModelDir, overrides: Mapping[str, Any] | None = None) -> Config:
  """The model's own config, with `overrides` ({"sample.num_steps": 64, ...}) applied.

  Keys added to md4 since the model was written take their defaults.

  Raises:
    ValueError: naming an override key the config has not (a network field the model lacks).
  """
  config = ml_collections.ConfigDict(config_lib.to_dict(config_lib.from_configdict(
      model_dir.config)))
  for key, value in (overrides or {}).items():
    try:
      config.update_from_flattened_dict({key: value})
    except (KeyError, AttributeError):
      raise ValueError(f"--config.{key}: the model in {model_dir.path} has no config key {key!r}"
                       ) from None
  return config_lib.from_configdict(config)


def model_spec(model_dir: ModelDir, cfg: Config) -> DatasetSpec | None:
  """The model's data spec under cfg: the recorded one, a text model's length cfg's
  data.seq_length (text models sample any length they were built for); None when none is
  recorded."""
  if model_dir.description is None:
    return None
  spec = model_dir.description.spec
  if spec.kind == "text":
    spec = dataclasses.replace(spec, example_shape=(cfg.data.seq_length,))
  return spec


def check_data(spec: DatasetSpec, data: DatasetSpec, dataset: str) -> None:
  """Refuses data whose vocabulary, example shape or classes are not the model's."""
  ours = (spec.kind, spec.vocab_size, spec.example_shape, spec.num_classes)
  theirs = (data.kind, data.vocab_size, data.example_shape, data.num_classes)
  if ours != theirs:
    raise ValueError(f"dataset {dataset!r} has {data.kind} data of vocabulary {data.vocab_size}, "
                     f"example shape {data.example_shape} and {data.num_classes} classes; the "
                     f"model reads {spec.kind} of vocabulary {spec.vocab_size}, shape "
                     f"{spec.example_shape}, {spec.num_classes} classes")


class Loaded(NamedTuple):
  """What eval and sampling need from a model."""
  network: nn.Module
  mesh: Mesh
  state: TrainState  # step, params, ema_params; opt_state and rng are None.
  # .spec, .decode(x): the model's description, else the loaded dataset (None when a spec was
  # given for a model without a description).
  decoder: Decoder | Dataset | None
  spec: DatasetSpec  # What the network was built for.


def _decoder(model_dir: ModelDir, cfg: Config, dataset: Dataset | None,
             spec: DatasetSpec | None) -> Decoder | Dataset | None:
  if model_dir.description is not None:
    description = dataclasses.replace(model_dir.description, spec=model_spec(model_dir, cfg))
    return Decoder(description, model_dir.path)
  if spec is not None and dataset is None:
    return None
  # Written before descriptions were recorded: the config's dataset, as then.
  return pipeline.load(cfg.data) if dataset is None else dataset


def _check_fingerprint(cfg: Config, model_dir: ModelDir) -> None:
  theirs = config_lib.state_fingerprint(config_lib.from_configdict(model_dir.config))
  ours = config_lib.state_fingerprint(cfg)
  diffs = [f"{k}: the model has {theirs[k]!r}, the config {v!r}" for k, v in ours.items()
           if theirs[k] != v]
  if diffs:
    raise ValueError(f"{model_dir.path} holds another model than this config's:\n  "
                     + "\n  ".join(diffs))


def load(cfg: Config, model_dir: ModelDir, *, dataset: Dataset | None = None,
         spec: DatasetSpec | None = None) -> Loaded:
  """The network, a mesh over all devices and the parameters of the model in model_dir.

  dataset: the decoder of a checkpoint without a description (default: loaded from cfg.data).
  spec: the spec to build the network for, in place of the model's (zero-shot evaluation reads a
    tokenizer's ids); a model without a description then loads no dataset.
  An export holds one set of parameters (EMA or raw): it serves as both params and ema_params.
  """
  decoder = _decoder(model_dir, cfg, dataset, spec)
  spec = spec or decoder.spec
  if not model_dir.exported:
    inference = checkpoint.load_for_inference(cfg, spec, model_dir.path, model_dir.step)
    return Loaded(inference.network, inference.mesh, inference.state, decoder, spec)
  _check_fingerprint(cfg, model_dir)
  network = model.build_network(cfg, spec)
  mesh = sharding.make_mesh(cfg.train.mesh_fsdp)
  abstract = checkpoint.abstract_params_state(cfg, network, spec, mesh)
  tree = export.read_params(model_dir.path, abstract.params)
  params = jax.tree.map(lambda a, x: jax.device_put(jnp.asarray(x, a.dtype), a.sharding),
                        abstract.params, tree)
  state = TrainState(step=jnp.asarray(model_dir.step, jnp.int32), params=params, opt_state=None,
                     ema_params=params, rng=None)
  return Loaded(network, mesh, state, decoder, spec)
