"""Classifier-free guidance: the null class, label dropout in training, guided sampling, the checks.

Tiny networks on a synthetic 3-class text dataset; the file runs in well under a minute on a CPU.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from md4 import checks, evaluate, generate, model, sampling, train
from md4 import config as config_lib
from md4.data import pipeline
from md4.networks import build_network

NUM_CLASSES = 3
SPEC = pipeline.DatasetSpec(27, (16,), "text", "char", NUM_CLASSES)
NETS = {
    "unet": dict(vocab_size=256, num_channels=3, features=16, num_res_blocks=1, num_heads=1,
                 norm_groups=4, dropout_rate=0.0),
    "uvit": dict(vocab_size=256, num_channels=3, features=16, num_res_blocks=1, norm_groups=4,
                 num_layers=1, num_heads=1, d_model=16, mlp_ratio=2.0, dropout_rate=0.0),
    "transformer": dict(vocab_size=11, num_layers=1, num_heads=2, d_model=16, cond_dim=8),
}


def cfg_with(**changes) -> config_lib.Config:
  """The tiny config, class-conditional with a null class, changed by {"group.key": value}; a
  "model.net.field" key changes one network field."""
  cd = tiny.get_config()
  cd.model.net = dict(cd.model.net, num_classes=NUM_CLASSES, null_class=True)
  cd.optimizer.warmup_steps = 0  # The first step moves the parameters.
  for key, value in changes.items():
    group, name = key.split(".", 1)
    if name.startswith("net."):
      cd.model.net = dict(cd.model.net, **{name[4:]: value})
    else:
      cd[group][name] = value
  return config_lib.from_configdict(cd)


def _embedding(params):
  return params["net"]["cond_embed"]["class_embed"]["embedding"]


# ------------------------------------------------------------------------------ the network


@pytest.mark.parametrize("name", sorted(NETS))
def test_null_class_adds_one_embedding_row_and_accepts_label_num_classes(name):
  shape = (2, 6) if name == "transformer" else (2, 8, 8, 3)
  z, t = jnp.zeros(shape, jnp.int32), jnp.full((2,), 0.5)
  null = jnp.full((2,), NUM_CLASSES, jnp.int32)

  def shapes(network, cond):
    # Abstract z and t, concrete labels (closed over): the label check runs, nothing is computed.
    return jax.eval_shape(lambda z, t: network.init(jax.random.key(0), z, t, cond=cond), z, t)

  with_null = build_network(name, **NETS[name], num_classes=NUM_CLASSES, null_class=True)
  table = shapes(with_null, null)["params"]["cond_embed"]["class_embed"]["embedding"]
  assert table.shape[0] == NUM_CLASSES + 1
  with pytest.raises(ValueError, match=r"cond labels must be in \[0, 3\] \(3 is the null class\)"):
    shapes(with_null, null + 1)

  plain = build_network(name, **NETS[name], num_classes=NUM_CLASSES)
  table = shapes(plain, null - 1)["params"]["cond_embed"]["class_embed"]["embedding"]
  # Off by default: the parameter shapes of existing (and converted) models are unchanged.
  assert table.shape[0] == NUM_CLASSES
  with pytest.raises(ValueError, match=r"label 3 is the null class only with null_class=True"):
    shapes(plain, null)


@pytest.mark.parametrize("name", sorted(NETS))
def test_null_class_without_classes_is_refused(name):
  with pytest.raises(ValueError, match=r"null_class=True needs num_classes > 0"):
    build_network(name, **NETS[name], null_class=True)


# ------------------------------------------------------------------------------ training


# No gradient clipping in these steps: the global norm would also sum the null row's zero gradient,
# a reduction of another shape, whose float rounding may differ from the model without that row.
NO_CLIP = {"optimizer.grad_clip_norm": 0.0}


def _step(cfg):
  setup = train.make_setup(cfg, SPEC)
  return setup, jax.jit(functools.partial(train.train_step, setup=setup))


@pytest.fixture(scope="module")
def stepping():
  """(setup, jitted step, state, batch) of the null-class model at train.label_drop=0; the state's
  parameters are moved off their initial values, where adaLN-zero's zero projections make every
  gradient of the class table exactly zero."""
  setup, step = _step(cfg_with(**NO_CLIP))
  state = train.create_state(setup)
  keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(state.params))))
  params = jax.tree.map(lambda p: p + 0.5 * jax.random.normal(next(keys), p.shape), state.params)
  local, _ = train.model_batch(next(pipeline.SyntheticDataset(SPEC).train_iterator(8, 0)))
  batch = {k: jnp.asarray(v) for k, v in local.items()}
  return setup, step, state.replace(params=params, ema_params=params), batch


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _drop_null_row(tree):
  """The tree with the null class's row cut from every class table."""
  def cut(path, leaf):
    names = [getattr(p, "key", None) for p in path]
    return leaf[:NUM_CLASSES] if "class_embed" in names and leaf.ndim == 2 else leaf
  return jax.tree_util.tree_map_with_path(cut, tree)


