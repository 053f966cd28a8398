"""Generative-perplexity protocols: how samples become a judge's tokens and one figure.

The papers this project's numbers are set beside each score samples their own way, so a figure is
comparable only with figures of the same protocol. Each protocol here follows its source line by
line (the judge's forward pass is the same in all three; md4/judge.py):

"md4" (this project's, the default)
    Each sample is decoded to text and retokenised by the judge; the text is cut at literal
    end-of-text markers ("<|endoftext|>"), each piece scored as a text of its own, the markers
    themselves not scored. A piece is read in windows of the judge's context, each window after
    the judge's start token (GPT-2: its end-of-text token), so every token of a piece is scored,
    the first one included. Figure: exp(total NLL / total scored tokens) over all samples
    (pooled).
"mdlm" (kuleshov-group/mdlm, diffusion.py: `eval_retokenize` and `compute_generative_perplexity`,
    as `main.py`'s `generate_samples` calls it)
    Each sample is decoded to text and retokenised by the judge's tokenizer as a Hugging Face
    GPT-2 tokenizer does it (a literal marker becomes the end-of-text id, EOS), truncated to the
    generating model's length (`max_length`, the rest dropped), and padded with EOS to the longest
    of the samples. No start token is added. The padded rows are split into chunks of the judge's
    context (1024 for GPT-2), each chunk read on its own; within a chunk the first token is context
    only, and a later position is scored if its token is not EOS or it is the chunk's first EOS
    (counting position 0, so a chunk that opens with EOS scores no EOS); the context runs on across
    EOS. Samples after the last full batch of min(8, N) are dropped (eval.perplexity_batch_size = 8
    in configs/config.yaml). Figure: exp(total NLL / total scored tokens) (a torchmetrics
    MeanMetric weighted by the mask: pooled).
"sedd" (louaaron/Score-Entropy-Discrete-Diffusion, run_train.py, the "Generative Perplexity"
    block)
    No retokenisation: the sample's own ids are fed to the judge, so the model's tokenizer must
    be the judge's. Every position but the first is scored (logits[..., :-1] against s[..., 1:]),
    EOS included. Each sample's perplexity is exp(mean NLL over its L - 1 scored tokens); the figure
    is their mean over the samples, in batches of 32 (eval.perplexity_batch_size in
    configs/config.yaml): samples after the last full batch are dropped, and fewer than 32 samples
    cannot be scored (SEDD's code would divide by zero batches).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

MDLM_BATCH_SIZE = 8  # kuleshov-group/mdlm configs/config.yaml eval.perplexity_batch_size.
# Score-Entropy-Discrete-Diffusion configs/config.yaml eval.perplexity_batch_size.
SEDD_BATCH_SIZE = 32


class JudgeScore(NamedTuple):
  """A protocol's scores: per sample, and the figure the protocol reports."""
  protocol: str
  sample_nll: np.ndarray  # float64[N]: nats over each sample's scored tokens (0 if dropped).
  sample_tokens: np.ndarray  # int64[N]: each sample's scored tokens (0 if dropped).
  kept: np.ndarray  # bool[N]: the samples the protocol scores.

  @property
  def nll(self) -> float:
    """Total nats over all scored tokens."""
    return float(self.sample_nll[self.kept].sum())

  @property
  def num_tokens(self) -> int:
    return int(self.sample_tokens[self.kept].sum())

  @property
  def pooled_perplexity(self) -> float:
    """exp(total NLL / total scored tokens)."""
    return math.exp(self.nll / self.num_tokens) if self.num_tokens else math.nan

  @property
  def sample_perplexities(self) -> np.ndarray:
    """float64[N]: exp(a sample's NLL / its scored tokens); nan for a dropped or empty sample."""
    with np.errstate(divide="ignore", invalid="ignore"):
      per = np.exp(self.sample_nll / self.sample_tokens)
    return np.where(self.kept & (self.sample_tokens > 0), per, np.nan)

  @property
  def perplexity(self) -> float:
    """The figure the protocol reports: pooled ("md4", "mdlm") or the mean of the samples'
    perplexities ("sedd")."""
    if self.protocol == "sedd":
      return float(np.mean(self.sample_perplexities[self.kept]))
    return self.pooled_perplexity


