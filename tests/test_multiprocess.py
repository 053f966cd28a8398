"""Several processes on one machine (CPU, gloo collectives): the same run as one process, and
bounded failure. Each process is `md4 train` with --coordinator_address, --num_processes and
--process_id on a free localhost port and one CPU device, so the tiny config's global batch is split
between them."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from md4 import config as config_lib
from md4 import checkpoint, distributed, train
from md4.data import pipeline
from md4.metric_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each step logged, with the gradient norm (one more check that the runs compute the same step).
LOG_EVERY_STEP = ["--config.train.log_every=1", "--config.train.log_grad_norm=True"]
RUN_TIMEOUT_S = 300  # Generous: a 2-process tiny run takes ~30 s on 2 busy cores.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir: str, num_processes: int, args: list[str], log_dir: str,
           command: str = "train", prefixes: dict[int, list[str]] | None = None
           ) -> list[subprocess.Popen]:
  """`md4 COMMAND` as num_processes processes on localhost, each with one CPU device; process i runs
  prefixes[i] + its arguments instead of `python -m md4.main` if given."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONUNBUFFERED="1")
  port = _free_port()
  procs = []
  for i in range(num_processes):
    log = open(os.path.join(log_dir, f"process_{i}.log"), "w")
    program = (prefixes or {}).get(i, [sys.executable, "-m", "md4.main"])
    procs.append(subprocess.Popen(
        program + [command, f"--config={ROOT}/configs/tiny.py",
         f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
         f"--num_processes={num_processes}", f"--process_id={i}"] + args,
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env))
    log.close()
  return procs


def _output(log_dir: str, i: int) -> str:
  with open(os.path.join(log_dir, f"process_{i}.log")) as f:
    return f.read()


def _finish(procs: list[subprocess.Popen], log_dir: str) -> None:
  """Waits for every process (bounded) and asserts that each exited 0."""
  deadline = time.monotonic() + RUN_TIMEOUT_S
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{_output(log_dir, i)[-4000:]}"


def _train_records(records):
  return {r["step"]: r for r in records if "train/loss_bits" in r}


def _restore_final(workdir, cfg, setup):
  state = checkpoint.Checkpointer(workdir, cfg, read_only=True).restore(
      train.abstract_state(setup), setup.tx.init).state
  return state


def _assert_same_run(workdir, single_dir, single_state, cfg, setup):
  ours, reference = read_metrics(workdir), read_metrics(single_dir)
  ours_train, reference_train = _train_records(ours), _train_records(reference)
  assert sorted(ours_train) == sorted(reference_train) == [1, 2, 3, 4, 5, 6]
  for step, record in reference_train.items():
    for key in ("train/loss_bits", "train/grad_norm", "train/lr"):
      np.testing.assert_allclose(ours_train[step][key], record[key], rtol=1e-5, err_msg=key)
  evals = [[r["eval/bits_per_char"] for r in rs if "eval/bits_per_char" in r]
           for rs in (ours, reference)]
  np.testing.assert_allclose(evals[0], evals[1], rtol=1e-5)
  state = _restore_final(workdir, cfg, setup)
  assert int(state.step) == 6
  pairs = zip(jax.tree.leaves((state.params, state.ema_params, state.opt_state)),
              jax.tree.leaves((single_state.params, single_state.ema_params,
                               single_state.opt_state)), strict=True)
  for a, b in pairs:
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_two_processes_stopped_and_resumed_match_one_process(tmp_path):
  cd = tiny.get_config()  # 6 steps, checkpoints at 3 and 6.
  cd.train.log_every = 1  # Each step's loss on its own, so a resumed run's records compare too.
  cd.train.log_grad_norm = True
  cfg = config_lib.from_configdict(cd)
  dataset = pipeline.load(cfg.data)
  setup = train.make_setup(cfg, dataset.spec)
  single_dir = str(tmp_path / "single")
  single = train.train(cfg, single_dir, dataset=dataset)

  workdir, logs = str(tmp_path / "two"), str(tmp_path / "logs")
  os.makedirs(logs)
  _finish(_start(workdir, 2, LOG_EVERY_STEP, logs), logs)
  out = _output(logs, 0)
  assert "on 2 device(s)" in out and "eval (valid)" in out
  assert "eval (valid)" not in _output(logs, 1)  # Only process 0 reports.
  _assert_same_run(workdir, single_dir, single.state, cfg, setup)

  # Stopped after the checkpoint at step 3: resume from it, with the metrics written until then.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  kept = [r for r in read_metrics(workdir) if r["step"] <= 3 and "train/loss_bits" in r]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  _finish(_start(workdir, 2, LOG_EVERY_STEP, logs), logs)
  assert "resumed from step 3" in _output(logs, 0)
  _assert_same_run(workdir, single_dir, single.state, cfg, setup)

  # Evaluation and sampling from the checkpoint: computed by both, reported and written by one.
  _finish(_start(workdir, 2, [], logs, "eval"), logs)
  match = re.search(r"^step 6, split valid, continuous-time bound, 1 time sample\(s\) per "
                    r"example: ([0-9.]+) ", _output(logs, 0), re.MULTILINE)
  assert match, _output(logs, 0)[-3000:]
  np.testing.assert_allclose(float(match.group(1)), single.eval.bits_per_token, atol=1e-4)
  assert "split valid" not in _output(logs, 1)
  stem = str(tmp_path / "samples")
  _finish(_start(workdir, 2, [f"--output={stem}"], logs, "sample"), logs)
  assert "2 samples" in _output(logs, 0) and "samples" not in _output(logs, 1)
  lines = open(stem + ".txt").read().splitlines()
  assert len(lines) == 2 and all(len(line) == cfg.data.seq_length for line in lines)