def test_label_drop_zero_is_the_step_of_the_model_without_a_null_class(stepping):
  _, step, state, batch = stepping
  plain_setup, plain_step = _step(cfg_with(**NO_CLIP, **{"model.net.null_class": False}))
  params = _drop_null_row(state.params)
  plain = state.replace(params=params, ema_params=params, opt_state=plain_setup.tx.init(params))

  after, metrics = step(state, batch)
  plain_after, plain_metrics = plain_step(plain, batch)
  assert float(metrics["loss"]) == float(plain_metrics["loss"])
  for a, b in zip(_leaves((_drop_null_row(after.params), _drop_null_row(after.ema_params))),
                  _leaves((plain_after.params, plain_after.ema_params)), strict=True):
    np.testing.assert_array_equal(a, b)
  # The labels' rows learn; the null row, unused, does not move.
  table, table_after = _embedding(state.params), _embedding(after.params)
  assert np.all(np.any(table_after[:NUM_CLASSES] != table[:NUM_CLASSES], axis=-1))
  np.testing.assert_array_equal(table_after[NUM_CLASSES], table[NUM_CLASSES])


def test_label_drop_one_trains_only_the_null_class(stepping):
  _, keep_step, state, batch = stepping
  # 1 is outside train.label_drop's valid range (the conditional model would never learn); it is
  # set past the validation to see every label dropped.
  cfg = cfg_with(**NO_CLIP)
  _, step = _step(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, label_drop=1.0)))
  after, metrics = step(state, batch)
  table, table_after = _embedding(state.params), _embedding(after.params)
  np.testing.assert_array_equal(table_after[:NUM_CLASSES], table[:NUM_CLASSES])  # Zero gradient.
  assert np.any(table_after[NUM_CLASSES] != table[NUM_CLASSES])

  # Exactly the step without dropout on the batch with every label the null class: the drop's key
  # is folded in, so the step's other draws are unchanged.
  null_batch = dict(batch, label=jnp.full_like(batch["label"], NUM_CLASSES))
  kept, kept_metrics = keep_step(state, null_batch)
  assert float(metrics["loss"]) == float(kept_metrics["loss"])
  for a, b in zip(_leaves((after.params, after.opt_state)),
                  _leaves((kept.params, kept.opt_state)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_label_drop_draws_a_fraction_of_labels_from_a_named_key():
  labels = jnp.arange(4096, dtype=jnp.int32) % NUM_CLASSES
  key = jax.random.key(5)
  dropped = np.asarray(model.drop_labels(labels, key, 0.25, NUM_CLASSES))
  again = np.asarray(model.drop_labels(labels, key, 0.25, NUM_CLASSES))
  np.testing.assert_array_equal(dropped, again)
  is_null = dropped == NUM_CLASSES
  assert 0.2 < is_null.mean() < 0.3
  np.testing.assert_array_equal(dropped[~is_null], np.asarray(labels)[~is_null])


def test_evaluation_uses_the_true_labels():
  cfg = cfg_with()
  dropping = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, label_drop=0.5))
  network = model.build_network(cfg, SPEC)
  params = jax.eval_shape(lambda: model.init_params(jax.random.key(0), network, cfg.model, SPEC))
  batch = dict(pipeline.SyntheticDataset(SPEC).eval_example("valid", np.arange(4)),
               weight=np.ones(4, np.float32), index=np.arange(4, dtype=np.int32))
  # The same program whatever train.label_drop is: no label is dropped in evaluation.
  program = lambda c: str(jax.make_jaxpr(functools.partial(
      evaluate._batch_sums, network=network, cfg=c))(params, batch, jax.random.key(2)))
  assert program(cfg) == program(dropping)


