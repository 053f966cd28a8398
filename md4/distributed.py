"""Joining a multi-process run: JAX's distributed runtime, started only for several processes.

  md4 train --coordinator_address=HOST:PORT --num_processes=N --process_id=I ...   # explicit
  srun md4 train ...         # SLURM: count, id and coordinator from SLURM_NTASKS, SLURM_PROCID, ...
  md4 train ...              # on every worker of a multi-host Cloud TPU slice: TPU metadata

initialize() must run before anything touches a JAX device. It calls jax.distributed.initialize
when, and only when, more than one process is expected: explicitly (num_processes > 1) or by the
launcher's environment, found as JAX's own cluster detection finds it (an srun step of more than
one task, Open MPI's mpirun, a Cloud TPU VM slice of several hosts). A plain single-process run,
`python` inside an salloc or sbatch allocation without srun included, never waits for a
coordinator.

Failure is bounded. JAX's coordination service (in process 0) expects heartbeats from every
process; one silent for `timeout_s` seconds is declared dead and every survivor is terminated
("Terminating process because the JAX distributed service detected fatal errors ... another task
died") instead of hanging in a collective. The shutdown barrier at exit waits at most `timeout_s`
for the others, and start-up waits at most `init_timeout_s` for every process to connect. On CPU a
collective whose peer died fails at once (gloo sees the closed socket), and so does a checkpoint
save whose peer died (Orbax's barrier fails); md4's CLI then exits 1 at once, after its one-line
message (exit_now_if_multiprocess), without waiting at the shutdown barrier for peers that are gone.
"""

from __future__ import annotations

import math
import os
import sys

import jax

# Seconds: a process silent this long is dead; also the longest wait at the shutdown barrier.
DEFAULT_TIMEOUT_S = 60
# Seconds for every process to reach the coordinator at start-up (nodes may boot minutes apart).
DEFAULT_INIT_TIMEOUT_S = 300


def _slurm_processes() -> int:
  """Tasks in this srun step (the variables JAX's SlurmCluster reads); 0 outside srun."""
  if not all(v in os.environ for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                                       "SLURM_PROCID", "SLURM_LOCALID")):
    return 0
  return int(os.environ["SLURM_NTASKS"])


def _ompi_processes() -> int:
  """Processes started by Open MPI's mpirun (what JAX's OmpiCluster detects); 0 otherwise."""
  if "OMPI_MCA_orte_hnp_uri" not in os.environ:
    return 0
  return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))


def _tpu_processes() -> int:
  """Hosts in this Cloud TPU slice (GCE TPU VM or GKE) as JAX counts them; 0 off TPU VMs."""
  try:
    from jax._src.clusters import cloud_tpu_cluster  # What jax.distributed.initialize detects.
  except ImportError:
    return 0
  for env in (cloud_tpu_cluster.GkeTpuCluster, cloud_tpu_cluster.GceTpuCluster):
    # False without TPU chips and libtpu here: no metadata request on other machines.
    if env.is_env_present():
      return env.get_process_count()
  return 0


def detect_num_processes() -> tuple[int, str]:
  """(processes the launcher started, the launcher's name), or (1, "") when none is detected."""
  for name, count in (("slurm", _slurm_processes), ("ompi", _ompi_processes),
                      ("tpu", _tpu_processes)):
    n = count()
    if n:
      return n, name
  return 1, ""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = DEFAULT_TIMEOUT_S,
               init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S) -> bool:
  """Starts JAX's distributed runtime if this run has several processes; returns whether it did.

  Args:
    coordinator_address: "host:port" of process 0, where it serves the coordination service (the
      same in every process). None: from the launcher (SLURM's first node, the TPU metadata) or
      the JAX_COORDINATOR_ADDRESS environment variable.
    num_processes: the number of processes. None: from the launcher, else 1 (nothing to start).
    process_id: this process's index in [0, num_processes). None: from the launcher.
    timeout_s: a process silent this long is declared dead and the others are stopped with an
      error; also the longest wait for the others at the shutdown barrier.
    init_timeout_s: the longest wait for every process to connect at start-up.

  Raises:
    ValueError: inconsistent arguments, or several processes and no way to know the coordinator or
      this process's index.
    RuntimeError: from JAX, if a device was touched before (initialize must come first).
  """
  if jax.distributed.is_initialized():
    return True
  detected, launcher = detect_num_processes()
  if num_processes is None:
    if detected == 1 and (coordinator_address is not None or process_id is not None):
      raise ValueError(f"--coordinator_address={coordinator_address} --process_id={process_id} "
                       "need --num_processes (no SLURM step, mpirun or multi-host TPU slice was "
                       "detected to tell it)")
    num_processes = detected
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be at least 1")
  if process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must lie in [0, {num_processes})")
  if num_processes == 1:
    return False
  if not launcher:  # Nothing to fill in what the flags leave out.
    if coordinator_address is None and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
      raise ValueError(f"--num_processes={num_processes} needs --coordinator_address=HOST:PORT "
                       "(process 0's host and a free port, the same in every process)")
    if process_id is None:
      raise ValueError(f"--num_processes={num_processes} needs --process_id, a different one in "
                       f"each process: 0 .. {num_processes - 1}")
  # Cross-process collectives on CPU (the all-reduce of gradients, gathers) go over TCP with gloo;
  # without an implementation a multi-process CPU run fails at its first collective.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # The CPU client exchanges device topologies through the coordinator; bound those waits too (in
  # whole minutes, the global one strictly longer than the local one).
  minutes = max(1, math.ceil(timeout_s / 60))
  jax.config.update("jax_cpu_get_local_topology_timeout_minutes", minutes)
  jax.config.update("jax_cpu_get_global_topology_timeout_minutes", minutes + 1)
  jax.distributed.initialize(
      coordinator_address, num_processes, process_id, initialization_timeout=init_timeout_s,
      heartbeat_timeout_seconds=timeout_s, shutdown_timeout_seconds=timeout_s)
  return True


def exit_now_if_multiprocess(prefix: str, message: str, error: BaseException) -> None:
  """In a multi-process run: prints `PREFIX: error in process I of N: MESSAGE` and ends this process
  now, status 1, whatever the error (a config error, a failed save, a failed collective).

  An error there usually means a peer died (a collective or a barrier inside a checkpoint save
  failed), or makes the peers wait for this process; a normal exit would then sit at JAX's shutdown
  barrier for up to timeout_s waiting for processes that are gone, and die by SIGABRT there, while
  exiting at once lets the peers fail fast too. In a single-process run it returns, and the caller
  exits as usual.
  """
  if not jax.distributed.is_initialized():
    return
  try:
    where = f"process {jax.process_index()} of {jax.process_count()}"
  except Exception:  # The backend itself failed to start.
    where = "a multi-process run"
  hint = ""
  if isinstance(error, jax.errors.JaxRuntimeError):
    hint = ("; a computation across processes failed: another process has probably died or "
            "stopped; see its log")
  sys.stdout.flush()
  sys.stderr.write(f"{prefix}: error in {where}: {message}{hint}\n")
  sys.stderr.flush()
  os._exit(1)
