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
  md4 convert --from_reference=DIR [--config=...] [--workdir=...] [--checkpoint_step=N]
             a checkpoint of the paper's released code -> a checkpoint of this project
  md4 convert --from_mdlm=DIR_OR_CKPT --config=configs/mdlm/openwebtext.py [--workdir=...]
             MDLM's released checkpoint (Hugging Face directory or Lightning .ckpt) -> the same

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

COMMANDS = ("train", "eval", "sample", "info", "convert", "prepare")

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(CONFIG_ROOT / "demo.py"),
    "Config file, optionally with a preset: configs/md4/text8.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics, samples); default runs/<config name>.")
_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "train: resume from this step (default: the newest intact "
    "checkpoint; newer ones are set aside); eval/sample: read this step (default: the latest); "
    "convert: the released checkpoint's step.")
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
                            "imagenet64, imagenet64_resized: the folder of its manual download).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "prepare (openwebtext, fineweb_edu; default 'gpt2'), eval --zero_shot "
    "(default: the prepared dataset's, else 'gpt2'): 'gpt2', 'bpe:DIR' or 'sentencepiece:PATH'.")
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
  """(inference, dataset) from a checkpoint, with the config's dataset loaded."""
  from md4 import checkpoint
  from md4.data import pipeline
  dataset = pipeline.load(cfg.data)
  return checkpoint.load_for_inference(cfg, dataset.spec, workdir, step), dataset


def _train(cfg, workdir):
  from md4 import train
  train.train(cfg, workdir, checkpoint_step=_STEP.value)


def _eval(cfg, workdir):
  import jax

  from md4.evaluate import Evaluator
  if _ZERO_SHOT.value:
    return _zero_shot(cfg, workdir)
  if _MODEL.value:
    raise ValueError("--model goes with --zero_shot")
  if _SOURCE.value or _TOKENIZER.value:
    raise ValueError("--source and --tokenizer go with --zero_shot (or md4 prepare)")
  if _SPLIT.value is not None:
    from md4 import checks
    checks.check_split(cfg, _SPLIT.value, "--split")
  from md4.state import inference_params
  loaded, dataset = _restore_for_inference(cfg, workdir, _STEP.value)
  state = loaded.state
  result = Evaluator(loaded.network, cfg, loaded.mesh)(inference_params(state, cfg, "eval"),
                                                       dataset, split=_SPLIT.value)
  if jax.process_index() == 0:
    if cfg.model.objective == "autoregressive":
      what = "exact likelihood"
    else:
      what = (f"{cfg.eval.timesteps}-step discrete-time" if cfg.eval.timesteps else
              "continuous-time") + f" bound, {cfg.eval.num_time_samples} time sample(s) per example"
    print(f"step {int(state.step)}, split {_SPLIT.value or cfg.eval.split}, {what}: "
          f"{result.summary()}")


def _zero_shot_sources() -> dict[str, list[str]]:
  """--zero_shot=NAME --source=FILES, or --zero_shot=all --source=NAME=FILE,NAME=FILE,...: the
  files of each corpus, every one checked to exist."""
  from md4.data import zero_shot
  given = _SOURCE.value or []
  if _ZERO_SHOT.value != "all":
    zero_shot.corpus(_ZERO_SHOT.value)
    sources = {_ZERO_SHOT.value: list(given)}
  else:
    sources = {}
    for item in given:
      name, sep, path = item.partition("=")
      if not sep:
        raise ValueError(f"--zero_shot=all takes --source=NAME=FILE,...; got {item!r} (NAME one "
                         f"of {', '.join(zero_shot.CORPORA)})")
      zero_shot.corpus(name)
      sources.setdefault(name, []).append(path)
    if not sources:
      raise ValueError("--zero_shot=all found no --source=NAME=FILE: give the test sets' files")
  return {name: zero_shot.resolve_files(name, sources[name])
          for name in zero_shot.CORPORA if name in sources}


