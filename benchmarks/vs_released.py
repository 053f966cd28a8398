"""This project against the released code (google-deepmind/md4) on the same networks, in one table.

  python benchmarks/vs_released.py --released=/path/to/google-deepmind/md4 \
      --released_python=/path/to/released_env/bin/python

Each measurement runs in its own process, released then this project, round after round (A B A B;
--repeats rounds); a row reports the median over rounds of each process's own median. The released
side runs the released code's own functions, unmodified, under its own interpreter
(--released_python: an environment with jax, flax, optax, clu, distrax, tfp-nightly...; the
released package is also named `md4`, so the two cannot share a process). Its TensorFlow-only
imports (tensorflow, tensorflow_datasets, tensorboard, transformers, datasets), which the measured
functions never call, are stubbed by modules this script writes to a temporary folder.

Rows (--rows, comma-separated; default all):
  train_4x256    training step of the text8 network at 4 layers x 256 wide, sequence 256, batch 8:
                 released: its train_step (loss, AdamW, EMA, metrics) under jax.pmap over the one
                 device, as its training loop runs it; here: train.compile_train_step.
  train_text8    the same for the text8 network, 12 x 768 (88.7M), sequence 128, batch 4.
  sample_4x256   ancestral sampling of 16 x 256 with the 4 x 256 network, 100 steps on the cosine
                 grid: released: sampling.simple_generate under jax.jit (100 steps and one decoding
                 call); here: a compiled generate.Sampler.
  forward_md4s   MD4-S (165.9M) forward pass, 1 x 1024.
  md4s_128, md4s_256, md4s_1024
                 MD4-S ancestral sampling of --md4s_batch x 1024 at 128, 256, 1024 steps.
  md4s_fh        this project's first_hitting on MD4-S (--md4s_batch x 1024; 1024 network calls),
                 against the released code at 1024 steps (it has no first-hitting sampler; with
                 md4s_1024 among the rows, that row's released measurement is reused).
The compile time of the training step and each process's peak resident memory come with the rows.
--malloc=heap runs both sides' processes with glibc's malloc told to keep large blocks on its heap
(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_ past any heap): by default XLA:CPU's buffers above
32 MB come from fresh mmap pages on every call, and faulting them in is a sizeable part of a large
forward pass (see BENCHMARKS.md).
Both sides report their parameter count and XLA's FLOPs of what they time; the table shows them
and a warning names any row where they differ.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name: (kind, network, sequence length, batch, steps). Networks: "text8_4x256", "text8", "md4s".
ROWS = {
    "train_4x256": ("train", "text8_4x256", 256, 8, 0),
    "train_text8": ("train", "text8", 128, 4, 0),
    "sample_4x256": ("sample", "text8_4x256", 256, 16, 100),
    "forward_md4s": ("forward", "md4s", 1024, 1, 0),
    "md4s_128": ("sample", "md4s", 1024, None, 128),
    "md4s_256": ("sample", "md4s", 1024, None, 256),
    "md4s_1024": ("sample", "md4s", 1024, None, 1024),
    "md4s_fh": ("first_hitting", "md4s", 1024, None, 1024),
}
TITLES = {
    "train_4x256": "train step, 4 x 256 transformer, seq 256, batch 8",
    "train_text8": "train step, text8 network 12 x 768, seq 128, batch 4",
    "sample_4x256": "ancestral sampling, 16 x 256, 100 steps",
    "forward_md4s": "MD4-S forward pass, 1 x 1024",
    "md4s_128": "MD4-S sampling, {b} x 1024, 128 steps",
    "md4s_256": "MD4-S sampling, {b} x 1024, 256 steps",
    "md4s_1024": "MD4-S sampling, {b} x 1024, 1024 steps",
    "md4s_fh": "MD4-S first-hitting, {b} x 1024 (released: 1024 steps)",
}
# The text8 network (the released text8 config and its sweep's dropout and weight decay), and at
# 4 layers of 4 heads (width 256); MD4-S: the released OpenWebText config and its sweep's values.
RELEASED_NETS = {
    "text8_4x256": ("text8", dict(n_layers=4, num_heads=4, dropout_rate=0.05, weight_decay=0.03)),
    "text8": ("text8", dict(dropout_rate=0.05, weight_decay=0.03)),
    "md4s": ("openwebtext", dict(dropout_rate=0.02, weight_decay=0.03)),
}
OUR_NETS = {
    "text8_4x256": ("md4/text8.py", dict(num_layers=4, num_heads=4, d_model=256)),
    "text8": ("md4/text8.py", {}),
    "md4s": ("md4/openwebtext.py", {}),
}
# Environment of both sides' processes under --malloc=heap (glibc's malloc tunables).
HEAP_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}
STUBS = ("tensorflow", "tensorflow/compat", "tensorflow/compat/v2", "tensorflow_datasets",
         "tensorboard", "tensorboard/plugins", "tensorboard/plugins/hparams", "transformers",
         "datasets", "datasets/distributed")
# A module whose every attribute is a callable, subscriptable, subclassable placeholder.
STUB_SOURCE = '''"""Stand-in for a TensorFlow-side module that the benchmark never calls."""
class _Any:
  def __getattr__(self, name): return _Any()
  def __call__(self, *args, **kwargs): return _Any()
  def __getitem__(self, key): return _Any()
  def __mro_entries__(self, bases): return (object,)
def __getattr__(name): return _Any()
'''


def _median_times(fn, count: int) -> float:
  times = []
  for _ in range(count):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def _hlo_ops(compiled) -> dict:
  """Counts of the compiled program's fusions, transposes, copies and reductions."""
  import re
  text = compiled.as_text()
  return {op: len(re.findall(rf"= \S+ {op}\(", text))
          for op in ("fusion", "transpose", "copy", "reduce")}


