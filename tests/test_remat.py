"""Rematerialisation policies (md4.networks.remat) change memory, never values; and the memory mode
of benchmarks/benchmark.py, which compiles the training step from shapes to size a batch.

Tiny networks, jitted at XLA's lowest optimisation level: the values do not depend on it, and it
keeps the 15 gradient compilations quick.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from md4 import config as config_lib
from md4 import train
from md4.data import pipeline
from md4.networks import build_network
from md4.networks.remat import REMAT_POLICIES

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Dropout on, and the gradients taken in training mode: a rematerialised block must redraw the same
# dropout masks when it recomputes its forward pass. num_res_blocks=0 still leaves ResBlocks (the
# UNet's two middle ones, and one on each network's way up), and the UViT one transformer block.
TINY = {
    "transformer": dict(vocab_size=11, num_layers=2, num_heads=2, d_model=16, mlp_ratio=2.0,
                        cond_dim=8, dropout_rate=0.1),
    "unet": dict(vocab_size=8, num_channels=3, features=16, num_res_blocks=0, attention=True,
                 num_heads=2, norm_groups=4, dropout_rate=0.1),
    "uvit": dict(vocab_size=8, num_channels=3, features=16, num_res_blocks=0, norm_groups=4,
                 num_layers=1, num_heads=2, d_model=16, mlp_ratio=2.0, dropout_rate=0.1),
}
REMATTED = [p for p in REMAT_POLICIES if p != "none"]


def inputs(name):
  """Tokens (masks included) and times for a batch of 2."""
  k_z, k_t = jax.random.split(jax.random.key(0))
  vocab = TINY[name]["vocab_size"]
  shape = (2, 8) if name == "transformer" else (2, 4, 4, 3)
  z = jax.random.randint(k_z, shape, 0, vocab + 1, dtype=jnp.int32)
  return z, jax.random.uniform(k_t, (2,), minval=0.05, maxval=0.95)


def random_params(model, z, t):
  """Random parameters of model's shapes: unlike init's, the adaLN-zero projections and
  zero-initialised output layers are non-zero, so every parameter gets a gradient."""
  rng = np.random.default_rng(3)

  def draw(leaf):
    std = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 0.3
    return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)

  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), z, t))["params"]
  return jax.tree.map(draw, shapes)


def loss_and_grads(name, policy, params, z, t):
  """(loss, logits), grads of a cross-entropy-like scalar of the logits, dropout on."""
  model = build_network(name, **TINY[name], remat=policy)

  def loss(p):
    logits = model.apply({"params": p}, z, t, train=True, rngs={"dropout": jax.random.key(5)})
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

  fn = jax.jit(jax.value_and_grad(loss, has_aux=True),
               compiler_options={"xla_backend_optimization_level": 0})
  return fn(params)


@pytest.fixture(scope="module", params=sorted(TINY))
def reference(request):
  """Network name, its inputs and random parameters, and the values and gradients without remat."""
  name = request.param
  z, t = inputs(name)
  params = random_params(build_network(name, **TINY[name]), z, t)
  return name, params, z, t, loss_and_grads(name, "none", params, z, t)


@pytest.mark.parametrize("policy", REMATTED)
def test_remat_policy_gives_the_logits_and_gradients_of_no_remat(reference, policy):
  name, params, z, t, ((loss, logits), grads) = reference
  (loss_r, logits_r), grads_r = loss_and_grads(name, policy, params, z, t)
  # The forward pass is the same computation whatever is kept for the backward pass, but not
  # always bit for bit: XLA:CPU compiles a rematerialised block apart from its surroundings (the
  # UNet's logits differ by ~1e-7 under "full"; the transformer's are identical).
  np.testing.assert_allclose(logits_r, logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  # The backward pass recomputes the same operations, rounded and summed in other orders.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_r, grads)
  assert jax.tree.structure(grads_r) == jax.tree.structure(grads)
  # Every parameter gets a gradient, so a block whose recomputation went wrong would show.
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("bad", ["selective", True, "Full"])
def test_unknown_remat_policy_is_refused_naming_the_valid_ones(name, bad):
  with pytest.raises(ValueError) as error:
    build_network(name, **TINY[name], remat=bad)
  assert repr(bad) in str(error.value)
  assert all(repr(policy) in str(error.value) for policy in REMAT_POLICIES)


# ----------------------------------------------------------------------- memory benchmark


@pytest.fixture(scope="module")
def benchmark():
  """benchmarks/benchmark.py as a module (it is a script, not a package)."""
  spec = importlib.util.spec_from_file_location("benchmark", ROOT / "benchmarks" / "benchmark.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_memory_table_counts_state_and_batch_and_grows_with_batch(benchmark):
  cfg = config_lib.from_configdict(tiny.get_config())
  small, large = benchmark.memory_table(cfg, [8, 16])
  spec = pipeline.get_spec(cfg.data)
  state = train.abstract_state(train.make_setup(cfg, spec))
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  state_bytes, params_bytes = nbytes(state), nbytes(state.params)
  for row in (small, large):
    assert row.remat == "none" and row.dtype == "float32"
    assert row.state_bytes == state_bytes >= 4 * params_bytes  # params, Adam's two moments, EMA.
    # The step's arguments are the state and the int32 tokens (the demo's data have no labels).
    assert row.argument_bytes == state_bytes + row.batch * spec.tokens_per_example * 4
    # The state is donated: the new state is written over the old one.
    assert row.alias_bytes == state_bytes
    assert row.output_bytes >= state_bytes  # The step returns the new state (and its metrics).
  assert (small.batch, large.batch) == (8, 16)
  assert large.temp_bytes > small.temp_bytes  # Activations grow with the batch.


def test_full_remat_does_not_add_temporary_bytes_for_a_deep_transformer(benchmark):
  # Measured with XLA:CPU (jax 0.10.2), which saves little with remat: with 3 layers over 32 tokens
  # "full" needs ~3% fewer temporary bytes than "none", with MD4-S ~0.3% fewer (BENCHMARKS.md); a
  # GPU compile is where a policy's savings show. With one layer "full" needs slightly more (the
  # recomputation's own buffers), and "dots" needs as much as "none" or slightly more, so only
  # "full" against "none" over several layers is asserted.
  config = tiny.get_config()
  config.model.net.num_layers = 3
  config.data.seq_length = 32
  cfg = config_lib.from_configdict(config)
  none, full = benchmark.memory_table(cfg, [8], ["none", "full"])
  assert (none.remat, full.remat) == ("none", "full")
  assert full.temp_bytes <= none.temp_bytes
  assert full.argument_bytes == none.argument_bytes  # The same state and batch.
