"""Tests of the denoiser backbones in md4.networks.

Tiny sizes: the whole file runs in well under a minute on one CPU core.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.networks import NETWORKS, build_network
from md4.networks.blocks import Mlp, SelfAttention, mlp_width
from md4.networks.layers import apply_rope, branch_dropout, rope_angles
from md4.networks.transformer import Transformer, TransformerConfig, project_features
from md4.networks.uvit import depth_to_space, sincos_position_table

TEXT_VOCAB = 11
PIXEL_VOCAB = 256
NUM_CLASSES = 3
TINY = {
    "transformer": dict(vocab_size=TEXT_VOCAB, num_layers=2, num_heads=2, d_model=32, cond_dim=8),
    "unet": dict(vocab_size=PIXEL_VOCAB, num_channels=3, features=32, num_res_blocks=1,
                 attention=True, num_heads=2, norm_groups=8, dropout_rate=0.0),
    "uvit": dict(vocab_size=PIXEL_VOCAB, num_channels=3, features=32, num_res_blocks=1,
                 norm_groups=8, num_layers=2, num_heads=2, d_model=32, dropout_rate=0.0),
    "dit": dict(vocab_size=TEXT_VOCAB, num_layers=1, num_heads=2, d_model=16, cond_dim=8),
}
# MDLM's DIT is tested against a transcription of its source in tests/test_mdlm.py.
ALL = sorted(set(TINY) - {"dit"})


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


# ------------------------------------------------------------------------ initialisation


@pytest.mark.parametrize("name", ALL)
def test_output_layer_starts_at_zero_so_initial_logits_are_uniform(name):
  model = make(name)
  z, t = inputs(name)
  logits = apply(model, init(model, z, t), z, t)
  np.testing.assert_array_equal(np.asarray(logits), 0.0)


@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
def test_transformer_blocks_are_identity_at_init_with_adaln_zero(num_classes):
  cond = class_labels() if num_classes else None
  model = make("transformer", num_classes=num_classes)
  z, t = inputs("transformer")
  variables = init(model, z, t, cond)
  blocks = [k for k in variables["params"] if k.startswith("block_")]
  assert len(blocks) == 2
  # A random output layer, so that the logits show the stream the blocks leave behind.
  random = random_params(model, z, t, cond)["params"]
  params = {**variables["params"], "final": random["final"]}
  no_blocks = {"params": {k: v for k, v in params.items() if k not in blocks}}
  shallow = make("transformer", num_layers=0, num_classes=num_classes)
  full_out = apply(model, {"params": params}, z, t, cond=cond)
  assert max_abs_diff(full_out, 0.0) > 1e-3
  np.testing.assert_array_equal(
      np.asarray(full_out), np.asarray(apply(shallow, no_blocks, z, t, cond=cond))
  )
  # The blocks are on the path: once their adaLN weights move, the output changes.
  moved = {"params": {**params, "block_0": random["block_0"]}}
  assert max_abs_diff(apply(model, moved, z, t, cond=cond), full_out) > 1e-3


@pytest.mark.parametrize("depth_scaled", [True, False])
def test_mlp_kernels_have_variance_one_over_fan_in_times_the_depth_scale(depth_scaled):
  layers = 8
  model = build_network("transformer", vocab_size=5, num_layers=layers, num_heads=2, d_model=64,
                        depth_scaled_init=depth_scaled)
  z, t = jnp.zeros((1, 4), jnp.int32), jnp.zeros((1,))
  params = init(model, z, t)["params"]
  scale = 2.0 / layers if depth_scaled else 1.0
  for i in range(layers):
    for name, fan_in in (("gate", 64), ("up", 64), ("down", model.config.mlp_dim)):
      kernel = np.asarray(params[f"block_{i}"]["mlp"][name]["kernel"])
      # >= 64 x 192 = 12288 draws each: a truncated normal's sample variance then has a relative
      # standard error of about 1.05%, so 4% is about 3.8 of them (the init key is fixed).
      np.testing.assert_allclose(kernel.var(), scale / fan_in, rtol=0.04)
  attn = np.asarray(params["block_0"]["attn"]["query"]["kernel"])  # Not depth-scaled.
  np.testing.assert_allclose(attn.var(), 1.0 / 64, rtol=0.06)  # 4096 draws: 6% is ~3.3 SE.


# ----------------------------------------------------------------------------- transformer


@pytest.mark.parametrize("time_conditioning", [True, False])
def test_transformer_is_bidirectional(time_conditioning):
  model, variables, z, t, _ = active("transformer", time_conditioning=time_conditioning)
  z2 = z.at[:, -1].set((z[:, -1] + 1) % (TEXT_VOCAB + 1))
  a = apply(model, variables, z, t)
  b = apply(model, variables, z2, t)
  assert max_abs_diff(a[:, 0], b[:, 0]) > 1e-4


@pytest.mark.parametrize("mlp_type", ["glu", "swiglu", "gelu"])
def test_mlp_matches_its_formula(mlp_type):
  mlp = Mlp(hidden_dim=8, mlp_type=mlp_type)
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  p = mlp.init(jax.random.key(1), x)["params"]
  if mlp_type == "gelu":
    expected = jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + p[
        "fc2"]["bias"]
  else:
    gate = {"glu": jax.nn.sigmoid, "swiglu": jax.nn.silu}[mlp_type]
    expected = (gate(x @ p["gate"]["kernel"]) * (x @ p["up"]["kernel"])) @ p["down"]["kernel"]
  np.testing.assert_allclose(mlp.apply({"params": p}, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option", [dict(mlp_type="swiglu"), dict(norm="rmsnorm"),
                                    dict(cond_activation="silu"), dict(rope="halves"),
                                    dict(norm_eps=1e-2)])
def test_each_option_changes_the_function_of_the_same_parameters(option):
  model, variables, z, t, _ = active("transformer")
  other = make("transformer", **option)
  assert max_abs_diff(apply(model, variables, z, t), apply(other, variables, z, t)) > 1e-4


def test_mlp_width_follows_the_released_rounding_rule():
  # int(8 d / 3) rounded up to a multiple of 32: 2048 for MD4-S's 768, 2752 for MD4-M's 1024.
  assert mlp_width(8 / 3, 768, 32) == 2048
  assert mlp_width(8 / 3, 1024, 32) == 2752
  assert mlp_width(4.0, 768, 1) == 3072 and mlp_width(2.0, 16, 32) == 32
  assert TransformerConfig(vocab_size=5).mlp_dim == 2048


def test_parameter_shapes_of_the_embedding_and_conditioning_options():
  z, t = inputs("transformer")

  def shapes(**overrides):
    model = make("transformer", **overrides)
    return jax.tree.map(lambda x: x.shape, jax.eval_shape(lambda: init(model, z, t))["params"])

  released = shapes(embed_dim=8)
  assert released["embed"]["embedding"] == (TEXT_VOCAB + 1, 8)
  assert released["embed_proj"]["kernel"] == (8, 32)
  assert released["cond_embed"]["time_hidden"]["kernel"] == (8, 32)  # 4 x the 8-wide vector.
  assert released["block_0"]["adaln"]["kernel"] == (8, 6 * 32)
  assert "bias" not in released["final"]["proj"] and "attn_norm" not in released["block_0"]
  wide = shapes(cond_dim=0, output_bias=True)  # cond_dim=0: the conditioning is d_model wide.
  assert wide["embed"]["embedding"] == (TEXT_VOCAB + 1, 32) and "embed_proj" not in wide
  assert wide["block_0"]["adaln"]["kernel"] == (32, 6 * 32)
  assert wide["final"]["proj"]["bias"] == (TEXT_VOCAB,)


def test_rope_scores_depend_only_on_relative_position():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))
  angles = rope_angles(jnp.arange(10), 8)
  for layout in ("interleaved", "halves"):

    def score(m, n):
      rotate = lambda x, i: apply_rope(x, angles[i:i + 1], layout)
      return jnp.sum(rotate(q, m) * rotate(k, n))

    np.testing.assert_allclose(score(2, 5), score(6, 9), rtol=1e-5)
    assert abs(float(score(2, 5) - score(2, 6))) > 1e-4
    np.testing.assert_allclose(  # rotations preserve norms
        jnp.linalg.norm(apply_rope(q, angles[7:8], layout)), jnp.linalg.norm(q), rtol=1e-6
    )


def test_interleaved_rope_is_halves_rope_with_features_permuted():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  angles = rope_angles(jnp.arange(5), 8)
  # Pair (2i, 2i + 1) -> (i, i + 4).
  to_halves = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])
  np.testing.assert_allclose(apply_rope(x, angles, "interleaved")[..., to_halves],
                             apply_rope(x[..., to_halves], angles, "halves"), rtol=1e-6, atol=1e-6)


def test_attention_with_dropout_matches_the_fused_path_when_nothing_is_dropped():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  angles = rope_angles(jnp.arange(5), 8)
  fused = SelfAttention(num_heads=2)
  params = fused.init(jax.random.key(1), x, angles)
  explicit = SelfAttention(num_heads=2, dropout_rate=1e-12, deterministic=False)
  out = explicit.apply(params, x, angles, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_allclose(out, fused.apply(params, x, angles), rtol=1e-5, atol=1e-6)
  dropped = SelfAttention(num_heads=2, dropout_rate=0.5, deterministic=False)
  assert max_abs_diff(dropped.apply(params, x, angles, rngs={"dropout": jax.random.key(2)}),
                      out) > 1e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_at_positions_and_from_features_are_the_full_logits_bitwise(dtype):
  """The readouts a sampler (logits at revealed positions only) and a chunked loss (features, then
  the output layer) use are the full network's logits, bit for bit."""
  model, variables, z, t, _ = active("transformer", output_bias=True, dtype=dtype)
  full = np.asarray(apply(model, variables, z, t))
  positions = jnp.array([[0, 5, 5], [3, 1, 0]], jnp.int32)
  at = model.apply(variables, z, t, positions=positions)
  np.testing.assert_array_equal(at, np.take_along_axis(full, np.asarray(positions)[..., None], 1))
  features = model.apply(variables, z, t, features=True)
  assert features.shape == z.shape + (TINY["transformer"]["d_model"],)
  np.testing.assert_array_equal(project_features(model.config, variables["params"], features), full)