class _Rows(NamedTuple):
  """Rows for a judge: it scores targets[n, i] after inputs[n, :i + 1], weighted."""
  inputs: list[list[int]]
  targets: list[list[int]]
  weights: list[list[float]]
  owner: list[int]  # The sample each row belongs to.


def _score_rows(judge: Any, rows: _Rows, num_samples: int, kept: np.ndarray,
                protocol: str) -> JudgeScore:
  nll = np.zeros(num_samples, np.float64)
  tokens = np.zeros(num_samples, np.int64)
  if rows.inputs:
    width = max(len(r) for r in rows.inputs)
    inputs = np.zeros((len(rows.inputs), width), np.int32)
    targets = np.zeros_like(inputs)
    weights = np.zeros(inputs.shape, np.float64)
    for n, (x, y, w) in enumerate(zip(rows.inputs, rows.targets, rows.weights)):
      inputs[n, :len(x)], targets[n, :len(y)], weights[n, :len(w)] = x, y, w
    per_row = (judge.position_nll(inputs, targets).astype(np.float64) * weights).sum(-1)
    np.add.at(nll, rows.owner, per_row)
    np.add.at(tokens, rows.owner, weights.sum(-1).astype(np.int64))
  return JudgeScore(protocol, nll, tokens, kept)


def _md4(judge, texts: Sequence[str], samples: np.ndarray | None) -> JudgeScore:
  del samples  # Retokenised from the texts.
  rows = _Rows([], [], [], [])
  size = judge.context  # The start token takes the place of a window's last token.
  for n, text in enumerate(texts):
    for piece in judge.pieces(text):
      for start in range(0, len(piece), size):
        window = piece[start:start + size]
        rows.inputs.append([judge.bos_id] + window[:-1])
        rows.targets.append(window)
        rows.weights.append([1.0] * len(window))
        rows.owner.append(n)
  return _score_rows(judge, rows, len(texts), np.ones(len(texts), bool), "md4")


def check_judge(judge: Any, protocol: str) -> None:
  """Raises ValueError unless `judge` can score under `protocol` ("mdlm", "sedd": GPT-2 only)."""
  check_protocol(protocol)
  if protocol != "md4":
    _needs_gpt2(judge, protocol)


def _needs_gpt2(judge, protocol: str) -> None:
  if not hasattr(judge, "encode_with_markers"):
    raise ValueError(f"--judge_protocol={protocol} is defined for a GPT-2 judge (its end-of-text "
                     f"token and tokenizer); {judge.description} takes --judge_protocol=md4")


def _mdlm(judge, texts: Sequence[str], samples: np.ndarray | None) -> JudgeScore:
  _needs_gpt2(judge, "mdlm")
  if samples is None:
    raise ValueError("the mdlm protocol truncates the retokenised text to the generating model's "
                     "length: give the samples' ids")
  max_length = np.shape(samples)[1]
  eos = judge.eos_id
  ids = [judge.encode_with_markers(t)[:max_length] for t in texts]
  width = max((len(i) for i in ids), default=0)  # padding=True: to the longest sample.
  num_kept = len(texts) // min(MDLM_BATCH_SIZE, len(texts)) * min(MDLM_BATCH_SIZE, len(texts))
  rows = _Rows([], [], [], [])
  for n in range(num_kept):
    padded = ids[n] + [eos] * (width - len(ids[n]))
    for start in range(0, width, judge.context):
      chunk = padded[start:start + judge.context]
      first_eos = chunk.index(eos) if eos in chunk else -1
      scored = [float(tok != eos or j == first_eos) for j, tok in enumerate(chunk)]
      rows.inputs.append(chunk)
      rows.targets.append(chunk[1:] + [eos])  # Position j predicts token j + 1.
      rows.weights.append(scored[1:] + [0.0])
      rows.owner.append(n)
  return _score_rows(judge, rows, len(texts), np.arange(len(texts)) < num_kept, "mdlm")


