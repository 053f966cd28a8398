"""Samplers beyond the exact ones: long generation in blocks, MaskGIT, ReMDM remasking, guidance.

Statistical criterion as in test_sampling.py: Pearson's chi-square goodness-of-fit asserted at
p > 1e-4 (fixed seeds, so deterministic), here with the cells whose expected count is below 5 pooled
into one (the block laws have up to 243 cells, many of them tiny). The reference laws are enumerated
in float64: for blocks, products of the toy's conditionals; for remdm, the law of its Markov chain,
propagated through the exact transition matrix of every step over the 4^3 states of z.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from md4 import guidance, long_generation, readout, sampling, schedules
from md4.samplers import grid as grid_lib
from toy import make_toy, posterior_denoiser

TOY = make_toy(length=3, vocab_size=3, seed=0)
V, L = TOY.vocab_size, TOY.length
N = 10000
STEPS = 400
EXACT = posterior_denoiser(TOY)
LINEAR = schedules.get_schedule("linear")


def pooled_chi2_pvalue(counts, probs, min_expected=5.0):
  """Pearson's chi-square of counts against probs, the cells expected below min_expected pooled."""
  counts, probs = np.asarray(counts, np.float64), np.asarray(probs, np.float64)
  expected = probs / probs.sum() * counts.sum()
  small = expected < min_expected
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  keep = exp > 0
  stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
  return stats.chi2.sf(stat, df=keep.sum() - 1)


def law_of(samples, n):
  idx = np.ravel_multi_index(np.asarray(samples).T, (V,) * n)
  return np.bincount(idx, minlength=V**n)


def tv(p, q):
  return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def _fixed_distribution(probs):
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  return lambda z, t: jnp.broadcast_to(logits, z.shape + (len(probs),))


# --------------------------------------------------------------------------------------------------
# Long generation in blocks.

JOINT = TOY.probs.reshape((V,) * L)  # p(y_0, ..., y_{L-1}) of the model (the exact denoiser's law).


