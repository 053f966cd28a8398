"""`md4 sample`: unconditional samples, from a prompt or filling a template's blanks, of any length;
scored by a judge; or a sweep of samplers and steps against a judge."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from md4 import generate, inference, judge_protocols
from md4.config import Config


@dataclasses.dataclass(frozen=True)
class Request:
  """What the flags ask of `md4 sample` (md4/main.py documents each)."""
  prompt: str | None = None
  infill: str | None = None
  length: int | None = None
  window: int | None = None
  output: str | None = None  # A path stem; default workdir/samples/sample_step_N.
  judge: str | None = None
  judge_protocol: str = "md4"  # md4/judge_protocols.py.
  sweep_steps: tuple[str, ...] = ()
  sweep_methods: tuple[str, ...] = ()
  sweep_grids: tuple[str, ...] = ()


def check(cfg: Config, request: Request) -> list[int]:
  """The request's combinations checked before anything is loaded; returns the sweep's steps."""
  if cfg.model.objective != "diffusion":
    raise ValueError(f"md4 sample draws from diffusion models; this one is "
                     f"{cfg.model.objective} (a judge: use it with --judge)")
  if request.prompt is not None and request.infill is not None:
    raise ValueError("give --prompt or --infill, not both")
  if (request.sweep_methods or request.sweep_grids) and not request.sweep_steps:
    raise ValueError("--sweep_methods and --sweep_grids go with --sweep_steps")
  conditioned = request.prompt is not None or request.infill is not None
  if request.length is not None and request.sweep_steps:
    raise ValueError("--sweep_steps samples the model's own length; leave out --length")
  if conditioned and (request.sweep_steps or request.judge):
    raise ValueError("--judge and --sweep_steps score unconditional samples, not --prompt or "
                     "--infill ones (the judge would score the given text too)")
  try:
    steps = [int(n) for n in request.sweep_steps]
  except ValueError:
    raise ValueError(f"--sweep_steps takes numbers of steps, got {list(request.sweep_steps)}"
                     ) from None
  if steps and request.judge is None:
    raise ValueError("--sweep_steps needs --judge=DIR (a GPT-2 directory, or the workdir of an "
                     "autoregressive model such as configs/judge_demo.py's)")
  if request.judge_protocol != "md4" and request.judge is None:
    raise ValueError("--judge_protocol goes with --judge")
  judge_protocols.check_protocol(request.judge_protocol, cfg.sample.num_samples)
  return steps


def run(cfg: Config, model_dir: inference.ModelDir, request: Request) -> None:
  from md4.state import inference_params, stream_key
  sweep_steps = check(cfg, request)
  judge = _load_judge(request.judge)
  loaded = inference.load(cfg, model_dir)
  decoder = loaded.decoder
  if judge is not None:
    judge.check_samples(decoder.spec)
    judge_protocols.check_judge(judge, request.judge_protocol)
  state, params = loaded.state, inference_params(loaded.state, cfg, "sample")
  rng = stream_key(cfg.train.seed, "sample")
  spec, n = decoder.spec, cfg.sample.num_samples
  if sweep_steps:
    return _sweep(cfg, model_dir.path, loaded, params, rng, judge, sweep_steps, request)
  length, window = _length_and_window(spec, request)
  init = None
  if request.prompt is not None:
    init = generate.prompt_init(spec, request.prompt, n, cfg.model.vocab_size, length)
  elif request.infill is not None:
    init = generate.infill_init(spec, request.infill, n, cfg.model.vocab_size, length)
  elif length is not None:
    init = generate.unconditional_init(spec, n, cfg.model.vocab_size, length)
  stem = request.output or os.path.join(model_dir.path, "samples",
                                        f"sample_step_{int(state.step)}")
  drawn = generate.draw(generate.Sampler(loaded.network, cfg, window=window), params, rng, decoder,
                        cfg, stem, init)
  if jax.process_index() != 0:
    return
  how = cfg.sample.method + (f", blocks of {spec.example_shape[0]} with a window of {window}"
                             if window is not None else "")
  print(f"{n} samples ({how}, {drawn.num_calls} network calls) -> {drawn.path}")
  if spec.kind == "text":
    for s in drawn.samples:
      print(repr(decoder.decode(s)))
  report = generate.sample_report(decoder, drawn.samples, drawn.labels)
  if report:
    print(report)
  if judge is not None:
    from md4 import judge as judge_lib
    samples = np.asarray(drawn.samples)
    score = judge.score([decoder.decode(s) for s in samples], samples, request.judge_protocol)
    dropped = len(samples) - int(score.kept.sum())
    print(f"judge: {judge.description}\n{judge_protocols.DESCRIPTIONS[score.protocol]}\n"
          f"generative perplexity {score.perplexity:.4g} ({score.protocol} protocol) over "
          f"{score.num_tokens} judge tokens of {len(samples) - dropped} samples"
          f"{f' ({dropped} dropped)' if dropped else ''}; unigram entropy "
          f"{judge_lib.unigram_entropy(samples):.4g} nats (mean over samples)")


def _length_and_window(spec, request: Request) -> tuple[int | None, int | None]:
  """--length and --window checked against the model: (None, None) samples the model's length."""
  if request.length is None:
    if request.window is not None:
      raise ValueError("--window goes with --length")
    return None, None
  if spec.kind != "text":
    raise ValueError(f"--length applies to text models; this one models {spec.kind}s")
  seq_length = spec.example_shape[0]
  if request.length < 1:
    raise ValueError(f"--length={request.length} must be >= 1")
  window = seq_length // 2 if request.window is None else request.window
  if not 0 <= window < seq_length:
    raise ValueError(f"--window={window} must be in [0, {seq_length - 1}]: each block is the "
                     f"model's {seq_length} tokens, the window of context among them")
  return request.length, window


def _load_judge(path: str | None):
  if not path:
    return None
  from md4 import judge as judge_lib
  return judge_lib.load_judge(path)


def _sweep(cfg, workdir, loaded, params, rng, judge, steps, request: Request):
  from md4 import model, sweep
  state, decoder = loaded.state, loaded.decoder
  labels = generate.default_labels(decoder.spec, cfg.sample.num_samples, model.is_conditional(cfg))
  methods = list(request.sweep_methods) or sweep.default_samplers(cfg)
  rows = sweep.run(loaded.network, cfg, params, decoder, judge, steps, methods,
                   list(request.sweep_grids) or [cfg.sample.time_grid], rng, labels,
                   protocol=request.judge_protocol)
  if jax.process_index() != 0:
    return
  stem = request.output or os.path.join(workdir, "samples", f"sweep_step_{int(state.step)}")
  os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
  title = (f"{workdir} step {int(state.step)}: {cfg.sample.num_samples} samples per point; "
           f"{judge.description}")
  report = (f"{title}\n{judge_protocols.DESCRIPTIONS[request.judge_protocol]}\n\n"
            f"{sweep.table(rows, request.judge_protocol)}\n")
  with open(stem + ".md", "w") as f:
    f.write(report)
  sweep.plot(rows, stem + ".png", title)
  print(report + f"-> {stem}.md, {stem}.png")
