"""The md4 command line.

  md4 train  [--config=configs/demo.py] [--workdir=runs/NAME] [--checkpoint_step=N]
             [--config.KEY=VALUE ...]
  md4 eval   [--config=...] [--workdir=...] [--checkpoint_step=N] [--split=valid]
             [--zero_shot=NAME --source=FILES | --zero_shot=all --source=NAME=FILE,...]
             [--model=DIR]   with --zero_shot: a Hugging Face GPT-2 directory instead of a workdir
  md4 sample [--config=...] [--workdir=...] [--checkpoint_step=N] [--prompt=TEXT | --infill=TEMPLATE]
             [--length=N [--window=W]] [--output=PATH_STEM] [--judge=DIR [--judge_protocol=md4]]
             [--sweep_steps=64,128,... --sweep_methods=...]
  md4 prepare DATASET --data_dir=DIR [--source=FILES] [dataset options]
  md4 info   [--config=...]          parameters, per-module counts, data, FLOPs; allocates nothing
  md4 info   --workdir=DIR           the same for the model in DIR, with its recorded data
  md4 convert --from_reference=DIR [--config=...] [--workdir=...] [--checkpoint_step=N]
             [--tokenizer=SPEC]      a checkpoint of the paper's released code -> one of this project
  md4 convert --from_mdlm=DIR_OR_CKPT --config=configs/mdlm/openwebtext.py [--workdir=...]
             MDLM's released checkpoint (Hugging Face directory or Lightning .ckpt) -> the same
  md4 export --workdir=DIR --to=NEW_DIR [--params=ema|raw] [--checkpoint_step=N]
             a model as a directory to share (config.json, model.safetensors, README.md)
  md4 compile --topology=SLICE [--config=...] [--fit]
             the steps compiled for a TPU slice (or an H100) that is not attached: memory per
             chip, FLOPs, collectives, a roofline estimate; --fit: the fastest setting that fits

A model is read from a workdir (its checkpoints) or from a directory `md4 export` wrote, wherever
--workdir is taken. Without --config, eval, sample, export and info --workdir use the config the
model records, with any --config.KEY=VALUE overrides applied; a model also records its data's spec
and decoding, so sampling, info and zero-shot evaluation read no dataset (md4/standalone.py). Every
path may be relative or start with ~.

Several processes (one per host or GPU): train/eval/sample join them through jax.distributed, with
--coordinator_address, --num_processes and --process_id, or found from SLURM's srun or a Cloud TPU
slice (md4/distributed.py; launch/ has a script per kind of cluster).

The config is read once here, locked, and turned into md4.config.Config; an unknown key is an error.
Every error ends the command with `md4 COMMAND: error: ...` and status 1; the traceback of one md4
did not word itself (storage, a peer, a bug) goes to the workdir's error log, named in that line
(md4/failures.py), not to the terminal.
Samples use cfg.sample (method, steps, top_p, ...), overridable like any key:
--config.sample.method=first_hitting. In --infill templates '_' marks a character to fill.
"""

from __future__ import annotations

import os
import importlib
import pathlib
import sys
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The config files: configs/ of a checkout (or an editable install), else the copy a regular install
# puts in the package as md4.configs (setup.py).
if (REPO_ROOT / "configs").is_dir():
  CONFIG_ROOT = REPO_ROOT / "configs"
  if str(REPO_ROOT) not in sys.path:  # Config files import each other as `configs.*`.
    sys.path.insert(0, str(REPO_ROOT))
else:
  CONFIG_ROOT = pathlib.Path(__file__).resolve().parent / "configs"
  sys.modules.setdefault("configs", importlib.import_module("md4.configs"))

COMMANDS = ("train", "eval", "sample", "info", "convert", "export", "prepare", "compile")
# Commands that read a model from --workdir (info only when --workdir is given), and those that run
# in one process (no distributed set-up).
READS_MODEL = ("eval", "sample", "export")
SINGLE_PROCESS = ("info", "convert", "export", "compile")

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(CONFIG_ROOT / "demo.py"),
    "Config file, optionally with a preset: configs/md4/text8.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics, samples); default runs/<config name>.")
_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "train: resume from this step (default: the newest intact "
    "checkpoint; newer ones are set aside); eval/sample/export: read this step (default: the "
    "latest); convert: the released checkpoint's step.")
_FROM_REFERENCE = flags.DEFINE_string(
    "from_reference", None, "convert: a checkpoint of google-deepmind/md4 (its workdir, "
    "checkpoints/ directory, step directory or train_state directory).")
