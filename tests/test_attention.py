"""Every attention implementation computes the same function, and impl=None picks one per backend.

Ground truth: softmax(q k^T / sqrt(H)) v in float64 NumPy. cuDNN runs on NVIDIA GPUs only, so here
only its selection (`default_impl`) and its input checks are tested, not its numerics.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.networks import attention

# The implementations that run on this backend at these tests' sizes (cuDNN needs a GPU; splash,
# interpreted here, needs 128 positions and has tests of its own: tests/test_splash_attention.py).
RUNNABLE = [impl for impl in attention.ATTENTION_IMPLS if impl not in ("cudnn", "splash")]


def reference(q, k, v, causal):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnqk,bknh->bqnh", probs, v)


def qkv(seed=0, shape=(2, 7, 3, 8)):
  return tuple(jax.random.normal(k, shape) for k in jax.random.split(jax.random.key(seed), 3))


@pytest.mark.parametrize("causal", [False, True])
def test_every_runnable_implementation_matches_the_float64_reference(causal):
  q, k, v = qkv()
  want = reference(q, k, v, causal)
  for impl in RUNNABLE:
    got = attention.attend(q, k, v, impl=impl, causal=causal)
    assert got.shape == q.shape and got.dtype == v.dtype
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=str(impl))


@pytest.mark.parametrize("causal", [False, True])
def test_every_runnable_implementation_has_the_same_gradients(causal):
  q, k, v = qkv(1)
  cotangent = jax.random.normal(jax.random.key(2), q.shape)

  def grads(impl):
    loss = lambda q, k, v: (attention.attend(q, k, v, impl=impl, causal=causal) * cotangent).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  # Finite differences of the float64 reference along a random direction, for each input.
  eps = 1e-4
  direction = [np.asarray(d, np.float64) for d in qkv(3)]
  base = [np.asarray(x, np.float64) for x in (q, k, v)]
  ct = np.asarray(cotangent, np.float64)
  for impl in RUNNABLE:
    got = grads(impl)
    for i in range(3):
      plus, minus = list(base), list(base)
      plus[i] = base[i] + eps * direction[i]
      minus[i] = base[i] - eps * direction[i]
      fd = ((reference(*plus, causal) - reference(*minus, causal)) * ct).sum() / (2 * eps)
      np.testing.assert_allclose(float((np.asarray(got[i], np.float64) * direction[i]).sum()), fd,
                                 rtol=1e-3, atol=1e-4, err_msg=f"{impl} input {i}")
  first = grads(RUNNABLE[0])
  for impl in RUNNABLE[1:]:
    for a, b in zip(first, grads(impl)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=str(impl))


def test_explicit_probabilities_applied_to_values_are_the_attention():
  q, k, v = qkv(4)
  for causal in (False, True):
    probs = attention.attention_probs(q, k, causal)
    assert probs.shape == (2, 3, 7, 7) and probs.dtype == jnp.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(attention.apply_probs(probs, v), reference(q, k, v, causal),
                               rtol=2e-5, atol=2e-6)


def test_half_precision_inputs_give_half_precision_outputs_close_to_float32():
  q, k, v = qkv(5)
  want = reference(q, k, v, False)
  for impl in RUNNABLE:
    got = attention.attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), impl=impl)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05, err_msg=str(impl))


def test_none_runs_the_default_implementation_of_this_backend_bitwise():
  q, k, v = qkv(6)
  chosen = attention.chosen_impl(q.dtype, q.shape[-1])
  assert chosen == attention.default_impl(jax.default_backend(), q.dtype, q.shape[-1])
  np.testing.assert_array_equal(attention.attend(q, k, v, impl=None),
                                attention.attend(q, k, v, impl=chosen))


def test_default_implementation_per_backend():
  bf16, f16, f32 = jnp.bfloat16, jnp.float16, jnp.float32
  assert attention.default_impl("cpu", f32, 64) == "matmul"
  assert attention.default_impl("cpu", bf16, 64) == "matmul"
  # GPU: cuDNN's fused kernel for half precision where its head-width rule and the GPU allow it.
  assert attention.default_impl("gpu", bf16, 64, 9.0) == "cudnn"
  assert attention.default_impl("gpu", f16, 128, 8.0) == "cudnn"
  assert attention.default_impl("gpu", f32, 64, 9.0) == "xla"
  assert attention.default_impl("gpu", bf16, 60, 9.0) == "xla"  # Not a multiple of 8.
  assert attention.default_impl("gpu", bf16, 256, 9.0) == "xla"  # Wider than 128.
  assert attention.default_impl("gpu", bf16, 64, 7.5) == "xla"  # Before Ampere.
  assert attention.default_impl("gpu", bf16, 64, None) == "xla"  # Capability unknown (ROCm).
  # TPU: the splash kernel where the sequence is whole tiles of 128 positions.
  assert attention.default_impl("tpu", bf16, 64, length=1024) == "splash"
  assert attention.default_impl("tpu", f32, 64, length=256) == "splash"
  assert attention.default_impl("tpu", bf16, 64, length=100) == "xla"
  assert attention.default_impl("tpu", bf16, 128) == "xla"  # Length unknown.
  for backend in ("cpu", "gpu", "tpu"):
    for dtype in (bf16, f16, f32):
      impl = attention.default_impl(backend, dtype, 64, 9.0)
      attention.check_impl(impl, dtype)  # The choice always accepts the dtype.


def test_unknown_or_unfit_implementation_is_refused_by_name():
  with pytest.raises(ValueError, match="attention_impl must be one of .*'matmul'.*got 'flash'"):
    attention.check_impl("flash", jnp.float32)
  with pytest.raises(ValueError, match="'cudnn' needs dtype bfloat16 or float16, got float32"):
    attention.check_impl("cudnn", jnp.float32)
  attention.check_impl("cudnn", jnp.bfloat16)


def test_matmul_dot_general_is_dense_generals_contraction_with_the_same_parameters():
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(7), (2, 5, 12))
  for features, axis, inputs in [((3, 4), -1, x), (6, (-2, -1), x.reshape(2, 5, 3, 4))]:
    plain = nn.DenseGeneral(features, axis=axis, use_bias=True)
    flat = nn.DenseGeneral(features, axis=axis, use_bias=True,
                           dot_general=attention.matmul_dot_general)
    params = plain.init(jax.random.key(8), inputs)
    flat_params = flat.init(jax.random.key(8), inputs)
    jax.tree.map(np.testing.assert_array_equal, params, flat_params)  # Same tree, same init.
    params = jax.tree.map(lambda p: p + 1.0, params)  # Biases away from 0.
    np.testing.assert_allclose(flat.apply(params, inputs), plain.apply(params, inputs),
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="contracts x's last axes"):
    attention.matmul_dot_general(x, jnp.ones((5, 3)), (((1,), (0,)), ((), ())))