def _rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------------------ released side


def released_worker(row: str, batch: int, timed: int) -> dict:
  """Runs in the released environment, with the released checkout first on sys.path."""
  import functools

  import flax.jax_utils as flax_utils
  import jax
  import numpy as np
  from md4 import sampling as rsampling
  from md4 import train as rtrain
  from md4.configs.md4 import openwebtext, text8
  from md4.models import utils as model_utils

  kind, net, seq, default_batch, steps = ROWS[row]
  batch = default_batch or batch
  base, changes = RELEASED_NETS[net]
  cfg = {"text8": text8, "openwebtext": openwebtext}[base].get_config()
  cfg.update(changes)
  cfg.data_shape = (seq,)
  cfg.timesteps = steps or cfg.timesteps
  cfg.sampler = "ancestral"
  cfg.sampling_grid = "cosine"
  schedule_fn = functools.partial(
      rtrain.get_learning_rate, base_learning_rate=cfg.learning_rate,
      num_steps=cfg.num_train_steps, warmup_steps=cfg.warmup_steps,
      schedule_type=cfg.learning_rate_schedule)
  model, optimizer, state, metrics_class = rtrain.create_train_state(
      cfg, jax.random.PRNGKey(0), input_shape=(batch, seq), schedule_fn=schedule_fn)
  out = {"params": int(sum(x.size for x in jax.tree.leaves(state.params)))}
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)

  if kind == "train":
    step = jax.pmap(functools.partial(
        rtrain.train_step, model=model, optimizer=optimizer, train_metrics_class=metrics_class,
        learning_rate_fn=schedule_fn, ema_rate=cfg.ema_rate,
        num_microbatches=cfg.num_microbatches), axis_name="batch", donate_argnums=(0,))
    replicated = flax_utils.replicate(state)
    data = {"text": tokens[None]}
    start = time.perf_counter()
    # By keyword, as its training loop calls it (model and optimizer come first).
    compiled = step.lower(train_state=replicated, batch=data).compile()
    out["compile_s"] = time.perf_counter() - start
    out["flops"] = _flops(compiled)
    out["hlo"] = _hlo_ops(compiled)
    holder = [replicated]

    def one():
      holder[0], metrics = compiled(train_state=holder[0], batch=data)
      jax.block_until_ready(metrics)

    one()
    out["time_s"] = _median_times(one, timed)
  elif kind == "forward":
    forward = jax.jit(lambda params, z, t: model.apply({"params": params}, z, t,
                                                       method=model.predict_x)[0])
    t = np.full((batch,), 0.5, np.float32)
    compiled = forward.lower(state.params, tokens, t).compile()
    out["flops"] = _flops(compiled)
    one = lambda: jax.block_until_ready(compiled(state.params, tokens, t))
    one()
    out["time_s"] = _median_times(one, timed)
  else:  # Sampling; first_hitting rows compare with the released code at the same 1024 steps.
    generate = jax.jit(lambda rng, st: rsampling.simple_generate(rng, st, batch, model))
    rng = jax.random.PRNGKey(1)
    start = time.perf_counter()
    compiled = generate.lower(rng, state).compile()
    out["compile_s"] = time.perf_counter() - start
    out["flops"] = _flops(compiled)
    one = lambda: jax.block_until_ready(compiled(rng, state))
    out["time_s"] = _median_times(one, timed)
    out["calls"] = steps + 1  # model.timesteps steps, then decode's call at t = 0.
  out["rss_gb"] = _rss_gb()
  return out


