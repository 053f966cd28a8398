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


def check_config(cfg: Config, spec: DatasetSpec | None = None, *, num_devices: int = 1,
                 num_processes: int = 1) -> None:
  """Raises ValueError naming the key, its value and the valid values.

  spec: the dataset's (default: pipeline.get_spec(cfg.data), which reads no data).
  """
  spec = pipeline.get_spec(cfg.data) if spec is None else spec
  network = model.build_network(cfg, spec)  # Unknown network or fields, vocabulary, shape, classes.
  m, s = cfg.model, cfg.sample
  if not m.state_dependent:
    schedules.get_schedule(m.schedule, eps=m.eps)
  for key, value, valid in (("sample.method", s.method, sampling.METHODS),
                            ("sample.time_grid", s.time_grid, sampling.TIME_GRIDS)):
    if value not in valid:
      raise ValueError(f"{key}={value!r} is invalid; valid: {', '.join(valid)}")
  if s.method == "first_hitting" and m.state_dependent:
    raise ValueError("sample.method='first_hitting' needs a state-independent schedule and "
                     "model.state_dependent=True (GenMD4) has per-token schedules; valid methods "
                     f"for GenMD4: {', '.join(x for x in sampling.METHODS if x != 'first_hitting')}")
  if s.reuse_unchanged and network.config.time_conditioning:
    raise ValueError("sample.reuse_unchanged=True reuses a network call across times, which is exact "
                     "only for a network that ignores t; this one conditions on time "
                     f"(model.net.time_conditioning=True): set model.net.time_conditioning=False "
                     "or sample.reuse_unchanged=False")
  if s.reuse_unchanged and s.method == "first_hitting":
    raise ValueError("sample.reuse_unchanged applies to the grid samplers (ancestral, euler, mean); "
                     "first_hitting calls the network once per revealed token already")
  splits = pipeline.eval_splits(cfg.data)
  if cfg.eval.split not in splits:
    raise ValueError(f"eval.split={cfg.eval.split!r} is not a split of dataset "
                     f"{cfg.data.dataset!r}; valid: {', '.join(splits)}")
  check_batches(cfg, num_devices=num_devices, num_processes=num_processes)


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
