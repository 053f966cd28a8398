"""The bound against ground truth: exact enumeration of a tiny distribution and its exact denoisers.

Statistical tolerances: each Monte Carlo estimate is the mean of R independent replicas (R keys, each
a stratified batch), SE = std / sqrt(R), and agreement is asserted within 4 SE (two-sided p ~ 6e-5 for
a correct implementation). Seeds are fixed, so each test is deterministic.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import elbo, schedules
from toy import make_toy, posterior_denoiser

TOY = make_toy(length=3, vocab_size=3, seed=0)
V, L = TOY.vocab_size, TOY.length
EPS = schedules.DEFAULT_EPS
END_SLACK = 2 * L * EPS * math.log(V)  # Upper bound on the prior + decoder gap (see md4.elbo).
REPS = 32  # Copies of each sequence per batch.
X = jnp.asarray(np.tile(TOY.seqs, (REPS, 1)))
WEIGHTS = jnp.asarray(np.tile(TOY.probs, REPS) / REPS, jnp.float32)  # E_p as a weighted batch sum.


def replicate(fn, num_replicas, seed=0):
  """Mean and standard error of fn(key) over independent keys."""
  keys = jax.random.split(jax.random.key(seed), num_replicas)
  vals = jax.tree.map(lambda v: np.asarray(v, np.float64), jax.lax.map(fn, keys))
  return (jax.tree.map(lambda v: v.mean(0), vals),
          jax.tree.map(lambda v: v.std(0, ddof=1) / math.sqrt(num_replicas), vals))


@functools.partial(jax.jit, static_argnames=("denoise_fn", "timesteps", "antithetic"))
def expected_nelbo(key, schedule, denoise_fn, timesteps=None, antithetic=True):
  """One stratified estimate of E_p[nelbo]."""
  vals = elbo.nelbo(denoise_fn, X, key, schedule, vocab_size=V, timesteps=timesteps,
                    antithetic=antithetic)
  return (vals * WEIGHTS).sum()


EXACT_MD4 = posterior_denoiser(TOY)


@pytest.mark.parametrize("name", ["linear", "cosine", "geometric", "poly2", "poly0.5"])
def test_nelbo_equals_entropy_with_exact_denoiser(name):
  sched = schedules.get_schedule(name)
  mean, se = replicate(lambda k: expected_nelbo(k, sched, EXACT_MD4), 1024)
  gap = mean - TOY.entropy
  assert -4 * se <= gap <= END_SLACK + 4 * se, (gap, se)
  assert se < 0.025  # The test has power: a 0.1-nat error would be seen.


def test_genmd4_nelbo_equals_entropy_with_exact_time_dependent_posterior():
  sched = schedules.StateDependentPoly(jnp.array([0.6, 1.0, 2.5]))
  exact = posterior_denoiser(TOY, sched)
  mean, se = replicate(lambda k: expected_nelbo(k, sched, exact), 256)
  gap = mean - TOY.entropy
  assert -4 * se <= gap <= END_SLACK + 4 * se, (gap, se)
  # The time-free MD4 posterior is not exact for GenMD4: the bound is visibly looser.
  mean_md4, se_md4 = replicate(lambda k: expected_nelbo(k, sched, EXACT_MD4), 1024)
  assert mean_md4 - TOY.entropy > 10 * max(se, se_md4)


def exact_expected_nelbo(sched):
  """E_p[nelbo] for a state-independent schedule and the exact denoiser, without Monte Carlo:
  masks enumerated, t integrated by Gauss-Legendre quadrature."""
  patterns = np.array(np.meshgrid(*[[0, 1]] * L, indexing="ij")).reshape(L, -1).T.astype(bool)
  z = np.where(patterns[None], V, TOY.seqs[:, None])  # [N, P, L]
  logp = np.asarray(EXACT_MD4(jnp.asarray(z.reshape(-1, L)), None), np.float64)
  logp_x = np.take_along_axis(logp.reshape(z.shape + (V,)),
                              np.broadcast_to(TOY.seqs[:, None, :, None], z.shape + (1,)), -1)
  nll = np.where(patterns[None], -logp_x[..., 0], 0.0).sum(-1)  # [N, P]
  num_masked = patterns.sum(-1)
  nodes, weights = (np.asarray(v, np.float64) for v in _gauss_legendre_panels(64))
  alpha = np.asarray(sched.alpha(nodes), np.float64)
  gamma = -np.asarray(sched.dalpha(nodes), np.float64) / (1 - alpha)
  q = (1 - alpha[:, None]) ** num_masked * alpha[:, None] ** (L - num_masked)  # [Q, P]
  diffusion = weights @ (gamma[:, None] * (q[:, None, :] * nll[None]).sum(-1))  # [N]
  ends = np.asarray(elbo.end_terms(jnp.asarray(TOY.seqs), sched, V), np.float64)
  return float((TOY.probs * (diffusion + ends)).sum())


@pytest.mark.parametrize("name", ["linear", "cosine", "geometric", "poly2", "poly0.5"])
def test_exact_expected_bound_exceeds_entropy_by_at_most_the_end_terms(name):
  """The continuous-time bound with the exact denoiser is tight up to the eps end terms."""
  gap = exact_expected_nelbo(schedules.get_schedule(name)) - TOY.entropy
  assert -1e-5 <= gap <= END_SLACK, gap


def _zero_logits(z, t):
  del t
  return jnp.zeros(z.shape + (V,))


@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_input_free_uniform_denoiser_gives_length_log_vocab(name, antithetic):
  sched = schedules.get_schedule(name)
  mean, se = replicate(lambda k: expected_nelbo(k, sched, _zero_logits, antithetic=antithetic), 64)
  assert abs(mean - L * math.log(V)) <= 4 * se + 1e-5, (mean, se)


def exact_discrete_bound(sched, timesteps):
  """E_p of the T-step bound by enumerating x, the step and every mask pattern (MD4 schedules)."""
  patterns = np.array(np.meshgrid(*[[0, 1]] * L, indexing="ij")).reshape(L, -1).T.astype(bool)
  xs = np.repeat(TOY.seqs, len(patterns), 0)  # [N*P, L]
  ms = np.tile(patterns, (len(TOY.seqs), 1))
  z = np.where(ms, V, xs)
  logp = np.asarray(EXACT_MD4(jnp.asarray(z), None), np.float64)
  nll = np.where(ms, -np.take_along_axis(logp, xs[..., None], -1)[..., 0], 0).sum(-1)
  num_masked = ms.sum(-1)
  total = 0.0
  for i in range(1, timesteps + 1):
    a_t = float(sched.alpha(i / timesteps))
    a_s = float(sched.alpha((i - 1) / timesteps))
    q = (1 - a_t) ** num_masked * a_t ** (L - num_masked)
    r = (a_s - a_t) / (1 - a_t)
    total += (q * r * nll).reshape(len(TOY.seqs), -1).sum(-1)
  ends = np.asarray(elbo.end_terms(jnp.asarray(TOY.seqs), sched, V), np.float64)
  return float((TOY.probs * (total + ends)).sum())


def test_discrete_bound_matches_enumeration_and_tightens_with_steps():
  sched = schedules.get_schedule("linear")
  exact = {t: exact_discrete_bound(sched, t) for t in (1, 2, 4, 16, 64, 1024)}
  values = list(exact.values())
  assert all(a > b for a, b in zip(values, values[1:])), exact
  assert values[-1] >= TOY.entropy - 1e-6
  assert values[0] - TOY.entropy > 0.1  # One step = independent marginals: much looser.
  assert values[-1] - TOY.entropy < 0.01  # Converges to the (tight) continuous bound.
  for t in (1, 4):
    mean, se = replicate(lambda k: expected_nelbo(k, sched, EXACT_MD4, timesteps=t), 64)
    assert abs(mean - exact[t]) <= 4 * se, (t, mean, exact[t], se)


def _table_denoiser(seed=1):
  """A fixed, input-dependent but arbitrary denoiser (not the posterior)."""
  table = jax.random.normal(jax.random.key(seed), (V + 1, L, V))
  return lambda z, t: table[z, jnp.arange(L)] + 0.0 * t[:, None, None]


def test_equal_exponents_reproduce_md4_poly_bound():
  denoise = _table_denoiser()
  key = jax.random.key(3)
  for k in (1.0, 2.0):
    md4 = schedules.get_schedule(f"poly{k}")
    gen = schedules.StateDependentPoly(jnp.full((V,), k))
    for timesteps in (None, 8):
      a = elbo.nelbo(denoise, X, key, md4, vocab_size=V, timesteps=timesteps)
      b = elbo.nelbo(denoise, X, key, gen, vocab_size=V, timesteps=timesteps)
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_training_loss_is_nelbo_for_fixed_schedules():
  sched = schedules.get_schedule("cosine")
  denoise = _table_denoiser()
  key = jax.random.key(4)
  np.testing.assert_array_equal(
      elbo.training_loss(denoise, X, key, sched, vocab_size=V),
      elbo.nelbo(denoise, X, key, sched, vocab_size=V))


def _gauss_legendre_panels(points_per_panel=32):
  """Nodes and weights on [0, 1]: log-spaced panels resolve the eps-scale structure near t = 0."""
  edges = np.concatenate([[0.0], np.logspace(-8, 0, 17)])
  x, w = np.polynomial.legendre.leggauss(points_per_panel)
  nodes = np.concatenate([(b - a) / 2 * x + (a + b) / 2 for a, b in zip(edges, edges[1:])])
  weights = np.concatenate([(b - a) / 2 * w for a, b in zip(edges, edges[1:])])
  return jnp.asarray(nodes, jnp.float32), jnp.asarray(weights, jnp.float32)


def exact_genmd4_objective(power, denoise_fn):
  """E_p E_t E_{z_t} of the GenMD4 integrand, by enumerating masks and integrating t by quadrature."""
  sched = schedules.StateDependentPoly(power)
  patterns = jnp.asarray(
      np.array(np.meshgrid(*[[0, 1]] * L, indexing="ij")).reshape(L, -1).T.astype(bool))
  seqs = jnp.asarray(TOY.seqs)
  z = jnp.where(patterns[None], V, seqs[:, None])  # [N, P, L]
  logp = jax.nn.log_softmax(denoise_fn(z.reshape(-1, L), jnp.zeros(z.shape[0] * z.shape[1])))
  logp = logp.reshape(z.shape + (V,))
  logp_x = jnp.take_along_axis(logp, jnp.broadcast_to(seqs[:, None, :, None], z.shape + (1,)),
                               -1)[..., 0]
  nodes, weights = _gauss_legendre_panels()
  alpha = sched.alpha(nodes)  # [Q, V]
  gamma = -sched.dalpha(nodes) / (1 - alpha)
  a_x = alpha[:, seqs]  # [Q, N, L]
  q = jnp.prod(jnp.where(patterns[None, None], 1 - a_x[:, :, None], a_x[:, :, None]), -1)
  g_x = gamma[:, seqs][:, :, None]  # [Q, N, 1, L]
  per_pos = jnp.einsum("qv,nplv->qnpl", gamma, jnp.exp(logp)) - g_x * (logp_x + 1)
  integrand = (q * jnp.where(patterns[None, None], per_pos, 0).sum(-1)).sum(-1)  # [Q, N]
  per_x = weights @ integrand + elbo.end_terms(seqs, sched, V)
  return (jnp.asarray(TOY.probs, jnp.float32) * per_x).sum()


@pytest.mark.parametrize("network_masks", [1, 2])
def test_genmd4_rloo_gradient_is_unbiased(network_masks):
  power = jnp.array([1.0, 1.5, 2.5])
  denoise = EXACT_MD4  # Not the GenMD4 posterior, so the bound depends on the exponents.
  exact_value, exact_grad = jax.value_and_grad(exact_genmd4_objective)(power, denoise)

  def surrogate(w, key):
    loss = elbo.training_loss(denoise, X, key, schedules.StateDependentPoly(w), vocab_size=V,
                              network_masks=network_masks)
    return (loss * WEIGHTS).sum()

  value_and_grad = jax.jit(jax.value_and_grad(surrogate))
  (mean_value, mean_grad), (se_value, se_grad) = replicate(
      lambda k: value_and_grad(power, k), 400, seed=7)
  assert abs(mean_value - exact_value) <= 4 * se_value, (mean_value, exact_value, se_value)
  np.testing.assert_array_less(np.abs(mean_grad - exact_grad), 4 * se_grad + 1e-4)
  # Power: the gradient is resolved well enough that its sign and size are tested.
  assert np.all(se_grad < 0.25 * np.abs(exact_grad)), (se_grad, exact_grad)


def test_pathwise_gradient_alone_is_biased():
  """Without the REINFORCE term the exponents' gradient is wrong: the RLOO term is needed."""
  power = jnp.array([1.0, 1.5, 2.5])
  exact_grad = jax.grad(exact_genmd4_objective)(power, EXACT_MD4)

  def pathwise(w, key):
    vals = elbo.nelbo(EXACT_MD4, X, key, schedules.StateDependentPoly(w), vocab_size=V)
    return (vals * WEIGHTS).sum()  # nelbo samples z_t with stop-gradient through the draw.

  grad = jax.jit(jax.grad(pathwise))
  mean, se = replicate(lambda k: grad(power, k), 400, seed=8)
  assert np.any(np.abs(mean - exact_grad) > 6 * se + 1e-3), (mean, exact_grad, se)


