"""Samplers against ground truth: with the exact denoiser of an enumerable distribution, samples follow it.

Statistical criterion: Pearson's chi-square goodness-of-fit on n samples, asserted at p > 1e-4 (fixed
seeds, so deterministic). Grid samplers are exact only as num_steps grows (two tokens revealed in one
step are drawn independently); with 3 tokens and 400 steps that error is ~0.3% in total variation,
below the ~2% sampling noise of 10000 samples.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from md4 import sampling, schedules
from md4.samplers import draws as draws_lib, logprobs
from toy import empirical_tv, make_toy, posterior_denoiser

TOY = make_toy(length=3, vocab_size=3, seed=0)
V, L = TOY.vocab_size, TOY.length
N = 10000
STEPS = 400


def chi2_pvalue(counts, probs):
  expected = probs * counts.sum()
  stat = ((counts - expected) ** 2 / expected).sum()
  return stats.chi2.sf(stat, df=len(probs) - 1)


def law_of(samples, shape):
  idx = np.ravel_multi_index(np.asarray(samples).T, shape)
  return np.bincount(idx, minlength=int(np.prod(shape)))


@functools.partial(jax.jit, static_argnames=("denoise_fn", "num_steps", "method", "top_p",
                                             "time_grid_kind", "reuse_unchanged"))
def run_sampler(key, init, schedule, denoise_fn, num_steps=STEPS, method="ancestral", top_p=None,
                time_grid_kind="uniform", reuse_unchanged=False):
  return sampling.sample_with_info(denoise_fn, key, init, schedule, vocab_size=V,
                                   num_steps=num_steps, method=method, top_p=top_p,
                                   time_grid_kind=time_grid_kind, reuse_unchanged=reuse_unchanged)


EXACT_MD4 = posterior_denoiser(TOY)
ALL_MASKED = jnp.full((N, L), V, jnp.int32)

CASES = [
    ("ancestral", "linear", "uniform"),
    ("ancestral", "cosine", "cosine"),
    ("euler", "linear", "uniform"),
    ("mean", "geometric", "uniform"),
    ("first_hitting", "linear", "uniform"),
    ("first_hitting", "cosine", "uniform"),
]


@pytest.mark.parametrize("method,schedule_name,grid", CASES)
def test_samples_follow_p_with_exact_denoiser(method, schedule_name, grid):
  sched = schedules.get_schedule(schedule_name)
  out = run_sampler(jax.random.key(11), ALL_MASKED, sched, EXACT_MD4, method=method,
                    time_grid_kind=grid)
  samples = np.asarray(out.samples)
  assert samples.max() < V and samples.min() >= 0
  pvalue = chi2_pvalue(law_of(samples, (V,) * L), TOY.probs)
  assert pvalue > 1e-4, (pvalue, empirical_tv(TOY, samples))
  if method == "first_hitting":
    assert int(out.num_calls) == L  # One network call per masked token.
  else:  # No call on a step that reveals nothing (tests/test_reveal_first.py counts them).
    assert int(out.num_calls) <= STEPS


def test_factorised_one_step_sampler_is_detectably_wrong():
  """Power check: one step draws the positions independently; the test above must reject that."""
  out = run_sampler(jax.random.key(11), ALL_MASKED, schedules.get_schedule("linear"), EXACT_MD4,
                    num_steps=1)
  assert chi2_pvalue(law_of(out.samples, (V,) * L), TOY.probs) < 1e-10


@pytest.mark.parametrize("method", ["ancestral", "euler", "mean"])
def test_genmd4_samples_follow_p_with_exact_posterior(method):
  sched = schedules.StateDependentPoly(jnp.array([0.6, 1.0, 2.5]))
  exact = posterior_denoiser(TOY, sched)
  out = run_sampler(jax.random.key(12), ALL_MASKED, sched, exact, method=method)
  samples = np.asarray(out.samples)
  pvalue = chi2_pvalue(law_of(samples, (V,) * L), TOY.probs)
  assert pvalue > 1e-4, (pvalue, empirical_tv(TOY, samples))


def _conditional(fixed_pos, fixed_val):
  keep = TOY.seqs[:, fixed_pos] == fixed_val
  probs = np.where(keep, TOY.probs, 0.0)
  return keep, probs / probs.sum()


@pytest.mark.parametrize("method", ["ancestral", "first_hitting"])
@pytest.mark.parametrize("fixed_pos", [0, 1])  # A prefix prompt, and infilling around a given token.
def test_infilling_follows_conditional_and_keeps_given_tokens(method, fixed_pos):
  fixed_val = 2
  init = ALL_MASKED.at[:, fixed_pos].set(fixed_val)
  out = run_sampler(jax.random.key(13), init, schedules.get_schedule("linear"), EXACT_MD4,
                    method=method)
  samples = np.asarray(out.samples)
  assert np.all(samples[:, fixed_pos] == fixed_val)
  assert samples.max() < V
  keep, cond = _conditional(fixed_pos, fixed_val)
  counts = law_of(samples, (V,) * L)
  assert counts[~keep].sum() == 0
  assert chi2_pvalue(counts[keep], cond[keep]) > 1e-4


def _fixed_distribution(probs):
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  return lambda z, t: jnp.broadcast_to(logits, z.shape + (len(probs),))


def test_top_p_never_draws_outside_the_nucleus_and_renormalises():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  denoise = _fixed_distribution(probs)
  init = jnp.full((4000, 5), 4, jnp.int32)
  samples = np.asarray(sampling.sample(denoise, jax.random.key(5), init,
                                       schedules.get_schedule("linear"), vocab_size=4,
                                       num_steps=20, top_p=0.7))
  # Nucleus for 0.7: {0, 1} (mass before token 2 is 0.8 >= 0.7).
  assert set(np.unique(samples)) == {0, 1}
  frac0 = (samples == 0).mean()
  se = math.sqrt(0.625 * 0.375 / samples.size)
  assert abs(frac0 - 0.5 / 0.8) < 4 * se


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
  logp = jnp.log(jnp.array([[0.1, 0.6, 0.3], [0.25, 0.25, 0.5]]))
  kept = np.isfinite(np.asarray(logprobs.top_p_filter(logp, 0.6)))
  np.testing.assert_array_equal(kept, [[False, True, False], [True, True, True]])
  np.testing.assert_allclose(np.exp(logprobs.top_p_filter(logp, 0.6))[0], [0, 1, 0], atol=1e-6)
  np.testing.assert_allclose(np.exp(logprobs.top_p_filter(logp, 1.0)), np.exp(logp), rtol=1e-5)


def test_reuse_unchanged_skips_calls_without_changing_samples():
  # remdm (here without remasking) calls the network on every step unless told to reuse; the
  # reveal-first samplers skip those calls anyway.
  sched = schedules.get_schedule("linear")
  init = jnp.full((1, L), V, jnp.int32)
  plain = run_sampler(jax.random.key(2), init, sched, EXACT_MD4, num_steps=200, method="remdm")
  reused = run_sampler(jax.random.key(2), init, sched, EXACT_MD4, num_steps=200, method="remdm",
                       reuse_unchanged=True)
  np.testing.assert_array_equal(plain.samples, reused.samples)
  assert int(plain.num_calls) == 200
  # A call is needed at the start and after each step that revealed something: at most L + 1.
  assert 1 <= int(reused.num_calls) <= L + 1


def test_categorical_matches_its_distribution():
  probs = np.array([0.4, 0.3, 0.2, 0.09, 0.009, 0.001])
  draws = draws_lib.categorical(jax.random.key(0), jnp.log(jnp.broadcast_to(probs, (200000, 6))))
  counts = np.bincount(np.asarray(draws), minlength=6)
  assert chi2_pvalue(counts, probs) > 1e-4


def test_small_probabilities_are_drawn_in_the_noise_tail():
  """Conditioned on its noise word being in the lowest 2^-24 of the range, a token 1e-10 as likely as
  its rival wins with probability E[exp(-U * 2^-24 * 1e10)], U ~ Uniform(0, 1) = (1 - e^-c)/c with
  c = 2^-24 * 1e10. A float32 Gumbel-max draw from the same top bits never lets it win: its noise
  spans at most ~19.4 nats, less than the 23 nats between the two logits."""
  n = 2_000_000
  key_hi, key_lo = jax.random.split(jax.random.key(9))
  hi = jax.random.bits(key_hi, (n, 2), jnp.uint32).at[:, 1].set(0)
  lo = jax.random.bits(key_lo, (n, 2), jnp.uint32)
  logits = jnp.log(jnp.array([1.0, 1e-10]))
  wins = int((draws_lib.categorical_from_bits(logits, hi, lo) == 1).sum())
  c = 2.0**-24 * 1e10
  p = (1 - math.exp(-c)) / c
  assert abs(wins - n * p) < 5 * math.sqrt(n * p * (1 - p)), (wins, n * p)
  # The same condition on a float32 uniform gives the Gumbel trick's most extreme noise.
  u32 = jnp.maximum((hi >> 8).astype(jnp.float32) * 2.0**-24, jnp.finfo(jnp.float32).tiny)
  gumbel = -jnp.log(-jnp.log(u32))
  assert int((jnp.argmax(logits + gumbel, -1) == 1).sum()) == 0


def test_fine_uniform_is_uniform_and_inside_the_open_interval():
  u, w = draws_lib.fine_uniform(jax.random.key(1), (100000,))
  u, w = np.asarray(u, np.float64), np.asarray(w, np.float64)
  assert u.min() > 0 and u.max() < 1 and w.min() > 0
  np.testing.assert_allclose(u + w, 1.0, atol=1e-7)
  assert stats.kstest(u, "uniform").pvalue > 1e-4


def test_ill_formed_sampling_input_raises_clear_errors():
  sched = schedules.get_schedule("linear")
  key = jax.random.key(0)
  init = jnp.full((2, L), V, jnp.int32)
  kw = dict(vocab_size=V, num_steps=10)
  with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
    sampling.sample(EXACT_MD4, key, init, sched, vocab_size=V, num_steps=0)
  with pytest.raises(ValueError, match="unknown sampling method 'gibbs'.*ancestral"):
    sampling.sample(EXACT_MD4, key, init, sched, method="gibbs", **kw)
  with pytest.raises(ValueError, match="top_p"):
    sampling.sample(EXACT_MD4, key, init, sched, top_p=1.5, **kw)
  with pytest.raises(ValueError, match="init holds the id 4"):
    sampling.sample(EXACT_MD4, key, init.at[0, 0].set(V + 1), sched, **kw)
  with pytest.raises(ValueError, match="unknown time grid"):
    sampling.sample(EXACT_MD4, key, init, sched, time_grid_kind="log", **kw)
  with pytest.raises(ValueError, match="first_hitting needs a state-independent schedule"):
    sampling.sample(EXACT_MD4, key, init, schedules.StateDependentPoly(jnp.ones(V)),
                    method="first_hitting", **kw)
  with pytest.raises(ValueError, match="logits of shape"):
    sampling.sample(lambda z, t: jnp.zeros(z.shape + (V + 2,)), key, init, sched, **kw)