def _sedd(judge, texts: Sequence[str], samples: np.ndarray | None) -> JudgeScore:
  _needs_gpt2(judge, "sedd")
  if samples is None:
    raise ValueError("the sedd protocol feeds the samples' own ids to the judge: give them")
  samples = np.asarray(samples)
  num, length = samples.shape[0], int(np.prod(samples.shape[1:]))
  samples = samples.reshape(num, length)
  check_protocol("sedd", num)
  if length > judge.context:
    raise ValueError(f"the sedd protocol feeds each sample whole to the judge; samples of {length} "
                     f"tokens exceed its context of {judge.context}")
  vocab = judge.tokenizer.vocab_size
  for n, (row, text) in enumerate(zip(samples, texts)):
    if int(row.max()) >= vocab or judge.tokenizer.decode(row) != text:
      raise ValueError(f"the sedd protocol feeds the samples' ids to the judge, so the model's "
                       f"tokenizer must be the judge's; sample {n} does not decode to the same "
                       f"text under the judge's tokenizer ({judge.tokenizer.name})")
  num_kept = num // SEDD_BATCH_SIZE * SEDD_BATCH_SIZE
  rows = _Rows([], [], [], [])
  for n in range(num_kept):
    row = [int(i) for i in samples[n]]
    rows.inputs.append(row)
    rows.targets.append(row[1:] + [row[-1]])
    rows.weights.append([1.0] * (length - 1) + [0.0])
    rows.owner.append(n)
  return _score_rows(judge, rows, num, np.arange(num) < num_kept, "sedd")


PROTOCOLS: dict[str, Callable[..., JudgeScore]] = {"md4": _md4, "mdlm": _mdlm, "sedd": _sedd}

DESCRIPTIONS = {
    "md4": "generative perplexity = exp(total NLL / total judge tokens) over all samples "
           "(protocol md4): each sample decoded to text (cut at end-of-text markers), retokenised "
           "by the judge, read after the judge's start token in windows of its context, every "
           "token scored, with float32 matrix products",
    "mdlm": "generative perplexity = exp(total NLL / total judge tokens) over all samples "
            "(protocol mdlm, kuleshov-group/mdlm diffusion.py compute_generative_perplexity): "
            "decoded, retokenised (markers -> EOS), truncated to the model's length, no start "
            "token, the first token context only, non-EOS tokens and the first EOS scored, samples "
            "after the last full batch of 8 dropped, with float32 matrix products",
    "sedd": "generative perplexity = mean over samples of exp(mean NLL per token) (protocol sedd, "
            "louaaron/Score-Entropy-Discrete-Diffusion run_train.py): the samples' own ids fed to "
            "the judge, every token but the first scored (EOS included), samples after the last "
            "full batch of 32 dropped, with float32 matrix products",
}


def check_protocol(name: str, num_samples: int | None = None) -> None:
  """Raises ValueError for an unknown protocol, or too few samples for "sedd"."""
  if name not in PROTOCOLS:
    raise ValueError(f"unknown judge protocol {name!r}; valid: {', '.join(PROTOCOLS)}")
  if name == "sedd" and num_samples is not None and num_samples < SEDD_BATCH_SIZE:
    raise ValueError(f"the sedd protocol averages over batches of {SEDD_BATCH_SIZE} samples "
                     f"(SEDD's eval.perplexity_batch_size); got {num_samples}: draw at least "
                     f"{SEDD_BATCH_SIZE} (sample.num_samples)")


def score(judge: Any, protocol: str, texts: Sequence[str],
          samples: np.ndarray | None = None) -> JudgeScore:
  """The samples' generative perplexity under `protocol`.

  Args:
    judge: a judge of md4/judge.py.
    protocol: a name of PROTOCOLS.
    texts: the samples decoded to text by the generating model's tokenizer.
    samples: int[N, L] the samples' ids in the generating model's vocabulary (their length is the
      model's, which "mdlm" truncates to; "sedd" feeds them to the judge); "md4" reads the texts
      only.
  """
  check_protocol(protocol)
  if samples is not None and len(samples) != len(texts):
    raise ValueError(f"{len(texts)} texts but {len(samples)} samples")
  if not texts:
    raise ValueError("no samples to score")
  return PROTOCOLS[protocol](judge, list(texts), samples)
