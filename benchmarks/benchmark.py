"""Training throughput, memory and compile time for a config, and the speed of each sampler.

  python benchmarks/benchmark.py --config=configs/demo.py
  python benchmarks/benchmark.py --config=configs/md4/openwebtext.py --config.train.batch_size=32 \
      --config.train.compute_dtype=bfloat16 --peak_tflops=989
  python benchmarks/benchmark.py --config=configs/md4/openwebtext.py --mode=memory \
      --batch_sizes=8,16 --remat=none,full,dots --config.train.compute_dtype=bfloat16

--mode=speed (the default) runs on synthetic data of the config's shape (no files needed) and
prints one table. Step time is the median over --steps timed steps after --warmup untimed ones
(compilation excluded and reported apart). Model FLOPs come from XLA's cost analysis of the compiled
step; MFU = FLOPs / step time / peak, printed when --peak_tflops is given. Peak memory is the
device's peak bytes in use where the backend reports it (GPU, TPU), else the process's peak
resident memory (CPU).

--mode=memory compiles the training step for each batch size in --batch_sizes and each remat policy
in --remat (md4.networks.remat) from shapes alone, allocating no state and running nothing, and
prints XLA's memory analysis of each compiled step: the bytes of its arguments (state and batch),
outputs, temporaries and generated code. The numbers are those of the backend that compiles: run it
where jax sees the target accelerator to size a batch for it. XLA:CPU's numbers only hint at a
GPU's: its buffer assignment differs, it reports no generated code bytes, and with jax 0.10.2 it
needs about as many temporary bytes with a remat policy as without one (BENCHMARKS.md), so it
does not show what a policy saves on a GPU.

--remat replaces the config's model.net.remat: `--config.model.net.remat=...` works only for a
config whose model.net already sets remat, since a config override cannot add a key.
"""

import dataclasses
import functools
import pathlib
import resource
import statistics
import sys
import time
from typing import NamedTuple, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flax.core  # noqa: E402  (after the path set-up, like the configs)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from md4 import config as config_lib  # noqa: E402
from md4 import generate, model, sharding, train  # noqa: E402
from md4.data import pipeline  # noqa: E402
from md4.networks import remat  # noqa: E402

MODES = ("speed", "memory")


def _define_flags():
  """The command line's flags, defined only when this file runs as a script, so that tests can
  import its functions next to other modules defining flags of the same names."""
  return dict(
      config=config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "demo.py"),
                                             "Config (any, with overrides)."),
      mode=flags.DEFINE_enum("mode", "speed", MODES,
                             "speed: time training and sampling; memory: XLA's memory analysis "
                             "of the compiled training step, nothing allocated or run."),
      batch_sizes=flags.DEFINE_list("batch_sizes", [], "memory: global batch sizes to compile "
                                    "(default: the config's train.batch_size)."),
      remat=flags.DEFINE_list("remat", [], "Remat policies replacing model.net.remat (default: "
                              f"the config's); one of {remat.REMAT_POLICIES}. speed: at most "
                              "one; memory: one row per policy and batch size."),
      steps=flags.DEFINE_integer("steps", 10, "speed: timed training steps."),
      warmup=flags.DEFINE_integer("warmup", 2, "speed: untimed steps after compilation."),
      methods=flags.DEFINE_list("methods", ["ancestral", "euler", "mean", "first_hitting"],
                                "speed: samplers to time (empty: none)."),
      sample_batch=flags.DEFINE_integer("sample_batch", 8, "speed: sequences per sampling run."),
      sample_repeats=flags.DEFINE_integer("sample_repeats", 3,
                                          "speed: timed sampling runs per method."),
      peak_tflops=flags.DEFINE_float("peak_tflops", 0.0,
                                     "speed: accelerator peak TFLOP/s for MFU (0: skip)."),
  )


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


