"""Checkpoints: Orbax directories holding the state, the data stream's state and md4's record.

A save writes to a temporary directory and renames it when complete (Orbax), so a process killed
mid-save leaves the previous checkpoint as the latest one. md4's record (the `meta` item, a JSON dict
to which keys may be added) holds the config, what fixes the parameters' meaning, the training
settings, the layout and checksum of every array of the state (md4.integrity), the digest of the data
stream's state, its own digest, and the model's description (md4.standalone: the data's spec and
how ids decode), so that the checkpoint can be used with no dataset at hand.

Every restore is verified: the record against its digest, each restored array against its checksum,
the data stream's state against its digest, and the restored parameters for NaN and infinity. A
checkpoint that fails any of this, or that Orbax cannot read, raises failures.CheckpointUnreadable
naming what failed. Training resumes from the newest intact checkpoint and sets newer unreadable ones
aside, moved unchanged to W/checkpoints_set_aside/ (it never deletes or rewrites them); readers
refuse an unreadable checkpoint, naming the newest intact step.

A checkpoint whose parameters mean something else (config.STATE_DEFINING_KEYS) is refused by name.
One written under other optimizer settings is restored with what still applies: when the layout of
the optimizer state recorded at save time differs from this config's, the optimizer state starts
fresh and a note says so. Damage is never taken for such a change: the decision reads the record,
which is itself verified.

Readers that need only parameters (eval, sample, judges; through md4.inference, which reads
exported models too) use `load_for_inference`, which restores params, EMA params and the step
without the optimizer state, and imports nothing of the trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from md4 import config as config_lib
from md4 import integrity, model, paths, sharding
from md4.config import Config
from md4.data.pipeline import DatasetSpec
from md4.failures import (CheckpointUnreadable, SaveFailed, StorageError, describe,
                          is_out_of_space)
from md4.standalone import Description
from md4.state import TrainState

_ITEMS = ("state", "data", "meta")
SET_ASIDE_DIR = "checkpoints_set_aside"
# What Orbax names the directory of a save in progress: "<step>.orbax-checkpoint-tmp".
PARTIAL_SUFFIX = ".orbax-checkpoint-tmp"
_REMOVE_TRIES, _SETTLE_S = 40, 0.25  # At most ~10 s.
_FIELDS = tuple(f.name for f in dataclasses.fields(TrainState))


class Restored(NamedTuple):
  state: TrainState
  data_state: dict[str, Any]  # {} when the checkpoint has no data stream (a converted one).
  notes: list[str]  # What differs from the checkpoint's training settings and what that did.
  skipped: list[CheckpointUnreadable]  # Newer checkpoints that failed, newest first.


class Checkpointer:
  """The checkpoints of one workdir under one config. A writer passes the model's `description`
  (md4.standalone) and, for a model not trained here, its `origin` in words; both are recorded
  with each save."""

  def __init__(self, workdir: str, cfg: Config, *, read_only: bool = False,
               description: Description | None = None, origin: str | None = None):
    self.cfg = cfg
    self.description = description
    self.origin = origin
    self.workdir = paths.resolve(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    if read_only and not os.path.isdir(self.directory):
      raise ValueError(f"no checkpoint in {self.directory}: {workdir} holds no run (train first: "
                       f"md4 train --workdir={workdir})")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.train.keep_checkpoints, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
    self.last_good: int | None = None  # The newest step restored or saved by this object.

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def last_good_text(self) -> str:
    return (f"the last good checkpoint is step {self.last_good} in {self.directory}"
            if self.last_good is not None else "no checkpoint of this run was written yet")

  def save(self, state: TrainState, data_state: dict[str, Any]) -> None:
    """Writes step int(state.step) with its checksums; returns when it is complete on disk.

    Raises failures.SaveFailed (after removing what the save had written) if writing fails.
    """
    step = int(state.step)
    data_state = json.loads(json.dumps(data_state))
    meta = seal(self._record(state, data_state))
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(meta)), force=True)
      self.manager.wait_until_finished()
    except Exception as e:
      partial = self._remove_partial_save(step)
      space = " (the disk or quota is full)" if is_out_of_space(e) else ""
      peers = ("; in a multi-process run this is also how a save fails when another process dies: "
               "see the other processes' logs" if jax.process_count() > 1 else "")
      raise SaveFailed(f"could not write the checkpoint of step {step} to {self.directory}"
                       f"{space}: {describe(e)}; {partial}; {self.last_good_text()}{peers}") from e
    self.last_good = step

  def _record(self, state: TrainState, data_state: dict[str, Any]) -> dict[str, Any]:
    """md4's record of a checkpoint (before its own digest is added)."""
    sums, shapes = integrity.checksums(state), integrity.layout(state)
    return {"fingerprint": config_lib.state_fingerprint(self.cfg),
            "training": config_lib.training_settings(self.cfg),
            "config": config_lib.to_dict(self.cfg),
            "arrays": {name: [shapes[name], sums[name]] for name in shapes},
            "data_digest": integrity.json_digest(data_state),
            **({"description": self.description.to_json()} if self.description else {}),
            **({"origin": self.origin} if self.origin else {})}

  def _remove_partial_save(self, step: int) -> str:
    """Removes the temporary directory of a failed save of `step`; says what happened to it."""
    path = os.path.join(self.directory, f"{step}{PARTIAL_SUFFIX}")
    if jax.process_index() != 0:
      return "process 0 removes what it had written"
    if not os.path.exists(path):
      return "nothing of it is left on disk"
    # Writes the failed save had already handed to TensorStore's threads still land after the
    # exception, recreating the directory: remove it until it has stayed absent for two looks.
    error, absent = None, 0
    for _ in range(_REMOVE_TRIES):
      try:
        if os.path.exists(path):
          shutil.rmtree(path)
      except OSError as e:
        error = e
      time.sleep(_SETTLE_S)
      absent = absent + 1 if not os.path.exists(path) else 0
      if absent == 2:
        return f"its partial directory {path} was removed"
    cause = f" ({describe(error)})" if error else " (writes of the failed save kept landing in it)"
    return f"its partial directory {path} could not be removed{cause}: the next md4 train removes it"

  def remove_partial_saves(self) -> list[str]:
    """Removes the temporary directories that killed saves left (process 0; call it only while
    holding the workdir's lock, so that no save is in progress); returns their paths."""
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return []
    removed = []
    for name in sorted(os.listdir(self.directory)):
      head, _, _ = name.partition(PARTIAL_SUFFIX)
      if PARTIAL_SUFFIX in name and head.isdigit():
        shutil.rmtree(os.path.join(self.directory, name))
        removed.append(os.path.join(self.directory, name))
    return removed

  def set_aside(self, steps: list[int]) -> list[str]:
    """Moves the checkpoints of `steps`, unchanged, to W/checkpoints_set_aside/<step> (a suffix .N
    if taken), so that a resumed run can write those steps again; returns the new paths."""
    target_dir = os.path.join(self.workdir, SET_ASIDE_DIR)
    moved = []
    for step in steps:
      target, n = os.path.join(target_dir, str(step)), 0
      while os.path.exists(target):
        n += 1
        target = os.path.join(target_dir, f"{step}.{n}")
      if jax.process_index() == 0:
        os.makedirs(target_dir, exist_ok=True)
        os.rename(os.path.join(self.directory, str(step)), target)
      moved.append(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("md4 checkpoints set aside")
    self.manager.reload()
    return moved

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint in {self.directory}")
    if step not in self.manager.all_steps():
      raise ValueError(f"no checkpoint at step {step} in {self.directory}; steps there: "
                       f"{self.steps()}")
    return step

  def read_record(self, step: int) -> dict[str, Any]:
    """md4's record of the checkpoint at `step`, verified against its own digest."""
    return _read_meta(self.manager, step)

  def check_compatible(self, step: int, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Refuses a checkpoint of another model, naming every differing key; returns its record."""
    meta = self.read_record(step) if meta is None else meta
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
    """The verified state at `step`; by default the newest intact one (None when there is no
    checkpoint), with the newer ones that failed in Restored.skipped (left in place: see set_aside).

    init_opt_state(params): a fresh optimizer state, used when the optimizer state's layout recorded
    at save time differs from this config's (an optimizer setting changed it); the parameters, EMA,
    step and data stream are restored then, and a note says the optimizer state was reset.

    Raises CheckpointUnreadable if `step` fails verification, StorageError if every checkpoint
    does.
    """
    if step is not None:
      step = self._step(step)
      try:
        return self._restore_step(step, abstract_state, init_opt_state)
      except CheckpointUnreadable as e:
        raise CheckpointUnreadable(step, self.directory, e.reason + "; leave out "
                                   "--checkpoint_step to resume from the newest intact one") from e
    skipped = []
    for candidate in reversed(self.steps()):
      try:
        return self._restore_step(candidate, abstract_state, init_opt_state)._replace(
            skipped=skipped)
      except CheckpointUnreadable as e:
        skipped.append(e)
    if not skipped:
      return None
    raise StorageError(f"no checkpoint in {self.directory} can be restored (" + "; ".join(
        f"step {e.step}: {e.reason}" for e in skipped) + "); starting afresh would overwrite "
        f"them: move {self.directory} away to start a new run")

  def _restore_step(self, step: int, abstract_state: TrainState,
                    init_opt_state: Callable[[Any], Any]) -> Restored:
    meta = self.check_compatible(step)
    notes = _changed_settings(meta.get("training"), config_lib.training_settings(self.cfg))
    saved_layout = self._saved_layout(step, meta)
    ours = integrity.layout(abstract_state.opt_state)
    theirs = {k[len("opt_state."):]: v for k, v in saved_layout.items()
              if k.startswith("opt_state.")}
    fresh_optimizer = theirs != ours
    skip = ("opt_state",) if fresh_optimizer else ()
    state = self._read_state(step, abstract_state, skip, meta)
    data = self._read_data(step, meta)
    if fresh_optimizer:
      state = state.replace(opt_state=init_opt_state(state.params))
      changed = sorted(set(theirs) ^ set(ours) | {k for k in set(theirs) & set(ours)
                                                  if theirs[k] != ours[k]})
      notes.append(f"the optimizer state saved at step {step} has another layout than this "
                   f"config's optimizer ({len(changed)} of its arrays differ, e.g. "
                   f"opt_state.{changed[0]}): restored parameters, EMA parameters, step and data "
                   "stream; the optimizer state (Adam moments) starts fresh")
    if "arrays" not in meta:
      notes.append(f"the checkpoint at step {step} was written before md4 recorded checksums: "
                   "restored without verifying its arrays")
    self.last_good = step
    return Restored(state, data, notes, [])

  def restore_params(self, abstract_state: TrainState, step: int | None = None) -> TrainState:
    """The verified step, params and ema_params at `step` (default: the latest); opt_state and rng
    are None. An unreadable checkpoint is refused naming the newest intact older step."""
    step = self._step(step)
    try:
      meta = self.check_compatible(step)
      return self._read_state(step, abstract_state, ("opt_state", "rng"), meta)
    except CheckpointUnreadable as e:
      intact = self._newest_intact_before(step, abstract_state)
      way_out = (f"; the newest intact checkpoint is step {intact}: read it with "
                 f"--checkpoint_step={intact}" if intact is not None else
                 "; no older checkpoint is intact")
      raise CheckpointUnreadable(step, self.directory, e.reason + way_out) from e

  def _newest_intact_before(self, step: int, abstract_state: TrainState) -> int | None:
    for candidate in reversed([s for s in self.steps() if s < step]):
      try:
        self._read_state(candidate, abstract_state, ("opt_state", "rng"),
                         self.check_compatible(candidate))
        return candidate
      except CheckpointUnreadable:
        continue
    return None

  def _saved_layout(self, step: int, meta: dict[str, Any]) -> dict[str, str]:
    """{array name: "dtype[shape]"} of the saved state: from md4's record, or for checkpoints
    written before it held one, from Orbax's own metadata."""
    if "arrays" in meta:
      return {name: entry[0] for name, entry in meta["arrays"].items()}
    tree = self._orbax_tree(step)
    return {f"{field}.{k}" if k else field: v for field in tree
            for k, v in integrity.layout(tree[field]).items()}

  def _orbax_tree(self, step: int) -> dict[str, Any]:
    """The saved state's tree of Orbax ArrayMetadata (from state/_METADATA and the arrays' own
    metadata in the OCDBT store)."""
    path = os.path.join(self.directory, str(step), "state")
    # The handler itself, not a Checkpointer: that one logs a warning and returns None on failure.
    handler = ocp.PyTreeCheckpointHandler()
    try:
      saved = handler.metadata(epath.Path(path))
    except Exception as e:
      raise CheckpointUnreadable(step, self.directory, f"Orbax cannot read the metadata of the "
                                 f"state in {path}: {describe(e)}") from e
    finally:
      handler.close()
    saved = saved.tree if hasattr(saved, "tree") else saved
    if not isinstance(saved, dict) or set(saved) != set(_FIELDS):
      raise CheckpointUnreadable(step, self.directory, f"Orbax's metadata of the state in {path} is "
                                 f"incomplete: it lists {sorted(saved or {})}")
    return saved

  def _read_state(self, step: int, abstract_state: TrainState, skip: tuple[str, ...],
                  meta: dict[str, Any]) -> TrainState:
    """The state with the fields in `skip` left unread (None), each read array verified."""
    saved = self._orbax_tree(step)
    item, restore_args = {}, {}
    for name in _FIELDS:
      if name in skip:
        item[name] = restore_args[name] = jax.tree.map(lambda _: ocp.PLACEHOLDER, saved[name])
      else:
        item[name] = getattr(abstract_state, name)
        restore_args[name] = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                           dtype=a.dtype), item[name])
    path = os.path.join(self.directory, str(step), "state")
    ok, out, error = True, None, None
    try:
      out = ocp.PyTreeCheckpointer().restore(
          path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
    except Exception as e:  # pylint: disable=broad-except
      ok, error = False, e
    if not _everywhere(ok):
      reason = (f"reading its arrays failed: {describe(error)}" if error is not None else
                "reading its arrays failed in another process (see that process's error log)")
      raise CheckpointUnreadable(step, self.directory, reason) from error
    state = TrainState(**{name: None if name in skip else out[name] for name in _FIELDS})
    self._verify(step, state, meta)
    return state

  def _verify(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
    """Every read array against its checksum at save time, and the parameters for NaN and inf."""
    if "arrays" in meta:
      expected = {name: entry[1] for name, entry in meta["arrays"].items()}
      got = integrity.checksums(state)
      bad = sorted(name for name, value in got.items() if expected.get(name) != value)
      if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointUnreadable(step, self.directory, (
            f"{len(bad)} of the {len(got)} arrays read differ from their checksums at save time "
            f"({listed}): the files changed on disk since they were written"))
    bad = integrity.non_finite_leaves(state.replace(step=None, opt_state=None, rng=None))
    if bad:
      raise CheckpointUnreadable(step, self.directory, f"non-finite values in {len(bad)} restored "
                                 f"parameter array(s) (e.g. {bad[0]})")

  def _read_data(self, step: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The data stream's state, verified against its digest."""
    path = os.path.join(self.directory, str(step), "data")
    try:
      data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    except Exception as e:
      raise CheckpointUnreadable(step, self.directory, f"the data stream's state ({path}) is "
                                 f"unreadable: {describe(e)}") from e
    data = data or {}
    if "data_digest" in meta and integrity.json_digest(data) != meta["data_digest"]:
      raise CheckpointUnreadable(step, self.directory, f"the data stream's state ({path}) differs "
                                 "from its digest at save time")
    return data


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds in every process (a failure seen by one is a failure for all, so that all
  fall back together). When only some processes fail to read a checkpoint, the others first wait at
  Orbax's closing barrier of the restore, up to its timeout (300 s in orbax 0.12.8), before all can
  agree (read from Orbax's code; not exercised by the tests)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def seal(meta: dict[str, Any]) -> dict[str, Any]:
  """meta (JSON-normalised) with its own digest added under "digest"."""
  meta = json.loads(json.dumps(meta))
  return {**meta, "digest": integrity.json_digest(meta)}


def _changed_settings(theirs: dict[str, Any] | None, ours: dict[str, Any]) -> list[str]:
  """One line per training setting that differs from the checkpoint's (none known for checkpoints
  written before they were recorded)."""
  if theirs is None:
    return []
  return [f"{key} changed since the checkpoint: {theirs[key]!r} -> {value!r}"
          for key, value in ours.items() if key in theirs and theirs[key] != value]


class Record(NamedTuple):
  """What a checkpoint records beside its arrays."""
  step: int
  config: dict[str, Any]  # As written (md4.config.to_dict); keys added since take their defaults.
  description: Description | None  # None for checkpoints written before descriptions were.
  origin: str | None  # Where a model not trained here came from (md4 convert), in words.


def read_record(workdir: str, step: int | None = None) -> Record:
  """The record of the checkpoint at `step` (default: the latest) in workdir, for readers that know
  only the workdir (sample, info, a judge).

  The config and description are the run's: when this step's record is unreadable they come from
  the newest older record that is intact, the step staying the one asked for, so that reading its
  arrays (restore_params) reports the damage and names the newest intact step.
  """
  directory = os.path.join(paths.resolve(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"no checkpoint in {directory}")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(directory, options=options, item_names=_ITEMS) as manager:
    steps = sorted(manager.all_steps())
    step = (steps[-1] if steps else None) if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint in {directory}")
    if step not in steps:
      raise ValueError(f"no checkpoint at step {step} in {directory}; steps there: {steps}")
    try:
      meta = _read_meta(manager, step)
    except CheckpointUnreadable:
      meta = _newest_readable_meta(manager, [s for s in steps if s < step])
      if meta is None:
        raise
  description = meta.get("description")
  where = f"the checkpoint record of {directory}"
  return Record(step, meta["config"],
                None if description is None else Description.from_json(description, where),
                meta.get("origin"))


def _newest_readable_meta(manager: ocp.CheckpointManager, steps: list[int]
                          ) -> dict[str, Any] | None:
  for step in reversed(steps):
    try:
      return _read_meta(manager, step)
    except CheckpointUnreadable:
      continue
  return None


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """md4's record of a checkpoint: its fingerprint, settings, config, checksums; verified against
  its own digest (records written before digests existed are taken as they are)."""
  directory = os.fspath(manager.directory)
  path = os.path.join(directory, str(step), "meta", "metadata")
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except FileNotFoundError as e:
    raise CheckpointUnreadable(step, directory, f"md4's record {path} is missing") from e
  except Exception as e:
    raise CheckpointUnreadable(step, directory, f"md4's record {path} is unreadable: "
                               f"{describe(e)}") from e
  if not isinstance(meta, dict) or not {"fingerprint", "config"} <= set(meta):
    raise CheckpointUnreadable(step, directory, f"md4's record {path} is not a record of md4 "
                               "(no fingerprint or config)")
  if "digest" in meta:
    body = {k: v for k, v in meta.items() if k != "digest"}
    if integrity.json_digest(body) != meta["digest"]:
      raise CheckpointUnreadable(step, directory, f"md4's record {path} differs from its digest "
                                 "at save time (changed or damaged on disk)")
  return meta


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
  """The network, a mesh over all devices and the verified parameters of the checkpoint at `step`
  (default: the latest) in workdir. (md4.inference reads exported models too.)"""
  network = model.build_network(cfg, spec)
  mesh = sharding.make_mesh(cfg.train.mesh_fsdp)
  checkpointer = Checkpointer(workdir, cfg, read_only=True)
  state = checkpointer.restore_params(abstract_params_state(cfg, network, spec, mesh), step)
  jax.block_until_ready(state)
  return Inference(network, mesh, state)
