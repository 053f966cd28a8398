"""Training throughput, memory and compile time for a config, and the speed of each sampler.

  python benchmarks/benchmark.py --config=configs/demo.py
  python benchmarks/benchmark.py --config=configs/md4/openwebtext.py --config.train.batch_size=32 \
      --config.train.compute_dtype=bfloat16 --peak_tflops=989

Runs on synthetic data of the config's shape (no files needed). Prints one table. Step time is the
median over --steps timed steps after --warmup untimed ones (compilation excluded and reported
apart). Model FLOPs come from XLA's cost analysis of the compiled step; MFU = FLOPs / step time /
peak, printed when --peak_tflops is given. Peak memory is the device's peak bytes in use where the
backend reports it (GPU, TPU), else the process's peak resident memory (CPU).
"""

import dataclasses
import pathlib
import resource
import statistics
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402  (after the path set-up, like the configs)

from md4 import config as config_lib  # noqa: E402
from md4 import generate, model, sharding, train  # noqa: E402
from md4.data import pipeline  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "demo.py"),
                                          "Config (any, with overrides).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed training steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_METHODS = flags.DEFINE_list("methods", ["ancestral", "euler", "mean", "first_hitting"],
                             "Samplers to time (empty: none).")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 8, "Sequences per sampling run.")
_SAMPLE_REPEATS = flags.DEFINE_integer("sample_repeats", 3, "Timed sampling runs per method.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Accelerator peak TFLOP/s for MFU (0: skip).")


def _peak_memory_gib() -> tuple[float, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30, "device"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host RSS"


def _timed(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def bench_training(cfg: config_lib.Config):
  spec = pipeline.get_spec(cfg.data)
  data = pipeline.SyntheticDataset(spec)
  setup = train.make_setup(cfg, spec)
  state = train.create_state(setup)
  batch = sharding.global_batch(next(data.train_iterator(cfg.train.batch_size, 0)), setup.mesh)
  step_fn = train.compile_train_step(setup, train.abstract_state(setup))
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", float("nan")))
  holder = {"state": state}

  def one():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics["loss"]

  _timed(one, _WARMUP.value)
  step_s = statistics.median(_timed(one, _STEPS.value))
  tokens = cfg.train.batch_size * spec.tokens_per_example
  params = sum(x.size for x in jax.tree.leaves(holder["state"].params))
  return setup, holder["state"], {
      "params (M)": params / 1e6, "batch": cfg.train.batch_size,
      "tokens/example": spec.tokens_per_example, "dtype": cfg.train.compute_dtype,
      "compile (s)": compile_s, "step (ms, median)": step_s * 1e3, "tokens/s": tokens / step_s,
      "TFLOP/step": flops / 1e12,
      "MFU": flops / step_s / (_PEAK.value * 1e12) if _PEAK.value else None,
  }


def bench_sampling(cfg: config_lib.Config, setup, state, method: str):
  cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, method=method))
  sampler = generate.Sampler(setup.network, cfg)
  n = _SAMPLE_BATCH.value
  init = generate.unconditional_init(setup.spec, n, cfg.model.vocab_size)
  labels = generate.default_labels(setup.spec, n, model.is_conditional(cfg))
  key = jax.random.key(0)
  start = time.perf_counter()
  calls = int(sampler(state.params, key, init, labels).num_calls)  # Compiles.
  first_s = time.perf_counter() - start
  run_s = statistics.median(_timed(lambda: sampler(state.params, key, init, labels).samples,
                                   _SAMPLE_REPEATS.value))
  return {"method": method, "steps": cfg.sample.num_steps, "batch": n,
          "first run (s)": first_s, "run (s, median)": run_s, "sequences/s": n / run_s,
          "network calls": calls}


def _table(rows: list[dict]) -> str:
  keys = list(rows[0])
  fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  cfg = config_lib.from_configdict(_CONFIG.value)
  setup, state, row = bench_training(cfg)
  memory, where = _peak_memory_gib()
  row[f"peak memory (GiB, {where})"] = memory
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}; "
        f"arguments: {' '.join(sys.argv[1:]) or '(defaults)'}")
  print(_table([row]))
  if _METHODS.value:
    print()
    print(_table([bench_sampling(cfg, setup, state, m) for m in _METHODS.value]))


if __name__ == "__main__":
  app.run(main)