def with_overrides(cfg: config_lib.Config, *, batch_size: int | None = None,
                   remat_policy: str | None = None) -> config_lib.Config:
  """cfg with train.batch_size and/or model.net.remat replaced (None: kept), validated again."""
  if batch_size is not None:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch_size))
  if remat_policy is not None:
    remat.check_remat(remat_policy)
    net = flax.core.FrozenDict({**cfg.model.net, "remat": remat_policy})
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, net=net))
  config_lib.validate(cfg)
  return cfg


def bench_training(cfg: config_lib.Config, *, steps: int, warmup: int, peak_tflops: float):
  spec = pipeline.get_spec(cfg.data)
  data = pipeline.SyntheticDataset(spec)
  setup = train.make_setup(cfg, spec)
  state = train.create_state(setup)
  local = next(data.train_iterator(cfg.train.batch_size, 0))
  local.pop("source_index", None)  # Bookkeeping of the data stream; the step takes no such input.
  batch = sharding.global_batch(local, setup.mesh)
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

  _timed(one, warmup)
  step_s = statistics.median(_timed(one, steps))
  tokens = cfg.train.batch_size * spec.tokens_per_example
  params = sum(x.size for x in jax.tree.leaves(holder["state"].params))
  return setup, holder["state"], {
      "params (M)": params / 1e6, "batch": cfg.train.batch_size,
      "remat": cfg.model.net.get("remat", "none"),
      "tokens/example": spec.tokens_per_example, "dtype": cfg.train.compute_dtype,
      "compile (s)": compile_s, "step (ms, median)": step_s * 1e3, "tokens/s": tokens / step_s,
      "TFLOP/step": flops / 1e12,
      "MFU": flops / step_s / (peak_tflops * 1e12) if peak_tflops else None,
  }


def bench_sampling(cfg: config_lib.Config, setup, state, method: str, *, batch: int,
                   repeats: int):
  cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, method=method))
  sampler = generate.Sampler(setup.network, cfg)
  n = batch
  init = generate.unconditional_init(setup.spec, n, cfg.model.vocab_size)
  labels = generate.default_labels(setup.spec, n, model.is_conditional(cfg))
  key = jax.random.key(0)
  start = time.perf_counter()
  calls = int(sampler(state.params, key, init, labels).num_calls)  # Compiles.
  first_s = time.perf_counter() - start
  run_s = statistics.median(_timed(lambda: sampler(state.params, key, init, labels).samples,
                                   repeats))
  return {"method": method, "steps": cfg.sample.num_steps, "batch": n,
          "first run (s)": first_s, "run (s, median)": run_s, "sequences/s": n / run_s,
          "network calls": calls}


class MemoryRow(NamedTuple):
  """XLA's memory analysis of one compiled training step (bytes; see memory_table)."""
  remat: str
  dtype: str
  batch: int
  state_bytes: int  # Parameters, optimizer state, EMA, step and rng: the state the step takes.
  argument_bytes: int  # The step's inputs: state and batch.
  output_bytes: int  # The new state and the metrics.
  temp_bytes: int  # Everything else live during the step: activations, gradients, workspace.
  alias_bytes: int  # Output bytes that reuse donated input buffers (the state).
  generated_code_bytes: int
  total_bytes: int  # argument + output + temp - alias.


def _state_bytes(abstract_state) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