_FROM_MDLM = flags.DEFINE_string(
    "from_mdlm", None, "convert: an MDLM checkpoint (kuleshov-group/mdlm): a Hugging Face "
    "directory (config.json, model.safetensors; kuleshov-group/mdlm-owt) or a Lightning .ckpt; "
    "with --config=configs/mdlm/openwebtext.py.")
_SPLIT = flags.DEFINE_string("split", None, "eval: the split (default: config.eval.split).")
_ZERO_SHOT = flags.DEFINE_string(
    "zero_shot", None, "eval: a zero-shot test set (lambada, wikitext2, ptb, wikitext103, lm1b) "
    "read from --source=FILES, or 'all' with --source=NAME=FILE,NAME=FILE,...")
_PROMPT = flags.DEFINE_string("prompt", None, "sample: text prefix to continue.")
_JUDGE = flags.DEFINE_string(
    "judge", None, "sample: score the samples' generative perplexity with a judge: a Hugging Face "
    "GPT-2 directory (config.json, model.safetensors, vocab.json, merges.txt) or the workdir of an "
    "autoregressive model of this project (configs/judge_demo.py).")
_JUDGE_PROTOCOL = flags.DEFINE_string(
    "judge_protocol", "md4", "sample --judge: how samples are scored (md4/judge_protocols.py): md4 "
    "(this project's), mdlm (kuleshov-group/mdlm's compute_generative_perplexity) or sedd "
    "(Score-Entropy-Discrete-Diffusion's run_train.py); figures compare within one protocol only.")
_MODEL = flags.DEFINE_string(
    "model", None, "eval --zero_shot: score a Hugging Face GPT-2 directory (config.json, "
    "model.safetensors, vocab.json, merges.txt) with its exact likelihood on the same blocks, "
    "instead of a checkpoint of this project: GPT-2's row of the zero-shot table.")
_SWEEP_STEPS = flags.DEFINE_list(
    "sweep_steps", None, "sample: numbers of steps to sweep (e.g. 64,128,256,1024), printing a "
    "table and a PNG of generative perplexity, entropy and wall time per sampler; needs --judge.")
_SWEEP_METHODS = flags.DEFINE_list(
    "sweep_methods", None, "sample --sweep_steps: the samplers, names of md4.sweep.SAMPLERS "
    "(default: all that apply: ancestral, euler, mean, first_hitting, maskgit, maskgit_greedy, "
    "remdm_cap, remdm_loop; GenMD4 only the first three).")
_SWEEP_GRIDS = flags.DEFINE_list(
    "sweep_grids", None, "sample --sweep_steps: the time grids, uniform and/or cosine (default: "
    "config.sample.time_grid).")
_INFILL = flags.DEFINE_string("infill", None, "sample: template whose '_' characters are filled.")
_LENGTH = flags.DEFINE_integer(
    "length", None, "sample: tokens per text sample, beyond the model's sequence length if wanted: "
    "blocks left to right, each conditioned on the last --window tokens before it.")
_WINDOW = flags.DEFINE_integer(
    "window", None, "sample --length: tokens of context each later block sees (default: half the "
    "model's sequence length).")
_OUTPUT = flags.DEFINE_string("output", None,
                              "sample: output path without extension (default: workdir/samples/).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "prepare: where to write the prepared dataset.")
_SOURCE = flags.DEFINE_list("source", None, "prepare, eval --zero_shot: local input files, "
                            "directories or globs "
                            "(text8: text8.zip; openwebtext, fineweb_edu: parquet/jsonl/txt files; "
                            "imagenet32, imagenet64, imagenet64_resized: the folder of its manual "
                            "download).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "prepare (openwebtext, fineweb_edu; default 'gpt2'), eval --zero_shot "
    "(default: the model's own), convert (recorded with the model; default: the prepared "
    "dataset's, else GPT-2's for its vocabulary): 'gpt2', 'bpe:DIR' or 'sentencepiece:PATH'.")
_TO = flags.DEFINE_string("to", None, "export: the directory to write (must not exist).")
_PARAMS = flags.DEFINE_enum("params", "ema", ["ema", "raw"],
                            "export: the parameters to write: the EMA ones or the raw ones.")
_SEQ_LENGTH = flags.DEFINE_integer("seq_length", None, "prepare: tokens per packed block (1024).")
_HELDOUT = flags.DEFINE_float("heldout_fraction", None,
                              "prepare: fraction of documents held out for evaluation (0.005).")
_SPLIT_SEED = flags.DEFINE_integer("split_seed", None, "prepare: seed of the held-out split (0).")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "compile: the slice, a Cloud TPU accelerator type (v5e-8, v4-8, v5p-128, "
    "v6e-8, ...) or h100, h100-8.")