# ------------------------------------------------------------------------------ sampling


@pytest.fixture(scope="module")
def trained_like():
  """A network with a null class and random parameters (at init the outputs ignore the class)."""
  cfg = cfg_with(**{"sample.num_steps": 6, "sample.num_samples": 4})
  network = model.build_network(cfg, SPEC)

  @jax.jit
  def moved_params():
    params = model.init_params(jax.random.key(0), network, cfg.model, SPEC)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    return jax.tree.map(lambda p: p + jax.random.normal(next(keys), p.shape), params)

  params = moved_params()
  labels = np.arange(4, dtype=np.int32) % NUM_CLASSES
  init = generate.unconditional_init(SPEC, 4, cfg.model.vocab_size)
  return cfg, network, params, labels, init


_SAMPLERS = {}


def _draw(cfg, network, params, labels, init, scale):
  """Samples of generate.Sampler at guidance scale `scale` (one compiled Sampler per scale)."""
  if scale not in _SAMPLERS:
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, guidance_scale=scale))
    _SAMPLERS[scale] = generate.Sampler(network, cfg)
  return _SAMPLERS[scale](params, jax.random.key(7), init, labels)


def test_guidance_scale_zero_and_one_sample_the_null_class_and_the_conditional_model(trained_like):
  cfg, network, params, labels, init = trained_like
  null = np.full_like(labels, NUM_CLASSES)
  unconditional = _draw(cfg, network, params, null, init, 1.0)
  conditional = _draw(cfg, network, params, labels, init, 1.0)
  assert np.any(np.asarray(unconditional.samples) != np.asarray(conditional.samples))
  np.testing.assert_array_equal(_draw(cfg, network, params, labels, init, 0.0).samples,
                                unconditional.samples)
  # Scale 1 is the conditional model's sampler, unchanged: the same draws as sampling it directly.
  direct = jax.jit(lambda: sampling.sample_with_info(
      model.denoiser(network, params, jnp.asarray(labels)), jax.random.key(7), init,
      model.make_schedule(cfg.model, params), vocab_size=cfg.model.vocab_size,
      num_steps=cfg.sample.num_steps, time_grid_kind=cfg.sample.time_grid))()
  np.testing.assert_array_equal(conditional.samples, direct.samples)