def _block_starts(n, window):
  if n <= L:
    return [0]
  stride = L - window
  num_blocks = 1 + -(-(n - L) // stride)
  return [min(b * stride, n - L) for b in range(num_blocks)]


def _conditional(y, known):
  """p(y) / p(y restricted to the positions in known): the block's law of its unknown positions."""
  agree = np.all(TOY.seqs[:, known] == np.asarray(y)[known], axis=1)
  return JOINT[tuple(y)] / TOY.probs[agree].sum()


def block_law(n, window, given=None):
  """float64[V^n]: the product over blocks of each block's conditional given its window and its
  given tokens (zero where a given token disagrees). For n < L: the marginal of the first n
  positions."""
  given = given or {}
  if n < L:
    return JOINT.sum(axis=tuple(range(n, L))).ravel()
  law = np.zeros(V**n)
  starts = _block_starts(n, window)
  for k, x in enumerate(itertools.product(range(V), repeat=n)):
    if any(x[i] != v for i, v in given.items()):
      continue
    prob, written = 1.0, 0  # Positions [0, written) are in the sequence before the block.
    for start in starts:
      known = [i - start for i in range(start, start + L) if i < written or i in given]
      prob *= _conditional(x[start:start + L], known)
      written = start + L
    law[k] = prob
  return law


def run_blocks(key, init, window, method="first_hitting", num_steps=STEPS):
  return long_generation.sample_blocks(EXACT, key, init, LINEAR, vocab_size=V, seq_length=L,
                                       window=window, num_steps=num_steps, method=method)


def test_block_law_reference_is_a_distribution_that_differs_from_independent_blocks():
  """The enumerated reference: it sums to 1, and the window matters (power for the tests below)."""
  for n, window in [(4, 2), (4, 1), (5, 2), (5, 1)]:
    assert abs(block_law(n, window).sum() - 1.0) < 1e-12
  # With window 2, x_3 depends on (x_1, x_2): the law is far from p(x_0..2) p(y_2) (no context).
  no_context = np.multiply.outer(TOY.probs, JOINT.sum(axis=(0, 1)))
  assert tv(block_law(4, 2), no_context.ravel()) > 0.1


# (n, window, method): n = L + 1 with window L - 1; window 1 at n = L + 1 widens the last block's
# window to 2; n = L + 2 with window L - 1 takes two one-token blocks.
BLOCK_CASES = [
    (4, 2, "first_hitting"),
    (4, 1, "first_hitting"),
    (5, 2, "first_hitting"),
    (5, 1, "first_hitting"),
    (5, 2, "ancestral"),
]


@pytest.mark.parametrize("n,window,method", BLOCK_CASES)
def test_blocks_follow_the_product_of_block_conditionals(n, window, method):
  init = jnp.full((N, n), V, jnp.int32)
  out = run_blocks(jax.random.key(21), init, window, method)
  samples = np.asarray(out.samples)
  assert samples.shape == (N, n) and samples.min() >= 0 and samples.max() < V
  law = block_law(n, window)
  pvalue = pooled_chi2_pvalue(law_of(samples, n), law)
  assert pvalue > 1e-4, (pvalue, tv(law_of(samples, n) / N, law))
  num_blocks = len(_block_starts(n, window))
  if method == "first_hitting":
    assert int(out.num_calls) == n  # One call per generated token, over all blocks.
  else:
    # At most one call per step of each block (none on a step that reveals nothing).
    assert num_blocks <= int(out.num_calls) <= num_blocks * STEPS


def test_blocks_keep_prompts_and_condition_each_block_on_its_own_given_tokens():
  # Block 0 = [0, 3) holds the prompt x_0 = 2; block 1 = [2, 5) has window x_2 and given x_4 = 1.
  given = {0: 2, 4: 1}
  init = jnp.full((N, 5), V, jnp.int32)
  for i, v in given.items():
    init = init.at[:, i].set(v)
  samples = np.asarray(run_blocks(jax.random.key(22), init, window=1).samples)
  for i, v in given.items():
    assert np.all(samples[:, i] == v)
  law = block_law(5, 1, given)
  counts = law_of(samples, 5)
  assert counts[law == 0].sum() == 0
  assert pooled_chi2_pvalue(counts[law > 0], law[law > 0]) > 1e-4


def test_blocks_shorter_than_the_model_sample_its_marginal():
  out = run_blocks(jax.random.key(23), jnp.full((N, 2), V, jnp.int32), window=1)
  assert out.samples.shape == (N, 2)
  assert int(out.num_calls) == L  # The padded position is sampled too, then dropped.
  assert pooled_chi2_pvalue(law_of(out.samples, 2), block_law(2, 1)) > 1e-4


def test_blocks_compile_under_jit_and_match_the_eager_run():
  init = jnp.full((8, 7), V, jnp.int32)
  run = jax.jit(functools.partial(run_blocks, window=1, method="ancestral", num_steps=20))
  jitted = run(jax.random.key(24), init)
  eager = run_blocks(jax.random.key(24), init, window=1, method="ancestral", num_steps=20)
  np.testing.assert_array_equal(jitted.samples, eager.samples)
  assert int(jitted.num_calls) == int(eager.num_calls)
  assert 3 <= int(jitted.num_calls) <= 3 * 20  # Blocks start at 0, 2 and 4 (= n - L).


def test_ill_formed_block_arguments_raise_clear_errors():
  key, init = jax.random.key(0), jnp.full((2, 5), V, jnp.int32)
  kw = dict(vocab_size=V, num_steps=10)
  with pytest.raises(ValueError,
                     match=r"window must be an int in \[0, seq_length - 1\] = \[0, 2\], got 3"):
    long_generation.sample_blocks(EXACT, key, init, LINEAR, seq_length=L, window=3, **kw)
  with pytest.raises(ValueError, match="window must be an int.*got -1"):
    long_generation.sample_blocks(EXACT, key, init, LINEAR, seq_length=L, window=-1, **kw)
  with pytest.raises(ValueError, match="seq_length must be an int >= 1.*got 0"):
    long_generation.sample_blocks(EXACT, key, init, LINEAR, seq_length=0, window=0, **kw)
  with pytest.raises(ValueError, match=r"init must be int32\[batch, N\] with N >= 1.*\(2, 5, 1\)"):
    long_generation.sample_blocks(EXACT, key, init[..., None], LINEAR, seq_length=L, window=1, **kw)
  with pytest.raises(ValueError, match=r"init must be int32\[batch, N\] with N >= 1.*\(2, 0\)"):
    long_generation.sample_blocks(EXACT, key, init[:, :0], LINEAR, seq_length=L, window=1, **kw)
  with pytest.raises(ValueError, match="unknown sampling method 'gibbs'"):
    long_generation.sample_blocks(EXACT, key, init, LINEAR, seq_length=L, window=1, method="gibbs",
                                  **kw)


# --------------------------------------------------------------------------------------------------
# MaskGIT.

def clock_denoiser(vocab_size, confidence=None):
  """A rigged denoiser whose likeliest token at every position is the number of visible positions of
  z, so a sample records when each position was revealed. confidence: float[S] probability of that
  token per position (None: probability 1, every other token impossible)."""
  def denoise_fn(z, t):
    visible = (z != vocab_size).sum(-1)[:, None, None]  # [B, 1, 1]
    clock = jnp.arange(vocab_size) == visible  # [B, 1, V]
    if confidence is None:
      return jnp.where(clock, 0.0, -jnp.inf) * jnp.ones(z.shape + (1,))
    c = jnp.asarray(confidence, jnp.float32)[None, :, None]
    return jnp.where(clock, jnp.log(c), jnp.log((1.0 - c) / (vocab_size - 1)))
  return denoise_fn


def expected_clock_values(num_masked, seq_len, ratios):
  """The sorted values a row shows with the clock denoiser: each reveal writes the visible count."""
  values, left = [], num_masked
  for ratio in ratios:
    target = int(np.round(num_masked * ratio))
    values += [seq_len - left] * (left - target)
    left = target
  return sorted(values)


@pytest.mark.parametrize("schedule_name,grid,num_steps,temperature",
                         [("cosine", "uniform", 5, 1.0), ("linear", "cosine", 7, 4.5),
                          ("poly2", "uniform", 4, 0.0)])
def test_maskgit_reveals_the_scheduled_count_each_step(schedule_name, grid, num_steps, temperature):
  seq_len, vocab = 12, 13
  sched = schedules.get_schedule(schedule_name)
  init = jnp.full((3, seq_len), vocab, jnp.int32)
  init = init.at[1, jnp.array([0, 4, 5])].set(0).at[2, jnp.array([1, 2, 3, 6, 7, 8, 11])].set(0)
  out = sampling.sample_with_info(clock_denoiser(vocab), jax.random.key(3), init, sched,
                                  vocab_size=vocab, num_steps=num_steps, method="maskgit",
                                  time_grid_kind=grid, temperature=temperature)
  samples, init = np.asarray(out.samples), np.asarray(init)
  assert int(out.num_calls) == num_steps
  assert samples.max() < vocab  # No mask left.
  given = init != vocab
  np.testing.assert_array_equal(samples[given], init[given])
  s = np.asarray(grid_lib.time_grid(num_steps, grid), np.float64)[::-1][1:]  # Each step's s.
  alpha = lambda t: np.asarray(sched.alpha(jnp.asarray(t, jnp.float32)), np.float64)
  ratios = np.where(s == 0, 0.0, (1 - alpha(s)) / (1 - alpha(1.0)))
  for row in range(3):
    m = int((~given[row]).sum())
    frac = m * ratios - np.floor(m * ratios)
    assert np.all(np.abs(frac - 0.5) > 1e-3)  # No rounding tie, so float32 and float64 agree.
    got = sorted(samples[row][~given[row]])
    assert got == expected_clock_values(m, seq_len, ratios), (row, got)


def test_maskgit_at_zero_temperature_is_deterministic_and_reveals_the_most_confident_first():
  confidence = [0.5, 0.9, 0.3, 0.7]  # Reveal order: positions 1, 3, 0, 2.
  denoise = clock_denoiser(5, confidence)
  init = jnp.full((6, 4), 5, jnp.int32)
  for key in (jax.random.key(0), jax.random.key(1)):
    samples = sampling.sample(denoise, key, init, LINEAR, vocab_size=5, num_steps=4,
                              method="maskgit", temperature=0.0)
    np.testing.assert_array_equal(samples, np.tile([2, 0, 3, 1], (6, 1)))


def test_maskgit_confidence_noise_orders_equally_confident_positions_at_random():
  """Every candidate is certain (probability 1), so every confidence is log 1 = 0 and the reveal
  order comes from the Gumbel noise alone: i.i.d. within a step, so the order is a uniformly random
  permutation (without the noise the stable sort would always reveal left to right, [0, 1, 2, 3]).
  One reveal per step, so a row's values are its positions' reveal steps."""
  samples = np.asarray(sampling.sample(clock_denoiser(5), jax.random.key(2),
                                       jnp.full((2400, 4), 5, jnp.int32), LINEAR, vocab_size=5,
                                       num_steps=4, method="maskgit", temperature=1.0))
  assert np.all(np.sort(samples, axis=1) == np.arange(4))  # Each row a permutation.
  orders = [tuple(map(int, row)) for row in samples]
  counts = [orders.count(p) for p in itertools.permutations(range(4))]
  assert stats.chisquare(counts).pvalue > 1e-4  # Uniform: 100 expected per permutation.


def test_maskgit_is_not_an_exact_sampler_of_the_model():
  """With the exact denoiser and one reveal per step, MaskGIT still favours confident tokens."""
  out = sampling.sample_with_info(EXACT, jax.random.key(4), jnp.full((N, L), V, jnp.int32), LINEAR,
                                  vocab_size=V, num_steps=STEPS, method="maskgit")
  assert pooled_chi2_pvalue(law_of(out.samples, L), TOY.probs) < 1e-10


# --------------------------------------------------------------------------------------------------
# ReMDM remasking.

@functools.partial(jax.jit, static_argnames=("denoise_fn", "num_steps", "method", "time_grid_kind",
                                             "remask_eta", "remask_strategy", "top_p"))
def run_sampler(key, init, schedule, denoise_fn=EXACT, num_steps=STEPS, method="remdm",
                time_grid_kind="uniform", remask_eta=0.0, remask_strategy="cap", top_p=None):
  return sampling.sample_with_info(denoise_fn, key, init, schedule, vocab_size=V,
                                   num_steps=num_steps, method=method, top_p=top_p,
                                   time_grid_kind=time_grid_kind, remask_eta=remask_eta,
                                   remask_strategy=remask_strategy)


@pytest.mark.parametrize("schedule_name,grid,top_p", [("linear", "uniform", None),
                                                      ("cosine", "cosine", 0.8)])
def test_remdm_without_remasking_is_bitwise_the_ancestral_sampler(schedule_name, grid, top_p):
  sched = schedules.get_schedule(schedule_name)
  init = jnp.full((2000, L), V, jnp.int32).at[:1000, 1].set(0)
  kw = dict(num_steps=100, time_grid_kind=grid, top_p=top_p)
  ancestral = run_sampler(jax.random.key(5), init, sched, method="ancestral", **kw)
  remdm = run_sampler(jax.random.key(5), init, sched, method="remdm", remask_eta=0.0, **kw)
  np.testing.assert_array_equal(remdm.samples, ancestral.samples)
  # remdm calls the network on every step; ancestral only on steps that reveal something.
  assert int(remdm.num_calls) == 100 and int(ancestral.num_calls) <= 100


def _time_switch_denoiser(t_switch):
  """Token 1 while t > t_switch, token 2 after; never token 0."""
  def denoise_fn(z, t):
    token = jnp.where(t > t_switch, 1, 2)[:, None, None]
    return jnp.where(jnp.arange(V) == token, 0.0, -jnp.inf) * jnp.ones(z.shape + (1,))
  return denoise_fn


@pytest.mark.parametrize("strategy", ["cap", "loop"])
def test_remdm_redraws_decoded_tokens_but_never_given_ones(strategy):
  """Column 0 is given as 0, a token the denoiser never proposes: remasking it would show. Tokens
  decoded while the network time is above 0.6 are 1, later ones 2: without remasking about 40% are 1
  (alpha(0.6) = 0.4); with eta 0.5 every early token is remasked and redrawn as 2 (cap: on the steps
  down to t = 1/3, where sigma = 0.5; loop: on the 200 steps of the window, network time 0.55)."""
  init = jnp.full((4000, L), V, jnp.int32).at[:, 0].set(0)
  denoise = _time_switch_denoiser(0.6)
  plain = run_sampler(jax.random.key(6), init, LINEAR, denoise_fn=denoise, remask_eta=0.0,
                      remask_strategy=strategy)
  remask = run_sampler(jax.random.key(6), init, LINEAR, denoise_fn=denoise, remask_eta=0.5,
                       remask_strategy=strategy)
  for out in (plain, remask):
    samples = np.asarray(out.samples)
    assert np.all(samples[:, 0] == 0)
    assert np.all(samples[:, 1:] > 0)  # Decoded, and never the given token's value.
  assert 0.35 < (np.asarray(plain.samples)[:, 1:] == 1).mean() < 0.45
  assert (np.asarray(remask.samples)[:, 1:] == 1).mean() < 1e-3


# The states of z over {0, .., V} (V = mask) and the exact posterior marginals of x at each.
STATES = np.array(list(itertools.product(range(V + 1), repeat=L)))


def _posterior_marginals():
  out = np.zeros((len(STATES), L, V))
  for a, z in enumerate(STATES):
    w = TOY.probs * np.all((z == V) | (TOY.seqs == z), axis=1)
    for i in range(L):
      out[a, i] = np.bincount(TOY.seqs[:, i], weights=w / w.sum(), minlength=V)
  return out


MARGINALS = _posterior_marginals()


def remdm_step_params(num_steps, eta, strategy, t_on=0.55, t_off=0.05, eps=1e-4):
  """[(r, sigma)] per step on the uniform grid for the linear schedule, derived here from the ReMDM
  formulas: r = P(masked -> decoded), sigma = P(decoded -> masked)."""
  alpha = lambda t: (1 - 2 * eps) * (1 - t) + eps

  def tau(t):
    if strategy == "cap" or t > t_on:
      return t
    return t_on if t >= t_off else t * t_on / t_off

  params = []
  for i in range(num_steps, 0, -1):
    t, s = i / num_steps, (i - 1) / num_steps
    a_t, a_s = alpha(tau(t)), alpha(tau(s))
    sigma = min(eta, min(1.0, (1 - a_s) / a_t))
    if strategy == "loop" and not t_off < t <= t_on:
      sigma = 0.0
    r = (a_s - (1 - sigma) * a_t) / (1 - a_t)
    if s == 0:
      r, sigma = 1.0, 0.0
    assert -1e-12 <= r <= 1 + 1e-12
    # The point of ReMDM's posterior: a token's forward marginal (x with probability a) is kept.
    assert s == 0 or abs(a_t * (1 - sigma) + (1 - a_t) * r - a_s) < 1e-12
    params.append((r, sigma))
  return params


def chain_law(params):
  """float64[V^L]: the exact law of the factorised chain (positions drawn independently given z_t
  from the exact posterior marginals) started from all masked, after the steps' (r, sigma)."""
  masked = STATES == V
  one_hot = np.eye(V + 1)[STATES]  # [S, L, V + 1]
  dist = np.zeros(len(STATES))
  dist[-1] = 1.0  # All masked is the last state.
  for r, sigma in params:
    from_masked = np.concatenate([r * MARGINALS, np.full(MARGINALS.shape[:2] + (1,), 1 - r)], -1)
    from_visible = (1 - sigma) * one_hot + sigma * np.eye(V + 1)[V]
    per = np.where(masked[..., None], from_masked, from_visible)  # [S, L, V + 1]
    kernel = per[:, 0]
    for i in range(1, L):
      kernel = (kernel[:, :, None] * per[:, i, None, :]).reshape(len(STATES), -1)
    dist = dist @ kernel
  done = ~masked.any(1)
  return dist[done]  # The done states are in the order of TOY.seqs.


@pytest.mark.parametrize("strategy,eta", [("cap", 0.3), ("loop", 0.1), ("loop", 1.0)])
def test_remdm_samples_follow_the_enumerated_law_of_its_chain(strategy, eta):
  law = chain_law(remdm_step_params(STEPS, eta, strategy))
  assert abs(law.sum() - 1) < 1e-9
  out = run_sampler(jax.random.key(7), jnp.full((N, L), V, jnp.int32), LINEAR, remask_eta=eta,
                    remask_strategy=strategy)
  assert int(out.num_calls) == STEPS
  counts = law_of(out.samples, L)
  pvalue = pooled_chi2_pvalue(counts, law)
  assert pvalue > 1e-4, (pvalue, tv(counts / N, law))
  if strategy == "loop" and eta == 1.0:
    # Power: this chain is 0.045 from p in total variation, and the samples show it.
    assert tv(law, TOY.probs) > 0.03
    assert pooled_chi2_pvalue(counts, TOY.probs) < 1e-10


def test_remdm_cap_keeps_p_only_up_to_an_error_that_shrinks_with_the_steps():
  """ReMDM keeps the forward marginals of each token, so with the exact joint posterior it would
  sample p exactly. The denoiser gives per-position marginals only, and remasking changes several
  positions per step with a probability that does not shrink with the step, so the law is not
  exactly p: its error decays like steps^-1/2 (ancestral: steps^-1). Enumerated, no sampling."""
  ancestral = tv(chain_law(remdm_step_params(STEPS, 0.0, "cap")), TOY.probs)
  cap_400 = tv(chain_law(remdm_step_params(STEPS, 0.3, "cap")), TOY.probs)
  cap_1600 = tv(chain_law(remdm_step_params(4 * STEPS, 0.3, "cap")), TOY.probs)
  assert ancestral < 1e-3
  assert 2e-3 < cap_400 < 1e-2  # 0.0078: detectable with 10^4 samples, below 1%.
  assert cap_1600 < 0.6 * cap_400  # 0.0039.


def test_ill_formed_remasking_and_maskgit_arguments_raise_clear_errors():
  key, init = jax.random.key(0), jnp.full((2, L), V, jnp.int32)
  kw = dict(vocab_size=V, num_steps=10)
  genmd4 = schedules.StateDependentPoly(jnp.ones(V))
  for method in ("remdm", "maskgit"):
    with pytest.raises(ValueError, match=f"{method} needs a state-independent schedule"):
      sampling.sample(EXACT, key, init, genmd4, method=method, **kw)
  with pytest.raises(ValueError, match="remask_eta=0.1 applies to method='remdm' only, got "
                                       "method='first_hitting'"):
    sampling.sample(EXACT, key, init, LINEAR, method="first_hitting", remask_eta=0.1, **kw)
  with pytest.raises(ValueError, match="remask_eta=0.1 applies to method='remdm' only"):
    sampling.sample(EXACT, key, init, LINEAR, remask_eta=0.1, **kw)
  with pytest.raises(ValueError, match=r"remask_eta must be a float in \[0, 1\], got 1.5"):
    sampling.sample(EXACT, key, init, LINEAR, method="remdm", remask_eta=1.5, **kw)
  with pytest.raises(ValueError, match="unknown remask_strategy 'ring'; valid: cap, loop"):
    sampling.sample(EXACT, key, init, LINEAR, method="remdm", remask_strategy="ring", **kw)
  with pytest.raises(ValueError,
                     match="remask_t_on > remask_t_off.*remask_t_on=0.3, remask_t_off=0.5"):
    sampling.sample(EXACT, key, init, LINEAR, method="remdm", remask_strategy="loop",
                    remask_t_on=0.3, remask_t_off=0.5, **kw)
  with pytest.raises(ValueError, match="remask_t_on=1.5"):
    sampling.sample(EXACT, key, init, LINEAR, method="remdm", remask_t_on=1.5, **kw)
  with pytest.raises(ValueError, match="temperature must be a finite float >= 0, got -1.0"):
    sampling.sample(EXACT, key, init, LINEAR, method="maskgit", temperature=-1.0, **kw)
  with pytest.raises(ValueError, match="temperature=0.5 applies to method='maskgit' only, got "
                                       "method='ancestral'"):
    sampling.sample(EXACT, key, init, LINEAR, temperature=0.5, **kw)
  with pytest.raises(ValueError, match="unknown sampling method 'gibbs'.*maskgit, remdm"):
    sampling.sample(EXACT, key, init, LINEAR, method="gibbs", **kw)


# --------------------------------------------------------------------------------------------------
# Classifier-free guidance.

def _random_logits(seed, shape=(4, 7, 5)):
  return jax.random.normal(jax.random.key(seed), shape) * 2.0


def test_guidance_scale_zero_is_unconditional_and_one_is_conditional():
  cond, uncond = _random_logits(0), _random_logits(1)
  np.testing.assert_allclose(np.exp(guidance.guided_logits(cond, uncond, 0.0)),
                             jax.nn.softmax(uncond), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.exp(guidance.guided_logits(cond, uncond, 1.0)),
                             jax.nn.softmax(cond), rtol=1e-5, atol=1e-7)


def test_guidance_scale_two_is_the_renormalised_ratio_cond_squared_over_uncond():
  cond, uncond = _random_logits(2), _random_logits(3)
  p_c = np.asarray(jax.nn.softmax(cond), np.float64)
  p_u = np.asarray(jax.nn.softmax(uncond), np.float64)
  expected = p_c**2 / p_u
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.exp(guidance.guided_logits(cond, uncond, 2.0)), expected,
                             rtol=1e-4, atol=1e-7)


