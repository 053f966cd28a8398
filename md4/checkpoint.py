"""Checkpoints: Orbax directories holding the state, the data stream's state and the config.

A save writes to a temporary directory and renames it when complete (Orbax), so a process killed
mid-save leaves the previous checkpoint as the latest one. A checkpoint records the config it was
written with; one whose parameters mean something else (config.STATE_DEFINING_KEYS) is refused by
name, and one written under other optimizer settings is restored with what still applies, saying
what was reset.

Readers that need only parameters (eval, sample, judges) use `load_for_inference`, which restores
params, EMA params and the step without the optimizer state, and imports nothing of the trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from md4 import config as config_lib
from md4 import model, sharding
from md4.config import Config
from md4.data.pipeline import DatasetSpec
from md4.state import TrainState

_ITEMS = ("state", "data", "meta")


class Restored(NamedTuple):
  state: TrainState
  data_state: dict[str, Any]  # {} when the checkpoint has no data stream (a converted one).
  notes: list[str]  # What differs from the checkpoint's training settings and what that did.


class Checkpointer:
  """The checkpoints of one workdir under one config."""

  def __init__(self, workdir: str, cfg: Config, *, read_only: bool = False):
    self.cfg = cfg
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if read_only and not os.path.isdir(self.directory):
      raise ValueError(f"no checkpoint in {self.directory}: {workdir} holds no run (train first: "
                       f"md4 train --workdir={workdir})")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.train.keep_checkpoints, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_state: dict[str, Any]) -> None:
    """Writes step int(state.step); returns when it is complete on disk."""
    meta = {"fingerprint": config_lib.state_fingerprint(self.cfg),
            "training": config_lib.training_settings(self.cfg),
            "config": config_lib.to_dict(self.cfg)}
    self.manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint in {self.directory}")
    if step not in self.manager.all_steps():
      raise ValueError(f"no checkpoint at step {step} in {self.directory}; steps there: "
                       f"{sorted(self.manager.all_steps())}")
    return step

  def check_compatible(self, step: int) -> dict[str, Any]:
    """Refuses a checkpoint of another model, naming every differing key; returns its meta."""
    meta = _read_meta(self.manager, step)
    ours = json.loads(json.dumps(config_lib.state_fingerprint(self.cfg)))
    # A key added to the fingerprint after a checkpoint was written meant its default then.
    defaults = json.loads(json.dumps(config_lib.state_fingerprint(
        dataclasses.replace(Config(), model=dataclasses.replace(
            Config().model, state_dependent=self.cfg.model.state_dependent)))))
    theirs = {k: meta["fingerprint"].get(k, defaults[k]) for k in ours}
    # Checkpoints written before NET_RUNTIME_FIELDS left the fingerprint still list them.
    theirs["model.net"] = {k: v for k, v in theirs["model.net"].items()
                           if k not in config_lib.NET_RUNTIME_FIELDS}
    diffs = [f"{k}: checkpoint has {theirs[k]!r}, config has {v!r}"
             for k, v in ours.items() if theirs[k] != v]
    if diffs:
      raise ValueError(f"the checkpoint at step {step} in {self.directory} belongs to another model "
                       "config; refusing to restore it:\n  " + "\n  ".join(diffs))
    return meta

  def restore(self, abstract_state: TrainState, init_opt_state: Callable[[Any], Any],
              step: int | None = None) -> Restored | None:
    """The state at `step` (default: the latest), or None when there is no checkpoint.

    init_opt_state(params): a fresh optimizer state, used when the checkpoint's optimizer state has
    another structure (an optimizer setting changed it); the parameters, EMA, step and data stream
    are restored then, and a note says the optimizer state was reset.
    """
    if step is None and self.latest_step() is None:
      return None
    step = self._step(step)
    meta = self.check_compatible(step)
    notes = _changed_settings(meta.get("training"), config_lib.training_settings(self.cfg))
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      return Restored(out["state"], out["data"] or {}, notes)
    except ValueError as e:
      if "opt_state" not in str(e):
        raise ValueError(f"the checkpoint at step {step} in {self.directory} does not fit this "
                         f"config's model: {e}") from None
    kept = self._restore_without(step, abstract_state, ("opt_state",))
    state = kept.replace(opt_state=init_opt_state(kept.params))
    data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    notes.append("the optimizer state of the checkpoint has another structure than this config's "
                 "optimizer: restored parameters, EMA parameters, step and data stream; the "
                 "optimizer state (Adam moments) starts fresh")
    return Restored(state, data or {}, notes)

  def restore_params(self, abstract_state: TrainState, step: int | None = None) -> TrainState:
    """step, params and ema_params at `step` (default: the latest); opt_state and rng are None."""
    step = self._step(step)
    self.check_compatible(step)
    return self._restore_without(step, abstract_state, ("opt_state", "rng"))

  def _restore_without(self, step: int, abstract_state: TrainState, skip: tuple[str, ...]
                       ) -> TrainState:
    """The state with the fields in `skip` left unread (None), whatever their saved structure."""
    path = os.path.join(self.directory, str(step), "state")
    reader = ocp.PyTreeCheckpointer()
    saved = reader.metadata(path).item_metadata
    saved = saved.tree if hasattr(saved, "tree") else saved
    item, restore_args = {}, {}
    for field in dataclasses.fields(TrainState):
      name = field.name
      if name in skip:
        item[name] = restore_args[name] = jax.tree.map(lambda _: ocp.PLACEHOLDER, saved[name])
      else:
        item[name] = getattr(abstract_state, name)
        restore_args[name] = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                           dtype=a.dtype), item[name])
    try:
      out = reader.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
    except ValueError as e:
      raise ValueError(f"the checkpoint at step {step} in {self.directory} does not fit this "
                       f"config's model: {e}") from None
    return TrainState(**{name: None if name in skip else out[name] for name in out})


def _changed_settings(theirs: dict[str, Any] | None, ours: dict[str, Any]) -> list[str]:
  """One line per training setting that differs from the checkpoint's (none known for checkpoints
  written before they were recorded)."""
  if theirs is None:
    return []
  return [f"{key} changed since the checkpoint: {theirs[key]!r} -> {value!r}"
          for key, value in ours.items() if key in theirs and theirs[key] != value]


def read_checkpoint_config(workdir: str, step: int | None = None) -> Config:
  """The config a checkpoint in workdir was written with (its own record), for readers that know
  only the workdir, such as a judge. step: default the latest."""
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise ValueError(f"no checkpoint in {directory}")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(directory, options=options, item_names=_ITEMS) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint in {directory}")
    meta = _read_meta(manager, step)
  return config_lib.from_configdict(meta["config"])


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The JSON record a checkpoint keeps beside the state: its fingerprint, settings and config."""
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


