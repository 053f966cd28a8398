"""MDLM's released model in this project: DIT (md4/networks/dit.py), its converter
(md4/convert_mdlm.py) and its log-linear schedule.

The reference is a NumPy (float64) transcription of kuleshov-group/mdlm models/dit.py's forward
pass and diffusion.py's SUBS parameterisation, written from that code: DIT.forward (vocab_embed,
silu(sigma_map(sigma)), Rotary + rotate_half, DDiTBlock.forward with bias_dropout_add_scale at
inference, DDitFinalLayer.forward), then _subs_parameterization. Tiny random checkpoints are
written in both released layouts: a Hugging Face directory (config.json, model.safetensors with
"backbone." keys and the rotary buffer) and a Lightning .ckpt, the latter in torch.save's zip format
by a writer here that needs no PyTorch (torch/serialization.py's _save: data.pkl with persistent
storage ids and torch._utils._rebuild_tensor_v2, records data/KEY, byteorder, version).
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs.mdlm import openwebtext
from md4 import checkpoint, config as config_lib, convert_mdlm, elbo, model, sampling, schedules
from md4.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, L, D, HEADS, LAYERS, COND = 40, 6, 16, 2, 2, 8  # V real tokens; the mask id V (V + 1 rows).


def _cfg(time_conditioning=False):
  config = openwebtext.get_config("tiny")
  config.model.vocab_size = V
  config.data.seq_length = L
  config.model.net = dict(config.model.net, num_layers=LAYERS, num_heads=HEADS, d_model=D,
                          cond_dim=COND, mlp_ratio=4, time_conditioning=time_conditioning)
  return config_lib.from_configdict(config)


SPEC = pipeline.DatasetSpec(V, (L,), "text", "token")


def _mdlm_tensors(seed=0):
  """DIT's parameters by MDLM's names (torch layouts: Linear weights [out, in]), in the order of
  its state dict, the rotary buffer where the module registers it; every tensor non-zero."""
  rng = np.random.default_rng(seed)
  w = lambda *shape, s=0.3: (s * rng.standard_normal(shape)).astype(np.float32)
  t = collections.OrderedDict()
  t["vocab_embed.embedding"] = w(V + 1, D, s=1.0)
  t["sigma_map.mlp.0.weight"], t["sigma_map.mlp.0.bias"] = w(COND, 256), w(COND)
  t["sigma_map.mlp.2.weight"], t["sigma_map.mlp.2.bias"] = w(COND, COND), w(COND)
  hd = D // HEADS
  t["rotary_emb.inv_freq"] = (1.0 / 10000 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
  for i in range(LAYERS):
    b = f"blocks.{i}."
    t[b + "norm1.weight"] = 1 + w(D, s=0.1)
    t[b + "attn_qkv.weight"], t[b + "attn_out.weight"] = w(3 * D, D), w(D, D)
    t[b + "norm2.weight"] = 1 + w(D, s=0.1)
    t[b + "mlp.0.weight"], t[b + "mlp.0.bias"] = w(4 * D, D), w(4 * D)
    t[b + "mlp.2.weight"], t[b + "mlp.2.bias"] = w(D, 4 * D), w(D)
    t[b + "adaLN_modulation.weight"], t[b + "adaLN_modulation.bias"] = w(6 * D, COND), w(6 * D)
  t["output_layer.norm_final.weight"] = 1 + w(D, s=0.1)
  t["output_layer.linear.weight"], t["output_layer.linear.bias"] = w(V + 1, D), w(V + 1)
  t["output_layer.adaLN_modulation.weight"] = w(2 * D, COND)
  t["output_layer.adaLN_modulation.bias"] = w(2 * D)
  return t


# ------------------------------------------------------------------ NumPy transcription of MDLM


def _np_dit_subs(t, x, sigma):
  """models/dit.py DIT.forward then diffusion.py _subs_parameterization, float64.

  x: int[B, L] (mask id V); sigma: float[B]. Returns log-probabilities [B, L, V + 1]."""
  p = {k: v.astype(np.float64) for k, v in t.items()}
  linear = lambda h, name, bias=True: (h @ p[name + ".weight"].T
                                       + (p[name + ".bias"] if bias else 0))
  silu = lambda h: h / (1 + np.exp(-h))

  def layer_norm(h, weight):
    mean = h.mean(-1, keepdims=True)
    return (h - mean) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * weight

  def modulate(h, shift, scale):
    return h * (1 + scale[:, None]) + shift[:, None]

  b, n = x.shape
  h = p["vocab_embed.embedding"][x]
  half = 128
  freqs = np.exp(-math.log(10000) * np.arange(half) / half)
  args = sigma[:, None] * freqs[None]
  t_freq = np.concatenate([np.cos(args), np.sin(args)], -1)
  c = silu(linear(silu(linear(t_freq, "sigma_map.mlp.0")), "sigma_map.mlp.2"))
  hd = D // HEADS
  angles = np.arange(n)[:, None] * p["rotary_emb.inv_freq"][None]
  emb = np.concatenate([angles, angles], -1)  # Rotary: cat(freqs, freqs)
  cos, sin = np.cos(emb)[None, :, None], np.sin(emb)[None, :, None]
  rotate_half = lambda q: np.concatenate([-q[..., hd // 2:], q[..., :hd // 2]], -1)
  for i in range(LAYERS):
    pre = f"blocks.{i}."
    mods = np.split(linear(c, pre + "adaLN_modulation"), 6, axis=-1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    x_skip = h
    a = modulate(layer_norm(h, p[pre + "norm1.weight"]), shift_msa, scale_msa)
    qkv = linear(a, pre + "attn_qkv", bias=False).reshape(b, n, 3, HEADS, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    a = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, D)
    h = x_skip + gate_msa[:, None] * linear(a, pre + "attn_out", bias=False)
    m = modulate(layer_norm(h, p[pre + "norm2.weight"]), shift_mlp, scale_mlp)
    m = linear(m, pre + "mlp.0")
    m = 0.5 * m * (1 + np.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m**3)))
    h = h + gate_mlp[:, None] * linear(m, pre + "mlp.2")
  shift, scale = np.split(linear(c, "output_layer.adaLN_modulation"), 2, axis=-1)
  h = modulate(layer_norm(h, p["output_layer.norm_final.weight"]), shift, scale)
  logits = linear(h, "output_layer.linear")
  # _subs_parameterization
  logits[:, :, V] += -1e6
  top = logits.max(-1, keepdims=True)
  logits = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  unmasked = x != V
  logits[unmasked] = -1e6
  logits[unmasked, x[unmasked]] = 0
  return logits


def _write_hub(directory, tensors, **config):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(dict({"model_type": "mdlm", "vocab_size": V + 1, "model_length": L,
                    "hidden_dim": D, "cond_dim": COND, "n_blocks": LAYERS, "n_heads": HEADS,
                    "dropout": 0.1, "time_conditioning": False}, **config), f)
  save_file({"backbone." + k: v for k, v in tensors.items()},
            os.path.join(directory, "model.safetensors"))


def _inputs():
  rng = np.random.default_rng(1)
  x = rng.integers(0, V, (3, L))
  x[rng.random((3, L)) < 0.5] = V  # Masked positions.
  x[2] = V  # All masked.
  return x, np.array([0.9, 0.3, 0.05])


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_dit_gives_mdlms_subs_log_probabilities(tmp_path, time_conditioning):
  tensors = _mdlm_tensors()
  _write_hub(str(tmp_path / "hub"), tensors)
  ref = convert_mdlm.read_mdlm(str(tmp_path / "hub"))
  assert ref.ema is None and ref.step == 0 and ref.config["hidden_dim"] == D
  cfg = _cfg(time_conditioning)
  params = convert_mdlm.convert_params(ref.params, cfg, SPEC)
  network = model.build_network(cfg, SPEC)
  x, t = _inputs()
  ours = np.asarray(network.apply({"params": params["net"]}, jnp.asarray(x, jnp.int32),
                                  jnp.asarray(t, jnp.float32)))
  # Off (MDLM's OpenWebText model): the network is given sigma = 0 whatever t is.
  expected = _np_dit_subs(tensors, x, t if time_conditioning else np.zeros(3))
  assert ours.shape == (3, L, V)  # The mask's column dropped.
  masked = x == V
  np.testing.assert_allclose(ours[masked], expected[masked][:, :V], atol=2e-5, rtol=0)
  np.testing.assert_array_equal(ours[~masked], expected[~masked][:, :V])  # 0 / -1e6 exactly.
  assert np.abs(expected[masked][:, V] + 1e6).max() < 100  # The dropped column: ~-1e6.


def test_hub_config_and_tensors_are_checked_naming_the_problem(tmp_path):
  tensors = _mdlm_tensors()
  cfg = _cfg()
  with pytest.raises(ValueError, match="time-conditioned"):
    convert_mdlm.check_config({"time_conditioning": True}, cfg)
  with pytest.raises(ValueError, match=r"n_blocks=3 \(config: 2\)"):
    convert_mdlm.check_config({"n_blocks": 3}, cfg)
  with pytest.raises(ValueError, match=r"vocab_size=40 \(config: 41\).*model.vocab_size \+ 1"):
    convert_mdlm.check_config({"vocab_size": V}, cfg)
  extra = dict(tensors, **{"blocks.2.norm1.weight": np.ones(D, np.float32)})
  with pytest.raises(ValueError, match="does not: blocks.2.norm1.weight"):
    convert_mdlm.convert_params(extra, cfg, SPEC)
  missing = {k: v for k, v in tensors.items() if k != "blocks.1.mlp.2.bias"}
  with pytest.raises(ValueError, match="lacks 1 tensor.*blocks_1/mlp_2/bias"):
    convert_mdlm.convert_params(missing, cfg, SPEC)
  with pytest.raises(ValueError, match="rotary frequencies of heads of 8"):
    convert_mdlm.convert_params(dict(tensors, **{"rotary_emb.inv_freq": np.ones(2, np.float32)}),
                                cfg, SPEC)
  with pytest.raises(ValueError, match="lacks model.safetensors"):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    convert_mdlm.read_mdlm(str(tmp_path / "empty"))


# ---------------------------------------------------------- the Lightning .ckpt, without torch


class _Global:
  """A class named module.name in the pickle (a GLOBAL opcode), as torch's own globals are."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle's save_reduce wants a callable; only its name is written.
    raise TypeError(f"{self.module}.{self.name} stands in for torch's; it is never called")


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pickles arrays as torch.save does: _rebuild_tensor_v2 of a persistent storage id."""

  def __init__(self, file, storages):
    super().__init__(file, protocol=2)
    self.storages = storages

  def persistent_id(self, obj):
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__storage__":
      key = obj[1]
      return ("storage", _Global("torch", "FloatStorage"), key, "cpu",
              self.storages[key].size)
    return None

  def reducer_override(self, obj):
    if isinstance(obj, np.ndarray):
      key = str(len(self.storages))
      self.storages[key] = np.ascontiguousarray(obj, np.float32)
      stride = tuple(s // 4 for s in self.storages[key].strides)
      return (_Global("torch._utils", "_rebuild_tensor_v2"),
              (("__storage__", key), 0, obj.shape, stride, False, collections.OrderedDict()))
    if isinstance(obj, _Opaque):
      return (_Global(obj.module, obj.name), (), obj.state)
    return NotImplemented

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, _Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
      return
    super().save(obj, save_persistent_id)


class _Opaque:
  def __init__(self, module, name, state):
    self.module, self.name, self.state = module, name, state


def _write_ckpt(path, state_dict, ema, step):
  storages = {}
  buf = io.BytesIO()
  backbone = collections.OrderedDict(("backbone." + k, v) for k, v in state_dict.items())
  obj = {"state_dict": backbone,
         "ema": {"decay": 0.9999, "num_updates": 7, "shadow_params": ema, "collected_params": []},
         "global_step": step, "pytorch-lightning_version": "2.2.1",
         "hyper_parameters": {"config": _Opaque("omegaconf.dictconfig", "DictConfig",
                                                {"_content": {"backbone": "dit"}})},
         "optimizer_states": [{"state": {0: {"exp_avg": np.ones((3, 2), np.float32)}}}]}
  _TorchPickler(buf, storages).dump(obj)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("mdlm/data.pkl", buf.getvalue())
    z.writestr("mdlm/byteorder", "little")
    for key, array in storages.items():
      z.writestr(f"mdlm/data/{key}", array.tobytes())
    z.writestr("mdlm/version", "3\n")


def test_a_lightning_checkpoint_converts_with_its_ema_weights(tmp_path):
  tensors = _mdlm_tensors()
  ema_tensors = _mdlm_tensors(seed=5)
  # The EMA list follows the parameters in order: the state dict less the rotary buffer.
  shadow = [v for k, v in ema_tensors.items() if k != "rotary_emb.inv_freq"]
  path = str(tmp_path / "last.ckpt")
  _write_ckpt(path, tensors, shadow, step=1234)
  ref = convert_mdlm.read_mdlm(path)
  assert ref.step == 1234 and set(ref.params) == set(tensors)
  for k, v in tensors.items():
    np.testing.assert_array_equal(ref.params[k], v)
    np.testing.assert_array_equal(ref.ema[k], ema_tensors[k])
  # Written as a checkpoint of this project: both sets, and each gives MDLM's output.
  workdir = str(tmp_path / "run")
  cfg = _cfg()
  result = convert_mdlm.convert_checkpoint(path, cfg, SPEC, workdir)
  assert (result.step, result.has_ema) == (1234, True)
  loaded = checkpoint.load_for_inference(cfg, SPEC, workdir)
  assert int(loaded.state.step) == 1234
  x, t = _inputs()
  for which, source in (("params", tensors), ("ema_params", ema_tensors)):
    net = getattr(loaded.state, which)["net"]
    ours = np.asarray(loaded.network.apply({"params": net}, jnp.asarray(x, jnp.int32),
                                           jnp.asarray(t, jnp.float32)))
    expected = _np_dit_subs(source, x, np.zeros(3))
    np.testing.assert_allclose(ours[x == V], expected[x == V][:, :V], atol=2e-5, rtol=0)
  with pytest.raises(ValueError, match="already holds checkpoints"):
    convert_mdlm.convert_checkpoint(path, cfg, SPEC, workdir)
  with pytest.raises(ValueError, match="not a torch.save zip archive"):
    (tmp_path / "bad.ckpt").write_bytes(b"not a zip")
    convert_mdlm.read_mdlm(str(tmp_path / "bad.ckpt"))


def test_md4_convert_from_mdlm_names_a_missing_source(tmp_path):
  done = subprocess.run([sys.executable, "-m", "md4.main", "convert",
                         "--config=configs/mdlm/openwebtext.py:tiny",
                         f"--from_mdlm={tmp_path}/nothing", f"--workdir={tmp_path}/run"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  assert f"--from_mdlm={tmp_path}/nothing does not exist" in done.stderr, done.stderr[-2000:]


# ------------------------------------------------------------------------ the log-linear schedule


def test_loglinear_is_mdlms_schedule_and_its_weight_is_one_over_t():
  eps = 1e-3
  sched = schedules.get_schedule("loglinear", eps=eps)
  t = np.linspace(0.0, 1.0, 101)
  sigma = -np.log1p(-(1 - eps) * t)  # noise_schedule.py LogLinearNoise.total_noise
  np.testing.assert_allclose(np.asarray(sched.alpha(t)), np.exp(-sigma), rtol=1e-6, atol=1e-7)
  dsigma = (1 - eps) / (1 - (1 - eps) * t[1:])  # rate_noise
  weight = dsigma / np.expm1(sigma[1:])  # diffusion.py: dsigma / torch.expm1(sigma)
  np.testing.assert_allclose(weight, 1 / t[1:], rtol=1e-9)
  np.testing.assert_allclose(np.asarray(schedules.rate(sched, t[1:])), 1 / t[1:], rtol=2e-5)
  np.testing.assert_allclose(np.asarray(sched.inverse(sched.alpha(t))), t, atol=1e-6)
  # The bound's ends: alpha(0) = 1, nothing to reconstruct; the prior pays eps log V per token.
  ends = np.asarray(elbo.end_terms(jnp.zeros((2, L), jnp.int32), sched, V))
  np.testing.assert_allclose(ends, L * eps * math.log(V), rtol=1e-5)


def test_nelbo_integrand_is_mdlms_loss_on_the_same_draw():
  """At a given t, this project's diffusion term equals MDLM's continuous-time SUBS loss,
  sum over positions of -log p_theta(x) * dsigma / expm1(sigma) (diffusion.py
  _forward_pass_diffusion), on the same z_t (masked with MDLM's move_chance 1 - exp(-sigma))."""
  eps = 1e-3
  sched = schedules.get_schedule("loglinear", eps=eps)
  logits = jax.random.normal(jax.random.key(0), (4, L, V))
  seen = []

  def denoise_fn(z, t):
    seen.append(z)
    return jnp.where((z == V)[..., None], logits, 0.0)

  x = jax.random.randint(jax.random.key(1), (4, L), 0, V)
  t = jnp.array([0.2, 0.5, 0.8, 0.999])
  ours = np.asarray(elbo.nelbo(denoise_fn, x, jax.random.key(2), sched, vocab_size=V, times=t)
                    - elbo.end_terms(x, sched, V))
  z = np.asarray(seen[0])
  sigma = -np.log1p(-(1 - eps) * np.asarray(t, np.float64))
  dsigma = (1 - eps) / (1 - (1 - eps) * np.asarray(t, np.float64))
  lg = np.asarray(logits, np.float64)
  logp = lg - lg.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  log_p_theta = np.take_along_axis(logp, np.asarray(x)[..., None], -1)[..., 0]
  # SUBS: an unmasked position carries its token, log p = 0.
  log_p_theta = np.where(z == V, log_p_theta, 0.0)
  mdlm = (-log_p_theta * (dsigma / np.expm1(sigma))[:, None]).sum(-1)
  assert (z == V).any(axis=1).all()
  np.testing.assert_allclose(ours, mdlm, rtol=1e-5)


# Ancestral in the default suite; the other samplers (compilation dominates: ~8 s each on 2
# loaded cores) behind the slow marker.
@pytest.mark.parametrize("method", [
    m if m == "ancestral" else pytest.param(m, marks=pytest.mark.slow) for m in sampling.METHODS])
def test_every_sampler_runs_on_the_dit_with_the_loglinear_schedule(method):
  tensors = _mdlm_tensors()
  cfg = _cfg()
  params = convert_mdlm.convert_params(tensors, cfg, SPEC)
  network = model.build_network(cfg, SPEC)
  denoise_fn = model.denoiser(network, params)
  sched = model.make_schedule(cfg.model, params)
  init = jnp.full((2, L), V, jnp.int32)
  out = np.asarray(sampling.sample(denoise_fn, jax.random.key(3), init, sched, vocab_size=V,
                                   num_steps=8, method=method))
  assert out.shape == (2, L) and out.min() >= 0 and out.max() < V


def test_the_config_builds_mdlms_small_dit_parameter_for_parameter():
  """169,627,218: the parameters of models/dit.py's DIT at MDLM's small size (configs/model/
  small.yaml: hidden 768, cond 128, 12 blocks; vocabulary 50258), counted from its layers."""
  cfg = config_lib.from_configdict(openwebtext.get_config())
  spec = pipeline.get_spec(cfg.data)
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0),
                                                    model.build_network(cfg, spec), cfg.model,
                                                    spec))
  d, c, v = 768, 128, 50258
  block = 2 * d + 3 * d * d + d * d + (d * 4 * d + 4 * d) + (4 * d * d + d) + (c * 6 * d + 6 * d)
  mdlm = (v * d + (256 * c + c) + (c * c + c) + 12 * block + d + (d * v + v)
          + (c * 2 * d + 2 * d))
  assert mdlm == 169_627_218
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == mdlm