_FIT = flags.DEFINE_bool("fit", False, "compile: search remat, gradient accumulation and FSDP "
                         "degree for the fastest setting that fits, and print its overrides.")
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


def _prepare(argv):
  from md4.data import prepare
  if len(argv) != 3:
    sys.exit(f"md4 prepare: error: usage: md4 prepare DATASET --data_dir=DIR; datasets: "
             f"{', '.join(prepare.PREPARERS)}")
  if not _DATA_DIR.value:
    sys.exit("md4 prepare: error: md4 prepare needs --data_dir=DIR")
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
    sys.exit(f"md4: error: usage: md4 {{{'|'.join(COMMANDS)}}} [--config=...] [flags]; got "
             f"{' '.join(argv[1:]) or 'no command'}")
  command = argv[1]
  from md4 import distributed, failures, paths
  workdir = paths.resolve(_WORKDIR.value or _default_workdir())
  errors = failures.ErrorLog(workdir, f"md4 {command}")
  errors.capture_background_errors()
  if command == "compile":  # Traced on this host's CPU, compiled for a slice that is not attached.
    from md4 import aot
    aot.prepare_environment()
  try:
    if command not in SINGLE_PROCESS:
      # Several processes (flags, SLURM, a TPU slice): join them before anything touches a device.
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    # With --config, what a command's flags ask is checked before any model is opened.
    cfg = None if _reads_model(command) and not flags.FLAGS["config"].present else _config(None)
    if cfg is not None:
      _check_request(command, cfg)
    model_dir = _model_dir(command, workdir)
    if cfg is None:
      cfg = _config(model_dir)
      _check_request(command, cfg)
    if command != "compile":  # md4 compile checks the config against the slice's devices.
      _check(cfg, model_dir)
    _run_command(command, cfg, workdir, model_dir)
  except (ValueError, FloatingPointError) as e:  # md4's own messages: complete in one line.
    _exit(command, str(e), e)
  except Exception as e:  # pylint: disable=broad-except
    # Storage, a peer or a bug: the line says what and where; the traceback goes to the log.
    log = errors.record(e)
    message = failures.summary(e)
    _exit(command, message + (f" (full traceback in {log})" if log else ""), e)


def _exit(command: str, message: str, error: BaseException) -> None:
  """Prints `md4 COMMAND: error: MESSAGE` and exits 1: at once in a multi-process run (see
  md4.distributed.exit_now_if_multiprocess)."""
  from md4 import distributed
  distributed.exit_now_if_multiprocess(f"md4 {command}", message, error)
  # A save that failed mid-write leaves Orbax's pending fragment writes as coroutines nobody will
  # await; Python warns about each when it collects them at exit, after the one line below.
  warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited",
                          category=RuntimeWarning)
  sys.exit(f"md4 {command}: error: {message}")


def _reads_model(command: str) -> bool:
  """Whether the command reads a model from --workdir (eval --model scores a Hugging Face GPT-2
  instead; info reads one only when given --workdir)."""
  if command == "eval" and _MODEL.value:
    return False
  return command in READS_MODEL or (command == "info" and _WORKDIR.present)


def _model_dir(command: str, workdir: str):
  """The model a command reads (md4.inference.ModelDir), or None for one that reads none."""
  if not _reads_model(command):
    return None
  from md4 import inference
  return inference.open_model(workdir, _STEP.value)


def _sample_request():
  from md4 import paths
  from md4.commands import sample
  return sample.Request(
      prompt=_PROMPT.value, infill=_INFILL.value, length=_LENGTH.value, window=_WINDOW.value,
      output=paths.resolve_optional(_OUTPUT.value), judge=paths.resolve_optional(_JUDGE.value),
      judge_protocol=_JUDGE_PROTOCOL.value, sweep_steps=tuple(_SWEEP_STEPS.value or ()),
      sweep_methods=tuple(_SWEEP_METHODS.value or ()), sweep_grids=tuple(_SWEEP_GRIDS.value or ()))


def _check_request(command: str, cfg) -> None:
  """What the command's own flags ask, against the config, before anything is loaded."""
  if command == "sample":
    from md4.commands import sample
    sample.check(cfg, _sample_request())


