"""Sample quality against sampling steps, for every sampler: the paper's figure, plus wall time
(`md4 sample --sweep_steps=...`).

For each sampler (a method with its settings, named in SAMPLERS), time grid and number of steps:
cfg.sample.num_samples unconditional samples (the sampler compiled ahead, so the wall time is
sampling alone), their generative perplexity under a judge (md4/judge.py) and a protocol
(md4/judge_protocols.py: "md4", "mdlm" or "sedd", named in the table), their unigram entropy,
the network calls made and the wall time. first_hitting makes one network call per token whatever
the number of steps or grid, so it runs once.

For MD4 (a schedule shared by all tokens) the ancestral and mean steps are the same distribution,
drawn here with the same random numbers, so they give the same samples up to floating-point
rounding; with the linear schedule the Euler step equals the exact one too. They differ for GenMD4
and for other schedules.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from md4 import generate, judge as judge_lib, judge_protocols, sampling
from md4.config import Config
from md4.data.pipeline import Dataset
from md4.samplers import grid as grid_lib

# The samplers a sweep compares: sample.* settings under a name, none tuned here. remdm_loop takes
# the settings of ReMDM's OpenWebText loop script (eta 0.02, t_on 0.55, t_off 0.05), but this
# project's loop holds alpha at alpha(t_on) inside the window (md4.sampling.sample) where ReMDM's
# holds it at its alpha_on = 0.9; remdm_cap uses eta 0.02 where ReMDM's cap script uses 0.008.
SAMPLERS: dict[str, dict[str, Any]] = {
    "ancestral": dict(method="ancestral"),
    "euler": dict(method="euler"),
    "mean": dict(method="mean"),
    "first_hitting": dict(method="first_hitting"),
    "maskgit": dict(method="maskgit", temperature=1.0),
    "maskgit_greedy": dict(method="maskgit", temperature=0.0),
    "remdm_cap": dict(method="remdm", remask_strategy="cap", remask_eta=0.02),
    "remdm_loop": dict(method="remdm", remask_strategy="loop", remask_eta=0.02, remask_t_on=0.55,
                       remask_t_off=0.05),
}


def default_samplers(cfg: Config) -> list[str]:
  """Every sampler of SAMPLERS that applies to cfg's model."""
  return [name for name, s in SAMPLERS.items()
          if not (cfg.model.state_dependent and s["method"] in sampling.STATE_INDEPENDENT_ONLY)]


def describe(name: str) -> str:
  """The settings of sampler `name` beyond its method, as `key=value` pairs ('-' if none)."""
  extra = {k: v for k, v in SAMPLERS[name].items() if k != "method"}
  return ", ".join(f"{k}={v}" for k, v in extra.items()) or "-"


class SweepRow(NamedTuple):
  sampler: str  # A name of SAMPLERS.
  grid: str | None  # None: first_hitting, which takes no grid.
  steps: int | None  # None: first_hitting, which takes no number of steps.
  num_calls: int
  seconds: float  # Wall time of one compiled sampling run.
  perplexity: float  # Generative perplexity under the judge.
  entropy: float  # Mean unigram entropy of the samples, nats.


def run(network, cfg: Config, params, dataset: Dataset, judge: judge_lib.Judge,
        steps: Sequence[int], samplers: Sequence[str], grids: Sequence[str], rng: jax.Array,
        labels: np.ndarray | None = None, protocol: str = "md4") -> list[SweepRow]:
  """Samples with every sampler on every grid at every number of steps and scores the samples
  under the judge protocol `protocol` (md4.judge_protocols.PROTOCOLS)."""
  judge_protocols.check_protocol(protocol)
  unknown = [m for m in samplers if m not in SAMPLERS]
  if unknown or not samplers:
    raise ValueError(f"--sweep_methods must name samplers among {', '.join(SAMPLERS)}, got "
                     f"{list(samplers)}")
  unknown = [g for g in grids if g not in grid_lib.TIME_GRIDS]
  if unknown or not grids:
    raise ValueError(f"--sweep_grids must name time grids among {grid_lib.TIME_GRIDS}, got "
                     f"{list(grids)}")
  invalid = [m for m in samplers if m not in default_samplers(cfg)]
  if invalid:
    raise ValueError(f"{', '.join(invalid)} need(s) a state-independent schedule; GenMD4's is not: "
                     f"valid here: {', '.join(default_samplers(cfg))}")
  if not steps or min(steps) < 1:
    raise ValueError(f"--sweep_steps must be positive numbers of steps, got {list(steps)}")
  init = generate.unconditional_init(dataset.spec, cfg.sample.num_samples, cfg.model.vocab_size)
  # The sampling settings of cfg that a sampler does not set are reset, so each row is its sampler.
  base = dataclasses.replace(cfg.sample, temperature=1.0, remask_eta=0.0)
  rows = []
  settings = [(m, g, n) for m in samplers if m != "first_hitting" for g in grids for n in steps]
  if "first_hitting" in samplers:
    settings.append(("first_hitting", None, None))
  for name, grid, n in settings:
    sample_cfg = dataclasses.replace(base, **SAMPLERS[name], num_steps=n or cfg.sample.num_steps,
                                     time_grid=grid or cfg.sample.time_grid)
    sampler = generate.Sampler(network, dataclasses.replace(cfg, sample=sample_cfg))
    compiled = sampler.compile(params, rng, init, labels)
    start = time.perf_counter()
    result = jax.block_until_ready(compiled(params, rng, init, labels))
    seconds = time.perf_counter() - start
    samples = np.asarray(result.samples)
    score = judge.score([dataset.decode(s) for s in samples], samples, protocol)
    rows.append(SweepRow(name, grid, n, int(result.num_calls), seconds, score.perplexity,
                         judge_lib.unigram_entropy(samples)))
  return rows


def table(rows: Sequence[SweepRow], protocol: str) -> str:
  """A Markdown table, one row per sampler, grid and number of steps; the perplexity column names
  the judge protocol it was computed under."""
  lines = ["| sampler | time grid | steps | network calls | wall time (s) | generative perplexity "
           f"({protocol} protocol) | unigram entropy (nats) | settings |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    steps = "-" if r.steps is None else str(r.steps)
    lines.append(f"| {r.sampler} | {r.grid or '-'} | {steps} | {r.num_calls} | {r.seconds:.3g} | "
                 f"{r.perplexity:.4g} | {r.entropy:.4g} | {describe(r.sampler)} |")
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
  for method, grid in dict.fromkeys((r.sampler, r.grid) for r in rows):
    mine = [r for r in rows if (r.sampler, r.grid) == (method, grid)]
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