# -------------------------------------------------------------------------------- this project


def our_worker(row: str, batch: int, timed: int, log_grad_norm: bool = False) -> dict:
  sys.path.insert(0, str(ROOT))
  import dataclasses
  import importlib.util

  import jax
  import numpy as np

  from md4 import config as config_lib
  from md4 import generate, sharding, train
  from md4.data import pipeline

  kind, net, seq, default_batch, steps = ROWS[row]
  batch = default_batch or batch
  path, changes = OUR_NETS[net]
  spec_loader = importlib.util.spec_from_file_location("bench_config", ROOT / "configs" / path)
  module = importlib.util.module_from_spec(spec_loader)
  spec_loader.loader.exec_module(module)
  cd = module.get_config()
  cd.model.net = dict(cd.model.net, **changes)
  cd.data.seq_length = seq
  cd.train.batch_size = batch
  cd.train.compute_dtype = "float32"
  cd.train.log_grad_norm = log_grad_norm
  cd.sample.num_steps = steps or 1
  cd.sample.method = "first_hitting" if kind == "first_hitting" else "ancestral"
  cd.sample.time_grid = "cosine"
  cfg = config_lib.from_configdict(cd)
  spec = pipeline.get_spec(cfg.data)
  setup = train.make_setup(cfg, spec)
  state = train.create_state(setup)
  out = {"params": int(sum(x.size for x in jax.tree.leaves(state.params)))}
  tokens = np.random.default_rng(0).integers(0, spec.vocab_size, (batch, seq)).astype(np.int32)

  if kind == "train":
    data = sharding.global_batch({"x": tokens}, setup.mesh)
    step = train.compile_train_step(setup, train.abstract_state(setup))
    start = time.perf_counter()
    compiled = step.lower(state, data).compile()
    out["compile_s"] = time.perf_counter() - start
    out["flops"] = _flops(compiled)
    out["hlo"] = _hlo_ops(compiled)
    holder = [state]

    def one():
      holder[0], metrics = compiled(holder[0], data)
      jax.block_until_ready(metrics)

    one()
    out["time_s"] = _median_times(one, timed)
  elif kind == "forward":
    forward = jax.jit(lambda params, z, t: setup.network.apply({"params": params["net"]}, z, t))
    t = np.full((batch,), 0.5, np.float32)
    compiled = forward.lower(state.params, tokens, t).compile()
    out["flops"] = _flops(compiled)
    one = lambda: jax.block_until_ready(compiled(state.params, tokens, t))
    one()
    out["time_s"] = _median_times(one, timed)
  else:
    sampler = generate.Sampler(setup.network, cfg)
    init = generate.unconditional_init(spec, batch, cfg.model.vocab_size)
    rng = jax.random.key(1)
    args = sampler._args(state.params, rng, init, None)
    start = time.perf_counter()
    compiled = sampler._run.lower(*args).compile()
    out["compile_s"] = time.perf_counter() - start
    out["flops"] = _flops(compiled)
    calls = []
    out["time_s"] = _median_times(
        lambda: calls.append(int(jax.block_until_ready(compiled(*args)).num_calls)), timed)
    out["calls"] = calls[-1]
  out["rss_gb"] = _rss_gb()
  return out


