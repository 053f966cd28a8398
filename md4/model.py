"""Glue between a network and the math: parameters, the schedule, the denoiser, the objective.

The network knows nothing of diffusion and the math knows nothing of Flax; they meet here, through
denoise_fn(z_t, t) -> logits (split into body and output layer for the samplers: `denoiser`).
Parameters are {"net": network params} plus, for GenMD4, {"schedule": {"raw_power": float32[V]}}
with w = softplus(raw_power) > 0.

model.objective picks what a model is trained and evaluated on (`OBJECTIVES`): "diffusion" (MD4,
GenMD4: the bound of md4/elbo.py) or "autoregressive" (a causal transformer's exact likelihood,
md4/autoregressive.py: the judges that score samples).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from md4 import autoregressive, elbo, guidance, networks, readout, schedules
from md4.config import Config, ModelConfig
from md4.data.pipeline import DatasetSpec
from md4.networks import transformer

Params = Any


def check_compatible(cfg: Config, spec: DatasetSpec) -> None:
  """Refuses a model whose vocabulary, shape or classes differ from the dataset's, before training."""
  extra = cfg.model.extra_tokens
  if cfg.model.vocab_size != spec.vocab_size + extra:
    plus = f" (+ model.extra_tokens={extra})" if extra else ""
    raise ValueError(f"model.vocab_size={cfg.model.vocab_size} but dataset "
                     f"{cfg.data.dataset!r} has a vocabulary of {spec.vocab_size}{plus}")
  num_classes = cfg.model.net.get("num_classes", 0)
  if num_classes and num_classes != spec.num_classes:
    raise ValueError(f"model.net.num_classes={num_classes} but dataset {cfg.data.dataset!r} has "
                     f"{spec.num_classes} classes")
  wants_images = cfg.model.network in ("unet", "uvit")
  if wants_images != (spec.kind == "image"):
    raise ValueError(f"network {cfg.model.network!r} does not fit {spec.kind} dataset "
                     f"{cfg.data.dataset!r} (example shape {spec.example_shape})")
  channels = cfg.model.net.get("num_channels")
  if wants_images and channels is not None and channels != spec.example_shape[-1]:
    raise ValueError(f"model.net.num_channels={channels} but dataset {cfg.data.dataset!r} has "
                     f"{spec.example_shape[-1]} channels")


def build_network(cfg: Config, spec: DatasetSpec) -> nn.Module:
  check_compatible(cfg, spec)
  kwargs = dict(cfg.model.net, vocab_size=cfg.model.vocab_size, dtype=cfg.train.compute_dtype)
  fields = {f.name for f in dataclasses.fields(networks.NETWORKS[cfg.model.network][1])}
  if "num_channels" in fields:
    kwargs.setdefault("num_channels", spec.example_shape[-1])
  return networks.build_network(cfg.model.network, **kwargs)


def make_schedule(model_cfg: ModelConfig, params: Params):
  if model_cfg.state_dependent:
    power = jax.nn.softplus(params["schedule"]["raw_power"])
    return schedules.StateDependentPoly(power, eps=model_cfg.eps)
  return schedules.get_schedule(model_cfg.schedule, eps=model_cfg.eps)


def init_params(rng: jax.Array, network: nn.Module, model_cfg: ModelConfig,
                spec: DatasetSpec) -> Params:
  z = jnp.zeros((1,) + spec.example_shape, jnp.int32)
  cond = jnp.zeros((1,), jnp.int32) if model_cfg.net.get("num_classes", 0) else None
  params = {"net": network.init(rng, z, jnp.zeros((1,)), cond=cond)["params"]}
  if model_cfg.state_dependent:
    raw = math.log(math.expm1(model_cfg.power_init))  # softplus^-1
    params["schedule"] = {"raw_power": jnp.full((model_cfg.vocab_size,), raw, jnp.float32)}
  return params


def is_conditional(cfg: Config) -> bool:
  return bool(cfg.model.net.get("num_classes", 0))


def class_labels(cfg: Config, batch) -> jax.Array | None:
  """The batch's labels for a class-conditional network; None otherwise (datasets may carry labels
  that an unconditional model ignores)."""
  return batch.get("label") if is_conditional(cfg) else None


def null_label(cfg: Config) -> int | None:
  """The null class's label ("no class": num_classes) of a network built with null_class; None
  when the network has none."""
  net = cfg.model.net
  return net.get("num_classes", 0) if net.get("null_class", False) and is_conditional(cfg) else None


def drop_labels(labels: jax.Array, key: jax.Array, rate: float, null: int) -> jax.Array:
  """labels: int32[B] with each entry replaced by `null` with probability `rate`, independently.

  One draw per example of the global batch, so the result does not depend on how the batch is
  split over devices or microbatches.
  """
  drop = jax.random.bernoulli(key, rate, labels.shape)
  return jnp.where(drop, jnp.asarray(null, labels.dtype), labels)


