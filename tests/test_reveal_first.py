"""Reveal first: the samplers that read the network out only at the positions they reveal.

Ground truth: the enumerated law of the toy (tests/toy.py), NumPy references of the read-out
loop, the pre-reveal-first samplers written out here (the coins and first_hitting's draws are kept
bitwise), and the full network's logits (a split denoiser must sample exactly what the whole
network samples).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from md4 import model, readout, sampling, schedules
from md4.config import ModelConfig
from md4.data import pipeline
from md4.networks import build_network
from md4.samplers import draws, grid as grid_lib
from toy import make_toy, posterior_denoiser

TOY = make_toy(length=3, vocab_size=3, seed=0)
V, L = TOY.vocab_size, TOY.length
EXACT = posterior_denoiser(TOY)


# ------------------------------------------------------------------------------ read-out loop


def test_chunk_size_fills_about_read_out_rows_per_iteration():
  for batch in [1, 2, 3, 5, 16, 64, 100]:
    for n in [1, 7, 64, 1024]:
      chunk = readout.chunk_size(batch, n)
      assert chunk & (chunk - 1) == 0 or chunk == n  # A power of two, or the whole row.
      assert chunk == n or batch * chunk >= readout.READ_OUT_ROWS
      assert chunk == 1 or batch * chunk < 2 * readout.READ_OUT_ROWS + 2 * batch


def test_revealed_in_order_lists_every_true_entry_in_order():
  rng = np.random.default_rng(0)
  mask = rng.random((6, 11)) < np.array([0.0, 0.1, 0.4, 0.7, 1.0, 0.5])[:, None]
  order, count = readout.revealed_in_order(jnp.asarray(mask), 4)
  assert order.shape == (6, 12)
  for row, pos, c in zip(mask, np.asarray(order), np.asarray(count)):
    assert c == row.sum()
    np.testing.assert_array_equal(pos[:c], np.nonzero(row)[0])
    assert np.all(pos[c:] == 0)


@pytest.mark.parametrize("batch,n", [(1, 13), (3, 40), (40, 9)])
def test_for_revealed_reads_out_every_true_position_once_and_nothing_else(batch, n):
  @jax.jit
  def times_read(mask):
    def read_out(positions, valid, seen):
      rows = jnp.arange(batch)[:, None]
      return seen.at[rows, jnp.where(valid, positions, n)].add(1, mode="drop")
    return readout.for_revealed(mask, read_out, jnp.zeros(mask.shape, jnp.int32))

  rng = np.random.default_rng(batch)
  for p in [0.0, 0.05, 0.3, 1.0]:
    mask = rng.random((batch, n)) < p
    mask[0] = rng.random(n) < 0.9  # One full row among sparse ones.
    np.testing.assert_array_equal(times_read(jnp.asarray(mask)), mask.astype(np.int32))
  assert int(times_read(jnp.zeros((batch, n), bool)).sum()) == 0


# ------------------------------------------------------------------------- calls and coins


def clock_denoiser(vocab_size):
  """Its only possible token at every position is the number of visible positions of z, so a
  sample records the call at which each position was revealed."""
  def denoise_fn(z, t):
    visible = (z != vocab_size).reshape(z.shape[0], -1).sum(-1)
    clock = jnp.arange(vocab_size) == visible.reshape((-1,) + (1,) * z.ndim)
    return jnp.where(clock, 0.0, -jnp.inf) * jnp.ones(z.shape + (1,))
  return denoise_fn


def test_each_row_calls_the_network_exactly_on_its_steps_that_reveal():
  length, vocab, steps = 8, 9, 50
  init = jnp.full((5, length), vocab, jnp.int32).at[1, :6].set(0)  # Row 1: two to reveal.
  methods = ("ancestral", "euler", "mean")
  outs = jax.jit(lambda key: [sampling.sample_with_info(
      clock_denoiser(vocab), key, init, schedules.get_schedule("cosine"), vocab_size=vocab,
      num_steps=steps, method=method) for method in methods])(jax.random.key(3))
  for method, out in zip(methods, outs):
    # Each of a row's calls writes its own clock value on the positions it reveals: the row's
    # calls are its distinct values (row 1 starts at clock 6, with its prompt's zeros beside).
    samples = np.asarray(out.samples)
    per_row = [len(np.unique(row[row >= (6 if i == 1 else 0)])) for i, row in enumerate(samples)]
    assert per_row[1] <= 2 and max(per_row) > 2, method
    # A batch call serves every row's next revealing step, so calls are the most of any row.
    assert int(out.num_calls) == max(per_row), method
    assert int(out.num_calls) < steps  # 8 tokens over 50 steps: most steps reveal nothing.


def step_by_step_sampler(denoise_fn, key, init, schedule, num_steps, method, vocab_size):
  """The reveal-first grid sampler one step at a time for the whole batch (as it was before rows
  skipped their own steps): each step's coins, every position's logits at the step's t, and each
  revealed position's token from draws.draw_tokens with the step's token key."""
  grid = grid_lib.time_grid(num_steps)
  b, n = init.shape

  def step(j, z):
    t, s = grid[num_steps - j], grid[num_steps - j - 1]
    r = grid_lib.step_probs(method, schedule, t, s)
    k_unmask, k_token = jax.random.split(jax.random.fold_in(key, j))
    reveal = (z == vocab_size) & (draws.fine_uniform(k_unmask, z.shape)[0] < r)
    logp = jax.nn.log_softmax(denoise_fn(z, jnp.full((b,), t)), axis=-1)
    every = jnp.broadcast_to(jnp.arange(n), (b, n))
    return jnp.where(reveal, draws.draw_tokens(k_token, logp, every, n), z)

  return jax.lax.fori_loop(0, num_steps, step, init)


def test_rows_on_their_own_steps_sample_bitwise_what_the_step_by_step_loop_samples(
    network_and_params):
  """A time-conditioned random transformer (its logits depend on t) and a denoiser whose only token
  is the step of its t: each row's call runs at its own step's t with that step's token key."""
  network, params = network_and_params
  steps, vocab = 40, 29
  init = jnp.full((6, 24), vocab, jnp.int32).at[:2, 3:9].set(5)
  sched = schedules.get_schedule("cosine")
  net = model.denoiser(network, params, jnp.array([0, 1, 2, 0, 1, 2], jnp.int32))
  step_of_t = lambda z, t: jnp.where(
      jnp.arange(vocab) == jnp.round(t * steps).astype(jnp.int32)[:, None, None], 0.0, -jnp.inf
  ) * jnp.ones(z.shape + (1,))

  @jax.jit
  def both():
    return [(sampling.sample(fn, jax.random.key(9), init, sched, vocab_size=vocab,
                             num_steps=steps, method=method),
             step_by_step_sampler(fn, jax.random.key(9), init, sched, steps, method, vocab))
            for fn in (net, step_of_t) for method in ("ancestral", "euler")]

  for now, reference in both():
    np.testing.assert_array_equal(now, reference)