def test_bits_and_perplexity():
  nats = jnp.array([10 * math.log(2.0)])
  np.testing.assert_allclose(elbo.bits_per_token(nats, 5), 2.0, rtol=1e-6)
  np.testing.assert_allclose(elbo.perplexity(nats, 10), 2.0, rtol=1e-6)


def test_ill_formed_input_raises_clear_errors():
  sched = schedules.get_schedule("linear")
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="holds the id 3, outside"):
    elbo.nelbo(EXACT_MD4, X.at[0, 0].set(3), key, sched, vocab_size=V)
  with pytest.raises(ValueError, match="holds the id -1"):
    elbo.nelbo(EXACT_MD4, X.at[0, 0].set(-1), key, sched, vocab_size=V)
  with pytest.raises(ValueError, match="integer token ids"):
    elbo.nelbo(EXACT_MD4, X.astype(jnp.float32), key, sched, vocab_size=V)
  with pytest.raises(ValueError, match=r"shape \[batch, \*positions\]"):
    elbo.nelbo(EXACT_MD4, X[0], key, sched, vocab_size=V)
  with pytest.raises(ValueError, match="logits of shape"):
    elbo.nelbo(lambda z, t: jnp.zeros(z.shape + (V + 1,)), X, key, sched, vocab_size=V)
  with pytest.raises(ValueError, match="timesteps"):
    elbo.nelbo(EXACT_MD4, X, key, sched, vocab_size=V, timesteps=0)
  with pytest.raises(ValueError, match="num_samples"):
    elbo.nelbo(EXACT_MD4, X, key, sched, vocab_size=V, num_samples=0)
  with pytest.raises(ValueError, match="4 exponents but vocab_size is 3"):
    elbo.training_loss(EXACT_MD4, X, key, schedules.StateDependentPoly(jnp.ones(4)), vocab_size=V)
  with pytest.raises(ValueError, match="network_masks"):
    elbo.training_loss(EXACT_MD4, X, key, schedules.StateDependentPoly(jnp.ones(3)), vocab_size=V,
                       network_masks=3)


def test_per_example_keys_make_draws_independent_of_the_batch():
  """With one key per example and given times, an example's estimate is the same in any batch."""
  sched = schedules.StateDependentPoly(jnp.array([1.0, 2.0, 0.5]))
  denoise = _table_denoiser()
  keys = jax.random.split(jax.random.key(5), 8)
  times = jnp.linspace(0.05, 0.95, 8)
  x = X[:8]
  for fn in (elbo.nelbo, elbo.training_loss):
    whole = fn(denoise, x, keys, sched, vocab_size=V, times=times)
    halves = jnp.concatenate([fn(denoise, x[:4], keys[:4], sched, vocab_size=V, times=times[:4]),
                              fn(denoise, x[4:], keys[4:], sched, vocab_size=V, times=times[4:])])
    np.testing.assert_allclose(whole, halves, rtol=1e-6)
  with pytest.raises(ValueError, match="one key per example"):
    elbo.nelbo(denoise, x, keys[:3], sched, vocab_size=V)