# ------------------------------------------------------------------------------------- driver


def _stub_dir() -> str:
  folder = tempfile.mkdtemp(prefix="md4_released_stubs_")
  for name in STUBS:
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    with open(os.path.join(folder, name, "__init__.py"), "w") as f:
      f.write(STUB_SOURCE)
  with open(os.path.join(folder, "tensorboard/plugins/hparams/api.py"), "w") as f:
    f.write(STUB_SOURCE)
  return folder


def _run_worker(side: str, row: str, args, stubs: str) -> dict:
  command = [args.released_python if side == "released" else sys.executable, __file__,
             f"--worker={side}", f"--rows={row}", f"--md4s_batch={args.md4s_batch}",
             f"--timed={args.timed}"] + (["--log_grad_norm"] if args.log_grad_norm else [])
  env = dict(os.environ, **(HEAP_MALLOC if args.malloc == "heap" else {}))
  if side == "released":
    env["PYTHONPATH"] = os.pathsep.join([args.released, stubs])
  result = subprocess.run(command, env=env, capture_output=True, text=True,
                          cwd=args.released if side == "released" else ROOT)
  lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
  if result.returncode != 0 or not lines:
    raise RuntimeError(f"the {side} worker for {row} failed (exit {result.returncode}):\n"
                       f"{result.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _fmt_time(seconds: float) -> str:
  return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def _table(results: dict, rows: list[str], md4s_batch: int) -> str:
  lines = ["| workload | released | here | here / released | params (released / here) | "
           "GFLOP (released / here) | peak RSS GB (released / here) |",
           "|---|---|---|---|---|---|---|"]
  warnings = []
  med = lambda side, row, key: statistics.median(r[key] for r in results[side][row])
  for row in rows:
    kind = ROWS[row][0]
    rel, here = med("released", row, "time_s"), med("ours", row, "time_s")
    cells = [_fmt_time(rel), _fmt_time(here)]
    if kind in ("sample", "first_hitting"):
      calls = [results[side][row][0]["calls"] for side in ("released", "ours")]
      cells = [f"{_fmt_time(t)} ({c} calls, {_fmt_time(t / c)}/call)"
               for t, c in zip((rel, here), calls)]
    params = [results[side][row][0]["params"] for side in ("released", "ours")]
    flops = [med(side, row, "flops") / 1e9 for side in ("released", "ours")]
    rss = [med(side, row, "rss_gb") for side in ("released", "ours")]
    if params[0] != params[1]:
      warnings.append(f"{row}: parameter counts differ ({params[0]} / {params[1]})")
    if kind in ("train", "forward") and abs(flops[0] - flops[1]) > 0.01 * flops[0]:
      warnings.append(f"{row}: XLA FLOPs differ by more than 1% ({flops[0]:.4g} / "
                      f"{flops[1]:.4g} GFLOP)")
    lines.append(f"| {TITLES[row].format(b=md4s_batch)} | {cells[0]} | {cells[1]} | "
                 f"{here / rel:.2f} | {params[0] / 1e6:.4g}M / {params[1] / 1e6:.4g}M | "
                 f"{flops[0]:.4g} / {flops[1]:.4g} | {rss[0]:.2f} / {rss[1]:.2f} |")
    if kind == "train":
      compile_s = [med(side, row, "compile_s") for side in ("released", "ours")]
      lines.append(f"| compile of that train step | {compile_s[0]:.3g} s | {compile_s[1]:.3g} s "
                   f"| {compile_s[1] / compile_s[0]:.2f} | | | |")
  hlo_rows = [r for r in rows if ROWS[r][0] == "train"]
  if hlo_rows:
    lines += ["", "| compiled train step (released / here) | fusions | transposes | copies | "
              "reductions |", "|---|---|---|---|---|"]
    for row in hlo_rows:
      ops = [results[side][row][0]["hlo"] for side in ("released", "ours")]
      lines.append(f"| {TITLES[row]} | " + " | ".join(
          f"{ops[0][op]} / {ops[1][op]}" for op in ("fusion", "transpose", "copy", "reduce"))
          + " |")
  return "\n".join(lines + [f"\nWARNING: {w}" for w in warnings])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--released", default=os.environ.get("MD4_RELEASED_REPO"),
                      help="a checkout of google-deepmind/md4 (default: $MD4_RELEASED_REPO)")
  parser.add_argument("--released_python", default=os.environ.get("MD4_RELEASED_PYTHON"),
                      help="the released code's Python (default: $MD4_RELEASED_PYTHON)")
  parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
  parser.add_argument("--repeats", type=int, default=3, help="rounds of A B (processes)")
  parser.add_argument("--timed", type=int, default=3, help="timed runs in each process")
  parser.add_argument("--md4s_batch", type=int, default=16, help="sequences of the MD4-S rows")
  parser.add_argument("--log_grad_norm", action="store_true",
                      help="this project's train step with train.log_grad_norm (what it costs)")
  parser.add_argument("--malloc", choices=("default", "heap"), default="default",
                      help="heap: both sides with glibc's malloc keeping large blocks on its heap")
  parser.add_argument("--worker", choices=("released", "ours"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  rows = args.rows.split(",")
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    parser.error(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
  if args.worker:
    if args.worker == "released":
      result = released_worker(rows[0], args.md4s_batch, args.timed)
    else:
      result = our_worker(rows[0], args.md4s_batch, args.timed, args.log_grad_norm)
    print("RESULT " + json.dumps(result), flush=True)
    return
  if not args.released or not os.path.isdir(os.path.join(args.released, "md4")):
    parser.error(f"--released must be a checkout of google-deepmind/md4, got {args.released!r}")
  if not args.released_python:
    parser.error("--released_python (or $MD4_RELEASED_PYTHON) must name the released code's "
                 "Python")
  stubs = _stub_dir()
  results = {"released": {r: [] for r in rows}, "ours": {r: [] for r in rows}}
  for round_ in range(args.repeats):
    for row in rows:
      for side in ("released", "ours"):
        if side == "released" and row == "md4s_fh" and "md4s_1024" in rows:
          # The same released workload as md4s_1024 (1024 steps): its measurement of this round.
          results[side][row].append(results[side]["md4s_1024"][-1])
          continue
        start = time.perf_counter()
        results[side][row].append(_run_worker(side, row, args, stubs))
        print(f"round {round_ + 1}/{args.repeats} {row} {side}: "
              f"{results[side][row][-1]['time_s']:.4g} s in a {time.perf_counter() - start:.0f} s "
              "process", file=sys.stderr, flush=True)
  print(f"one CPU process per measurement, {args.repeats} rounds (A B A B), median of "
        f"{args.timed} timed runs in each; load average at the end: {os.getloadavg()[0]:.2f}"
        + ("; here with train.log_grad_norm" if args.log_grad_norm else "")
        + ("; both with glibc malloc's large blocks on its heap" if args.malloc == "heap" else ""))
  print(_table(results, rows, args.md4s_batch))


if __name__ == "__main__":
  main()