def todays_grid_sampler(denoise_fn, key, init, schedule, num_steps, method, vocab_size):
  """The grid samplers as they were before reveal-first: every step calls the network, draws a
  token at every position and reveals with probability sum_v r mu_v."""
  grid = grid_lib.time_grid(num_steps)

  def step(j, z):
    t, s = grid[num_steps - j], grid[num_steps - j - 1]
    logp = jax.nn.log_softmax(denoise_fn(z, jnp.full(z.shape[:1], t)), axis=-1)
    if method == "euler":
      r = schedules.rate(schedule, t) * (t - s)
    else:
      r = (schedule.alpha(s) - schedule.alpha(t)) / (1.0 - schedule.alpha(t))
    r = jnp.where(s == 0.0, 1.0, r)
    k_unmask, k_token = jax.random.split(jax.random.fold_in(key, j))
    if method == "mean":
      token = draws.categorical(k_token, logp)
      unmask = draws.bernoulli(k_unmask, jnp.broadcast_to(r, z.shape))
    else:
      r_v = jnp.broadcast_to(r, logp.shape[-1:])
      token = draws.categorical(k_token, logp + jnp.log(r_v))
      unmask = draws.bernoulli(k_unmask,
                                  jnp.minimum((jnp.exp(logp) * r_v).sum(-1), 1.0))
    return jnp.where((z == vocab_size) & unmask, token, z)

  return jax.lax.fori_loop(0, num_steps, step, init)