def memory_table(cfg: config_lib.Config, batch_sizes: Sequence[int],
                 remat_policies: Sequence[str] = ()) -> list[MemoryRow]:
  """Compiles cfg's training step per (remat policy, batch size) from shapes and reads XLA's memory
  analysis of it; allocates no state and runs nothing.

  Args:
    cfg: the config; its train.batch_size and model.net.remat are replaced per row.
    batch_sizes: global batch sizes, each a multiple of train.grad_accum_steps.
    remat_policies: names in md4.networks.remat.REMAT_POLICIES; empty: the config's own.

  Returns:
    One MemoryRow per policy and batch size, policies outermost. The bytes are those of the
    backend jax compiles for (jax.devices()[0]); XLA:CPU's differ from XLA:GPU's.
  """
  if not batch_sizes:
    raise ValueError("memory_table needs at least one batch size")
  spec = pipeline.get_spec(cfg.data)
  rows = []
  for policy in remat_policies or (cfg.model.net.get("remat", "none"),):
    for batch_size in batch_sizes:
      run_cfg = with_overrides(cfg, batch_size=batch_size, remat_policy=policy)
      setup = train.make_setup(run_cfg, spec)
      state = train.abstract_state(setup)
      batch_sharding = sharding.batch_sharding(setup.mesh)
      # What the training loop feeds the step: the tokens, and labels where the dataset has them.
      batch = {"x": jax.ShapeDtypeStruct((batch_size,) + spec.example_shape, jnp.int32,
                                         sharding=batch_sharding)}
      if spec.num_classes:
        batch["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32,
                                              sharding=batch_sharding)
      stats = train.compile_train_step(setup, state).lower(state, batch).compile()
      stats = stats.memory_analysis()
      arg, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
      temp, alias = stats.temp_size_in_bytes, stats.alias_size_in_bytes
      rows.append(MemoryRow(
          remat=policy, dtype=run_cfg.train.compute_dtype, batch=batch_size,
          state_bytes=_state_bytes(state), argument_bytes=arg, output_bytes=out, temp_bytes=temp,
          alias_bytes=alias, generated_code_bytes=stats.generated_code_size_in_bytes,
          total_bytes=arg + out + temp - alias))
  return rows


def _memory_display(row: MemoryRow) -> dict:
  gib = lambda b: b / 2**30
  return {"remat": row.remat, "dtype": row.dtype, "batch": row.batch,
          "state (GiB)": gib(row.state_bytes), "arguments (GiB)": gib(row.argument_bytes),
          "outputs (GiB)": gib(row.output_bytes), "temporaries (GiB)": gib(row.temp_bytes),
          "aliased (GiB)": gib(row.alias_bytes), "code (GiB)": gib(row.generated_code_bytes),
          "total (GiB)": gib(row.total_bytes)}


def _table(rows: list[dict]) -> str:
  keys = list(rows[0])
  fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
  return "\n".join(lines)


def main(flag_values: dict, argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  v = {name: flag.value for name, flag in flag_values.items()}
  cfg = config_lib.from_configdict(v["config"])
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} "
        f"({jax.default_backend()}); arguments: {' '.join(sys.argv[1:]) or '(defaults)'}")
  if v["mode"] == "memory":
    batch_sizes = [int(b) for b in v["batch_sizes"]] or [cfg.train.batch_size]
    print(f"XLA's memory analysis of the compiled training step on {jax.default_backend()} "
          "(nothing allocated or run; another backend compiles to other numbers). "
          "total = arguments + outputs + temporaries - aliased.")
    if jax.default_backend() == "cpu":
      print("XLA:CPU reports no generated code bytes, and remat saves it few temporary bytes: "
            "these rows do not show what a policy saves on a GPU.")
    print(_table([_memory_display(r) for r in memory_table(cfg, batch_sizes, v["remat"])]))
    return
  if len(v["remat"]) > 1:
    raise app.UsageError(f"--mode=speed takes at most one --remat policy, got {v['remat']}")
  if v["remat"]:
    cfg = with_overrides(cfg, remat_policy=v["remat"][0])
  setup, state, row = bench_training(cfg, steps=v["steps"], warmup=v["warmup"],
                                     peak_tflops=v["peak_tflops"])
  memory, where = _peak_memory_gib()
  row[f"peak memory (GiB, {where})"] = memory
  print(_table([row]))
  if v["methods"]:
    print()
    print(_table([bench_sampling(cfg, setup, state, m, batch=v["sample_batch"],
                                 repeats=v["sample_repeats"]) for m in v["methods"]]))


if __name__ == "__main__":
  app.run(functools.partial(main, _define_flags()))