def test_guidance_gives_zero_probability_where_either_model_does():
  cond = jnp.array([0.0, 1.0, -jnp.inf, 0.5])
  uncond = jnp.array([-jnp.inf, 0.0, 0.0, 0.5])
  for scale in (0.0, 1.0, 3.0):
    probs = np.exp(np.asarray(guidance.guided_logits(cond, uncond, scale)))
    assert np.all(np.isfinite(probs)) and probs[0] == 0 and probs[2] == 0
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)


def test_guided_denoiser_samples_the_guided_distribution():
  p_c, p_u = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
  guided = guidance.guided_denoiser(_fixed_distribution(p_c), _fixed_distribution(p_u), 2.0)
  expected = p_c**2 / p_u
  expected /= expected.sum()
  init = jnp.full((4000, 5), 3, jnp.int32)
  np.testing.assert_allclose(np.exp(guided(init, jnp.ones(4000))[0, 0]), expected, rtol=1e-5)
  samples = np.asarray(sampling.sample(guided, jax.random.key(8), init, LINEAR, vocab_size=3,
                                       num_steps=10))
  assert pooled_chi2_pvalue(np.bincount(samples.ravel(), minlength=3), expected) > 1e-4
  # Guiding two split denoisers gives a split one, read out where revealed: the same samples.
  split = guidance.guided_denoiser(readout.as_split(_fixed_distribution(p_c)),
                                   readout.as_split(_fixed_distribution(p_u)), 2.0)
  assert isinstance(split, readout.SplitDenoiser)
  np.testing.assert_array_equal(sampling.sample(split, jax.random.key(8), init, LINEAR,
                                                vocab_size=3, num_steps=10), samples)


def test_ill_formed_guidance_arguments_raise_clear_errors():
  with pytest.raises(ValueError,
                     match=r"cond_logits has shape \(2, 3\) but uncond_logits has shape"):
    guidance.guided_logits(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 1.0)
  with pytest.raises(ValueError, match="scale must be a finite float, got nan"):
    guidance.guided_denoiser(EXACT, EXACT, float("nan"))