def test_grid_samplers_keep_todays_coins():
  """Which positions a step reveals comes from the same random numbers as before reveal-first: with
  a denoiser whose token is certain the samples are bitwise today's. (The tokens themselves now come
  from per-position keys, draws.draw_tokens, so with an uncertain denoiser they differ.)"""
  length, vocab, steps = 12, 14, 30
  init = jnp.full((16, length), vocab, jnp.int32).at[:8, 3].set(0)  # Half the rows prompted.
  sched = schedules.get_schedule("linear")
  key = jax.random.key(4)
  clock = clock_denoiser(vocab)

  @jax.jit
  def both():
    return [(sampling.sample(clock, key, init, sched, vocab_size=vocab, num_steps=steps,
                             method=method),
             todays_grid_sampler(clock, key, init, sched, steps, method, vocab))
            for method in ("ancestral", "euler", "mean")]

  for now, today in both():
    np.testing.assert_array_equal(now, today)


def todays_first_hitting(denoise_fn, rng, init, schedule, vocab_size):
  """first_hitting as it was before reveal-first: the full logits on every call."""
  b = init.shape[0]

  def body(carry):
    z, t, calls = carry
    k_time, k_pos, k_token = jax.random.split(jax.random.fold_in(rng, calls), 3)
    masked = z == vocab_size
    n = masked.sum(-1)
    log_u = jnp.log(draws.fine_uniform(k_time, (b,))[0])
    a_s = 1.0 - (1.0 - schedule.alpha(t)) * jnp.exp(log_u / jnp.maximum(n, 1))
    s = jnp.where(n > 0, schedule.inverse(a_s), t)
    logp = jax.nn.log_softmax(denoise_fn(z, s), axis=-1)
    pos = draws.categorical(k_pos, jnp.where(masked, 0.0, -jnp.inf))
    token = draws.categorical(k_token, jnp.take_along_axis(logp, pos[:, None, None], 1)[:, 0])
    current = jnp.take_along_axis(z, pos[:, None], axis=1)[:, 0]
    z = z.at[jnp.arange(b), pos].set(jnp.where(n > 0, token, current))
    return z, s, calls + 1

  return jax.lax.while_loop(lambda c: jnp.any(c[0] == vocab_size), body,
                            (init, jnp.ones((b,), jnp.float32), jnp.array(0, jnp.int32)))[0]


def test_first_hitting_is_bitwise_todays():
  init = jnp.full((300, L), V, jnp.int32).at[:100, 0].set(2)
  sched = schedules.get_schedule("cosine")
  key = jax.random.key(5)
  now = jax.jit(lambda: sampling.sample(EXACT, key, init, sched, vocab_size=V, num_steps=1,
                                        method="first_hitting"))()
  np.testing.assert_array_equal(now, jax.jit(todays_first_hitting, static_argnums=(0, 4))(
      EXACT, key, init, sched, V))


# ------------------------------------------------------------------------------ the law


def split_posterior(toy):
  """The toy's exact denoiser split as a network would be: the "body" gives each row's posterior
  weights over the enumerated sequences (not logits), and the read-out forms the marginal of each
  asked position from them, so nothing is computed at positions that are not asked for."""
  seqs = jnp.asarray(toy.seqs)
  log_prior = jnp.log(jnp.asarray(toy.probs, jnp.float32))
  mask_id = toy.vocab_size

  def features(z, t):
    agrees = (z[:, None, :] == mask_id) | (z[:, None, :] == seqs[None])
    return {"weights": jax.nn.softmax(jnp.where(agrees.all(-1), log_prior, -jnp.inf), axis=-1)}

  def logits(h, positions):
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seqs.shape[1]), (h["weights"].shape[0],
                                                              seqs.shape[1]))
    tokens = seqs.T[positions]  # [B, K, num_seqs]: each sequence's token at each asked position.
    one_hot = jax.nn.one_hot(tokens, mask_id)
    marginal = jnp.einsum("bn,bknv->bkv", h["weights"], one_hot)
    return jnp.log(jnp.maximum(marginal, 1e-30))

  return readout.SplitDenoiser(features, logits)


def chi2_pvalue(samples, probs):
  idx = np.ravel_multi_index(np.asarray(samples).T, (V,) * L)
  counts = np.bincount(idx, minlength=len(probs))
  expected = probs * counts.sum()
  return stats.chi2.sf(((counts - expected) ** 2 / expected).sum(), df=len(probs) - 1)


