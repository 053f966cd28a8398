"""A config's steps compiled for an accelerator slice that is not attached: `md4 compile`.

The training step, the evaluation step and the sampler's network call are lowered from shapes alone
(nothing is allocated) onto a mesh of the slice's devices, as jax describes them without the
hardware (jax.experimental.topologies: libtpu for a TPU slice, jax's CUDA plugin for an NVIDIA
GPU), and compiled by that accelerator's compiler on this host. Per chip, XLA's memory analysis
gives the memory; the compiled program's HLO text gives the FLOPs of its matrix products, the bytes
it moves to and from memory and between chips (md4/hlo.py, counting loops by their trip counts,
which XLA's own cost analysis does not). From those and the chip's published peaks (md4/chips.py)
comes a roofline estimate of the step time: the slowest of FLOPs / peak bf16 FLOP/s, bytes accessed
/ HBM bandwidth and collective bytes / inter-chip bandwidth. It is a lower bound on the time, a
prediction; nothing here runs on an accelerator.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from md4 import chips, hlo

if TYPE_CHECKING:  # Importing the config imports jax, which prepare_environment must precede.
  from md4.config import Config

GiB = chips.GiB

# The H100's description for jax's CUDA topology (a stream_executor GpuDeviceInfoProto text proto):
# NVIDIA's H100 SXM5 80GB: 132 SMs, compute capability 9.0, HBM3 at 3.35 TB/s, 79.1 GiB usable.
H100_DEVICE_INFO = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3350000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


# What keeps libtpu quiet on a host without a TPU: it is told that this is no Cloud TPU VM (else it
# asks the metadata server, and prints what it could not find), and that several processes may load
# it at once (else it holds a lock file, which a second process trips on).
_NO_TPU_HERE = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                "TPU_ACCELERATOR_TYPE": "v5litepod-8", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def quiet_libtpu_without_tpu() -> None:
  """Sets _NO_TPU_HERE where libtpu is installed on a host with no TPU chip (a CPU or GPU host with
  the tpu or test extra), so that jax falls back to its other backends without libtpu's noise; a
  Cloud TPU VM is left alone. Call before jax initialises a backend."""
  if importlib.util.find_spec("libtpu") is None:
    return
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
    for key, value in _NO_TPU_HERE.items():
      os.environ.setdefault(key, value)


def prepare_environment() -> None:
  """Call before jax initialises a backend: computations are traced on this host's CPU and compiled
  for the slice; libtpu is loaded as a compiler only (_NO_TPU_HERE), and jax's CUDA plugin without
  a GPU driver."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  for key, value in _NO_TPU_HERE.items():
    os.environ.setdefault(key, value)


