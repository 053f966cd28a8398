"""One writer for metrics: JSON lines always, TensorBoard too when TensorFlow is installed.

Metric names carry a namespace: "train/loss_bits", "eval/bits_per_char". Only process 0 writes. A
resumed run first drops the JSON records past its checkpoint (keep_until), so metrics.jsonl holds
each step once; TensorBoard's event files are append-only and keep both copies.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax


def _tensorboard_writer(logdir: str):
  try:
    from clu import metric_writers  # Needs TensorFlow: the optional `tf` extra.
  except ImportError:
    return None
  return metric_writers.SummaryWriter(logdir)


class MetricWriter:
  """Appends {"step": n, name: value, ...} to workdir/metrics.jsonl (and TensorBoard if available)."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: (v if math.isfinite(v) else str(v))
                                                 for k, v in values.items()}}) + "\n")
    if self._tb is not None:
      self._tb.write_scalars(int(step), values)
      self._tb.flush()


  def keep_until(self, step: int, *, drop_eval_at_step: bool = False) -> int:
    """On resuming from the checkpoint of `step`: drops the records of later steps, which the
    resumed run writes again, so that each step appears once (and, with drop_eval_at_step, the
    evaluation records of `step` itself: a finished run that is rerun evaluates again). Lines cut
    short by a killed process are dropped too. Returns how many records were dropped."""
    if not self.enabled or not os.path.exists(self.path):
      return 0
    kept, dropped = [], 0
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          dropped += bool(line.strip())
          continue
        later = record["step"] > step
        again = drop_eval_at_step and record["step"] == step and any(
            k.startswith("eval/") for k in record)
        if later or again:
          dropped += 1
        else:
          kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    return dropped


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records written so far, in order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