def _config(model_dir):
  """--config's config; or, reading a model with no --config given, the model's own with the
  --config.KEY=VALUE overrides. A relative or ~ data.data_dir is made absolute."""
  import dataclasses

  from md4 import config as config_lib
  from md4 import inference, paths
  if model_dir is not None and not flags.FLAGS["config"].present:
    cfg = inference.recorded_config(model_dir,
                                    config_flags.get_override_values(flags.FLAGS["config"]))
  else:
    cfg = config_lib.from_configdict(_CONFIG.value)
  if cfg.data.data_dir:
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, data_dir=paths.resolve(cfg.data.data_dir)))
  return cfg


def _run_command(command, cfg, workdir, model_dir) -> None:
  from md4 import paths
  from md4.commands import evaluate, models, sample
  if command == "train":
    from md4 import train
    train.train(cfg, workdir, checkpoint_step=_STEP.value)
  elif command == "eval":
    if _MODEL.value and not _ZERO_SHOT.value:
      raise ValueError("--model goes with --zero_shot")
    if _ZERO_SHOT.value:
      if _SPLIT.value:
        raise ValueError("--split does not apply to --zero_shot: each test set is scored whole")
      sources = evaluate.zero_shot_sources(_ZERO_SHOT.value, _SOURCE.value or [])
      if _MODEL.value:
        evaluate.zero_shot_causal(cfg, sources, paths.resolve(_MODEL.value), _TOKENIZER.value,
                                  _config_spec())
      else:
        evaluate.zero_shot(cfg, model_dir, sources, _TOKENIZER.value)
    elif _SOURCE.value or _TOKENIZER.value:
      raise ValueError("--source and --tokenizer go with --zero_shot (or md4 prepare)")
    else:
      evaluate.run(cfg, model_dir, _SPLIT.value)
  elif command == "sample":
    sample.run(cfg, model_dir, _sample_request())
  elif command == "info":
    given = model_dir is None or flags.FLAGS["config"].present
    models.info(cfg, _config_spec() if given else f"the one recorded in {model_dir.path}",
                model_dir)
  elif command == "convert":
    models.convert(cfg, workdir, _STEP.value, _TOKENIZER.value,
                   reference=paths.resolve_optional(_FROM_REFERENCE.value),
                   mdlm=paths.resolve_optional(_FROM_MDLM.value))
  elif command == "export":
    models.export(cfg, model_dir, _TO.value, _PARAMS.value)
  elif command == "compile":
    from md4 import aot
    if not _TOPOLOGY.value:
      raise ValueError("--topology=SLICE is required (e.g. v5e-8, v5p-8, h100)")
    aot.run(cfg, _TOPOLOGY.value, _FIT.value, _config_spec())


def _check(cfg, model_dir) -> None:
  """The whole config against the model's data, the devices and the processes, before anything
  runs."""
  import jax

  from md4 import checks, inference
  from md4.data import pipeline
  spec = None if model_dir is None else inference.model_spec(model_dir, cfg)
  if _ZERO_SHOT.value:  # The model reads a tokenizer's ids, checked against it once it is known.
    spec = pipeline.DatasetSpec(cfg.model.vocab_size - cfg.model.extra_tokens,
                                (cfg.data.seq_length,), "text", "token")
  checks.check_config(cfg, spec, num_devices=len(jax.devices()),
                      num_processes=jax.process_count())


def _shipped_config(value: str) -> str:
  """configs/X.py[:presets] names the shipped config X.py from any working directory: a path that
  does not exist here is looked up under CONFIG_ROOT. A leading ~ is expanded."""
  path, sep, presets = value.partition(":")
  path = os.path.expanduser(path)
  if not path.startswith("configs/") or os.path.exists(path):
    return f"{path}{sep}{presets}"
  shipped = CONFIG_ROOT / path[len("configs/"):]
  return f"{shipped}{sep}{presets}" if shipped.exists() else value


def _resolve_config_path(argv: list[str]) -> list[str]:
  """argv with --config's value (as --config=V or --config V) passed through _shipped_config."""
  out = []
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      arg = "--config=" + _shipped_config(arg[len("--config="):])
    elif i and argv[i - 1] == "--config":
      arg = _shipped_config(arg)
    out.append(arg)
  return out


def _parse_flags(argv: list[str]) -> list[str]:
  argv = _resolve_config_path(argv)
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:  # ml_collections: an override names a key that is not there.
    key = str(e).strip("'\"")
    culprits = [a for a in argv if a.startswith("--config.") and f".{key}" in a.split("=")[0]]
    sys.exit(f"md4: unknown config key {key!r} in {' '.join(culprits) or 'a --config override'}")
  except flags.Error as e:
    sys.exit(f"md4: {e}\nusage: md4 {{{'|'.join(COMMANDS)}}} [--config=...] [flags]")


def run():
  from md4 import aot
  aot.quiet_libtpu_without_tpu()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
