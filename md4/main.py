"""The md4 command line.

  md4 train  [--config=configs/demo.py] [--workdir=runs/NAME] [--config.KEY=VALUE ...]
  md4 eval   [--config=...] [--workdir=...] [--checkpoint_step=N] [--split=valid]
  md4 sample [--config=...] [--workdir=...] [--checkpoint_step=N] [--prompt=TEXT | --infill=TEMPLATE]
             [--output=PATH_STEM]
  md4 prepare DATASET --data_dir=DIR [--source=FILES] [dataset options]
  md4 info   [--config=...]          parameters, per-module counts, data, FLOPs; allocates nothing
  md4 convert --from_reference=DIR [--config=...] [--workdir=...] [--checkpoint_step=N]
             a checkpoint of the paper's released code -> a checkpoint of this project

Several processes (one per host or GPU): train/eval/sample join them through jax.distributed, with
--coordinator_address, --num_processes and --process_id, or found from SLURM's srun or a Cloud TPU
slice (md4/distributed.py; launch/ has a script per kind of cluster).

The config is read once here, locked, and turned into md4.config.Config; an unknown key is an error.
Samples use cfg.sample (method, steps, top_p, ...), overridable like any key:
--config.sample.method=first_hitting. In --infill templates '_' marks a character to fill.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Config files import each other as `configs.*` (presets by inheritance).
if (REPO_ROOT / "configs").is_dir() and str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

COMMANDS = ("train", "eval", "sample", "info", "convert", "prepare")

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(REPO_ROOT / "configs" / "demo.py"),
    "Config file, optionally with a preset: configs/md4/text8.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics, samples); default runs/<config name>.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "eval/sample/convert: checkpoint step "
                             "(default: latest).")
_FROM_REFERENCE = flags.DEFINE_string(
    "from_reference", None, "convert: a checkpoint of google-deepmind/md4 (its workdir, "
    "checkpoints/ directory, step directory or train_state directory).")
_SPLIT = flags.DEFINE_string("split", None, "eval: the split (default: config.eval.split).")
_PROMPT = flags.DEFINE_string("prompt", None, "sample: text prefix to continue.")
_INFILL = flags.DEFINE_string("infill", None, "sample: template whose '_' characters are filled.")
_OUTPUT = flags.DEFINE_string("output", None,
                              "sample: output path without extension (default: workdir/samples/).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "prepare: where to write the prepared dataset.")
_SOURCE = flags.DEFINE_list("source", None, "prepare: local input files, directories or globs "
                            "(text8: text8.zip; openwebtext, fineweb_edu: parquet/jsonl/txt files; "
                            "imagenet64, imagenet64_resized: the folder of its manual download).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "prepare (openwebtext, fineweb_edu): 'gpt2' "
                                 "(default) or 'sentencepiece:PATH'.")
_SEQ_LENGTH = flags.DEFINE_integer("seq_length", None, "prepare: tokens per packed block (1024).")
_HELDOUT = flags.DEFINE_float("heldout_fraction", None,
                              "prepare: fraction of documents held out for evaluation (0.005).")
_SPLIT_SEED = flags.DEFINE_integer("split_seed", None, "prepare: seed of the held-out split (0).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "train/eval/sample as several processes: process 0's HOST:PORT "
    "(default: from SLURM / the TPU slice, if any; see launch/README.md).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (default: from SLURM / the TPU slice, else 1).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 .. num_processes - 1 (default: from the launcher).")


def _config_spec() -> str:
  """The --config value as given: FILE[:presets]."""
  flag = flags.FLAGS["config"]
  return str(flag.config_filename if hasattr(flag, "config_filename") else flag.value)


def _default_workdir() -> str:
  path, _, preset = _config_spec().partition(":")
  name = pathlib.Path(path).stem + (f"_{preset}" if preset else "")
  return os.path.join("runs", name)


def _restore_for_inference(cfg, workdir, step):
  """(setup, dataset, params) from a checkpoint; EMA params unless the config says otherwise."""
  import jax

  from md4 import train
  from md4.data import pipeline

  dataset = pipeline.load(cfg.data)
  setup = train.make_setup(cfg, dataset.spec)
  checkpointer = train.Checkpointer(workdir, cfg, read_only=True)
  restored = checkpointer.restore(train.abstract_state(setup), step)
  if restored is None:
    raise app.UsageError(f"no checkpoint in {checkpointer.directory}: train first "
                         f"(md4 train --workdir={workdir})")
  state = restored[0]
  jax.block_until_ready(state)
  return setup, dataset, state


def _train(cfg, workdir):
  from md4 import train
  train.train(cfg, workdir)


def _eval(cfg, workdir):
  import jax

  from md4.evaluate import Evaluator
  setup, dataset, state = _restore_for_inference(cfg, workdir, _STEP.value)
  params = state.ema_params if cfg.eval.use_ema else state.params
  result = Evaluator(setup.network, cfg, setup.mesh)(params, dataset, split=_SPLIT.value)
  if jax.process_index() == 0:
    print(f"step {int(state.step)}, split {_SPLIT.value or cfg.eval.split}: {result.summary()}")


def _sample(cfg, workdir):
  import jax
  import numpy as np

  from md4 import generate, model

  if _PROMPT.value is not None and _INFILL.value is not None:
    raise app.UsageError("give --prompt or --infill, not both")
  setup, dataset, state = _restore_for_inference(cfg, workdir, _STEP.value)
  spec, n = dataset.spec, cfg.sample.num_samples
  if _PROMPT.value is not None:
    init = generate.prompt_init(spec, _PROMPT.value, n, cfg.model.vocab_size)
  elif _INFILL.value is not None:
    init = generate.infill_init(spec, _INFILL.value, n, cfg.model.vocab_size)
  else:
    init = generate.unconditional_init(spec, n, cfg.model.vocab_size)
  labels = generate.default_labels(spec, n, model.is_conditional(cfg))
  params = state.ema_params if cfg.sample.use_ema else state.params
  result = generate.Sampler(setup.network, cfg)(params, jax.random.key(cfg.train.seed + 3), init,
                                                labels)
  samples = np.asarray(result.samples)
  if jax.process_index() != 0:  # Every process samples (a collective computation); one writes.
    return
  stem = _OUTPUT.value or os.path.join(workdir, "samples", f"sample_step_{int(state.step)}")
  path = generate.write_samples(dataset, samples, stem)
  print(f"{n} samples ({cfg.sample.method}, {int(result.num_calls)} network calls) -> {path}")
  if spec.kind == "text":
    for s in samples:
      print(repr(dataset.decode(s)))


def _info(cfg, workdir):
  del workdir
  from md4 import info
  print(info.render(info.describe(cfg), _config_spec()))


def _convert(cfg, workdir):
  from md4 import convert
  from md4.data import pipeline
  if not _FROM_REFERENCE.value:
    raise ValueError("--from_reference=DIR is required: a checkpoint of the released code")
  result = convert.convert_checkpoint(_FROM_REFERENCE.value, cfg, pipeline.get_spec(cfg.data),
                                      workdir, _STEP.value)
  ema = "params and EMA params" if result.has_ema else "params (no EMA in the source; EMA = params)"
  print(f"converted {result.source} (step {result.step}): {ema}, {result.num_params:,} parameters "
        f"-> {result.checkpoint_dir}\n  md4 eval --config=... --workdir={workdir}   "
        "(the optimizer state starts fresh; the released one is not converted)")


def _prepare(argv):
  from md4.data import prepare
  if len(argv) != 3:
    raise app.UsageError(f"usage: md4 prepare DATASET --data_dir=DIR; datasets: "
                         f"{', '.join(prepare.PREPARERS)}")
  if not _DATA_DIR.value:
    raise app.UsageError("md4 prepare needs --data_dir")
  given = {"tokenizer": _TOKENIZER.value, "seq_length": _SEQ_LENGTH.value,
           "heldout_fraction": _HELDOUT.value, "seed": _SPLIT_SEED.value}
  try:
    summary = prepare.prepare(argv[2], _DATA_DIR.value, sources=_SOURCE.value,
                              **{k: v for k, v in given.items() if v is not None})
  except (ValueError, ImportError, RuntimeError) as e:  # ImportError: preparing images needs TF.
    sys.exit(f"md4 prepare: error: {e}")
  print(f"prepared {argv[2]} in {_DATA_DIR.value}: {summary}")


def main(argv):
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file operation at INFO and WARNING.
  if len(argv) >= 2 and argv[1] == "prepare":
    return _prepare(argv)
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: md4 {{{'|'.join(COMMANDS)}}} [--config=...] [flags]; got "
                         f"{' '.join(argv[1:]) or 'no command'}")
  from md4 import config as config_lib
  from md4 import distributed
  try:
    cfg = config_lib.from_configdict(_CONFIG.value)
  except ValueError as e:
    raise app.UsageError(f"bad config: {e}") from None
  workdir = _WORKDIR.value or _default_workdir()
  try:
    # Several processes (flags, SLURM, a TPU slice): join them before anything touches a device.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if argv[1] in ("info", "convert"):  # Single-process commands: no distributed set-up.
      return {"info": _info, "convert": _convert}[argv[1]](cfg, workdir)
    {"train": _train, "eval": _eval, "sample": _sample}[argv[1]](cfg, workdir)
  except (ValueError, FloatingPointError) as e:
    sys.exit(f"md4 {argv[1]}: error: {e}")
  except Exception as e:  # Several processes: exit now rather than wait for peers that may be gone.
    distributed.exit_now_if_multiprocess(f"md4 {argv[1]}", e)
    raise


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:  # ml_collections: an override names a key that is not there.
    key = str(e).strip("'\"")
    culprits = [a for a in argv if a.startswith("--config.") and f".{key}" in a.split("=")[0]]
    sys.exit(f"md4: unknown config key {key!r} in {' '.join(culprits) or 'a --config override'}")
  except flags.Error as e:
    sys.exit(f"md4: {e}\nusage: md4 {{{'|'.join(COMMANDS)}}} [--config=...] [flags]")


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
