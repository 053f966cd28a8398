"""Sample quality against sampling steps: the paper's figure, plus wall time (`md4 sample
--sweep_steps=...`).

For each sampler, time grid and number of steps: cfg.sample.num_samples unconditional samples (the
sampler compiled ahead, so the wall time is sampling alone), their generative perplexity under a
judge (md4/judge.py), their unigram entropy, the network calls made and the wall time.
first_hitting makes one network call per token whatever the number of steps or grid, so it runs
once.

For MD4 (a schedule shared by all tokens) the ancestral and mean steps are the same distribution,
drawn here with the same random numbers, so they give the same samples up to floating-point
rounding; with the linear schedule the Euler step equals the exact one too. They differ for GenMD4
and for other schedules.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple, Sequence

import jax
import numpy as np

from md4 import generate, judge as judge_lib, sampling
from md4.config import Config
from md4.data.pipeline import Dataset

class SweepRow(NamedTuple):
  method: str
  grid: str | None  # None: first_hitting, which takes no grid.
  steps: int | None  # None: first_hitting, which takes no number of steps.
  num_calls: int
  seconds: float  # Wall time of one compiled sampling run.
  perplexity: float  # Generative perplexity under the judge.
  entropy: float  # Mean unigram entropy of the samples, nats.


def run(network, cfg: Config, params, dataset: Dataset, judge: judge_lib.Judge,
        steps: Sequence[int], methods: Sequence[str], grids: Sequence[str], rng: jax.Array,
        labels: np.ndarray | None = None) -> list[SweepRow]:
  """Samples with every method on every grid at every number of steps and scores the samples."""
  unknown = [m for m in methods if m not in sampling.METHODS]
  if unknown:
    raise ValueError(f"unknown sampler(s) {unknown} in --sweep_methods; valid: {sampling.METHODS}")
  unknown = [g for g in grids if g not in sampling.TIME_GRIDS]
  if unknown or not grids:
    raise ValueError(f"--sweep_grids must name time grids among {sampling.TIME_GRIDS}, got "
                     f"{list(grids)}")
  if cfg.model.state_dependent and "first_hitting" in methods:
    raise ValueError("first_hitting needs a state-independent schedule; GenMD4's is not: leave it "
                     "out of --sweep_methods")
  if not steps or min(steps) < 1:
    raise ValueError(f"--sweep_steps must be positive numbers of steps, got {list(steps)}")
  init = generate.unconditional_init(dataset.spec, cfg.sample.num_samples, cfg.model.vocab_size)
  rows = []
  settings = [(m, g, n) for m in methods if m != "first_hitting" for g in grids for n in steps]
  if "first_hitting" in methods:
    settings.append(("first_hitting", None, None))
  for method, grid, n in settings:
    sample_cfg = dataclasses.replace(cfg.sample, method=method,
                                     num_steps=n or cfg.sample.num_steps,
                                     time_grid=grid or cfg.sample.time_grid)
    sampler = generate.Sampler(network, dataclasses.replace(cfg, sample=sample_cfg))
    compiled = sampler.compile(params, rng, init, labels)
    start = time.perf_counter()
    result = jax.block_until_ready(compiled(params, rng, init, labels))
    seconds = time.perf_counter() - start
    samples = np.asarray(result.samples)
    score = judge.score([dataset.decode(s) for s in samples])
    rows.append(SweepRow(method, grid, n, int(result.num_calls), seconds, score.perplexity,
                         judge_lib.unigram_entropy(samples)))
  return rows


def table(rows: Sequence[SweepRow]) -> str:
  """A Markdown table, one row per sampler, grid and number of steps."""
  lines = ["| sampler | time grid | steps | network calls | wall time (s) | generative perplexity | "
           "unigram entropy (nats) |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    steps = "-" if r.steps is None else str(r.steps)
    lines.append(f"| {r.method} | {r.grid or '-'} | {steps} | {r.num_calls} | {r.seconds:.3g} | "
                 f"{r.perplexity:.4g} | {r.entropy:.4g} |")
  return "\n".join(lines)


def plot(rows: Sequence[SweepRow], path: str, title: str) -> None:
  """A PNG: generative perplexity, entropy and wall time against steps, a line per sampler
  (first_hitting, which has no steps, as a dashed horizontal line)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fields = (("perplexity", "generative perplexity"), ("entropy", "unigram entropy (nats)"),
            ("seconds", "wall time (s)"))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for method, grid in dict.fromkeys((r.method, r.grid) for r in rows):
    mine = [r for r in rows if (r.method, r.grid) == (method, grid)]
    for ax, (field, _) in zip(axes, fields):
      if mine[0].steps is None:
        ax.axhline(getattr(mine[0], field), linestyle="--", color="gray",
                   label=f"{method} ({mine[0].num_calls} calls)")
      else:
        ax.plot([r.steps for r in mine], [getattr(r, field) for r in mine], marker="o",
                label=f"{method}, {grid} grid")
  for ax, (_, label) in zip(axes, fields):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