def slice_devices(sl: chips.Slice) -> list:
  """The slice's devices as jax describes them without the hardware."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if sl.chip.platform == "tpu":
    if importlib.util.find_spec("libtpu") is None:
      raise ValueError(f"compiling for {sl.name} needs libtpu, which is not installed: "
                       "pip install -e '.[tpu]'")
    return topologies.get_topology_desc(
        platform="tpu", topology_name=sl.topology, chip_config_name=sl.chip_config,
        chips_per_host_bounds=sl.chips_per_host, num_slices=1).devices
  if importlib.util.find_spec("jax_cuda12_plugin") is None:
    raise ValueError(f"compiling for {sl.name} needs jax's CUDA plugin, which is not installed: "
                     "pip install -e '.[gpu]'")
  return topologies.get_topology_desc(platform="cuda", topology=sl.topology,
                                      target_config=H100_DEVICE_INFO).devices


# ------------------------------------------------------------------------------ measuring


class Measured(NamedTuple):
  """One compiled computation, per chip: memory from XLA's memory analysis, FLOPs, bytes accessed
  and collective bytes counted from the compiled HLO (md4/hlo.py); compile_s: seconds to lower and
  compile."""
  what: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # Outputs written over donated arguments.
  temp_bytes: int
  flops: float
  bytes_accessed: float
  collective_bytes: float
  compile_s: float
  # The compiler refused it as larger than the chip: temp_bytes is what it said the temporaries
  # need, and nothing else was measured.
  refused: bool = False

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


class Estimate(NamedTuple):
  seconds: float
  bound: str  # "compute", "memory" (HBM) or "interconnect".


def roofline(m: Measured, chip: chips.Chip) -> Estimate:
  """The slowest of the three roofs: a lower bound on the time of m on chip."""
  roofs = {"compute": m.flops / chip.peak_bf16_flops,
           "memory": m.bytes_accessed / chip.hbm_bytes_per_s}
  if chip.ici_bytes_per_s:
    roofs["interconnect"] = m.collective_bytes / chip.ici_bytes_per_s
  bound = max(roofs, key=roofs.get)
  return Estimate(roofs[bound], bound)


_SIZE = re.compile(r"([\d.]+)([KMGT])?")
_UNITS = {None: 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def exhausted_bytes(message: str) -> int | None:
  """The temporaries the TPU compiler says a program needs when it refuses it for running out of
  HBM ("... memory required for HLO temporaries (49.20G) exceeds available HBM (15.75G)"), or
  None for any other error."""
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  match = re.search(r"HLO temporaries \(([\d.]+[KMGT]?)\)", message) or re.search(
      r"Used ([\d.]+[KMGT]?) of [\d.]+[KMGT]? hbm", message)
  if match is None:
    return None
  number, unit = _SIZE.fullmatch(match.group(1)).groups()
  return int(float(number) * _UNITS[unit])


def _arg_bytes(args) -> int:
  """Bytes one device holds of ShapeDtypeStructs with shardings."""
  import jax  # pylint: disable=g-import-not-at-top
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(args))


# ------------------------------------------------------------------------- the three steps


def _struct(shape, dtype, sharding_):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def _batch(cfg: Config, spec, size: int, mesh, fields: dict[str, Any] | None = None) -> dict:
  """ShapeDtypeStructs of a batch of `size` examples, split along the batch like a real one."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from md4 import model, sharding  # pylint: disable=g-import-not-at-top
  where = sharding.batch_sharding(mesh)
  batch = {"x": _struct((size,) + spec.example_shape, jnp.int32, where)}
  if model.is_conditional(cfg):
    batch["label"] = _struct((size,), jnp.int32, where)
  for name, dtype in (fields or {}).items():
    batch[name] = _struct((size,), dtype, where)
  return batch


def _train_step(setup):
  """("training step", the jitted step, its arguments as ShapeDtypeStructs)."""
  from md4 import train  # pylint: disable=g-import-not-at-top
  abstract = train.abstract_state(setup)
  batch = _batch(setup.cfg, setup.spec, setup.cfg.train.batch_size, setup.mesh)
  return "training step", train.compile_train_step(setup, abstract), (abstract, batch)


def _eval_step(setup):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from md4 import evaluate, sharding, train  # pylint: disable=g-import-not-at-top
  cfg = setup.cfg
  params = train.abstract_state(setup).ema_params
  batch = _batch(cfg, setup.spec, cfg.eval.batch_size, setup.mesh,
                 {"index": jnp.int32, "weight": jnp.float32})
  key = jax.eval_shape(lambda: jax.random.key(0))
  rng = _struct(key.shape, key.dtype, sharding.replicated(setup.mesh))
  evaluator = evaluate.Evaluator(setup.network, cfg, setup.mesh)
  return (f"evaluation step (batch {cfg.eval.batch_size})", evaluator.batch_sums,
          (params, batch, rng))


