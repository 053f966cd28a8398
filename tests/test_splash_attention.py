"""attention_impl="splash": jax's Pallas TPU splash attention kernel, run here by the Pallas
interpreter, against the XLA attention (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.networks import attention


@pytest.mark.parametrize("causal", [False, True])
def test_splash_attention_equals_xla_attention_in_value_and_gradient(causal):
  """Bidirectional and causal, 128 positions (one tile of the kernel) and 256 (two): the output
  and the gradients w.r.t. q, k and v of a weighted sum of the output agree to float32 rounding."""
  length = 256 if causal else 128
  kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (2, length, 2, 8)) for key in (kq, kk, kv))
  weights = jax.random.normal(kw, (2, length, 2, 8))

  def loss(impl):
    f = lambda q, k, v: jnp.sum(attention.attend(q, k, v, impl=impl, causal=causal) * weights)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

  (value, grads), (ref_value, ref_grads) = loss("splash"), loss("xla")
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)


def test_splash_attention_needs_whole_tiles():
  q = jnp.zeros((1, 64, 2, 8))
  with pytest.raises(ValueError, match="multiple of 128, got 64"):
    attention.attend(q, q, q, impl="splash")