def _zero_shot(cfg, workdir):
  """Zero-shot perplexities of a token-level model on local copies of the paper's test sets."""
  import jax

  from md4 import checkpoint, evaluate
  from md4.data import documents, pipeline, tokenizers
  from md4.data import zero_shot as zs

  if _SPLIT.value:
    raise ValueError("--split does not apply to --zero_shot: each test set is scored whole")
  sources = _zero_shot_sources()
  if _MODEL.value:
    return _zero_shot_causal(cfg, sources)
  if _TOKENIZER.value:
    tokenizer, where = tokenizers.get_tokenizer(_TOKENIZER.value), "--tokenizer"
  elif cfg.data.dataset in ("openwebtext", "fineweb_edu"):
    tokenizer = documents.prepared_tokenizer(cfg.data.data_dir, cfg.data.dataset)
    where = f"the one {cfg.data.dataset} was prepared with"
    if tokenizer is None:
      tokenizer, where = tokenizers.get_tokenizer("gpt2"), f"{cfg.data.dataset} is not prepared in "
      where += f"data.data_dir={cfg.data.data_dir!r}, so GPT-2's"
  else:
    raise ValueError(f"zero-shot perplexity needs a token-level model; dataset "
                     f"{cfg.data.dataset!r} is not tokenized (give --tokenizer=SPEC if the model "
                     "reads a tokenizer's ids)")
  if tokenizer.vocab_size + cfg.model.extra_tokens != cfg.model.vocab_size:
    raise ValueError(f"the tokenizer ({where}: {tokenizer.name}) has {tokenizer.vocab_size} tokens "
                     f"but the model reads {cfg.model.vocab_size - cfg.model.extra_tokens}: give "
                     "the model's own with --tokenizer=SPEC")
  texts = {name: zs.read_rows(name, files) for name, files in sources.items()}
  spec = pipeline.DatasetSpec(tokenizer.vocab_size, (cfg.data.seq_length,), "text", "token")
  from md4.state import inference_params
  loaded = checkpoint.load_for_inference(cfg, spec, workdir, _STEP.value)
  state, params = loaded.state, inference_params(loaded.state, cfg, "eval")
  evaluator = evaluate.Evaluator(loaded.network, cfg, loaded.mesh)
  likelihood = ("the exact likelihood" if cfg.model.objective == "autoregressive" else
                "the bound (<=)")
  if jax.process_index() == 0:
    print(f"step {int(state.step)}, tokenizer {tokenizer.name}, blocks of {cfg.data.seq_length}; "
          f"each document detokenized, tokenized, followed by EOS; perplexity = exp(total nats / "
          f"total tokens) of {likelihood}, ± its standard error over blocks\n"
          f"{evaluate.ZERO_SHOT_HEADER}", flush=True)
  for name, rows in texts.items():
    row = evaluate.zero_shot_row(evaluator, params, name, rows, tokenizer, cfg.data.seq_length,
                                 spec.vocab_size)
    if jax.process_index() == 0:
      print(evaluate.zero_shot_line(row), flush=True)


def _zero_shot_causal(cfg, sources):
  """Zero-shot perplexities of a Hugging Face GPT-2 (--model=DIR) on cfg's blocks."""
  import jax

  from md4 import evaluate, judge as judge_lib
  from md4.data import zero_shot as zs
  if _TOKENIZER.value:
    raise ValueError("--tokenizer does not go with --model: the model's own tokenizer "
                     "(vocab.json, merges.txt of DIR) is used")
  gpt2 = judge_lib.GPT2Judge(_MODEL.value)
  texts = {name: zs.read_rows(name, files) for name, files in sources.items()}
  if jax.process_index() == 0:
    print(f"{gpt2.description}, tokenizer {gpt2.tokenizer.name}, blocks of {cfg.data.seq_length} "
          f"(data.seq_length of {_config_spec()}); each document detokenized, tokenized, followed "
          f"by EOS; each block read after the start token; perplexity = exp(total nats / total "
          f"tokens) of the exact likelihood, ± its standard error over blocks\n"
          f"{evaluate.ZERO_SHOT_HEADER}", flush=True)
  for name, rows in texts.items():
    row = evaluate.causal_zero_shot_row(gpt2, name, rows, cfg.data.seq_length)
    if jax.process_index() == 0:
      print(evaluate.zero_shot_line(row), flush=True)


