"""The bound computed a chunk of positions at a time (model.logits_chunk, the logits_chunk argument of
elbo.nelbo and elbo.training_loss): the same value and gradient as from the whole logits, and the
whole logits never formed."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from md4 import config as config_lib
from md4 import elbo, model, networks, schedules, train
from md4.data import pipeline

V, L, B = 27, 16, 3
NET = networks.build_network("transformer", vocab_size=V, num_layers=1, num_heads=2, d_model=16,
                             mlp_ratio=2.0, cond_dim=8)


def _params():
  x = jnp.zeros((1, L), jnp.int32)
  params = {"net": NET.init(jax.random.key(1), x, jnp.zeros(1))["params"]}
  # The output layer starts at zero (uniform logits): give it weights so the test can fail.
  kernel = params["net"]["final"]["proj"]["kernel"]
  params["net"]["final"]["proj"]["kernel"] = jax.random.normal(jax.random.key(2), kernel.shape)
  params["schedule"] = {"raw_power": jax.random.normal(jax.random.key(3), (V,))}
  return params


X = jax.random.randint(jax.random.key(0), (B, L), 0, V)


def _loss(params, chunk, kind):
  denoise, rng, chunk = model.denoiser(NET, params), jax.random.key(4), chunk or None
  if kind == "md4":
    return elbo.nelbo(denoise, X, rng, schedules.get_schedule("linear"), vocab_size=V,
                      logits_chunk=chunk)
  if kind == "discrete":
    return elbo.nelbo(denoise, X, rng, schedules.get_schedule("cosine"), vocab_size=V,
                      timesteps=7, num_samples=2, logits_chunk=chunk)
  schedule = schedules.StateDependentPoly(jax.nn.softplus(params["schedule"]["raw_power"]))
  return elbo.training_loss(denoise, X, rng, schedule, vocab_size=V,
                            network_masks=int(kind[-1]), logits_chunk=chunk)


@pytest.mark.parametrize("kind", ["md4", "discrete", "genmd4_masks1", "genmd4_masks2"])
def test_chunked_bound_equals_the_whole_logits_bound_in_value_and_gradient(kind):
  """MD4's continuous bound, the discrete-time bound with two time samples, and GenMD4's RLOO
  surrogate with one or two masks in the network's gradient: per-example values and the gradient
  w.r.t. every parameter (network and GenMD4's exponents) agree to float32 rounding with chunks
  of 4 positions (4 chunks) and the whole logits."""
  params = _params()
  def sum_and_values(p, chunk):
    values = _loss(p, chunk, kind)
    return values.sum(), values

  value_and_grad = lambda chunk: jax.jit(jax.value_and_grad(sum_and_values, has_aux=True),
                                         static_argnums=1)(params, chunk)
  (_, whole), g_whole = value_and_grad(0)
  (_, chunked), g_chunked = value_and_grad(4)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_whole)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_chunked_training_step_never_forms_the_whole_logits():
  """The compiled training step with model.logits_chunk holds no [B, L, V] float array: its logits
  exist a chunk at a time ([B, C, V]); without chunks the whole array is there."""
  cfg = config_lib.from_configdict(tiny.get_config())
  spec = pipeline.get_spec(cfg.data)
  b, length = cfg.train.batch_size, cfg.data.seq_length
  texts = {}
  for chunk in (0, 4):
    c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, logits_chunk=chunk))
    setup = train.make_setup(c, spec)
    state = train.abstract_state(setup)
    batch = {"x": jax.ShapeDtypeStruct((b, length), jnp.int32)}
    texts[chunk] = train.compile_train_step(setup, state).lower(state, batch).as_text()
  whole = f"tensor<{b}x{length}x{spec.vocab_size}xf32>"
  assert whole in texts[0]
  assert whole not in texts[4]
  assert f"tensor<{b}x4x{spec.vocab_size}xf32>" in texts[4]


def test_logits_chunk_is_checked():
  base = tiny.get_config()
  base.model.logits_chunk = 5
  with pytest.raises(ValueError, match="model.logits_chunk=5 must divide data.seq_length=16"):
    config_lib.from_configdict(base)
  base.model.logits_chunk = -1
  with pytest.raises(ValueError, match=r"model.logits_chunk=-1 is invalid; valid: >= 0"):
    config_lib.from_configdict(base)
  from configs import mnist_demo
  images = mnist_demo.get_config()
  images.model.logits_chunk = 4
  with pytest.raises(ValueError, match="applies to the diffusion transformer"):
    config_lib.from_configdict(images)
