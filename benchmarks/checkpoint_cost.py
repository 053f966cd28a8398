"""What the checksums of md4.integrity cost a checkpoint of a config's whole training state.

  python benchmarks/checkpoint_cost.py --config=configs/md4/openwebtext.py --dir=/tmp/ckpt_cost

Builds the config's training state from shapes alone (parameters, AdamW moments, EMA, step, rng;
nothing of the dataset is read), fills it with random normal values (random bits compress no better
than trained weights do), and times, once each, on the devices JAX sees:
  1. the checksums alone (the first call includes their compilation, reported apart);
  2. Checkpointer.save as md4 does it (checksums computed, then Orbax writes);
  3. the same Orbax save without checksums (md4's record lacking them), before and after 2;
  4. the verified restore of the full state (Orbax reads, then the checksums are recomputed).
Prints one table; the saves go to --dir (emptied first).
"""

import argparse
import functools
import importlib.util
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp

from md4 import checkpoint, integrity, main, train
from md4 import config as config_lib
from md4.data import pipeline


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return out, time.perf_counter() - start


def _random_state(abstract):
  """The abstract state filled with N(0, 1) floats (integers zero), each array in its sharding."""
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(0), len(leaves))

  def fill(key, leaf):
    if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
      return jax.jit(functools.partial(jax.random.normal, shape=leaf.shape, dtype=leaf.dtype),
                     out_shardings=leaf.sharding)(key)
    return jax.jit(lambda: jax.numpy.zeros(leaf.shape, leaf.dtype), out_shardings=leaf.sharding)()

  return jax.tree.unflatten(treedef, [fill(k, leaf) for k, leaf in zip(keys, leaves)])


def run(config_path: str, directory: str) -> None:
  module = main._shipped_config(config_path)  # pylint: disable=protected-access
  path, _, preset = module.partition(":")
  spec = importlib.util.spec_from_file_location("benchmarked_config", path)
  loaded = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(loaded)
  cfg = config_lib.from_configdict(loaded.get_config(preset or None))
  setup = train.make_setup(cfg, pipeline.get_spec(cfg.data))
  abstract = train.abstract_state(setup)
  state = _random_state(abstract)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  num_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))

  _, first = _timed(lambda: integrity.checksums(state))
  _, sums = _timed(lambda: integrity.checksums(state))

  shutil.rmtree(directory, ignore_errors=True)
  checkpointer = checkpoint.Checkpointer(directory, cfg)
  meta = checkpoint.seal({"fingerprint": config_lib.state_fingerprint(cfg),
                          "training": config_lib.training_settings(cfg),
                          "config": config_lib.to_dict(cfg)})

  def save_without_sums(step):
    checkpointer.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state.replace(step=state.step + step)),
        data=ocp.args.JsonSave({}), meta=ocp.args.JsonSave(meta)), force=True)
    checkpointer.manager.wait_until_finished()

  # Without, with, without: the first save also pays Orbax's start-up.
  _, without_first = _timed(lambda: save_without_sums(1))
  _, with_sums = _timed(lambda: checkpointer.save(state, {}))
  _, without_sums = _timed(lambda: save_without_sums(2))
  restored, restore = _timed(lambda: checkpointer.restore(abstract, setup.tx.init, 0).state)
  assert int(restored.step) == 0
  on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                os.walk(os.path.join(directory, "checkpoints", "0")) for f in fs)
  print(f"{config_path}: {num_params:,} parameters; state {num_bytes / 2**30:.2f} GiB in "
        f"{len(jax.tree.leaves(state))} arrays (params, mu, nu, EMA, step, rng); "
        f"{on_disk / 2**30:.2f} GiB on disk; {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s)\n"
        "| what | seconds |\n|---|---|\n"
        f"| checksums, first call (compilation included) | {first:.2f} |\n"
        f"| checksums | {sums:.2f} |\n"
        f"| save without checksums (Orbax alone), first save | {without_first:.2f} |\n"
        f"| save with checksums (Checkpointer.save) | {with_sums:.2f} |\n"
        f"| save without checksums (Orbax alone) | {without_sums:.2f} |\n"
        f"| verified restore of the whole state | {restore:.2f} |")
  shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/md4/openwebtext.py")
  parser.add_argument("--dir", default="/tmp/md4_checkpoint_cost")
  args = parser.parse_args()
  run(args.config, args.dir)