def _sample(cfg, workdir):
  import jax

  from md4 import generate

  import numpy as np

  if cfg.model.objective != "diffusion":
    raise ValueError(f"md4 sample draws from diffusion models; this one is "
                     f"{cfg.model.objective} (a judge: use it with --judge)")
  if _PROMPT.value is not None and _INFILL.value is not None:
    raise ValueError("give --prompt or --infill, not both")
  if (_SWEEP_METHODS.value or _SWEEP_GRIDS.value) and not _SWEEP_STEPS.value:
    raise ValueError("--sweep_methods and --sweep_grids go with --sweep_steps")
  conditioned = _PROMPT.value is not None or _INFILL.value is not None
  if _LENGTH.value is not None and _SWEEP_STEPS.value:
    raise ValueError("--sweep_steps samples the model's own length; leave out --length")
  if conditioned and (_SWEEP_STEPS.value or _JUDGE.value):
    raise ValueError("--judge and --sweep_steps score unconditional samples, not --prompt or "
                     "--infill ones (the judge would score the given text too)")
  try:
    sweep_steps = [int(n) for n in _SWEEP_STEPS.value or []]
  except ValueError:
    raise ValueError(f"--sweep_steps takes numbers of steps, got {_SWEEP_STEPS.value}") from None
  if sweep_steps and _JUDGE.value is None:
    raise ValueError("--sweep_steps needs --judge=DIR (a GPT-2 directory, or the workdir of an "
                     "autoregressive model such as configs/judge_demo.py's)")
  if _JUDGE_PROTOCOL.value != "md4" and _JUDGE.value is None:
    raise ValueError("--judge_protocol goes with --judge")
  from md4 import judge_protocols
  judge_protocols.check_protocol(_JUDGE_PROTOCOL.value, cfg.sample.num_samples)
  from md4.state import inference_params, stream_key
  judge = _load_judge()
  loaded, dataset = _restore_for_inference(cfg, workdir, _STEP.value)
  if judge is not None:
    judge.check_samples(dataset.spec)
    judge_protocols.check_judge(judge, _JUDGE_PROTOCOL.value)
  state, params = loaded.state, inference_params(loaded.state, cfg, "sample")
  rng = stream_key(cfg.train.seed, "sample")
  spec, n = dataset.spec, cfg.sample.num_samples
  if sweep_steps:
    return _sweep(cfg, workdir, loaded, dataset, params, rng, judge, sweep_steps)
  length, window = _length_and_window(spec)
  init = None
  if _PROMPT.value is not None:
    init = generate.prompt_init(spec, _PROMPT.value, n, cfg.model.vocab_size, length)
  elif _INFILL.value is not None:
    init = generate.infill_init(spec, _INFILL.value, n, cfg.model.vocab_size, length)
  elif length is not None:
    init = generate.unconditional_init(spec, n, cfg.model.vocab_size, length)
  stem = _OUTPUT.value or os.path.join(workdir, "samples", f"sample_step_{int(state.step)}")
  drawn = generate.draw(generate.Sampler(loaded.network, cfg, window=window), params, rng, dataset,
                        cfg, stem, init)
  if jax.process_index() != 0:
    return
  how = cfg.sample.method + (f", blocks of {spec.example_shape[0]} with a window of {window}"
                             if window is not None else "")
  print(f"{n} samples ({how}, {drawn.num_calls} network calls) -> {drawn.path}")
  if spec.kind == "text":
    for s in drawn.samples:
      print(repr(dataset.decode(s)))
  if judge is not None:
    from md4 import judge as judge_lib
    samples = np.asarray(drawn.samples)
    score = judge.score([dataset.decode(s) for s in samples], samples, _JUDGE_PROTOCOL.value)
    dropped = len(samples) - int(score.kept.sum())
    print(f"judge: {judge.description}\n{judge_protocols.DESCRIPTIONS[score.protocol]}\n"
          f"generative perplexity {score.perplexity:.4g} ({score.protocol} protocol) over "
          f"{score.num_tokens} judge tokens of {len(samples) - dropped} samples"
          f"{f' ({dropped} dropped)' if dropped else ''}; unigram entropy "
          f"{judge_lib.unigram_entropy(samples):.4g} nats (mean over samples)")


def _length_and_window(spec) -> tuple[int | None, int | None]:
  """--length and --window checked against the model: (None, None) samples the model's length."""
  if _LENGTH.value is None:
    if _WINDOW.value is not None:
      raise ValueError("--window goes with --length")
    return None, None
  if spec.kind != "text":
    raise ValueError(f"--length applies to text models; this one models {spec.kind}s")
  seq_length = spec.example_shape[0]
  if _LENGTH.value < 1:
    raise ValueError(f"--length={_LENGTH.value} must be >= 1")
  window = seq_length // 2 if _WINDOW.value is None else _WINDOW.value
  if not 0 <= window < seq_length:
    raise ValueError(f"--window={window} must be in [0, {seq_length - 1}]: each block is the "
                     f"model's {seq_length} tokens, the window of context among them")
  return _LENGTH.value, window


def _load_judge():
  if not _JUDGE.value:
    return None
  from md4 import judge as judge_lib
  return judge_lib.load_judge(_JUDGE.value)