@pytest.mark.parametrize("kind", ["channel", "element"])
def test_channel_dropout_shares_its_mask_over_positions(kind):
  x = jnp.ones((3, 50, 40))
  out = np.asarray(branch_dropout(0.5, kind, deterministic=False).apply(
      {}, x, rngs={"dropout": jax.random.key(0)}))
  assert set(np.unique(out)) == {0.0, 2.0}
  constant_over_positions = bool(np.all(out == out[:, :1, :]))
  assert constant_over_positions == (kind == "channel")


def test_sincos_position_table_encodes_column_then_row():
  table = sincos_position_table(rows=3, cols=4, dim=16)
  assert table.shape == (12, 16)
  col, row = table[:, :8], table[:, 8:]
  # Token 6 is at (row 1, col 2): its column half is token 2's (0, 2), its row half token 4's
  # (1, 0).
  np.testing.assert_array_equal(col[6], col[2])
  np.testing.assert_array_equal(row[6], row[4])
  np.testing.assert_allclose(col[1, :4], np.sin(10_000.0 ** (-np.arange(4) / 4)), rtol=1e-6)
  np.testing.assert_allclose(col[0], np.r_[np.zeros(4), np.ones(4)])  # sin 0, cos 0.


def test_depth_to_space_puts_each_token_back_as_its_patch():
  x = jnp.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3)
  patches = x.reshape(2, 2, 2, 3, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 2, 3, 12)
  np.testing.assert_array_equal(patches[0, 1, 2], x[0, 2:4, 4:6].reshape(-1))
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


# -------------------------------------------------------------------------------- registry


def test_build_network_returns_configured_module():
  model = build_network("transformer", vocab_size=5, num_layers=1, num_heads=2, d_model=8)
  assert isinstance(model, Transformer)
  assert model.config == TransformerConfig(vocab_size=5, num_layers=1, num_heads=2, d_model=8)
  assert model.config.norm == "layernorm" and model.config.cond_dim == 64  # The released defaults.
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
        ("transformer", dict(norm="batchnorm"), "norm must be one of"),
        ("transformer", dict(rope="none"), "rope must be one of"),
        ("transformer", dict(dropout="spatial"), "dropout must be one of"),
        ("transformer", dict(cond_dim=6 + 1), "conditioning width"),
        ("transformer", dict(cond_activation="relu"), "cond_activation"),
        ("transformer", dict(d_model=30, num_heads=4), "divisible"),
        ("transformer", dict(dtype="int8"), "dtype"),
        ("transformer", dict(dropout_rate=1.0), "dropout_rate"),
        ("unet", dict(features=30), "norm_groups"),
        ("uvit", dict(d_model=24, num_heads=5), "divisible"),
        ("uvit", dict(d_model=30, num_heads=2), "divisible"),
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