def _sampler_call(setup):
  """One network call of the sampler, on sample.num_samples sequences (images)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from md4 import model, sharding, train  # pylint: disable=g-import-not-at-top
  cfg, mesh = setup.cfg, setup.mesh
  n = cfg.sample.num_samples
  params = train.abstract_state(setup).ema_params
  where = sharding.batch_sharding(mesh) if n % mesh.size == 0 else sharding.replicated(mesh)
  z = _struct((n,) + setup.spec.example_shape, jnp.int32, where)
  t = _struct((n,), jnp.float32, where)
  labels = _struct((n,), jnp.int32, where) if model.is_conditional(cfg) else None
  call = lambda params, z, t, labels: model.denoiser(setup.network, params, labels)(z, t)
  return (f"sampler network call (batch {n})", jax.jit(sharding.in_mesh(call, mesh)),
          (params, z, t, labels))


def measure(setup, build: Callable) -> Measured:
  """The computation build(setup) -> (name, jitted, args) lowered and compiled for setup's mesh;
  bytes and FLOPs per device.

  On a GPU the FLOPs are counted in the computation before optimisation (over the number of
  devices) and no bytes accessed are known: the compiled program calls cuBLAS for its products.
  """
  what, jitted, args = build(setup)
  start = time.perf_counter()
  try:
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    needed = exhausted_bytes(str(e))
    if needed is None:
      raise
    # The compiler refuses a program larger than the chip, saying how much it would need.
    return Measured(what, _arg_bytes(args), 0, 0, needed, 0.0, 0.0, 0.0,
                    time.perf_counter() - start, refused=True)
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  costs = hlo.costs(compiled.as_text())
  flops, accessed = costs.flops, costs.bytes_accessed
  if setup.mesh.devices.flat[0].platform == "gpu":
    # The GPU compiler turns matrix products into library calls (cuBLAS), which the HLO does not
    # size: count them before optimisation, in the whole (unpartitioned) computation.
    flops = hlo.costs(lowered.compiler_ir("hlo").as_hlo_text()).flops / setup.mesh.size
    accessed = 0.0
  return Measured(what, mem.argument_size_in_bytes, mem.output_size_in_bytes,
                  mem.alias_size_in_bytes, mem.temp_size_in_bytes, flops, accessed,
                  costs.collective_bytes, seconds)


class Compiled(NamedTuple):
  """The three computations of a config on a slice, per chip."""
  train: Measured
  state_bytes: int  # Parameters, optimizer moments and EMA held by one chip.
  eval: Measured
  sample: Measured


def state_bytes(setup) -> int:
  """The state (parameters, optimizer moments, EMA) one chip holds, from shapes."""
  from md4 import sharding, train  # pylint: disable=g-import-not-at-top
  abstract = train.abstract_state(setup)
  return sharding.bytes_per_device(abstract, sharding.state_shardings(abstract, setup.mesh))


def compile_train(setup) -> tuple[Measured, int]:
  """The training step's measures and the state one chip holds."""
  return measure(setup, _train_step), state_bytes(setup)


def make_setup(cfg: Config, devices: list):
  from md4 import sharding, train  # pylint: disable=g-import-not-at-top
  from md4.data import pipeline  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(cfg.train.mesh_fsdp, devices)
  return train.make_setup(cfg, pipeline.config_spec(cfg), mesh)


def compile_all(cfg: Config, devices: list, train: Measured | None = None) -> Compiled:
  """The three computations of cfg; `train`: its training step's measures when already compiled
  (by the --fit search), so that the step is not compiled a second time."""
  setup = make_setup(cfg, devices)
  step, state = compile_train(setup) if train is None else (train, state_bytes(setup))
  return Compiled(step, state, measure(setup, _eval_step), measure(setup, _sampler_call))


# --------------------------------------------------------------------------------- report


