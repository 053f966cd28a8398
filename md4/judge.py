"""Judges of sample quality: generative perplexity, and the samples' unigram entropy.

Generative perplexity (the paper's figure of sample quality against sampling steps, after SEDD and
MDLM): the samples are scored by a judge, a causal language model run with float32 matrix
products, under a named protocol (md4/judge_protocols.py): "md4" (this project's, the default),
"mdlm" (kuleshov-group/mdlm's diffusion.py) or "sedd" (louaaron/Score-Entropy-Discrete-Diffusion's
run_train.py). They differ in what is retokenised, which tokens are scored, how long texts are
cut and how the figure is pooled, so only figures of one protocol can be set side by side. Low
perplexity alone can hide degenerate, repetitive samples, so the samples' mean unigram entropy is
reported beside it.

Judges (`load_judge`):
  GPT2Judge   a GPT-2 family model in a local Hugging Face directory (config.json,
              model.safetensors, vocab.json, merges.txt; e.g. GPT-2 Large from a user's cache),
              run in JAX here: no PyTorch. Every protocol.
  ModelJudge  an autoregressive model trained by this project (model.objective="autoregressive",
              e.g. configs/judge_demo.py), read from its workdir or its exported directory: for
              character-level models, where GPT-2 does not apply. The "md4" protocol only (its
              vocabulary has no end-of-text token).
Both offer what the protocols need: `position_nll`, the negative log-probability of given targets
after given inputs, batched on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from md4 import judge_protocols
from md4.data import text8, tokenizers
from md4.data.pipeline import DatasetSpec

Array = jax.Array


JudgeScore = judge_protocols.JudgeScore


class Judge(Protocol):
  description: str
  context: int  # Tokens the judge reads at once.
  bos_id: int  # The start token the "md4" protocol reads each window after.

  def check_samples(self, spec: DatasetSpec) -> None:
    """Raises ValueError unless the judge can read samples of a model of this dataset spec."""

  def pieces(self, text: str) -> list[list[int]]:
    """The judge's tokens of text, as the pieces the "md4" protocol scores separately."""

  def position_nll(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """float32[N, T]: -log p(targets[n, i] | inputs[n, :i + 1]) for int[N, T] rows, T <= context."""

  def score(self, texts: Sequence[str], samples: np.ndarray | None = None,
            protocol: str = "md4") -> JudgeScore:
    """The samples' generative perplexity under `protocol` (md4.judge_protocols)."""


def unigram_entropy(samples: np.ndarray) -> float:
  """Mean over samples of the entropy (nats) of each sample's own token frequencies.

  samples: int[N, *S] token ids of the generating model. A sample repeating one token has 0.
  """
  samples = np.asarray(samples).reshape(len(samples), -1)
  entropies = []
  for row in samples:
    p = np.unique(row, return_counts=True)[1] / row.size
    entropies.append(float(-(p * np.log(p)).sum()))
  return float(np.mean(entropies))


def _token_nll(logits: Array, targets: Array) -> Array:
  """-log softmax(logits)[targets]: float32[B, T] from logits float[B, T, V], targets int[B, T]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _batched(fn, inputs: np.ndarray, targets: np.ndarray, batch_size: int,
             length: int) -> np.ndarray:
  """fn over rows padded to [batch_size, length] (one compiled shape): float32[N, T]."""
  inputs, targets = np.asarray(inputs, np.int32), np.asarray(targets, np.int32)
  n, t = inputs.shape
  if t > length:
    raise ValueError(f"rows of {t} tokens exceed the judge's context of {length}")
  out = np.zeros((n, t), np.float32)
  for start in range(0, n, batch_size):
    rows = slice(start, min(start + batch_size, n))
    x = np.zeros((batch_size, length), np.int32)
    y = np.zeros((batch_size, length), np.int32)
    x[:rows.stop - start, :t], y[:rows.stop - start, :t] = inputs[rows], targets[rows]
    out[rows] = np.asarray(fn(jnp.asarray(x), jnp.asarray(y)))[:rows.stop - start, :t]
  return out


# ------------------------------------------------------------------------------------- GPT-2

_GPT2_LAYER = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
               "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
               "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
# Causal-mask buffers some checkpoints carry beside the weights.
_GPT2_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


class GPT2Config(NamedTuple):
  num_layers: int
  num_heads: int
  width: int
  context: int
  vocab_size: int
  eps: float


def read_gpt2_config(directory: str) -> GPT2Config:
  path = os.path.join(directory, "config.json")
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"judge {directory}: cannot read {path} ({e}); a GPT-2 judge directory holds "
                     "config.json, model.safetensors, vocab.json and merges.txt") from e
  needed = ("n_layer", "n_head", "n_embd", "vocab_size")
  missing = [k for k in needed if k not in raw]
  if missing or not ("n_positions" in raw or "n_ctx" in raw):
    raise ValueError(f"judge {path} lacks {missing or ['n_positions']}: not a GPT-2 config")
  # Options of the Hugging Face GPT-2 that change its function; the forward pass here has GPT-2's.
  gpt2 = {"activation_function": "gelu_new", "scale_attn_weights": True,
          "scale_attn_by_inverse_layer_idx": False, "n_inner": None}
  bad = [f"{k}={raw[k]!r}" for k, v in gpt2.items()
         if k in raw and raw[k] != v and not (k == "n_inner" and raw[k] == 4 * raw["n_embd"])]
  if bad:
    raise ValueError(f"judge {path}: {', '.join(bad)}; this judge runs GPT-2's own architecture "
                     f"({', '.join(f'{k}={v!r}' for k, v in gpt2.items())})")
  return GPT2Config(raw["n_layer"], raw["n_head"], raw["n_embd"],
                    raw.get("n_positions", raw.get("n_ctx")), raw["vocab_size"],
                    raw.get("layer_norm_epsilon", 1e-5))


def read_gpt2_params(directory: str, cfg: GPT2Config) -> dict:
  """The weights of model.safetensors as float32 arrays, checked name by name against cfg."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, "model.safetensors")
  if not os.path.isfile(path):
    raise ValueError(f"judge {directory} lacks model.safetensors (the weights, as Hugging Face "
                     "saves them)")
  tensors = load_file(path)
  # Checkpoints saved from GPT2LMHeadModel prefix the body with "transformer."; the head is tied.
  tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
  d, v = cfg.width, cfg.vocab_size
  shapes = {"wte.weight": (v, d), "wpe.weight": (cfg.context, d), "ln_f.weight": (d,),
            "ln_f.bias": (d,)}
  layer_shapes = dict(zip(_GPT2_LAYER, [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
                                         (d, 4 * d), (4 * d,), (4 * d, d), (d,)]))
  for i in range(cfg.num_layers):
    shapes.update({f"h.{i}.{k}": s for k, s in layer_shapes.items()})
  for name, shape in shapes.items():
    if name not in tensors:
      raise ValueError(f"judge {path} lacks tensor {name!r}")
    if tuple(tensors[name].shape) != shape:
      raise ValueError(f"judge {path}: tensor {name!r} has shape {tensors[name].shape}, config.json "
                       f"implies {shape}")
  extra = [k for k in tensors if k not in shapes and k != "lm_head.weight"
           and not _GPT2_BUFFERS.fullmatch(k)]
  if extra:
    raise ValueError(f"judge {path} has tensors a GPT-2 has not: {extra[:5]}")
  if "lm_head.weight" in tensors and not np.array_equal(tensors["lm_head.weight"],
                                                        tensors["wte.weight"]):
    raise ValueError(f"judge {path}: lm_head.weight differs from wte.weight; GPT-2 ties its "
                     "output layer to the token embedding, as this judge does")
  f32 = lambda name: jnp.asarray(tensors[name], jnp.float32)
  return {"wte": f32("wte.weight"), "wpe": f32("wpe.weight"),
          "ln_f": (f32("ln_f.weight"), f32("ln_f.bias")),
          "layers": [{k: f32(f"h.{i}.{k}") for k in _GPT2_LAYER} for i in range(cfg.num_layers)]}


def _layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def gpt2_logits(params: dict, ids: Array, cfg: GPT2Config) -> Array:
  """GPT-2's forward pass: ids int32[B, T] (T <= context) -> float32[B, T, V] next-token logits."""
  b, t = ids.shape
  heads = lambda y: y.reshape(b, t, cfg.num_heads, cfg.width // cfg.num_heads)
  x = params["wte"][ids] + params["wpe"][:t]
  for p in params["layers"]:
    h = _layer_norm(x, p["ln_1.weight"], p["ln_1.bias"], cfg.eps)
    q, k, v = jnp.split(h @ p["attn.c_attn.weight"] + p["attn.c_attn.bias"], 3, axis=-1)
    a = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    x = x + a.reshape(b, t, cfg.width) @ p["attn.c_proj.weight"] + p["attn.c_proj.bias"]
    h = _layer_norm(x, p["ln_2.weight"], p["ln_2.bias"], cfg.eps)
    h = jax.nn.gelu(h @ p["mlp.c_fc.weight"] + p["mlp.c_fc.bias"], approximate=True)
    x = x + h @ p["mlp.c_proj.weight"] + p["mlp.c_proj.bias"]
  x = _layer_norm(x, *params["ln_f"], cfg.eps)
  return x @ params["wte"].T


class GPT2Judge:
  """A GPT-2 family model from a local Hugging Face directory, run in JAX in float32."""

  def __init__(self, directory: str, batch_size: int = 8):
    self.config = read_gpt2_config(directory)
    self.tokenizer = tokenizers.get_tokenizer(f"bpe:{directory}")
    if self.tokenizer.vocab_size != self.config.vocab_size:
      raise ValueError(f"judge {directory}: vocab.json has {self.tokenizer.vocab_size} tokens, "
                       f"config.json says {self.config.vocab_size}")
    self.params = read_gpt2_params(directory, self.config)
    self.batch_size = batch_size
    c = self.config
    self.description = (f"GPT-2 judge {directory} ({c.num_layers} layers, width {c.width}, "
                        f"context {c.context})")
    self.context = c.context
    # GPT-2 has no start token of its own: its end-of-text token serves (as in GPT-2's own
    # training data, where it separates documents).
    self.bos_id = self.eos_id = self.tokenizer.eos_id

    # The weights are an argument, not a closure: jit would bake them into the program.
    @jax.jit
    def nll(params, inputs, targets):
      with jax.default_matmul_precision("float32"):
        return _token_nll(gpt2_logits(params, inputs, c), targets)
    self._nll = functools.partial(nll, self.params)

  def check_samples(self, spec: DatasetSpec) -> None:
    if spec.kind != "text":
      raise ValueError(f"a GPT-2 judge reads text; this model makes {spec.kind}s")

  def tokenize(self, text: str) -> list[int]:
    """The judge's tokens of text, end-of-text markers cut out."""
    return [i for piece in self.pieces(text) for i in piece]

  def pieces(self, text: str) -> list[list[int]]:
    """The tokens of the pieces of text between end-of-text markers."""
    return [self.tokenizer.encode(piece) for piece in text.split(tokenizers.EOS_TEXT)]

  def encode_with_markers(self, text: str) -> list[int]:
    """The tokens of text with each end-of-text marker read as the end-of-text token (what a
    Hugging Face GPT-2 tokenizer does with the literal marker)."""
    out = []
    for n, piece in enumerate(text.split(tokenizers.EOS_TEXT)):
      out += ([self.eos_id] if n else []) + self.tokenizer.encode(piece)
    return out

  def position_nll(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return _batched(self._nll, inputs, targets, self.batch_size, self.context)

  def score(self, texts: Sequence[str], samples: np.ndarray | None = None,
            protocol: str = "md4") -> JudgeScore:
    return judge_protocols.score(self, protocol, texts, samples)


# ----------------------------------------------------------------------- a model of this project

class ModelJudge:
  """An autoregressive model of this project (model.objective="autoregressive") from its workdir or
  exported directory; over text8 characters, the vocabulary of the character-level demo and text8
  models."""

  def __init__(self, workdir: str, batch_size: int = 64):
    from md4 import evaluate, inference, state  # pylint: disable=g-import-not-at-top
    from md4.data import pipeline  # pylint: disable=g-import-not-at-top
    model_dir = inference.open_model(workdir)
    cfg = inference.recorded_config(model_dir)
    if cfg.model.objective != "autoregressive":
      raise ValueError(f"judge {workdir} is a {cfg.model.objective} model; a judge must be "
                       "autoregressive (model.objective='autoregressive', e.g. "
                       "configs/judge_demo.py)")
    dataset = pipeline.load(cfg.data)
    if dataset.spec.vocab_size != text8.VOCAB_SIZE or dataset.spec.kind != "text":
      raise ValueError(f"judge {workdir} reads dataset {cfg.data.dataset!r}; a judge of this "
                       "project must read text8 characters")
    # A judge computes in float32, whatever precision it trained in.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compute_dtype="float32"))
    loaded = inference.load(cfg, model_dir, dataset=dataset)
    params = state.inference_params(loaded.state, cfg, "eval")
    result = evaluate.Evaluator(loaded.network, cfg, loaded.mesh)(params, dataset)
    self.held_out_bits = result.bits_per_token
    self.batch_size = batch_size
    self.context = cfg.data.seq_length
    self.description = (f"autoregressive judge {workdir} (step {int(loaded.state.step)}, "
                        f"{result.bits_per_token:.4f} bits/char on {cfg.data.dataset}'s "
                        f"{cfg.eval.split} split)")
    network, self.bos_id = loaded.network, cfg.model.vocab_size

    @jax.jit
    def nll(net_params, inputs, targets):
      zeros = jnp.zeros(inputs.shape[:1], jnp.float32)
      with jax.default_matmul_precision("float32"):
        return _token_nll(network.apply({"params": net_params}, inputs, zeros), targets)
    self._nll = functools.partial(nll, params["net"])

  def check_samples(self, spec: DatasetSpec) -> None:
    if spec.kind != "text" or spec.vocab_size != text8.VOCAB_SIZE:
      raise ValueError(f"this judge reads text8 characters; the model makes {spec.kind} over a "
                       f"vocabulary of {spec.vocab_size}")

  def pieces(self, text: str) -> list[list[int]]:
    return [list(text8.encode(text))]

  def position_nll(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return _batched(self._nll, inputs, targets, self.batch_size, self.context)

  def score(self, texts: Sequence[str], samples: np.ndarray | None = None,
            protocol: str = "md4") -> JudgeScore:
    return judge_protocols.score(self, protocol, texts, samples)


def load_judge(path: str) -> Judge:
  """A GPT-2 directory (config.json) or a workdir or exported directory of this project's
  autoregressive model."""
  from md4 import export  # pylint: disable=g-import-not-at-top
  if export.is_exported(path) or os.path.isdir(os.path.join(path, "checkpoints")):
    return ModelJudge(path)
  if os.path.isfile(os.path.join(path, "config.json")):
    return GPT2Judge(path)
  raise ValueError(f"--judge={path}: expected a Hugging Face GPT-2 directory (config.json, "
                   "model.safetensors, vocab.json, merges.txt), or the workdir (with checkpoints/) "
                   "or exported directory of an autoregressive model of this project")