def _sweep(cfg, workdir, loaded, dataset, params, rng, judge, steps):
  import jax

  from md4 import generate, model, sweep
  state = loaded.state
  labels = generate.default_labels(dataset.spec, cfg.sample.num_samples, model.is_conditional(cfg))
  methods = _SWEEP_METHODS.value or sweep.default_samplers(cfg)
  rows = sweep.run(loaded.network, cfg, params, dataset, judge, steps, methods,
                   _SWEEP_GRIDS.value or [cfg.sample.time_grid], rng, labels,
                   protocol=_JUDGE_PROTOCOL.value)
  if jax.process_index() != 0:
    return
  stem = _OUTPUT.value or os.path.join(workdir, "samples", f"sweep_step_{int(state.step)}")
  os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
  title = (f"{workdir} step {int(state.step)}: {cfg.sample.num_samples} samples per point; "
           f"{judge.description}")
  from md4 import judge_protocols
  report = (f"{title}\n{judge_protocols.DESCRIPTIONS[_JUDGE_PROTOCOL.value]}\n\n"
            f"{sweep.table(rows, _JUDGE_PROTOCOL.value)}\n")
  with open(stem + ".md", "w") as f:
    f.write(report)
  sweep.plot(rows, stem + ".png", title)
  print(report + f"-> {stem}.md, {stem}.png")


def _info(cfg, workdir):
  del workdir
  from md4 import info
  print(info.render(info.describe(cfg), _config_spec()))


def _convert(cfg, workdir):
  from md4 import convert
  from md4.data import pipeline
  if _FROM_MDLM.value:
    return _convert_mdlm(cfg, workdir)
  if not _FROM_REFERENCE.value:
    raise ValueError("--from_reference=DIR (a checkpoint of the released code) or --from_mdlm=PATH "
                     "(an MDLM checkpoint) is required")
  result = convert.convert_checkpoint(_FROM_REFERENCE.value, cfg, pipeline.get_spec(cfg.data),
                                      workdir, _STEP.value)
  ema = "params and EMA params" if result.has_ema else "params (no EMA in the source; EMA = params)"
  print(f"converted {result.source} (step {result.step}): {ema}, {result.num_params:,} parameters "
        f"-> {result.checkpoint_dir}\n  md4 eval --config=... --workdir={workdir}   "
        "(the optimizer state starts fresh; the released one is not converted)")


def _convert_mdlm(cfg, workdir):
  from md4 import convert_mdlm
  from md4.data import pipeline
  if _FROM_REFERENCE.value:
    raise ValueError("give --from_reference or --from_mdlm, not both")
  if _STEP.value is not None:
    raise ValueError("--checkpoint_step does not apply to --from_mdlm: an MDLM checkpoint holds "
                     "one step")
  result = convert_mdlm.convert_checkpoint(_FROM_MDLM.value, cfg, pipeline.get_spec(cfg.data),
                                           workdir)
  ema = ("params and EMA params" if result.has_ema else
         "params (no EMA weights in the source; EMA = params)")
  print(f"converted MDLM {result.source} (step {result.step}): {ema}, {result.num_params:,} "
        f"parameters -> {result.checkpoint_dir}\n  md4 eval --config=... --workdir={workdir}   "
        "(the optimizer state starts fresh)")


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
  from md4 import config as config_lib
  from md4 import distributed, failures
  try:
    cfg = config_lib.from_configdict(_CONFIG.value)
  except ValueError as e:
    sys.exit(f"md4 {command}: error: {e}")
  workdir = _WORKDIR.value or _default_workdir()
  errors = failures.ErrorLog(workdir, f"md4 {command}")
  errors.capture_background_errors()
  try:
    if command in ("info", "convert"):  # Single-process commands: no distributed set-up.
      _check(cfg)
      return {"info": _info, "convert": _convert}[command](cfg, workdir)
    # Several processes (flags, SLURM, a TPU slice): join them before anything touches a device.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    _check(cfg)
    {"train": _train, "eval": _eval, "sample": _sample}[command](cfg, workdir)
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
  sys.exit(f"md4 {command}: error: {message}")


def _check(cfg) -> None:
  """The whole config against the dataset, the devices and the processes, before anything runs."""
  import jax

  from md4 import checks
  from md4.data import pipeline
  spec = None
  if _ZERO_SHOT.value:  # The model reads a tokenizer's ids, checked against it once it is known.
    spec = pipeline.DatasetSpec(cfg.model.vocab_size - cfg.model.extra_tokens,
                                (cfg.data.seq_length,), "text", "token")
  checks.check_config(cfg, spec, num_devices=len(jax.devices()),
                      num_processes=jax.process_count())


def _shipped_config(value: str) -> str:
  """configs/X.py[:presets] names the shipped config X.py from any working directory: a path that
  does not exist here is looked up under CONFIG_ROOT."""
  path, sep, presets = value.partition(":")
  if not path.startswith("configs/") or os.path.exists(path):
    return value
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
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
