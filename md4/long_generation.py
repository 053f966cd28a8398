"""Long generation: sequences longer than the model's length, sampled block by block, left to right
(semi-autoregressive, as MDLM)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from md4 import sampling
from md4.elbo import check_schedule, check_tokens
from md4.samplers import AnySchedule, DenoiseFn, SampleResult

Array = jax.Array


def sample_blocks(denoise_fn: DenoiseFn, rng: Array, init: Array, schedule: AnySchedule, *,
                  vocab_size: int, seq_length: int, window: int, num_steps: int,
                  **options) -> SampleResult:
  """Generates sequences of any length N with a model of length L, left to right in blocks (MDLM).

  Block 0 is positions [0, L), sampled as `sampling.sample` does. Block b >= 1 feeds the model the L
  positions from i_b = min(b (L - window), N - L): the last `window` tokens already generated, then
  the next L - window positions; when fewer positions remain, the last block takes a longer window
  so that its input is still exactly L tokens (the last L of the sequence). Within each block the
  masked positions are sampled with `method` and the given tokens of init are kept, so prompts and
  infilling work anywhere. N <= L is one block, padded with masked positions that are sampled and
  dropped (so the result follows the model's marginal of the first N positions).

  The law sampled: block b's new tokens follow the model's conditional given that block's window
  and its given tokens, so the sequence follows the product over blocks of these conditionals
  (exactly for first_hitting; as num_steps grows for ancestral, euler and mean, and slowly for
  remdm "cap"; not for maskgit nor remdm "loop"). The window truncates the context (nothing before
  it is seen), and a token given in a later block does not influence earlier blocks.

  Args:
    init: int32[B, N]; entries equal to vocab_size are generated, all others are kept.
    seq_length: L, the length the model takes.
    window: tokens of context carried into each later block, an int in [0, L - 1]; 0 makes blocks
      independent (except the last, whose window is widened as above).
    num_steps, **options: the arguments of `sampling.sample` (method, top_p, ...); they apply
      within each block.

  Returns:
    SampleResult with samples int32[B, N] and num_calls, the network calls of all blocks. The block
    loop is a lax loop over one block sampler of shape [B, L], so it compiles once.
  """
  if jnp.ndim(init) != 2 or 0 in jnp.shape(init):  # Before check_tokens, which needs values.
    raise ValueError("init must be int32[batch, N] with N >= 1 (one sequence per row), got shape "
                     f"{jnp.shape(init)}")
  check_tokens(init, vocab_size, allow_mask=True, name="init")
  check_schedule(schedule, vocab_size)
  opts = sampling.check_options(schedule.state_dependent, num_steps=num_steps, **options)
  if not isinstance(seq_length, int) or isinstance(seq_length, bool) or seq_length < 1:
    raise ValueError(f"seq_length must be an int >= 1 (the model's length), got {seq_length!r}")
  if not isinstance(window, int) or isinstance(window, bool) or not 0 <= window < seq_length:
    raise ValueError(f"window must be an int in [0, seq_length - 1] = [0, {seq_length - 1}], got "
                     f"{window!r}")
  init = jnp.asarray(init, jnp.int32)
  sampler = sampling.SAMPLERS[opts.method]
  n = init.shape[1]
  if n <= seq_length:
    padded = jnp.pad(init, ((0, 0), (0, seq_length - n)), constant_values=vocab_size)
    out = sampler(denoise_fn, jax.random.fold_in(rng, 0), padded, schedule, vocab_size, opts)
    return SampleResult(out.samples[:, :n], out.num_calls)
  stride = seq_length - window
  num_blocks = 1 + -(-(n - seq_length) // stride)

  def body(b, carry):
    seq, calls = carry
    start = jnp.minimum(b * stride, n - seq_length)
    block = jax.lax.dynamic_slice_in_dim(seq, start, seq_length, axis=1)
    out = sampler(denoise_fn, jax.random.fold_in(rng, b), block, schedule, vocab_size, opts)
    seq = jax.lax.dynamic_update_slice_in_dim(seq, out.samples, start, axis=1)
    return seq, calls + out.num_calls

  seq, calls = jax.lax.fori_loop(0, num_blocks, body, (init, jnp.array(0, jnp.int32)))
  return SampleResult(seq, calls)
