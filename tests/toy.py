"""A tiny data distribution small enough to enumerate, and its exact denoisers (the ground truth)."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Toy(NamedTuple):
  seqs: np.ndarray  # int32[N, L]: every sequence of length L over V symbols.
  probs: np.ndarray  # float64[N]: their probabilities.
  vocab_size: int

  @property
  def length(self) -> int:
    return self.seqs.shape[1]

  @property
  def entropy(self) -> float:
    """H(p) in nats."""
    return float(-(self.probs * np.log(self.probs)).sum())


def make_toy(length: int = 3, vocab_size: int = 3, seed: int = 0) -> Toy:
  """All sequences of `length` over `vocab_size` symbols with random (Dirichlet) probabilities.

  The concentration 0.5 makes the positions strongly dependent, so a factorised sampler that
  ignored the dependence would be visibly wrong.
  """
  seqs = np.array(list(itertools.product(range(vocab_size), repeat=length)), np.int32)
  probs = np.random.default_rng(seed).dirichlet(np.full(len(seqs), 0.5))
  probs = np.maximum(probs, 1e-4)
  return Toy(seqs, probs / probs.sum(), vocab_size)


def posterior_denoiser(toy: Toy, schedule=None):
  """denoise_fn(z, t) -> log p(x_i = v | z_t, t), the exact posterior marginals.

  For a state-independent schedule (schedule=None suffices) the posterior only needs the visible
  tokens to agree; for StateDependentPoly it weighs each x by q(z_t | x, t), so it depends on t.
  """
  seqs = jnp.asarray(toy.seqs)
  log_prior = jnp.log(jnp.asarray(toy.probs, jnp.float32))
  one_hot = jax.nn.one_hot(seqs, toy.vocab_size)  # [N, L, V]
  mask_id = toy.vocab_size

  def denoise_fn(z, t):
    masked = (z == mask_id)[:, None, :]  # [B, 1, L]
    agrees = z[:, None, :] == seqs[None]  # [B, N, L]
    log_w = jnp.where(masked | agrees, 0.0, -jnp.inf).sum(-1)
    if schedule is not None and schedule.state_dependent:
      a = schedule.alpha(t)  # [B, V]
      a_x = jnp.take_along_axis(a[:, None, :], seqs[None].repeat(z.shape[0], 0), axis=-1)
      log_w += jnp.where(masked, jnp.log1p(-a_x), jnp.log(a_x)).sum(-1)
    w = jax.nn.softmax(log_w + log_prior, axis=-1)  # [B, N]
    marg = jnp.einsum("bn,nlv->blv", w, one_hot)
    return jnp.log(jnp.maximum(marg, 1e-30))

  return denoise_fn


def empirical_tv(toy: Toy, samples: np.ndarray) -> float:
  """Total variation between the empirical law of samples: int[n, L] and toy's p."""
  idx = np.ravel_multi_index(samples.T, (toy.vocab_size,) * toy.length)
  freq = np.bincount(idx, minlength=len(toy.probs)) / len(samples)
  return 0.5 * float(np.abs(freq - toy.probs).sum())
