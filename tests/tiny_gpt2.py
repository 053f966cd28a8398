"""A tiny random GPT-2 in the Hugging Face layout (config.json, model.safetensors, and the tokenizer
of tests/tiny_bpe.py), and GPT-2's forward pass written out in NumPy (float64) to check it against.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from safetensors.numpy import save_file

import tiny_bpe

LAYERS, HEADS, WIDTH, CONTEXT = 2, 2, 16, 12


def write_gpt2(directory, *, prefix="", seed=0, drop=None, bad_shape=None):
  os.makedirs(directory, exist_ok=True)
  tiny_bpe.write(directory)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"model_type": "gpt2", "n_layer": LAYERS, "n_head": HEADS, "n_embd": WIDTH,
               "n_positions": CONTEXT, "vocab_size": tiny_bpe.VOCAB_SIZE,
               "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}, f)
  rng = np.random.default_rng(seed)
  d = WIDTH
  shapes = {"wte.weight": (tiny_bpe.VOCAB_SIZE, d), "wpe.weight": (CONTEXT, d),
            "ln_f.weight": (d,), "ln_f.bias": (d,)}
  for i in range(LAYERS):
    shapes.update({f"h.{i}.ln_1.weight": (d,), f"h.{i}.ln_1.bias": (d,),
                   f"h.{i}.attn.c_attn.weight": (d, 3 * d), f"h.{i}.attn.c_attn.bias": (3 * d,),
                   f"h.{i}.attn.c_proj.weight": (d, d), f"h.{i}.attn.c_proj.bias": (d,),
                   f"h.{i}.ln_2.weight": (d,), f"h.{i}.ln_2.bias": (d,),
                   f"h.{i}.mlp.c_fc.weight": (d, 4 * d), f"h.{i}.mlp.c_fc.bias": (4 * d,),
                   f"h.{i}.mlp.c_proj.weight": (4 * d, d), f"h.{i}.mlp.c_proj.bias": (d,)})
  tensors = {}
  for name, shape in shapes.items():
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
      tensors[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      tensors[name] = (0.4 * rng.standard_normal(shape)).astype(np.float32)
  tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, CONTEXT, CONTEXT), np.float32))  # A buffer.
  if drop:
    tensors.pop(drop)
  if bad_shape:
    tensors[bad_shape] = np.zeros((3,), np.float32)
  save_file({prefix + k: v for k, v in tensors.items()},
            os.path.join(directory, "model.safetensors"))
  return {k: v.astype(np.float64) for k, v in tensors.items()}


def np_gpt2_logits(w, ids):
  """GPT-2 in NumPy, float64: ids int[T] -> logits [T, V]."""
  def norm(x, name):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w[f"{name}.weight"] + w[
        f"{name}.bias"]

  t, hd = len(ids), WIDTH // HEADS
  x = w["wte.weight"][ids] + w["wpe.weight"][:t]
  for i in range(LAYERS):
    p = lambda n: w[f"h.{i}.{n}"]
    qkv = norm(x, f"h.{i}.ln_1") @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
    q, k, v = (m.reshape(t, HEADS, hd).transpose(1, 0, 2) for m in np.split(qkv, 3, axis=-1))
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + np.triu(np.full((t, t), -np.inf), 1)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    a = (probs @ v).transpose(1, 0, 2).reshape(t, WIDTH)
    x = x + a @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
    h = norm(x, f"h.{i}.ln_2") @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")
    h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    x = x + h @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
  return norm(x, "ln_f") @ w["wte.weight"].T


def np_token_nll(w, inputs, targets):
  """float64[T]: -log p(targets[i] | inputs[:i + 1]) under the NumPy GPT-2."""
  logits = np_gpt2_logits(w, list(inputs))
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return -logp[np.arange(len(targets)), list(targets)]
