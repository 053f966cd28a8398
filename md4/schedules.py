"""Masking schedules alpha(t): the probability that a token is still unmasked at time t.

Every schedule is squeezed into [eps, 1 - eps]: alpha(t) = (1 - 2 eps) a(t) + eps. The squeeze keeps
the bound finite (the log-weights stay bounded near t = 0 and t = 1); the price is paid exactly by the
reconstruction term at t = 0 and the prior term at t = 1 of the bound (see md4.elbo).

One exception, "loglinear": MDLM's log-linear schedule (Sahoo et al. 2024, kuleshov-group/mdlm
noise_schedule.py LogLinearNoise: sigma(t) = -log1p(-(1 - eps) t), alpha = exp(-sigma)) as MDLM
defines it, squeezed at t = 1 only: alpha(t) = (1 - eps)(1 - t) + eps = 1 - (1 - eps) t, so
alpha(0) = 1 and alpha(1) = eps (MDLM's eps is 1e-3: configs/mdlm). The bound stays exact: its
reconstruction term is 0 and its prior term eps log V per token; its weight
-alpha'/(1 - alpha) = 1/t is MDLM's dsigma/expm1(sigma), unbounded near t = 0 where the expected
number of masked tokens, (1 - eps) t L, vanishes as fast, so the integrand stays bounded.

Two kinds of schedule share one interface:
  - `Schedule` (from `get_schedule`): the same alpha for every token; alpha(t) has t's shape.
  - `StateDependentPoly`: GenMD4's per-vocabulary-entry schedule a_v(t) = 1 - t^{w_v}; alpha(t) has
    shape t.shape + (vocab_size,). It is a pytree whose one leaf is `power`, so jax.grad flows into w.

Both are pytrees, so either can be passed straight through jax.jit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp

DEFAULT_EPS = 1e-4
GEOMETRIC_BETA_MIN = 1e-5
GEOMETRIC_BETA_MAX = 20.0

Array = jax.Array
_Fn = Callable[[Array], Array]


def _linear(t):
  return 1.0 - t


def _linear_d(t):
  return -jnp.ones_like(t)


def _linear_inv(a):
  return 1.0 - a


def _cosine(t):
  return 1.0 - jnp.cos(0.5 * jnp.pi * (1.0 - t))


def _cosine_d(t):
  return -0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * (1.0 - t))


def _cosine_inv(a):
  return 1.0 - jnp.arccos(1.0 - a) * (2.0 / jnp.pi)


_LOG_BMIN = math.log(GEOMETRIC_BETA_MIN)
_LOG_RATIO = math.log(GEOMETRIC_BETA_MAX) - math.log(GEOMETRIC_BETA_MIN)


def _geometric(t):
  # -log a(t) = bmin^(1-t) bmax^t, interpolated in log space.
  return jnp.exp(-jnp.exp(_LOG_BMIN + t * _LOG_RATIO))


def _geometric_d(t):
  beta = jnp.exp(_LOG_BMIN + t * _LOG_RATIO)
  return -jnp.exp(-beta) * beta * _LOG_RATIO


def _geometric_inv(a):
  return (jnp.log(-jnp.log(a)) - _LOG_BMIN) / _LOG_RATIO


def _poly(k: float) -> tuple[_Fn, _Fn, _Fn]:
  return (lambda t: 1.0 - t**k,
          lambda t: -k * t ** (k - 1.0),
          lambda a: (1.0 - a) ** (1.0 / k))


_FIXED = {
    "linear": (_linear, _linear_d, _linear_inv),
    "loglinear": (_linear, _linear_d, _linear_inv),  # Squeezed at t = 1 only (see the docstring).
    "cosine": (_cosine, _cosine_d, _cosine_inv),
    "geometric": (_geometric, _geometric_d, _geometric_inv),
}
_POLY_RE = re.compile(r"poly(\d+(\.\d*)?|\.\d+)$")
VALID_NAMES = tuple(_FIXED) + ("poly<K>",)


def _check_eps(eps: float) -> None:
  if not 0.0 <= eps < 0.5:
    raise ValueError(f"eps must lie in [0, 0.5), got {eps!r}")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Schedule:
  """A state-independent schedule: alpha(t) = (1 - 2 eps) a(t) + eps ((1 - eps)(1 - t) + eps for
  "loglinear").

  Static (no array leaves), hashable, and usable as a jit argument.
  """

  name: str
  eps: float = DEFAULT_EPS

  state_dependent = False

  def __post_init__(self):
    _check_eps(self.eps)
    self._fns()  # Fails here, naming the problem, rather than at first use.

  def _fns(self) -> tuple[_Fn, _Fn, _Fn]:
    if self.name in _FIXED:
      return _FIXED[self.name]
    match = _POLY_RE.match(self.name)
    if match is None or float(match.group(1)) <= 0:
      raise ValueError(
          f"unknown schedule {self.name!r}; valid names: {', '.join(VALID_NAMES)} "
          "(K a positive number, e.g. 'poly2' or 'poly0.5')")
    return _poly(float(match.group(1)))

  @property
  def _scale(self) -> float:
    """alpha = scale * a + eps: 1 - 2 eps (squeezed at both ends), 1 - eps for "loglinear"."""
    return 1.0 - self.eps if self.name == "loglinear" else 1.0 - 2.0 * self.eps

  def alpha(self, t: Array) -> Array:
    """alpha(t): float32[*T] for t: float32[*T]."""
    t = jnp.asarray(t, jnp.float32)
    return self._scale * self._fns()[0](t) + self.eps

  def dalpha(self, t: Array) -> Array:
    """d alpha / dt: float32[*T], the exact derivative."""
    t = jnp.asarray(t, jnp.float32)
    return self._scale * self._fns()[1](t)

  def inverse(self, alpha: Array) -> Array:
    """t such that alpha(t) = alpha, clipped to [0, 1]."""
    alpha = jnp.asarray(alpha, jnp.float32)
    a = jnp.clip((alpha - self.eps) / self._scale, 0.0, 1.0)
    return jnp.clip(self._fns()[2](a), 0.0, 1.0)


def get_schedule(name: str, *, eps: float = DEFAULT_EPS) -> Schedule:
  """The schedule called `name`: "linear", "cosine", "geometric", "loglinear" (MDLM's) or
  "poly<K>" (K > 0)."""
  if not isinstance(name, str):
    raise ValueError(f"schedule name must be a string, got {name!r}")
  return Schedule(name, eps)


@jax.tree_util.register_pytree_node_class
class StateDependentPoly:
  """GenMD4's schedule: token value v stays unmasked with alpha_v(t) = (1 - 2 eps)(1 - t^{w_v}) + eps.

  The squeeze is the one `get_schedule` uses, so with all w_v = K this is exactly get_schedule("polyK").

  Args:
    power: float32[V] exponents w_v > 0 (a pytree leaf: gradients flow into it).
    eps: squeeze (static).
  """

  state_dependent = True

  def __init__(self, power: Array, *, eps: float = DEFAULT_EPS):
    _check_eps(eps)
    if not isinstance(power, jax.core.Tracer) and jnp.ndim(power) != 1:
      raise ValueError(f"power must be a vector float[vocab_size], got shape {jnp.shape(power)}")
    self.power = power
    self.eps = eps

  @property
  def vocab_size(self) -> int:
    return jnp.shape(self.power)[0]

  def tree_flatten(self):
    return (self.power,), self.eps

  @classmethod
  def tree_unflatten(cls, eps, children):
    obj = object.__new__(cls)
    obj.power, obj.eps = children[0], eps
    return obj

  def alpha(self, t: Array) -> Array:
    """alpha_v(t): float32[*T, V] for t: float32[*T]."""
    t = jnp.asarray(t, jnp.float32)[..., None]
    return (1.0 - 2.0 * self.eps) * (1.0 - t**self.power) + self.eps

  def dalpha(self, t: Array) -> Array:
    """d alpha_v / dt: float32[*T, V]."""
    t = jnp.asarray(t, jnp.float32)[..., None]
    return -(1.0 - 2.0 * self.eps) * self.power * t ** (self.power - 1.0)

  def __repr__(self):
    return f"StateDependentPoly(power={self.power!r}, eps={self.eps})"


def rate(schedule: Schedule | StateDependentPoly, t: Array) -> Array:
  """Unmasking rate gamma(t) = -alpha'(t) / (1 - alpha(t)) >= 0; shape as schedule.alpha(t)."""
  return -schedule.dalpha(t) / (1.0 - schedule.alpha(t))