def denoiser(network: nn.Module, params: Params, cond: jax.Array | None = None, *,
             dropout_rng: jax.Array | None = None) -> readout.SplitDenoiser:
  """The network as a denoiser; dropout on iff dropout_rng.

  Called, (z: int32[B, *S], t: float32[B]) -> float32[B, *S, V] logits. As a readout.SplitDenoiser,
  the samplers that know which positions they reveal run the network body once and the output layer
  at those positions only: the transformer's body gives the output layer's input features, and its
  output layer reads them out at given positions (the rows of the full logits, bitwise). The image
  networks have no such split: their full logits are read out by gathering.
  """
  train = dropout_rng is not None
  rngs = {"dropout": dropout_rng} if train else {}

  def apply(z, t, **kwargs):
    c = cond
    if c is not None and c.shape[0] != z.shape[0]:
      # GenMD4's training loss stacks two masked copies of the batch, [z1; z2], in one call.
      c = jnp.tile(c, z.shape[0] // c.shape[0])
    return network.apply({"params": params["net"]}, z, t, cond=c, train=train, rngs=rngs,
                         **kwargs)

  if not isinstance(network, networks.Transformer):
    return readout.as_split(apply)

  def logits(h, positions):
    if positions is not None:
      h = jnp.take_along_axis(h, positions[..., None], axis=1)
    return transformer.project_features(network.config, params["net"], h)

  return readout.SplitDenoiser(lambda z, t: apply(z, t, features=True), logits)


def guided_denoiser(network: nn.Module, params: Params, cond: jax.Array, *, null: int,
                    scale: float) -> readout.SplitDenoiser:
  """Classifier-free guidance: denoise_fn(z: int32[B, *S], t: float32[B]) -> float32[B, *S, V]
  log-probabilities of p_u^(1 - scale) p_c^scale, renormalised (guidance.guided_logits), where p_c
  is the network given the labels cond: int32[B] and p_u given the null class `null` ("no class").

  Both come from one network call on the doubled batch [z; z] with labels [cond; null], so a
  sampler's num_calls counts each guided call once (a call of twice the batch). Split as `denoiser`
  is: read out at given positions, both halves are read out there.
  """
  both = denoiser(network, params, jnp.concatenate([cond, jnp.full_like(cond, null)]))

  def features(z, t):
    return both.features(jnp.concatenate([z, z]), jnp.concatenate([t, t]))

  def logits(h, positions):
    doubled = None if positions is None else jnp.concatenate([positions, positions])
    logits_c, logits_u = jnp.split(both.logits(h, doubled), 2)
    return guidance.guided_logits(logits_c, logits_u, scale)

  return readout.SplitDenoiser(features, logits)


def _diffusion_training(cfg: Config, network, params, x, keys, times, label, dropout_rng):
  return elbo.training_loss(denoiser(network, params, label, dropout_rng=dropout_rng), x, keys,
                            make_schedule(cfg.model, params), vocab_size=cfg.model.vocab_size,
                            times=times, network_masks=cfg.model.network_masks,
                            logits_chunk=cfg.model.logits_chunk or None)


def _diffusion_eval(cfg: Config, network, params, x, keys, label):
  return elbo.nelbo(denoiser(network, params, label), x, keys, make_schedule(cfg.model, params),
                    vocab_size=cfg.model.vocab_size, num_samples=cfg.eval.num_time_samples,
                    timesteps=cfg.eval.timesteps or None,
                    logits_chunk=cfg.model.logits_chunk or None)


def _autoregressive(cfg: Config, network, params, x, label, dropout_rng):
  train = dropout_rng is not None
  rngs = {"dropout": dropout_rng} if train else {}
  zeros = jnp.zeros(x.shape[:1], jnp.float32)  # A causal model takes no diffusion time.
  logits_fn = lambda inputs: network.apply({"params": params["net"]}, inputs, zeros, cond=label,
                                           train=train, rngs=rngs)
  return autoregressive.nll(logits_fn, x, bos=cfg.model.vocab_size)


def _autoregressive_training(cfg: Config, network, params, x, keys, times, label, dropout_rng):
  del keys, times  # The likelihood is exact: nothing is drawn.
  return _autoregressive(cfg, network, params, x, label, dropout_rng)


def _autoregressive_eval(cfg: Config, network, params, x, keys, label):
  del keys
  return _autoregressive(cfg, network, params, x, label, None)


class Objective(NamedTuple):
  """Per-example nats: `training` (a surrogate whose gradient is unbiased for the loss; dropout
  on iff dropout_rng) and `eval` (the reported number: the bound, or the exact likelihood)."""
  training: Callable[..., jax.Array]  # (cfg, network, params, x, keys, times, label, dropout_rng)
  eval: Callable[..., jax.Array]  # (cfg, network, params, x, keys, label)


OBJECTIVES: dict[str, Objective] = {
    "diffusion": Objective(_diffusion_training, _diffusion_eval),
    "autoregressive": Objective(_autoregressive_training, _autoregressive_eval),
}
