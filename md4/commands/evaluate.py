"""`md4 eval`: the bound on a split of the model's dataset (the data needed, nothing else), or
zero-shot perplexities on local copies of the paper's test sets (the model's own tokenizer)."""

from __future__ import annotations

import jax

from md4 import evaluate, inference
from md4.config import Config
from md4.data import pipeline, tokenizers
from md4.state import inference_params


def run(cfg: Config, model_dir: inference.ModelDir, split: str | None) -> None:
  """Evaluates on `split` (default cfg.eval.split) of cfg's dataset, loaded from cfg.data."""
  if split is not None:
    from md4 import checks
    checks.check_split(cfg, split, "--split")
  dataset = pipeline.load(cfg.data)
  spec = inference.model_spec(model_dir, cfg)
  if spec is not None:
    inference.check_data(spec, dataset.spec, cfg.data.dataset)
  loaded = inference.load(cfg, model_dir, dataset=dataset)
  state = loaded.state
  result = evaluate.Evaluator(loaded.network, cfg, loaded.mesh)(
      inference_params(state, cfg, "eval"), dataset, split=split)
  if jax.process_index() == 0:
    if cfg.model.objective == "autoregressive":
      what = "exact likelihood"
    else:
      what = (f"{cfg.eval.timesteps}-step discrete-time" if cfg.eval.timesteps else
              "continuous-time") + f" bound, {cfg.eval.num_time_samples} time sample(s) per example"
    print(f"step {int(state.step)}, split {split or cfg.eval.split}, {what}: {result.summary()}")


def zero_shot_sources(zero_shot: str, given: list[str]) -> dict[str, list[str]]:
  """--zero_shot=NAME --source=FILES, or --zero_shot=all --source=NAME=FILE,NAME=FILE,...: the
  files of each corpus, every one checked to exist."""
  from md4.data import zero_shot as zs
  if zero_shot != "all":
    zs.corpus(zero_shot)
    sources = {zero_shot: list(given)}
  else:
    sources = {}
    for item in given:
      name, sep, path = item.partition("=")
      if not sep:
        raise ValueError(f"--zero_shot=all takes --source=NAME=FILE,...; got {item!r} (NAME one "
                         f"of {', '.join(zs.CORPORA)})")
      zs.corpus(name)
      sources.setdefault(name, []).append(path)
    if not sources:
      raise ValueError("--zero_shot=all found no --source=NAME=FILE: give the test sets' files")
  return {name: zs.resolve_files(name, sources[name]) for name in zs.CORPORA if name in sources}


def model_tokenizer(cfg: Config, model_dir: inference.ModelDir,
                    given: str | None) -> tuple[tokenizers.Tokenizer, str]:
  """The tokenizer zero-shot evaluation reads text with, and where it came from: --tokenizer, else
  the model's own (recorded with it), else (a checkpoint written before models recorded theirs)
  the prepared dataset's, else GPT-2's."""
  from md4.data import documents
  from md4.standalone import Decoder
  if given:
    return tokenizers.get_tokenizer(given), "--tokenizer"
  if model_dir.description is not None:
    tokenizer = Decoder(model_dir.description, model_dir.path).tokenizer
    if tokenizer is None:
      raise ValueError(f"zero-shot perplexity needs a token-level model; {model_dir.path} models "
                       f"{cfg.data.dataset!r}, which is not tokenized (give --tokenizer=SPEC if "
                       "the model reads a tokenizer's ids)")
    return tokenizer, "the model's own"
  if cfg.data.dataset in ("openwebtext", "fineweb_edu"):
    tokenizer = documents.prepared_tokenizer(cfg.data.data_dir, cfg.data.dataset)
    if tokenizer is not None:
      return tokenizer, f"the one {cfg.data.dataset} was prepared with"
    return tokenizers.get_tokenizer("gpt2"), (
        f"{cfg.data.dataset} is not prepared in data.data_dir={cfg.data.data_dir!r}, so GPT-2's")
  raise ValueError(f"zero-shot perplexity needs a token-level model; dataset "
                   f"{cfg.data.dataset!r} is not tokenized (give --tokenizer=SPEC if the model "
                   "reads a tokenizer's ids)")


def zero_shot(cfg: Config, model_dir: inference.ModelDir, sources: dict[str, list[str]],
              tokenizer_spec: str | None) -> None:
  """Zero-shot perplexities of a token-level model on local copies of the paper's test sets
  (sources: zero_shot_sources' files of each corpus)."""
  from md4.data import zero_shot as zs
  tokenizer, where = model_tokenizer(cfg, model_dir, tokenizer_spec)
  if tokenizer.vocab_size + cfg.model.extra_tokens != cfg.model.vocab_size:
    raise ValueError(f"the tokenizer ({where}: {tokenizer.name}) has {tokenizer.vocab_size} tokens "
                     f"but the model reads {cfg.model.vocab_size - cfg.model.extra_tokens}: give "
                     "the model's own with --tokenizer=SPEC")
  texts = {name: zs.read_rows(name, files) for name, files in sources.items()}
  spec = pipeline.DatasetSpec(tokenizer.vocab_size, (cfg.data.seq_length,), "text", "token")
  loaded = inference.load(cfg, model_dir, spec=spec)
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


def zero_shot_causal(cfg: Config, sources: dict[str, list[str]], model: str,
                     tokenizer_spec: str | None, config_name: str) -> None:
  """Zero-shot perplexities of a Hugging Face GPT-2 (--model=DIR) on cfg's blocks."""
  from md4 import judge as judge_lib
  from md4.data import zero_shot as zs
  if tokenizer_spec:
    raise ValueError("--tokenizer does not go with --model: the model's own tokenizer "
                     "(vocab.json, merges.txt of DIR) is used")
  gpt2 = judge_lib.GPT2Judge(model)
  texts = {name: zs.read_rows(name, files) for name, files in sources.items()}
  if jax.process_index() == 0:
    print(f"{gpt2.description}, tokenizer {gpt2.tokenizer.name}, blocks of {cfg.data.seq_length} "
          f"(data.seq_length of {config_name}); each document detokenized, tokenized, followed "
          f"by EOS; each block read after the start token; perplexity = exp(total nats / total "
          f"tokens) of the exact likelihood, ± its standard error over blocks\n"
          f"{evaluate.ZERO_SHOT_HEADER}", flush=True)
  for name, rows in texts.items():
    row = evaluate.causal_zero_shot_row(gpt2, name, rows, cfg.data.seq_length)
    if jax.process_index() == 0:
      print(evaluate.zero_shot_line(row), flush=True)