def test_guided_denoiser_is_p_c_to_the_w_over_p_u_to_the_w_minus_1(trained_like):
  cfg, network, params, labels, init = trained_like
  labels = jnp.asarray(labels)
  z = jnp.asarray(init).at[:, ::3].set(jnp.arange(16)[::3] % 27)  # Some positions revealed.
  t = jnp.full((4,), 0.6)
  scales = (0.0, 1.0, 2.0, 3.5)

  @jax.jit
  def outputs():
    separate = [model.denoiser(network, params, c)(z, t)  # Two calls of the batch.
                for c in (labels, jnp.full_like(labels, NUM_CLASSES))]
    guided = [model.guided_denoiser(network, params, labels, null=NUM_CLASSES, scale=w)(z, t)
              for w in scales]
    return [jax.nn.log_softmax(x) for x in separate], guided

  (log_c, log_u), guided_all = outputs()
  for scale, guided in zip(scales, guided_all, strict=True):
    expected = jax.nn.log_softmax(scale * log_c + (1.0 - scale) * log_u)  # p_c^w p_u^(1-w) / Z
    np.testing.assert_allclose(guided, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(jnp.exp(guided).sum(-1), 1.0, atol=1e-5)


def test_guided_sampler_makes_one_call_per_step_on_the_doubled_batch(trained_like):
  cfg, network, params, labels, init = trained_like
  guided = _draw(cfg, network, params, labels, init, 2.0)
  assert int(guided.num_calls) == cfg.sample.num_steps
  samples = np.asarray(guided.samples)
  assert samples.shape == init.shape and samples.min() >= 0 and samples.max() < 27
  # What the network itself sees in one guided call: one batch of 2B rows, labels then null labels.
  seen = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and type(context.module) is type(network):
      seen.append((args[0].shape, np.asarray(kwargs["cond"])))
    return next_fun(*args, **kwargs)

  denoise_fn = model.guided_denoiser(network, params, jnp.asarray(labels), null=NUM_CLASSES,
                                     scale=2.0)
  with nn.intercept_methods(record):
    denoise_fn(jnp.asarray(init), jnp.full((len(labels),), 0.5))
  assert len(seen) == 1
  shape, cond = seen[0]
  assert shape == (2 * len(labels),) + init.shape[1:]
  np.testing.assert_array_equal(cond, np.concatenate([labels, np.full_like(labels, NUM_CLASSES)]))


# ------------------------------------------------------------------------------ the checks


def test_label_drop_without_a_null_class_is_refused_naming_the_key():
  with pytest.raises(ValueError, match=r"train.label_drop=0.1 .*model.net.null_class=True; this "
                                       r"config has model.net.num_classes=3, model.net.null_class=False"):
    checks.check_config(cfg_with(**{"train.label_drop": 0.1, "model.net.null_class": False}), SPEC)
  with pytest.raises(ValueError, match=r"train.label_drop=1.0 is invalid; valid: in \[0, 1\)"):
    cfg_with(**{"train.label_drop": 1.0})
  checks.check_config(cfg_with(**{"train.label_drop": 0.1}), SPEC)


def test_guidance_without_classes_is_refused_naming_the_key():
  unconditional = tiny.get_config()
  unconditional.sample.guidance_scale = 2.0
  cfg = config_lib.from_configdict(unconditional)
  with pytest.raises(ValueError, match=r"sample.guidance_scale=2.0 .*model.net.num_classes > 0"):
    checks.check_config(cfg)
  with pytest.raises(ValueError, match=r"sample.guidance_scale=2.0"):
    generate.Sampler(model.build_network(cfg, pipeline.get_spec(cfg.data)), cfg)
  with pytest.raises(ValueError, match=r"sample.guidance_scale=0.0 .*null_class=False"):
    checks.check_config(cfg_with(**{"sample.guidance_scale": 0.0, "model.net.null_class": False}),
                        SPEC)
  with pytest.raises(ValueError, match=r"sample.guidance_scale=-1.0 is invalid; valid: >= 0"):
    cfg_with(**{"sample.guidance_scale": -1.0})
  checks.check_config(cfg_with(**{"sample.guidance_scale": 2.0}), SPEC)


def test_cifar10_cfg_preset_is_classifier_free_and_the_paper_default_is_not():
  from configs.md4 import cifar10, imagenet64
  paper = config_lib.from_configdict(cifar10.get_config())
  assert (paper.model.net["num_classes"], paper.train.label_drop) == (0, 0.0)
  assert "null_class" not in paper.model.net
  cfg = config_lib.from_configdict(cifar10.get_config("cfg,tiny"))
  assert (cfg.model.net["num_classes"], cfg.model.net["null_class"]) == (10, True)
  assert cfg.train.label_drop == 0.1 and cfg.sample.guidance_scale == 1.0
  checks.check_config(dataclasses.replace(
      cfg, sample=dataclasses.replace(cfg.sample, guidance_scale=2.0)))
  with pytest.raises(ValueError, match=r"unknown config preset 'cfg'"):  # No labels there.
    imagenet64.get_config("cfg")