def _start_long_run(tmp_path):
  workdir, logs = str(tmp_path / "run"), str(tmp_path / "logs")
  os.makedirs(logs)
  procs = _start(workdir, 2, ["--config.train.num_steps=100000", "--config.train.log_every=1",
                              "--config.train.checkpoint_every=100000"], logs)
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while len(read_metrics(workdir)) < 3:  # Both processes are in the training loop.
    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
      pytest.fail(f"the run did not start:\n{_output(logs, 0)[-3000:]}\n{_output(logs, 1)[-3000:]}")
    time.sleep(0.2)
  return workdir, logs, procs


@pytest.mark.parametrize("victim", [1, 0], ids=["worker_dies", "coordinator_dies"])
def test_when_one_process_dies_the_other_exits_with_an_error_in_bounded_time(tmp_path, victim):
  _, logs, procs = _start_long_run(tmp_path)
  survivor = 1 - victim
  procs[victim].kill()  # SIGKILL: no chance to say goodbye.
  procs[victim].wait()
  start = time.monotonic()
  try:
    procs[survivor].wait(timeout=150)
  except subprocess.TimeoutExpired:
    procs[survivor].kill()
    pytest.fail(f"process {survivor} hung after process {victim} died")
  elapsed = time.monotonic() - start
  out = _output(logs, survivor)
  assert procs[survivor].returncode != 0, out[-3000:]
  assert elapsed < 2 * distributed.DEFAULT_TIMEOUT_S, f"{elapsed:.0f} s"
  assert ("another process has probably died" in out
          or "JAX distributed service detected fatal errors" in out), out[-3000:]
  print(f"process {survivor} exited {procs[survivor].returncode} {elapsed:.1f} s after process "
        f"{victim} died")


def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
  workdir, logs, procs = _start_long_run(tmp_path)
  procs[1].send_signal(signal.SIGTERM)  # A preemption notice reaching one process only.
  _finish(procs, logs)
  assert "SIGTERM: saved the checkpoint at step" in _output(logs, 0)
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(saved) == 1 and saved[0] >= 3


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
  for var in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "OMPI_MCA_orte_hnp_uri"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False
  assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2, process_id=0), "needs --coordinator_address"),
    (dict(coordinator_address="localhost:1234", num_processes=2), "needs --process_id"),
    (dict(coordinator_address="localhost:1234", process_id=1), "need --num_processes"),
    (dict(num_processes=2, process_id=2, coordinator_address="localhost:1"), r"in \[0, 2\)"),
    (dict(num_processes=0), "at least 1"),
])
def test_initialize_rejects_incomplete_flags(monkeypatch, kwargs, message):
  for var in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "OMPI_MCA_orte_hnp_uri",
              "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  with pytest.raises(ValueError, match=message):
    distributed.initialize(**kwargs)


def test_slurm_step_is_detected_but_not_a_bare_allocation(monkeypatch):
  allocation = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "node[01-04]"}
  for k, v in allocation.items():
    monkeypatch.setenv(k, v)
  monkeypatch.delenv("SLURM_STEP_NODELIST", raising=False)
  assert distributed.detect_num_processes() == (1, "")  # `python` in an sbatch script, no srun.
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[01-04]")
  assert distributed.detect_num_processes() == (4, "slurm")


# `md4 train` as process 1 of a run, killing itself (SIGKILL) in the middle of the checkpoint save of
# step 3: after its arrays are handed to Orbax, before the save's closing barriers.
KILLED_IN_SAVE = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler as handler
from md4 import main

original = handler.BasePyTreeCheckpointHandler.async_save

async def save_then_die(self, directory, *args, **kwargs):
  result = await original(self, directory, *args, **kwargs)
  print("process 1 killing itself mid-save in", directory, flush=True)
  os.kill(os.getpid(), signal.SIGKILL)
  return result

handler.BasePyTreeCheckpointHandler.async_save = save_then_die
sys.argv[0] = "md4"
main.run()
"""


def test_a_peer_killed_during_a_save_ends_the_run_at_once_with_one_line(tmp_path):
  workdir, logs = str(tmp_path / "run"), str(tmp_path / "logs")
  os.makedirs(logs)
  victim_prefix = [sys.executable, "-c", KILLED_IN_SAVE.format(root=ROOT)]
  procs = _start(workdir, 2, ["--config.train.num_steps=6"], logs,
                 prefixes={1: victim_prefix})
  procs[1].wait(timeout=RUN_TIMEOUT_S)
  died = time.monotonic()
  assert procs[1].returncode == -signal.SIGKILL, _output(logs, 1)[-3000:]
  assert "killing itself mid-save" in _output(logs, 1)
  try:
    procs[0].wait(timeout=150)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    pytest.fail(f"process 0 hung after process 1 died mid-save:\n{_output(logs, 0)[-3000:]}")
  elapsed = time.monotonic() - died
  out = _output(logs, 0)
  last = out.strip().splitlines()[-1]
  assert procs[0].returncode == 1, out[-3000:]
  assert re.match(r"md4 train: error in process 0 of 2: could not write the checkpoint of step 3 "
                  r"to .*another process dies.*full traceback in .*md4_errors\.log\)$", last), out
  assert "Traceback" not in out, out[-3000:]
  # Exits well before the heartbeat timeout would have ended it, and without the shutdown barrier.
  assert elapsed < distributed.DEFAULT_TIMEOUT_S / 2, f"{elapsed:.0f} s"
  print(f"process 0 exited {elapsed:.1f} s after process 1 died mid-save")