@pytest.mark.parametrize("method,schedule_name", [("ancestral", "cosine"),
                                                  ("first_hitting", "linear")])
def test_split_denoiser_samples_follow_the_enumerated_law(method, schedule_name):
  """Pearson's chi-square at p > 1e-4 (fixed seed), 6000 samples, 300 steps: the grid's
  discretisation error (~0.4% in total variation, tests/test_sampling.py) is below the ~3% noise."""
  init = jnp.full((6000, L), V, jnp.int32)
  sched = schedules.get_schedule(schedule_name)

  @jax.jit
  def both():
    return [sampling.sample(fn, jax.random.key(6), init, sched, vocab_size=V, num_steps=300,
                            method=method) for fn in (split_posterior(TOY), EXACT)]

  split, plain = both()
  assert chi2_pvalue(split, TOY.probs) > 1e-4
  np.testing.assert_array_equal(split, plain)  # The split read-out samples what the plain one does.


# ------------------------------------------------------------------------- the network


@pytest.fixture(scope="module")
def network_and_params():
  """A small transformer with every parameter random (the zero-initialised output layer too)."""
  spec = pipeline.DatasetSpec(29, (24,), "text", "char", 3)
  net_cfg = dict(num_layers=1, num_heads=2, d_model=32, cond_dim=8, num_classes=3,
                 null_class=True)
  network = build_network("transformer", vocab_size=29, **net_cfg)
  model_cfg = ModelConfig(vocab_size=29, network="transformer", net=net_cfg)

  @jax.jit
  def random_params():
    params = model.init_params(jax.random.key(0), network, model_cfg, spec)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    return jax.tree.map(lambda p: p + jax.random.normal(next(keys), p.shape), params)

  return network, random_params()


def test_network_read_out_at_revealed_positions_samples_what_the_whole_network_samples(
    network_and_params):
  """model.denoiser runs the transformer's body once and its output layer at the revealed positions
  only; sampling with it gives bitwise the samples of the plain (z, t) -> logits network, on the
  grid and first-hitting, with top-p, classifier-free guidance and banned token ids."""
  network, params = network_and_params
  labels = jnp.array([0, 1, 2, 0], jnp.int32)
  init = jnp.full((4, 24), 29, jnp.int32).at[1, :5].set(7)
  sched = schedules.get_schedule("linear")
  banned = jnp.arange(29) >= 27

  def denoisers(kind):
    split = (model.denoiser(network, params, labels) if kind == "conditional" else
             model.guided_denoiser(network, params, labels, null=3, scale=1.5))
    split = readout.map_logits(split, lambda x: jnp.where(banned, -jnp.inf, x))
    return split, (lambda z, t: split(z, t))  # The second hides the split: full logits.

  @jax.jit
  def draws():
    out = {}
    for kind in ("conditional", "guided"):
      for method, top_p in {"conditional": [("ancestral", None), ("first_hitting", 0.9)],
                            "guided": [("euler", 0.9)]}[kind]:
        for path, fn in zip(("split", "full"), denoisers(kind)):
          out[kind, method, path] = sampling.sample_with_info(
              fn, jax.random.key(8), init, sched, vocab_size=29, num_steps=10, method=method,
              top_p=top_p)
    return out

  out = draws()
  for (kind, method, path), result in out.items():
    if path == "split":
      full = out[kind, method, "full"]
      np.testing.assert_array_equal(result.samples, full.samples, err_msg=f"{kind} {method}")
      assert int(result.num_calls) == int(full.num_calls)
      samples = np.asarray(result.samples)
      assert samples.max() < 27 and np.all(samples[1, :5] == 7)


def test_reuse_unchanged_is_refused_where_calls_are_skipped_already():
  init = jnp.full((2, L), V, jnp.int32)
  for method in sampling.REVEAL_FIRST:
    with pytest.raises(ValueError, match=f"reuse_unchanged applies to maskgit.*{method}"):
      sampling.sample(EXACT, jax.random.key(0), init, schedules.get_schedule("linear"),
                      vocab_size=V, num_steps=4, method=method, reuse_unchanged=True)
  # GenMD4's grid samplers read every position out: there it still applies.
  sampling.check_options(True, num_steps=4, method="ancestral", reuse_unchanged=True)
