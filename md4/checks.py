"""The whole config checked against the registries, the dataset and the machine, before anything runs.

md4.config.validate checks each value on its own; `check_config` checks what needs the rest of the
code: names that live in registries (datasets, networks and their fields, schedules, samplers,
evaluation splits), combinations (a sampler against the schedule, reuse of network calls against
time conditioning) and the batch sizes against the devices and processes. The trainer calls it
before its first step, so a setting read only by a hook at step 5000 fails at step 0.
"""

from __future__ import annotations

from md4 import model, sampling, schedules
from md4.config import Config
from md4.data import pipeline
from md4.data.pipeline import DatasetSpec
from md4.samplers import grid


def check_config(cfg: Config, spec: DatasetSpec | None = None, *, num_devices: int = 1,
                 num_processes: int = 1) -> None:
  """Raises ValueError naming the key, its value and the valid values.

  spec: the model's data (default: pipeline.config_spec(cfg), which reads no data).
  """
  spec = pipeline.config_spec(cfg) if spec is None else spec
  network = model.build_network(cfg, spec)  # Unknown network or fields, vocabulary, shape, classes.
  m, s = cfg.model, cfg.sample
  if not m.state_dependent:
    schedules.get_schedule(m.schedule, eps=m.eps)
  for key, value, valid in (("sample.method", s.method, sampling.METHODS),
                            ("sample.time_grid", s.time_grid, grid.TIME_GRIDS)):
    if value not in valid:
      raise ValueError(f"{key}={value!r} is invalid; valid: {', '.join(valid)}")
  if s.method in sampling.STATE_INDEPENDENT_ONLY and m.state_dependent:
    raise ValueError(f"sample.method={s.method!r} needs a state-independent schedule and "
                     "model.state_dependent=True (GenMD4) has per-token schedules; valid methods "
                     "for GenMD4: " + ", ".join(x for x in sampling.METHODS
                                               if x not in sampling.STATE_INDEPENDENT_ONLY))
  try:
    sampling.check_options(m.state_dependent, method=s.method, num_steps=s.num_steps,
                           temperature=s.temperature, remask_eta=s.remask_eta,
                           remask_strategy=s.remask_strategy, remask_t_on=s.remask_t_on,
                           remask_t_off=s.remask_t_off)
  except ValueError as e:  # Its messages name the sampler's arguments: the keys of cfg.sample.
    raise ValueError(f"in config.sample: {e}") from None
  if s.reuse_unchanged and network.config.time_conditioning:
    raise ValueError("sample.reuse_unchanged=True reuses a network call across times, which is exact "
                     "only for a network that ignores t; this one conditions on time "
                     "(model.net.time_conditioning=True): set model.net.time_conditioning=False "
                     "or sample.reuse_unchanged=False")
  if s.reuse_unchanged and sampling.reveals_first(s.method, m.state_dependent):
    raise ValueError("sample.reuse_unchanged applies to maskgit, remdm and GenMD4's grid "
                     f"samplers; sample.method={s.method!r} with a state-independent schedule "
                     "calls the network only on steps that reveal a token already")
  check_guidance(cfg)
  check_split(cfg, cfg.eval.split, "eval.split")
  check_batches(cfg, num_devices=num_devices, num_processes=num_processes)


def check_split(cfg: Config, split: str, key: str) -> None:
  """`split` (given as `key`) is an evaluation split of cfg's dataset."""
  splits = pipeline.eval_splits(cfg.data)
  if split not in splits:
    raise ValueError(f"{key}={split!r} is not a split of dataset {cfg.data.dataset!r}; "
                     f"valid: {', '.join(splits)}")


def check_guidance(cfg: Config) -> None:
  """Label dropout and guidance both need the null class of a class-conditional network."""
  net = cfg.model.net
  needs = ("a class-conditional network with a null class: model.net.num_classes > 0 and "
           "model.net.null_class=True")
  have = (f"model.net.num_classes={net.get('num_classes', 0)}, "
          f"model.net.null_class={net.get('null_class', False)}")
  if cfg.train.label_drop > 0 and model.null_label(cfg) is None:
    raise ValueError(f"train.label_drop={cfg.train.label_drop} replaces labels by the null class, "
                     f"which needs {needs}; this config has {have}")
  if cfg.sample.guidance_scale != 1.0 and model.null_label(cfg) is None:
    raise ValueError(f"sample.guidance_scale={cfg.sample.guidance_scale} combines the conditional "
                     f"and the null-class (unconditional) model, which needs {needs}, trained with "
                     f"train.label_drop > 0; this config has {have} (1.0: no guidance)")


def check_batches(cfg: Config, *, num_devices: int, num_processes: int) -> None:
  """Every batch splits evenly over the processes and the devices (each device holds a slice)."""
  t = cfg.train
  if num_devices % t.mesh_fsdp:
    raise ValueError(f"train.mesh_fsdp={t.mesh_fsdp} must divide the number of devices "
                     f"({num_devices})")
  rules = (("train.batch_size", t.batch_size, num_processes, "process(es)"),
           ("train.batch_size / train.grad_accum_steps", t.batch_size // t.grad_accum_steps,
            num_devices, "device(s)"),
           ("eval.batch_size", cfg.eval.batch_size, num_processes, "process(es)"),
           ("eval.batch_size", cfg.eval.batch_size, num_devices, "device(s)"))
  for key, value, n, what in rules:
    if value % n:
      raise ValueError(f"{key}={value} must be a multiple of the number of {what} ({n})")