class Inference(NamedTuple):
  """What eval and sampling need from a checkpoint."""
  network: nn.Module
  mesh: Mesh
  state: TrainState  # step, params, ema_params; opt_state and rng are None.


def abstract_params_state(cfg: Config, network: nn.Module, spec: DatasetSpec, mesh: Mesh
                          ) -> TrainState:
  """ShapeDtypeStructs with shardings of step, params and ema_params (others None)."""
  params = jax.eval_shape(functools.partial(model.init_params, network=network,
                                            model_cfg=cfg.model, spec=spec), jax.random.key(0))
  step = jax.ShapeDtypeStruct((), jax.numpy.int32)
  shapes = TrainState(step=step, params=params, opt_state=None, ema_params=params, rng=None)
  shardings = sharding.state_shardings(shapes, mesh)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def load_for_inference(cfg: Config, spec: DatasetSpec, workdir: str,
                       step: int | None = None) -> Inference:
  """The network, a mesh over all devices and the parameters of the checkpoint at `step` (default:
  the latest) in workdir."""
  network = model.build_network(cfg, spec)
  mesh = sharding.make_mesh(cfg.train.mesh_fsdp)
  checkpointer = Checkpointer(workdir, cfg, read_only=True)
  state = checkpointer.restore_params(abstract_params_state(cfg, network, spec, mesh), step)
  jax.block_until_ready(state)
  return Inference(network, mesh, state)
