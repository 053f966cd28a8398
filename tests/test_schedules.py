import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import schedules

NAMES = ["linear", "cosine", "geometric", "poly1", "poly2", "poly0.5", "poly3.5"]
EPS = schedules.DEFAULT_EPS


@pytest.mark.parametrize("name", NAMES)
def test_dalpha_matches_central_differences(name):
  sched = schedules.get_schedule(name)
  t = np.linspace(0.05, 0.95, 19)
  h = 1e-3
  # float64 differences of the float32 alpha: truncation O(h^2) ~ 1e-6, rounding ~ 1e-7 / h = 1e-4.
  fd = (np.float64(sched.alpha(t + h)) - np.float64(sched.alpha(t - h))) / (2 * h)
  np.testing.assert_allclose(sched.dalpha(t), fd, rtol=1e-3, atol=3e-4)


@pytest.mark.parametrize("name", NAMES)
def test_alpha_endpoints_and_monotone(name):
  sched = schedules.get_schedule(name)
  t = jnp.linspace(0.0, 1.0, 1001)
  a = np.asarray(sched.alpha(t))
  # geometric has a(0) = exp(-1e-5) and a(1) = exp(-20) by definition, hence 2e-5.
  assert abs(a[0] - (1 - EPS)) < 2e-5
  assert abs(a[-1] - EPS) < 1e-6
  assert np.all(np.diff(a) <= 0) and a[0] > a[500] > a[-1]
  assert np.all(np.asarray(sched.dalpha(t[1:-1])) < 0)


@pytest.mark.parametrize("name", NAMES)
def test_inverse_recovers_t(name):
  sched = schedules.get_schedule(name)
  t = jnp.linspace(0.02, 0.98, 49)
  np.testing.assert_allclose(sched.inverse(sched.alpha(t)), t, atol=2e-3)


def test_eps_squeeze_is_affine():
  raw = schedules.get_schedule("cosine", eps=0.0)
  sq = schedules.get_schedule("cosine", eps=0.01)
  t = jnp.linspace(0, 1, 11)
  np.testing.assert_allclose(sq.alpha(t), 0.98 * raw.alpha(t) + 0.01, atol=1e-6)


def test_geometric_matches_definition():
  sched = schedules.get_schedule("geometric", eps=0.0)
  t = np.linspace(0, 1, 11)
  expected = np.exp(-(1e-5 ** (1 - t)) * 20.0**t)
  np.testing.assert_allclose(sched.alpha(t), expected, rtol=1e-5)


def test_unknown_schedule_lists_valid_names():
  with pytest.raises(ValueError, match=r"unknown schedule 'quadratic'.*linear.*cosine.*poly<K>"):
    schedules.get_schedule("quadratic")
  with pytest.raises(ValueError, match="unknown schedule 'poly0'"):
    schedules.get_schedule("poly0")
  with pytest.raises(ValueError, match="eps"):
    schedules.get_schedule("linear", eps=0.7)


def test_state_dependent_shapes_and_fd():
  power = jnp.array([0.5, 1.0, 2.0, 3.0])
  sched = schedules.StateDependentPoly(power)
  t = jnp.linspace(0.05, 0.95, 7)
  assert sched.alpha(t).shape == (7, 4)
  assert sched.dalpha(t).shape == (7, 4)
  h = 1e-3
  fd = (np.float64(sched.alpha(t + h)) - np.float64(sched.alpha(t - h))) / (2 * h)
  np.testing.assert_allclose(sched.dalpha(t), fd, rtol=1e-3, atol=3e-4)


def test_state_dependent_equal_powers_is_md4_poly():
  t = jnp.linspace(0.0, 1.0, 101)
  for k in (0.5, 1.0, 2.0):
    gen = schedules.StateDependentPoly(jnp.full((5,), k))
    md4 = schedules.get_schedule(f"poly{k}")
    for v in range(5):
      np.testing.assert_allclose(gen.alpha(t)[:, v], md4.alpha(t), rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(gen.dalpha(t[1:])[:, v], md4.dalpha(t[1:]), rtol=1e-5)


def test_gradient_flows_into_power():
  t = jnp.array([0.3, 0.7])
  power = jnp.array([1.0, 2.0])
  g = jax.grad(lambda w: schedules.StateDependentPoly(w).alpha(t).sum())(power)
  # d/dw [(1 - 2 eps)(1 - t^w) + eps] = -(1 - 2 eps) t^w log t.
  expected = -(1 - 2 * EPS) * (t[:, None] ** power * jnp.log(t[:, None])).sum(0)
  np.testing.assert_allclose(g, expected, rtol=1e-5)


def test_schedules_pass_through_jit():
  f = jax.jit(lambda sched, t: sched.alpha(t))
  t = jnp.array([0.5])
  np.testing.assert_allclose(f(schedules.get_schedule("linear"), t), 0.5, atol=1e-6)
  np.testing.assert_allclose(f(schedules.StateDependentPoly(jnp.ones(3)), t), 0.5, atol=1e-6)


def test_rate_is_minus_dalpha_over_one_minus_alpha():
  sched = schedules.get_schedule("linear", eps=0.0)
  t = jnp.array([0.25, 0.5])
  np.testing.assert_allclose(schedules.rate(sched, t), 1.0 / t, rtol=1e-6)
