"""A damaged checkpoint, a full disk or a second run in the same workdir loses nothing.

The tiny config is trained once (checkpoints at steps 3, 6 and 9); each case copies that workdir,
damages the checkpoint of step 9 as a bad disk or a careless hand would, and runs a reader (eval,
sample) or the trainer on it. Every case ends in one line or an announced fallback to step 6, never
in a silently different result, and leaves the files of steps 3 and 6 byte-identical (and the
damaged step's files too: set aside, not rewritten).
"""

import errno
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from configs import tiny
from md4 import checkpoint, failures, integrity, train, workdir_lock
from md4 import config as config_lib
from md4.data import pipeline
from md4.metric_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
STEPS = (3, 6, 9)


def tiny_cfg(**changes) -> config_lib.Config:
  cd = tiny.get_config()
  cd.train.num_steps = 9
  for key, value in changes.items():
    group, name = key.split(".", 1)
    cd[group][name] = value
  return config_lib.from_configdict(cd)


def _hashes(root) -> dict[str, str]:
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _step_hashes(workdir, steps=(3, 6)) -> dict[int, dict[str, str]]:
  return {s: _hashes(os.path.join(workdir, "checkpoints", str(s))) for s in steps}


def _leaves(state, fields=("params", "opt_state", "ema_params", "rng", "step")):
  return [np.asarray(x) for f in fields for x in jax.tree.leaves(getattr(state, f))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(cfg, workdir, the uninterrupted 9-step result): checkpoints at 3, 6 and 9."""
  cfg = tiny_cfg()
  workdir = str(tmp_path_factory.mktemp("storage") / "run")
  result = train.train(cfg, workdir)
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == list(STEPS)
  return cfg, workdir, result


@pytest.fixture
def copy(run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(run[1], workdir)
  return workdir


# The faults, each applied to one checkpoint's directory, and what the message must say was wrong.
# The byte-level ones hit the stored bytes of an array the readers read (READ_ARRAY): which arrays
# share a data file of the OCDBT store depends on how TensorStore batched the save's concurrent
# writes, which varies from run to run (more under load), so "the largest data file" may hold only
# optimizer state, which readers rightly do not read.
READ_ARRAY = "params.net.embed.embedding"


def _ocdbt_entries(kv, location, prefix=b""):
  """(key, entry) of every leaf entry of the OCDBT b-tree below the node at `location`; keys in a
  subtree are stored without its common prefix."""
  node = ts.ocdbt.dump(kv, location).result()
  for entry in node["entries"]:
    if "location" in entry:  # An interior node's child.
      yield from _ocdbt_entries(kv, entry["location"],
                                prefix + entry.get("subtree_common_prefix", b""))
    else:
      yield prefix + entry["key"], entry


def _stored_bytes(step_dir, array=READ_ARRAY):
  """(data file, offset, length) of the bytes of `array` (one chunk in the tiny config), as the
  b-tree of the state's OCDBT store, which readers follow, records them."""
  state = os.path.join(step_dir, "state")
  kv = ts.KvStore.open({"driver": "file", "path": state + "/"}).result()
  root = ts.ocdbt.dump(kv).result()["versions"][-1]["root"]["location"]
  for key, entry in _ocdbt_entries(kv, root):
    if key.decode().startswith(array + "/") and "indirect_value" in entry:
      # "value:<base directory>:d/<file>:<offset>:<length>"
      _, base, name, offset, length = entry["indirect_value"].split(":")
      return pathlib.Path(state, base, name), int(offset), int(length)
  raise AssertionError(f"no stored bytes of {array} in the OCDBT store of {state}")


def flip_bytes(step_dir):
  """One byte set to 0x01 at ten offsets of an array's stored bytes (bad sectors, bit flips)."""
  path, start, length = _stored_bytes(step_dir)
  data = bytearray(path.read_bytes())
  for offset in range(start + length // 20, start + length, length // 10):
    data[offset] = 0x01 if data[offset] != 0x01 else 0x02
  path.write_bytes(bytes(data))


def random_bytes(step_dir):
  """The data file holding an array's bytes overwritten with random bytes."""
  path, _, _ = _stored_bytes(step_dir)
  path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def truncate(step_dir):
  """The data file holding an array's bytes cut short in the middle of them."""
  path, start, length = _stored_bytes(step_dir)
  os.truncate(path, start + length // 2)


def no_orbax_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def no_md4_record(step_dir):
  os.remove(os.path.join(step_dir, "meta", "metadata"))


def truncated_md4_record(step_dir):
  path = os.path.join(step_dir, "meta", "metadata")
  os.truncate(path, os.path.getsize(path) // 2)


def edited_md4_record(step_dir):
  """A hand edit of md4's record that leaves valid JSON: a different learning rate."""
  path = os.path.join(step_dir, "meta", "metadata")
  with open(path) as f:
    meta = json.load(f)
  meta["training"]["optimizer.lr"] *= 10
  with open(path, "w") as f:
    json.dump(meta, f)


def opt_entry_missing(step_dir):
  """One optimizer moment's entry deleted from Orbax's _METADATA (a partial write of that file)."""
  path = os.path.join(step_dir, "state", "_METADATA")
  with open(path) as f:
    meta = json.load(f)
  key = next(k for k in meta["tree_metadata"] if k.startswith("('opt_state'") and "'mu'" in k)
  del meta["tree_metadata"][key]
  with open(path, "w") as f:
    json.dump(meta, f)


def value_changed(step_dir):
  """A valid Orbax state whose one parameter differs by one ulp from what was saved: what only the
  checksums can see."""
  path = os.path.join(step_dir, "state")
  reader = ocp.PyTreeCheckpointer()
  tree = reader.metadata(path).item_metadata.tree
  state = reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
  embedding = state["params"]["net"]["embed"]["embedding"]
  embedding.flat[5] = np.nextafter(embedding.flat[5], np.float32(np.inf))
  shutil.rmtree(path)
  reader.save(path, state)


FAULTS = {
    "flipped_bytes": (flip_bytes, r"(arrays read differ from their checksums at save time|reading "
                                  r"its arrays failed|Orbax cannot read the metadata)"),
    "random_bytes": (random_bytes, r"reading its arrays failed: .*(ZSTD|corrupt|Error reading)"),
    "truncated_file": (truncate, r"reading its arrays failed: .*(OUT_OF_RANGE|not valid|Error "
                                 r"reading)"),
    "no_orbax_metadata": (no_orbax_metadata, r"Orbax cannot read the metadata of the state in "
                                             r".*/9/state: FileNotFoundError: Metadata file "
                                             r"\(named _METADATA\) does not exist"),
    "no_md4_record": (no_md4_record, r"md4's record .*/9/meta/metadata is missing"),
    "truncated_md4_record": (truncated_md4_record, r"md4's record .*/9/meta/metadata is unreadable: "
                                                   r"JSONDecodeError"),
    "edited_md4_record": (edited_md4_record, r"md4's record .* differs from its digest at save "
                                             r"time"),
    "opt_entry_missing": (opt_entry_missing, r"reading its arrays failed: .*(do not match|structure)"),
    "value_changed": (value_changed, r"1 of the \d+ arrays read differ from their checksums at save "
                                     r"time \(params\.net\.embed\.embedding\)"),
}
# Faults in what readers do not read (the optimizer state): eval and sample are right to succeed.
READERS_UNAFFECTED = {"opt_entry_missing"}


def _damage(workdir, fault, step=9):
  FAULTS[fault][0](os.path.join(workdir, "checkpoints", str(step)))


def test_checksums_change_with_every_single_bit_flip_and_match_numpy():
  rng = np.random.default_rng(0)
  arrays = {"f32": rng.standard_normal((3, 5)).astype(np.float32),
            "i32": rng.integers(-2**31, 2**31, (7,), dtype=np.int64).astype(np.int32),
            "bf16": jax.numpy.asarray(rng.standard_normal((2, 3)), jax.numpy.bfloat16)}
  base = integrity.checksums(arrays)
  words = np.asarray(arrays["f32"]).view(np.uint32).ravel().astype(np.uint64)
  weights = 2 * np.arange(words.size, dtype=np.uint64) + 1
  assert base["f32"].split(":")[0] == f"{int((weights * words).sum() % 2**32):08x}"
  for name, array in arrays.items():
    array = np.asarray(array)
    bits = array.dtype.itemsize * 8
    unsigned = array.view(f"u{array.dtype.itemsize}")
    for index in range(array.size):
      for bit in range(bits):
        flipped = unsigned.copy().ravel()
        flipped[index] ^= np.array(1 << bit, dtype=unsigned.dtype)
        changed = integrity.checksums({name: jax.numpy.asarray(
            flipped.view(array.dtype).reshape(array.shape))})[name]
        sums, before = changed.split(":"), base[name].split(":")
        assert sums[0] != before[0] and sums[1] != before[1], (name, index, bit)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_readers_refuse_a_damaged_checkpoint_naming_the_newest_intact_step(run, copy, fault):
  cfg, _, _ = run
  _damage(copy, fault)
  before = _step_hashes(copy, STEPS)
  spec = pipeline.get_spec(cfg.data)
  if fault in READERS_UNAFFECTED:
    damaged = checkpoint.load_for_inference(cfg, spec, copy).state
    intact = checkpoint.load_for_inference(cfg, spec, run[1]).state
    for a, b in zip(_leaves(damaged, ("params", "ema_params", "step")),
                    _leaves(intact, ("params", "ema_params", "step")), strict=True):
      np.testing.assert_array_equal(a, b)
  else:
    with pytest.raises(failures.CheckpointUnreadable) as error:
      checkpoint.load_for_inference(cfg, spec, copy)
    message = str(error.value)
    assert re.match(r"the checkpoint at step 9 in .*/checkpoints cannot be restored: ", message)
    assert re.search(FAULTS[fault][1], message), message
    assert message.endswith("; the newest intact checkpoint is step 6: read it with "
                            "--checkpoint_step=6"), message
    assert "\n" not in message
    assert int(checkpoint.load_for_inference(cfg, spec, copy, 6).state.step) == 6
  assert _step_hashes(copy, STEPS) == before


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_training_falls_back_to_the_newest_intact_checkpoint_saying_why(run, copy, fault):
  cfg, _, _ = run
  _damage(copy, fault)
  setup = train.make_setup(cfg, pipeline.get_spec(cfg.data))
  restored = checkpoint.Checkpointer(copy, cfg).restore(train.abstract_state(setup),
                                                        setup.tx.init)
  assert int(restored.state.step) == 6
  assert [e.step for e in restored.skipped] == [9]
  assert re.search(FAULTS[fault][1], restored.skipped[0].reason), restored.skipped[0].reason
  assert not any("starts fresh" in note for note in restored.notes), restored.notes


def test_a_resumed_run_sets_the_damaged_step_aside_and_reaches_the_uninterrupted_state(
    run, copy, capsys):
  """The whole path once: damaged step 9 and a killed save's leftover -> resume from 6, the damaged
  files moved unchanged, metrics.jsonl with each step once, and the uninterrupted run's state."""
  cfg, _, uninterrupted = run
  _damage(copy, "value_changed")
  damaged = _hashes(os.path.join(copy, "checkpoints", "9"))
  kept = _step_hashes(copy)
  leftover = os.path.join(copy, "checkpoints", "12.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(leftover, "state"))
  capsys.readouterr()
  result = train.train(cfg, copy)
  log = capsys.readouterr().out
  assert f"removed {leftover}: the partial save of a run that was killed while saving" in log
  assert not os.path.exists(leftover)
  aside = os.path.join(copy, "checkpoints_set_aside", "9")
  assert re.search(r"set aside the checkpoint at step 9, moved unchanged to " + re.escape(aside) +
                   r": it cannot be restored: 1 of the \d+ arrays read differ", log), log
  assert "resumed from step 6" in log
  assert _hashes(aside) == damaged
  assert _step_hashes(copy) == kept
  for a, b in zip(_leaves(uninterrupted.state), _leaves(result.state), strict=True):
    np.testing.assert_array_equal(a, b)
  records = read_metrics(copy)
  train_steps = [r["step"] for r in records if "train/loss_bits" in r]
  assert train_steps == [2, 4, 6, 8, 9]
  assert [r["step"] for r in records if "eval/bits_per_char" in r] == [9]
  np.testing.assert_allclose([r["eval/bits_per_char"] for r in records if "eval/bits_per_char" in r],
                             [uninterrupted.eval.bits_per_token], rtol=1e-6)


def test_every_checkpoint_damaged_is_refused_rather_than_restarted(run, copy):
  cfg, _, _ = run
  for step, fault in zip(STEPS, ("truncated_md4_record", "value_changed", "random_bytes")):
    _damage(copy, fault, step)
  before = _step_hashes(copy, STEPS)
  with pytest.raises(failures.StorageError, match=r"no checkpoint in .*/checkpoints can be "
                                                  r"restored \(step 9: reading its arrays failed.*; "
                                                  r"step 6: 1 of the .*; step 3: md4's record .*\); "
                                                  r"starting afresh would overwrite them"):
    train.train(cfg, copy)
  assert _step_hashes(copy, STEPS) == before
  assert not os.path.exists(os.path.join(copy, workdir_lock.LOCK_NAME))


def test_train_checkpoint_step_resumes_from_it_or_is_refused(run, copy, capsys):
  cfg, _, uninterrupted = run
  with pytest.raises(ValueError, match=r"no checkpoint at step 7 in .*; steps there: \[3, 6, 9\]"):
    train.train(cfg, copy, checkpoint_step=7)
  _damage(copy, "no_md4_record", 3)
  with pytest.raises(failures.CheckpointUnreadable, match=r"step 3 .* md4's record .* is missing; "
                                                          r"leave out --checkpoint_step"):
    train.train(cfg, copy, checkpoint_step=3)
  intact_9 = _hashes(os.path.join(copy, "checkpoints", "9"))
  capsys.readouterr()
  result = train.train(cfg, copy, checkpoint_step=6)
  log = capsys.readouterr().out
  assert "resumed from step 6" in log
  assert (f"set aside the checkpoint at step 9, moved unchanged to {copy}/checkpoints_set_aside/9: "
          "--checkpoint_step=6 resumes from an older step") in log
  assert _hashes(os.path.join(copy, "checkpoints_set_aside", "9")) == intact_9
  for a, b in zip(_leaves(uninterrupted.state), _leaves(result.state), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_failed_save_is_one_error_naming_the_cause_and_the_last_good_step(run, copy,
                                                                            monkeypatch, code):
  """A write that fails inside Orbax's save (injected in its JSON writer, which runs after the
  arrays are written): the partial directory is removed and older checkpoints stay as they were."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  cfg, _, _ = run
  kept = _step_hashes(copy, STEPS)
  setup = train.make_setup(cfg, pipeline.get_spec(cfg.data))
  checkpointer = checkpoint.Checkpointer(copy, cfg)
  restored = checkpointer.restore(train.abstract_state(setup), setup.tx.init)

  async def failing_write(self, x, directory):
    raise OSError(code, os.strerror(code), str(directory))

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", failing_write)
  state = restored.state.replace(step=restored.state.step + 3)
  with pytest.raises(failures.SaveFailed) as error:
    checkpointer.save(state, restored.data_state)
  message = str(error.value)
  space = " (the disk or quota is full)" if code == errno.ENOSPC else ""
  assert message.startswith(f"could not write the checkpoint of step 12 to {copy}/checkpoints"
                            f"{space}: {os.strerror(code).lower()}: "), message
  assert message.endswith(f"its partial directory {copy}/checkpoints/12.orbax-checkpoint-tmp was "
                          f"removed; the last good checkpoint is step 9 in {copy}/checkpoints")
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["3", "6", "9"]
  assert _step_hashes(copy, STEPS) == kept


# --- The command line: one line on the terminal, the traceback in the workdir's error log. ---

def _md4(*args, prefix=None, timeout=300):
  program = prefix or [sys.executable, "-m", "md4.main"]
  return subprocess.run(program + list(args), capture_output=True, text=True, env=ENV, cwd=ROOT,
                        timeout=timeout)


@pytest.mark.parametrize("command,fault", [("eval", "random_bytes"),
                                           ("sample", "truncated_md4_record")])
def test_cli_readers_print_one_line_and_log_the_traceback(run, copy, command, fault):
  _damage(copy, fault)
  out = _md4(command, f"--config={ROOT}/configs/tiny.py", f"--workdir={copy}")
  assert out.returncode == 1
  log = os.path.join(copy, "md4_errors.log")
  assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
  assert re.fullmatch(
      rf"md4 {command}: error: the checkpoint at step 9 in {copy}/checkpoints cannot be "
      rf"restored: .*{FAULTS[fault][1]}.*; the newest intact checkpoint is step 6: read it with "
      rf"--checkpoint_step=6 \(full traceback in {re.escape(log)}\)\n", out.stderr), out.stderr
  with open(log) as f:
    assert "Traceback (most recent call last)" in f.read()


# Trains the tiny config with a file size limit (RLIMIT_FSIZE) set just before the save of step 6: a
# real failure of the write system calls below TensorStore (EFBIG where a full disk gives ENOSPC; the
# same path through TensorStore, Orbax and md4), without root or a small filesystem.
WRITES_FAIL_AT_STEP_6 = r"""
import resource, signal, sys
sys.path.insert(0, {root!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Writes past the limit fail instead of killing us.
from md4 import checkpoint, main

original = checkpoint.Checkpointer.save

def save(self, state, data_state):
  if int(state.step) != 6:
    return original(self, state, data_state)
  resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))
  try:
    return original(self, state, data_state)
  finally:  # Room again for the error log.
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

checkpoint.Checkpointer.save = save
sys.argv[0] = "md4"
main.run()
"""


def test_cli_a_write_failure_during_a_save_is_one_line_and_loses_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  out = _md4("train", f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
             "--config.train.num_steps=9",
             prefix=[sys.executable, "-c", WRITES_FAIL_AT_STEP_6.format(root=ROOT)])
  assert out.returncode == 1
  assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
  assert re.fullmatch(
      rf"md4 train: error: could not write the checkpoint of step 6 to {workdir}/checkpoints: "
      r"file too large.*; its partial directory .*/6\.orbax-checkpoint-tmp "
      rf"was removed; the last good checkpoint is step 3 in {workdir}/checkpoints \(full traceback "
      r"in .*md4_errors\.log\)\n", out.stderr), out.stderr
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))


def test_cli_a_second_train_on_a_workdir_in_use_is_refused_in_one_line(copy):
  """This test process plays the running trainer: a lock file with its live pid and a fresh
  heartbeat."""
  holder = workdir_lock.WorkdirLock(copy, "md4 train")
  holder.acquire()
  try:
    before = _hashes(copy)
    out = _md4("train", f"--config={ROOT}/configs/tiny.py", f"--workdir={copy}",
               "--config.optimizer.lr=0.01")
    after = _hashes(copy)
    holder.heartbeat()
    holder.check()  # Still ours.
  finally:
    holder.release()
  assert out.returncode == 1
  assert re.fullmatch(
      rf"md4 train: error: the workdir {copy} is in use by md4 train on host "
      rf"{re.escape(socket.gethostname())}, pid {os.getpid()}, running since \S+ \(last heartbeat "
      r"\d+ s ago\): wait for it to end or use another --workdir; its lock .*md4\.lock is taken "
      r"over automatically once that process is gone\n", out.stderr), out.stderr
  del before[workdir_lock.LOCK_NAME], after[workdir_lock.LOCK_NAME]  # Its heartbeat moves on.
  assert after == before  # Checkpoints and metrics untouched.
  assert not os.path.exists(os.path.join(copy, workdir_lock.LOCK_NAME))


# --- The lock on its own (no JAX): contenders, dead holders, stale heartbeats. ---

CONTENDER = r"""
import os, sys, time
sys.path.insert(0, {root!r})
from md4 import workdir_lock
lock = workdir_lock.WorkdirLock({workdir!r}, log=lambda m: None)
while time.time() < {start}:
  time.sleep(0.001)
try:
  lock.acquire()
except workdir_lock.WorkdirInUse as e:
  print("refused", e)
  sys.exit(0)
print("acquired", flush=True)
# Held until the test has seen the other contender's answer (or a minute): however late a loaded
# machine starts that one, it finds the lock held.
deadline = time.time() + 60
while not os.path.exists({release!r}) and time.time() < deadline:
  time.sleep(0.01)
lock.release()
"""


def test_two_contenders_started_together_get_one_lock(tmp_path):
  workdir, release = tmp_path / "run", tmp_path / "release"
  start = time.time() + 1.5
  procs = [subprocess.Popen([sys.executable, "-c", CONTENDER.format(
      root=ROOT, workdir=str(workdir), start=start, release=str(release))],
      stdout=subprocess.PIPE, text=True) for _ in range(2)]
  deadline = time.monotonic() + 60
  while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
    time.sleep(0.01)  # Until one contender has answered and exited (the refused one).
  release.touch()
  outs = sorted(p.communicate(timeout=60)[0].split()[0] for p in procs)
  assert outs == ["acquired", "refused"]
  assert not os.path.exists(workdir / workdir_lock.LOCK_NAME)


def _write_lock(workdir, **fields):
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": "md4 train",
            "started": time.time() - 100, "started_text": "earlier", "heartbeat": time.time(),
            "token": "theirs"}
  holder.update(fields)
  with open(os.path.join(workdir, workdir_lock.LOCK_NAME), "w") as f:
    json.dump(holder, f)


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


@pytest.mark.parametrize("fields,reason", [
    ({"pid": "dead"}, "that process is gone"),
    ({"host": "elsewhere", "heartbeat": time.time() - 2 * workdir_lock.STALE_S},
     r"its last heartbeat is \d+ s old \(stale after \d+ s\)"),
])
def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_message(tmp_path, fields, reason):
  fields = {k: (_dead_pid() if v == "dead" else v) for k, v in fields.items()}
  _write_lock(tmp_path, **fields)
  messages = []
  lock = workdir_lock.WorkdirLock(str(tmp_path), log=messages.append)
  lock.acquire()
  try:
    assert len(messages) == 1 and re.search(r"took over the lock of .* from md4 train on host "
                                            r".*: " + reason, messages[0]), messages
    with open(tmp_path / workdir_lock.LOCK_NAME) as f:
      assert json.load(f)["pid"] == os.getpid()
  finally:
    lock.release()


def test_a_holder_that_missed_two_heartbeats_is_waited_for_then_taken_over(tmp_path, monkeypatch):
  """Its heartbeat 0.5 s old (two beats of 0.2 s missed): waited for until it is STALE_S = 2 s old,
  so at least 1.5 s after it was written (timed from before it was written, and with 1.5 s for a
  loaded machine to reach the first look, which must see it not yet stale)."""
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.2)
  monkeypatch.setattr(workdir_lock, "STALE_S", 2.0)
  messages = []
  start = time.monotonic()
  _write_lock(tmp_path, host="elsewhere", heartbeat=time.time() - 0.5)
  lock = workdir_lock.WorkdirLock(str(tmp_path), log=messages.append)
  lock.acquire()
  lock.release()
  assert 1.5 <= time.monotonic() - start < 6
  assert re.search(r"heartbeat stopped \d+ s ago: waiting until it is 2 s old", messages[0])
  assert "took over the lock" in messages[1] and len(messages) == 2, messages


def test_a_live_lock_on_another_host_is_refused_and_a_lost_lock_stops_the_holder(tmp_path):
  _write_lock(tmp_path, host="elsewhere", pid=1)
  with pytest.raises(workdir_lock.WorkdirInUse, match=r"in use by md4 train on host elsewhere, "
                                                      r"pid 1, running since earlier"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  os.remove(tmp_path / workdir_lock.LOCK_NAME)
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  lock.acquire()
  lock.heartbeat()
  lock.check()  # Still ours.
  _write_lock(tmp_path, host="elsewhere", pid=2)  # Taken over while we looked dead.
  lock.heartbeat()
  with pytest.raises(workdir_lock.WorkdirInUse, match=r"taken over by md4 train on host elsewhere, "
                                                      r"pid 2"):
    lock.check()
  lock.release()
  assert json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())["pid"] == 2  # Not ours to remove.


def test_a_holder_whose_lock_was_taken_over_stops_at_its_next_check_without_a_heartbeat(
    tmp_path, monkeypatch):
  """A holder suspended past STALE_S and taken over resumes: the check before its next save reads
  the lock file itself, so it stops even if its heartbeat thread has not run since."""
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 3600.0)  # The thread does not beat here.
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  lock.acquire()
  try:
    lock.check()  # Still ours.
    _write_lock(tmp_path, host="elsewhere", pid=2)  # Taken over while this process was suspended.
    with pytest.raises(workdir_lock.WorkdirInUse, match=r"taken over by md4 train on host "
                                                        r"elsewhere, pid 2"):
      lock.check()
  finally:
    lock.release()
  assert json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())["pid"] == 2  # Not ours.
  os.remove(tmp_path / workdir_lock.LOCK_NAME)
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  lock.acquire()
  os.remove(tmp_path / workdir_lock.LOCK_NAME)  # Removed by hand, or by a takeover half done.
  with pytest.raises(workdir_lock.WorkdirInUse, match=r"taken over by nobody \(its file was "
                                                      r"removed\)"):
    lock.check()
  lock.release()


def test_causes_are_named_in_plain_words_from_python_and_tensorstore_errors():
  full = ValueError('OUT_OF_RANGE: Error writing local file "/w/x": Failed to write 8 bytes to file '
                    "11: No space left on device [os_error_code='28']")
  assert failures.describe(full).startswith("no space left on device: ValueError: OUT_OF_RANGE")
  assert failures.is_out_of_space(full)
  denied = OSError(errno.EACCES, "Permission denied", "/w/checkpoints")
  try:
    raise RuntimeError("wrapped") from denied
  except RuntimeError as e:
    assert failures.describe(e) == "permission denied: /w/checkpoints"
    assert not failures.is_out_of_space(e)


def test_readers_ignore_and_keep_a_partial_save_left_by_a_killed_run(run, copy):
  cfg, _, uninterrupted = run
  leftover = pathlib.Path(copy, "checkpoints", "12.orbax-checkpoint-tmp", "state")
  leftover.mkdir(parents=True)
  (leftover / "half_written").write_bytes(b"\0" * 100)
  before = _hashes(copy)
  state = checkpoint.load_for_inference(cfg, pipeline.get_spec(cfg.data), copy).state
  assert int(state.step) == 9
  for a, b in zip(_leaves(state, ("params", "ema_params")),
                  _leaves(uninterrupted.state, ("params", "ema_params")), strict=True):
    np.testing.assert_array_equal(a, b)
  assert _hashes(copy) == before
