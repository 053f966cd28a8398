"""Tests of the denoiser backbones in md4.networks.

Tiny sizes: the whole file runs in well under a minute on one CPU core.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.networks import NETWORKS, build_network
from md4.networks.transformer import (
    GatedMlp,
    Transformer,
    TransformerConfig,
    apply_rope,
    rope_angles,
    rope_angles_2d,
)
from md4.networks.uvit import depth_to_space, space_to_depth

TEXT_VOCAB = 11
PIXEL_VOCAB = 256
NUM_CLASSES = 3
TINY = {
    "transformer": dict(vocab_size=TEXT_VOCAB, num_layers=2, num_heads=2, d_model=32),
    "unet": dict(vocab_size=PIXEL_VOCAB, num_channels=3, features=32, num_res_blocks=1,
                 attention=True, num_heads=2, norm_groups=8, dropout_rate=0.0),
    "uvit": dict(vocab_size=PIXEL_VOCAB, num_channels=3, features=32, num_res_blocks=1,
                 norm_groups=8, num_layers=2, num_heads=2, d_model=32),
}
ALL = sorted(TINY)


def make(name, **overrides):
  return build_network(name, **{**TINY[name], **overrides})


def inputs(name, key=0, batch=2):
  """Random tokens (masks included) and times for network `name`."""
  k_z, k_t = jax.random.split(jax.random.key(key))
  vocab = TINY[name]["vocab_size"]
  shape = (batch, 6) if name == "transformer" else (batch, 8, 8, 3)
  z = jax.random.randint(k_z, shape, 0, vocab + 1, dtype=jnp.int32)
  t = jax.random.uniform(k_t, (batch,), minval=0.05, maxval=0.95)
  return z, t


def class_labels(batch=2):
  return jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES


def init(model, z, t, cond=None):
  return model.init(jax.random.key(42), z, t, cond=cond)


def apply(model, variables, z, t, cond=None, train=False, rngs=None):
  # Eager on purpose: the small ops compile once and are reused by every tiny config,
  # where jitting each config's whole graph would compile far more.
  return model.apply(variables, z, t, cond=cond, train=train, rngs=rngs)


def random_params(model, z, t, cond=None, seed=7):
  """Random variables of model's shapes with every layer active.

  Unlike init, adaLN-zero layers are non-zero here. Drawn in numpy from eval_shape, which
  skips compiling every initialiser; std 1/sqrt(fan in) keeps activations O(1).
  """
  rng = np.random.default_rng(seed)

  def draw(leaf):
    std = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 0.3
    return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map(draw, jax.eval_shape(lambda: init(model, z, t, cond)))


def active(name, **overrides):
  """(model, random variables, z, t, cond) for a tiny network."""
  model = make(name, **overrides)
  z, t = inputs(name)
  cond = class_labels() if overrides.get("num_classes", 0) else None
  return model, random_params(model, z, t, cond), z, t, cond


def max_abs_diff(a, b):
  return float(jnp.max(jnp.abs(a - b)))


# ------------------------------------------------------------------------- shapes, dtypes


@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
@pytest.mark.parametrize("name", ALL)
def test_logits_have_shape_b_s_vocab_and_float32_dtype(name, num_classes):
  model, variables, z, t, cond = active(name, num_classes=num_classes)
  logits = apply(model, variables, z, t, cond=cond)
  vocab = TINY[name]["vocab_size"]
  assert logits.shape == z.shape + (vocab,)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("name", ALL)
def test_all_mask_input_is_accepted_and_embedded_distinctly(name):
  model, variables, z, t, _ = active(name)
  vocab = TINY[name]["vocab_size"]
  masked = apply(model, variables, jnp.full_like(z, vocab), t)
  zeros = apply(model, variables, jnp.zeros_like(z), t)
  assert bool(jnp.all(jnp.isfinite(masked)))
  # The mask id has its own embedding row rather than being clipped onto a real token.
  assert max_abs_diff(masked, zeros) > 1e-3


# --------------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("name", ALL)
def test_output_is_bit_identical_in_t_without_time_conditioning(name):
  model, variables, z, t, _ = active(name, time_conditioning=False)
  a = apply(model, variables, z, jnp.full_like(t, 0.1))
  b = apply(model, variables, z, jnp.full_like(t, 0.9))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ALL)
def test_output_changes_with_t_under_time_conditioning(name):
  model, variables, z, t, _ = active(name, time_conditioning=True)
  a = apply(model, variables, z, jnp.full_like(t, 0.1))
  b = apply(model, variables, z, jnp.full_like(t, 0.9))
  assert max_abs_diff(a, b) > 1e-3


@pytest.mark.parametrize("time_conditioning", [True, False])
@pytest.mark.parametrize("name", ALL)
def test_output_changes_with_class_label(name, time_conditioning):
  model, variables, z, t, cond = active(
      name, num_classes=NUM_CLASSES, time_conditioning=time_conditioning
  )
  a = apply(model, variables, z, t, cond=cond)
  b = apply(model, variables, z, t, cond=(cond + 1) % NUM_CLASSES)
  assert max_abs_diff(a, b) > 1e-3


@pytest.mark.parametrize("name", ALL)
def test_bad_cond_raises_value_error(name):
  z, t = inputs(name)
  unconditional = make(name)
  with pytest.raises(ValueError, match="num_classes=0"):
    init(unconditional, z, t, cond=class_labels())
  conditional = make(name, num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match="required"):
    init(conditional, z, t, cond=None)
  with pytest.raises(ValueError, match="shape"):
    init(conditional, z, t, cond=jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="integer"):
    init(conditional, z, t, cond=jnp.zeros((2,), jnp.float32))


def test_wrong_input_shapes_raise_value_error():
  z, t = inputs("transformer")
  with pytest.raises(ValueError, match="t must have shape"):
    init(make("transformer"), z, t[:1])
  with pytest.raises(ValueError, match=r"int32\[B, L\]"):
    init(make("transformer"), z[..., None], t)
  zi, ti = inputs("unet")
  with pytest.raises(ValueError, match="channels"):
    init(make("unet"), zi[..., :2], ti)
  with pytest.raises(ValueError, match="patch_size"):
    init(make("uvit"), zi[:, :7, :7], ti)


# ----------------------------------------------------------------------------- transformer


@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
def test_transformer_blocks_are_identity_at_init_with_adaln_zero(num_classes):
  cond = class_labels() if num_classes else None
  model = make("transformer", num_classes=num_classes)
  z, t = inputs("transformer")
  variables = init(model, z, t, cond)
  blocks = [k for k in variables["params"] if k.startswith("block_")]
  assert len(blocks) == 2
  no_blocks = {"params": {k: v for k, v in variables["params"].items() if k not in blocks}}
  shallow = make("transformer", num_layers=0, num_classes=num_classes)
  full_out = apply(model, variables, z, t, cond=cond)
  np.testing.assert_array_equal(
      np.asarray(full_out), np.asarray(apply(shallow, no_blocks, z, t, cond=cond))
  )
  # The blocks are on the path: once their adaLN weights move, the output changes.
  block_0 = random_params(model, z, t, cond)["params"]["block_0"]
  moved = {"params": {**variables["params"], "block_0": block_0}}
  assert max_abs_diff(apply(model, moved, z, t, cond=cond), full_out) > 1e-3


@pytest.mark.parametrize("time_conditioning", [True, False])
def test_transformer_is_bidirectional(time_conditioning):
  model, variables, z, t, _ = active("transformer", time_conditioning=time_conditioning)
  z2 = z.at[:, -1].set((z[:, -1] + 1) % (TEXT_VOCAB + 1))
  a = apply(model, variables, z, t)
  b = apply(model, variables, z2, t)
  assert max_abs_diff(a[:, 0], b[:, 0]) > 1e-4


@pytest.mark.parametrize("mlp_type,gate", [("swiglu", jax.nn.silu), ("glu", jax.nn.sigmoid)])
def test_gated_mlp_matches_its_formula(mlp_type, gate):
  mlp = GatedMlp(hidden_dim=8, mlp_type=mlp_type)
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  params = mlp.init(jax.random.key(1), x)["params"]
  expected = (gate(x @ params["gate"]["kernel"]) * (x @ params["up"]["kernel"])) @ params[
      "down"]["kernel"]
  np.testing.assert_allclose(mlp.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)


def test_mlp_type_changes_transformer_output():
  model, variables, z, t, _ = active("transformer", mlp_type="swiglu")
  glu = make("transformer", mlp_type="glu")
  assert max_abs_diff(apply(model, variables, z, t), apply(glu, variables, z, t)) > 1e-3


def test_rope_scores_depend_only_on_relative_position():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))
  angles = rope_angles(jnp.arange(10), 8)

  def score(m, n):
    return jnp.sum(apply_rope(q, angles[m:m + 1]) * apply_rope(k, angles[n:n + 1]))

  np.testing.assert_allclose(score(2, 5), score(6, 9), rtol=1e-5)
  assert abs(float(score(2, 5) - score(2, 6))) > 1e-4
  np.testing.assert_allclose(  # rotations preserve norms
      jnp.linalg.norm(apply_rope(q, angles[7:8])), jnp.linalg.norm(q), rtol=1e-6
  )


def test_rope_2d_splits_pairs_between_rows_and_columns():
  angles = rope_angles_2d(height=2, width=3, head_dim=8)
  assert angles.shape == (6, 4)
  row, col = angles[:, :2], angles[:, 2:]
  # Token 4 is at (row 1, col 1): its row angles are token 3's (1, 0), its column angles token 1's.
  np.testing.assert_array_equal(row[4], row[3])
  np.testing.assert_array_equal(col[4], col[1])
  assert not np.array_equal(row[4], row[1])


def test_space_to_depth_round_trips_and_groups_patches():
  x = jnp.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3)
  patches = space_to_depth(x, 2)
  assert patches.shape == (2, 2, 3, 12)
  np.testing.assert_array_equal(patches[0, 0, 0], x[0, :2, :2].reshape(-1))
  np.testing.assert_array_equal(depth_to_space(patches, 2), x)


# -------------------------------------------------------------------- dropout, precision


@pytest.mark.parametrize("name", ALL)
def test_dropout_only_in_train_mode(name):
  model, variables, z, t, _ = active(name, dropout_rate=0.5)
  r1, r2 = {"dropout": jax.random.key(1)}, {"dropout": jax.random.key(2)}
  eval_a = apply(model, variables, z, t, train=False, rngs=r1)
  eval_b = apply(model, variables, z, t, train=False, rngs=r2)
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
  train_a = apply(model, variables, z, t, train=True, rngs=r1)
  train_b = apply(model, variables, z, t, train=True, rngs=r2)
  np.testing.assert_array_equal(
      np.asarray(train_a), np.asarray(apply(model, variables, z, t, train=True, rngs=r1))
  )
  assert max_abs_diff(train_a, train_b) > 1e-3
  assert max_abs_diff(train_a, eval_a) > 1e-3


# bf16 keeps ~3 significant digits: on these tiny nets the largest logit error is about 1%
# of the largest logit; a real bug (wrong cast, lost residual) gives errors of order 100%.
BF16_RELATIVE_TOLERANCE = 0.05


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
  model, variables, z, t, _ = active(name)
  bf16 = make(name, dtype="bfloat16")
  assert bf16.config.dtype == jnp.bfloat16
  bf16_vars = jax.eval_shape(lambda: init(bf16, z, t))
  assert {x.dtype for x in jax.tree_util.tree_leaves(bf16_vars)} == {jnp.dtype(jnp.float32)}
  ref = apply(model, variables, z, t)
  out = apply(bf16, variables, z, t)
  assert out.dtype == jnp.float32
  assert not np.array_equal(np.asarray(out), np.asarray(ref))  # bf16 really computed
  assert max_abs_diff(out, ref) < BF16_RELATIVE_TOLERANCE * float(jnp.max(jnp.abs(ref)))


# The UViT rematerialises both the ResBlocks (shared with the UNet) and transformer blocks;
# one of each is enough, and keeps the two gradient compilations quick.
@pytest.mark.parametrize(
    "name,shallow",
    [("transformer", dict(num_layers=1)), ("uvit", dict(num_layers=1, num_res_blocks=0))],
)
def test_remat_gives_same_outputs_and_gradients(name, shallow):
  model, variables, z, t, _ = active(name, remat=False, **shallow)
  rematted = make(name, remat=True, **shallow)

  def loss(params, net):
    logits = net.apply({"params": params}, z, t)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  # Jitted, as in training. The values do not depend on XLA's optimisation level, and
  # level 0 halves the compile time of these two gradient programs.
  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1,
                           compiler_options={"xla_backend_optimization_level": 0})
  value, grads = value_and_grad(variables["params"], model)
  value_r, grads_r = value_and_grad(variables["params"], rematted)
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_r, grads
  )
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads)) > 0


# -------------------------------------------------------------------------------- registry


def test_build_network_returns_configured_module():
  model = build_network("transformer", vocab_size=5, num_layers=1, num_heads=2, d_model=8)
  assert isinstance(model, Transformer)
  assert model.config == TransformerConfig(vocab_size=5, num_layers=1, num_heads=2, d_model=8)
  for name, (module_cls, config_cls) in NETWORKS.items():
    assert isinstance(make(name), module_cls) and isinstance(make(name).config, config_cls)


def test_build_network_rejects_unknown_name_and_fields():
  with pytest.raises(ValueError, match="'resnet'.*transformer.*unet.*uvit"):
    build_network("resnet")
  with pytest.raises(ValueError, match="'n_layers'.*num_layers"):
    build_network("transformer", vocab_size=5, n_layers=2)
  with pytest.raises(ValueError, match="vocab_size"):
    build_network("transformer", num_layers=2)


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("transformer", dict(mlp_type="relu"), "mlp_type"),
        ("transformer", dict(d_model=30, num_heads=4), "divisible"),
        ("transformer", dict(dtype="int8"), "dtype"),
        ("transformer", dict(dropout_rate=1.0), "dropout_rate"),
        ("unet", dict(features=30), "norm_groups"),
        ("uvit", dict(d_model=24, num_heads=4), "divisible"),
        ("uvit", dict(num_classes=-1), "num_classes"),
        ("unet", dict(attention_impl="flash"), "attention_impl"),
        ("uvit", dict(attention_impl="cudnn"), "bfloat16 or float16"),
    ],
)
def test_config_rejects_bad_values(name, bad, match):
  with pytest.raises(ValueError, match=match):
    make(name, **bad)


def test_configs_are_frozen_and_hashable():
  config = make("transformer").config
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.num_layers = 3
  assert hash(config) == hash(dataclasses.replace(config))