def model_flops_per_step(cfg: Config) -> float:
  """The FLOPs of the network's matrix products, forward and backward, for one global batch, as
  md4/hlo.py counts them (the numerator of MFU, like the FLOPs of the table): without
  rematerialisation and with XLA's attention, the useful work whatever the setting."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  from md4 import info  # pylint: disable=g-import-not-at-top
  net = dict(cfg.model.net, remat="none")
  if "attention_impl" in net:
    net["attention_impl"] = "xla"
  plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, net=net))
  per_example = hlo.costs(info.network_grad(plain)[2].compiler_ir("hlo").as_hlo_text()).flops
  passes = cfg.model.network_masks if cfg.model.state_dependent else 1
  return per_example * passes * cfg.train.batch_size


def gib(n: float) -> str:
  return f"{n / GiB:.2f}"


def _attention_label(cfg: Config, chip: chips.Chip) -> str:
  """The attention_impl the config names, or what its default (None) runs on the chip."""
  net = cfg.model.net
  impl = net.get("attention_impl")
  if net.get("attention_dropout") and net.get("dropout_rate"):
    # Dropout on the probabilities needs them whole: the training step forms them explicitly.
    return f"{impl or 'default'} (explicit probabilities under attention dropout in training)"
  if impl is not None:
    return impl
  if cfg.model.network not in ("transformer", "dit"):  # Sequences of patches or pixels.
    return "the backend's default"
  from md4.networks import attention  # pylint: disable=g-import-not-at-top
  platform = "gpu" if chip.platform == "cuda" else chip.platform
  capability = 9.0 if chip.name.startswith("NVIDIA H100") else None
  return "default: " + attention.default_impl(
      platform, cfg.train.compute_dtype, net["d_model"] // net["num_heads"], capability,
      cfg.data.seq_length)


def render(cfg: Config, sl: chips.Slice, compiled: Compiled, model_flops: float) -> str:
  """The report `md4 compile` prints: a table per chip, then the training step's estimate."""
  import jax  # pylint: disable=g-import-not-at-top
  chip = sl.chip
  t = cfg.train
  per_chip = t.batch_size // sl.num_chips
  lines = [
      f"{sl.name}: {sl.num_chips} x {chip.name} ({chip.hbm_bytes / GiB:.1f} GiB HBM, "
      f"{chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bytes_per_s / 1e9:.0f} GB/s; "
      f"{chip.source}); jax {jax.__version__}{_libtpu_version(chip)}",
      f"training: global batch {t.batch_size} ({per_chip} per chip"
      + (f", {t.grad_accum_steps} microbatches of {per_chip // t.grad_accum_steps}"
         if t.grad_accum_steps > 1 else "")
      + f"), {t.compute_dtype}, remat {cfg.model.net.get('remat', 'none')}, mesh_fsdp "
      f"{t.mesh_fsdp}, attention {_attention_label(cfg, chip)}, logits_chunk "
      f"{cfg.model.logits_chunk}",
      f"state per chip (parameters, Adam moments, EMA): {gib(compiled.state_bytes)} GiB",
      "",
      "| per chip | arguments (GiB) | temporaries (GiB) | total (GiB) | of HBM | FLOPs | "
      "collectives (GiB) | compile (s) | estimate (ms) | bound |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for m in (compiled.train, compiled.eval, compiled.sample):
    if m.refused:
      lines.append(f"| {m.what} | {gib(m.argument_bytes)} | {gib(m.temp_bytes)} | "
                   f"> {gib(chip.hbm_bytes)} | refused by the compiler | | | {m.compile_s:.0f} | | |")
      continue
    est = roofline(m, chip)
    lines.append(
        f"| {m.what} | {gib(m.argument_bytes)} | {gib(m.temp_bytes)} | {gib(m.total_bytes)} | "
        f"{m.total_bytes / chip.hbm_bytes:.0%} | {m.flops:.3g} | {gib(m.collective_bytes)} | "
        f"{m.compile_s:.0f} | {est.seconds * 1e3:.4g} | {est.bound} |")
  lines.append("")
  if chip.platform == "cuda":
    lines.append("(the GPU compiler gives no cost analysis: FLOPs are counted in the computation "
                 "before optimisation, over the GPUs; the HBM roof is left out)")
  if not compiled.train.refused:
    est = roofline(compiled.train, chip)
    tokens = t.batch_size * _tokens_per_example(cfg)
    lines.append(
        f"estimate (a roofline: a lower bound on the time, not a measurement): training step "
        f"{est.seconds * 1e3:.4g} ms ({est.bound}-bound), {tokens / est.seconds:,.0f} tokens/s, "
        f"MFU at most {model_flops / (est.seconds * sl.num_chips * chip.peak_bf16_flops):.0%} "
        f"(model FLOPs {model_flops:.3g} per step)")
  lines.append(fit_line(cfg, sl, compiled.train))
  return "\n".join(lines)


def fit_line(cfg: Config, sl: chips.Slice, m: Measured) -> str:
  """One line: whether the training step fits the chip with >= 10% to spare."""
  need, have = m.total_bytes, sl.chip.hbm_bytes
  if need <= FIT_FRACTION * have and not m.refused:
    return (f"fits: {gib(need)} of {gib(have)} GiB per chip ({1 - need / have:.0%} left)")
  needs = "at least " if m.refused else ""
  return (f"does not fit: the training step needs {needs}{gib(need)} GiB per chip and a "
          f"{sl.chip.name} "
          f"has {gib(have)} GiB ({FIT_FRACTION:.0%} of it is the most a setting may use); "
          "md4 compile --fit searches the settings that fit")


def _tokens_per_example(cfg: Config) -> int:
  from md4.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.config_spec(cfg).tokens_per_example


def _libtpu_version(chip: chips.Chip) -> str:
  if chip.platform != "tpu":
    return ""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return f", libtpu {metadata.version('libtpu')}"


# At most this fraction of a chip's memory may be used: the rest is headroom (fragmentation, the
# runtime's own buffers, a changed library).
FIT_FRACTION = 0.9


def run(cfg: Config, slice_name: str, fit: bool, config_name: str,
        log: Callable[[str], None] = print) -> None:
  """`md4 compile`: compiles cfg for the slice and prints the report; with fit, first searches the
  fastest fitting setting (md4/fit.py), prints its overrides and reports it. Raises ValueError with
  the one-line answer when nothing fits or the slice or its compiler is missing."""
  import jax  # pylint: disable=g-import-not-at-top
  sl = chips.get_slice(slice_name)
  jax.config.update("jax_platforms", "cpu")
  devices = slice_devices(sl)
  log(f"md4 compile {config_name} for {sl.name} ({sl.topology}, {len(devices)} devices); "
      "compiling from shapes alone, nothing runs")
  searched = None  # The chosen setting's training step, compiled by the search.
  if fit:
    from md4 import fit as fit_lib  # pylint: disable=g-import-not-at-top
    log(f"searching remat policy, gradient accumulation and FSDP degree for the fastest setting "
        f"that leaves >= {1 - FIT_FRACTION:.0%} of each chip's memory:")
    result = fit_lib.search(cfg, sl, devices, log)
    if result.best is None:
      least = min(result.tried, key=lambda c: c.measured.total_bytes)
      raise ValueError(
          f"nothing fits {sl.name} at global batch {cfg.train.batch_size}: the least memory "
          f"found is {gib(least.measured.total_bytes)} GiB per chip ({least.overrides()}) of "
          f"{gib(FIT_FRACTION * sl.chip.hbm_bytes)} GiB usable; use a larger slice, bfloat16, "
          "a logits chunk, or fewer layers")
    best = result.best
    log(f"fastest that fits ({len(result.tried)} compiles): {best.overrides()}")
    cfg = fit_lib.with_settings(cfg, best.remat, best.accum, best.fsdp)
    searched = best.measured
  compiled = compile_all(cfg, devices, searched)
  log(render(cfg, sl, compiled, model_flops_per_step(cfg)))
