"""md4.sampling.sample: the samplers' entry point, their options and the registry of methods.

Methods (`sample`, `sample_with_info`; each implemented in md4/samplers/):
  - ancestral, euler, mean: steps on a time grid; exact as the number of steps grows
    (samplers/grid.py).
  - first_hitting: exact; draws the time of each unmasking, one network call per token.
  - maskgit: MaskGIT's confidence-ordered parallel decoding; fast, NOT a sampler of the model's law.
  - remdm: ancestral steps plus ReMDM remasking of tokens decoded earlier (Wang et al. 2025).
Beyond one sample of the model's length: md4/long_generation.py (`sample_blocks`, sequences longer
than the model's length, block by block) and md4/guidance.py (classifier-free guidance, a denoiser
made of a conditional and an unconditional one).

Conditioning is by initialisation: positions of `init` equal to the mask id are generated, all others
are kept. A whole sampling run is one lax loop, so it compiles once.

Reveal first: with a state-independent schedule, ancestral, euler, mean and first_hitting decide
which masked positions a step reveals before they call the network (that choice does not depend on
the network's output; see md4/samplers/grid.py), call the network for each row only on its steps
that reveal something, and read it out only at the revealed positions (md4.readout: a denoiser split
into body and output layer; a plain (z, t) -> logits callable works too, read out by gathering).
Token draws keep probabilities down to about 1e-14 of the largest (md4/samplers/draws.py).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from md4.elbo import check_schedule, check_tokens
from md4.samplers import (AnySchedule, DenoiseFn, SampleResult, SamplerOptions, first_hitting, grid,
                          maskgit, remdm)

Array = jax.Array

METHODS = ("ancestral", "euler", "mean", "first_hitting", "maskgit", "remdm")
REMASK_STRATEGIES = ("cap", "loop")
# Methods that need one alpha(t) for every token, so not GenMD4's state-dependent schedule.
STATE_INDEPENDENT_ONLY = ("first_hitting", "maskgit", "remdm")
# Methods that, with a state-independent schedule, draw the positions a step reveals before the
# network call, call it for a row only on its steps that reveal something and read it out there.
REVEAL_FIRST = ("ancestral", "euler", "mean", "first_hitting")

# method -> its sampler, called as (denoise_fn, rng, init, schedule, vocab_size, opts) -> SampleResult.
SAMPLERS = {
    "ancestral": grid.sample,
    "euler": grid.sample,
    "mean": grid.sample,
    "first_hitting": first_hitting.sample,
    "maskgit": maskgit.sample,
    "remdm": remdm.sample,
}


def reveals_first(method: str, state_dependent: bool) -> bool:
  """Whether `method` reveals first (REVEAL_FIRST) under a schedule that is state-dependent or not."""
  return method in REVEAL_FIRST and not state_dependent


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_options(state_dependent: bool, *, num_steps: int, method: str = "ancestral",
                  top_p: float | None = None, time_grid_kind: str = "uniform",
                  reuse_unchanged: bool = False, temperature: float = 1.0, remask_eta: float = 0.0,
                  remask_strategy: str = "cap", remask_t_on: float = 0.55,
                  remask_t_off: float = 0.05) -> SamplerOptions:
  """The sampler's options (arguments as for `sample`; state_dependent: a GenMD4 schedule), checked
  without a network, so a config can be checked before training. Raises ValueError naming the
  argument, its value and the valid values."""
  if method not in METHODS:
    raise ValueError(f"unknown sampling method {method!r}; valid: {', '.join(METHODS)}")
  if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
    raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
  if time_grid_kind not in grid.TIME_GRIDS:
    raise ValueError(f"unknown time grid {time_grid_kind!r}; valid: {', '.join(grid.TIME_GRIDS)}")
  if not _is_real(temperature) or temperature < 0.0:
    raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
  if temperature != 1.0 and method != "maskgit":
    raise ValueError(f"temperature={temperature!r} applies to method='maskgit' only, got "
                     f"method={method!r}; leave temperature at 1.0")
  if not _is_real(remask_eta) or not 0.0 <= remask_eta <= 1.0:
    raise ValueError(f"remask_eta must be a float in [0, 1], got {remask_eta!r}")
  if remask_eta != 0.0 and method != "remdm":
    raise ValueError(f"remask_eta={remask_eta!r} applies to method='remdm' only, got "
                     f"method={method!r}; set method='remdm' or remask_eta=0")
  if remask_strategy not in REMASK_STRATEGIES:
    raise ValueError(f"unknown remask_strategy {remask_strategy!r}; valid: "
                     f"{', '.join(REMASK_STRATEGIES)}")
  if not (_is_real(remask_t_on) and _is_real(remask_t_off)
          and 0.0 <= remask_t_off < remask_t_on <= 1.0):
    raise ValueError("remask_t_on and remask_t_off must satisfy "
                     "1 >= remask_t_on > remask_t_off >= 0, "
                     f"got remask_t_on={remask_t_on!r}, remask_t_off={remask_t_off!r}")
  if reuse_unchanged and reveals_first(method, state_dependent):
    raise ValueError(f"reuse_unchanged applies to maskgit, remdm and GenMD4's grid samplers; "
                     f"{method} with a state-independent schedule calls the network only on steps "
                     "that reveal a token already")
  if state_dependent and method in STATE_INDEPENDENT_ONLY:
    why = {"first_hitting": "the time of the next unmasking depends on the unknown token values",
           "maskgit": "its reveal counts need one alpha(t) for every token",
           "remdm": "its remasking probabilities need one alpha(t) for every token"}[method]
    raise ValueError(f"{method} needs a state-independent schedule: with StateDependentPoly {why}; "
                     "use ancestral, euler or mean")
  return SamplerOptions(method, num_steps, top_p, time_grid_kind, reuse_unchanged,
                        float(temperature), float(remask_eta), remask_strategy,
                        float(remask_t_on), float(remask_t_off))


def sample_with_info(denoise_fn: DenoiseFn, rng: Array, init: Array, schedule: AnySchedule, *,
                     vocab_size: int, num_steps: int, method: str = "ancestral",
                     top_p: float | None = None, time_grid_kind: str = "uniform",
                     reuse_unchanged: bool = False, temperature: float = 1.0,
                     remask_eta: float = 0.0, remask_strategy: str = "cap",
                     remask_t_on: float = 0.55, remask_t_off: float = 0.05) -> SampleResult:
  """Samples and the number of network calls made. Arguments as for `sample`."""
  check_tokens(init, vocab_size, allow_mask=True, name="init")
  check_schedule(schedule, vocab_size)
  opts = check_options(schedule.state_dependent, method=method, num_steps=num_steps, top_p=top_p,
                       time_grid_kind=time_grid_kind, reuse_unchanged=reuse_unchanged,
                       temperature=temperature, remask_eta=remask_eta,
                       remask_strategy=remask_strategy, remask_t_on=remask_t_on,
                       remask_t_off=remask_t_off)
  init = jnp.asarray(init, jnp.int32)
  return SAMPLERS[method](denoise_fn, rng, init, schedule, vocab_size, opts)


def sample(denoise_fn: DenoiseFn, rng: Array, init: Array, schedule: AnySchedule, *,
           vocab_size: int, num_steps: int, method: str = "ancestral", top_p: float | None = None,
           time_grid_kind: str = "uniform", reuse_unchanged: bool = False,
           temperature: float = 1.0, remask_eta: float = 0.0, remask_strategy: str = "cap",
           remask_t_on: float = 0.55, remask_t_off: float = 0.05) -> Array:
  """Fills the masked positions of init: int32[B, *S] and returns int32[B, *S] with no mask id.

  Args:
    denoise_fn: (z: int32[B, *S], t: float32[B]) -> float32[B, *S, vocab_size] logits of x, or a
      readout.SplitDenoiser (model.denoiser gives one), which the REVEAL_FIRST methods read out
      only at the positions they reveal.
    rng: PRNG key.
    init: int32[B, *S]; entries equal to vocab_size are generated, all others are kept.
    schedule: from md4.schedules; StateDependentPoly unmasks each value v at its own rate (only the
      ancestral, euler and mean methods accept it).
    vocab_size: V (the mask id).
    num_steps: steps of the time grid (first_hitting ignores it: it takes one step per masked token).
    method: one of METHODS:
      "ancestral": exact step probabilities (a_s - a_t)/(1 - a_t) mu.
      "euler": rate * dt, clipped to a probability.
      "mean": draw x0 from mu, then reveal it with the step probability.
      "first_hitting": exact unmasking times, one network call per token.
      "maskgit": MaskGIT's confidence-ordered parallel decoding (Chang et al. 2022). NOT a sampler
        of the model's law: it reveals the positions whose drawn tokens are most probable first,
        which favours confident tokens (at temperature 0 it is a deterministic greedy decoder). On
        the step from t to s of the grid, every masked position draws a candidate
        x ~ softmax(log mu / temperature) (the argmax of mu at temperature 0) with the confidence
        c = log mu(x) + temperature * rho(s) * G, G ~ Gumbel(0, 1), rho(s) = (1 - a_s)/(1 - a_1)
        (the scheduled fraction still masked after the step; rho(0) = 0). The row then reveals its
        most confident masked positions, with their candidates, until round(M rho(s)) stay masked
        (M: the row's masked positions in init; round half to even; the last step reveals all).
        MaskGIT draws tokens at temperature 1 and uses a separate choice temperature (4.5) for the
        noise; here `temperature` sets both. With the linear schedule and the uniform grid,
        rho = 1 - (j + 1)/num_steps after step j, MaskGIT's annealing of the noise; with the cosine
        schedule the counts follow MaskGIT's cosine mask schedule. Network calls: num_steps.
      "remdm": ancestral steps with remasking (ReMDM: Wang, Schiff, Sahoo, Kuleshov 2025,
        "Remasking Discrete Diffusion Models with Inference-Time Scaling", arXiv:2503.00307).
        On a step from t to s, with x drawn from mu(z_t) for each position:
          z_t = m:  z_s = x with probability (a_s - (1 - sigma_t) a_t)/(1 - a_t),
                    z_s = m with probability (1 - a_s - sigma_t a_t)/(1 - a_t);
          z_t = x decoded by this run: z_s = m with probability sigma_t, else x;
          tokens given in init never change.
        Any 0 <= sigma_t <= sigma_max = min(1, (1 - a_s)/a_t) keeps these probabilities valid and
        the forward process's per-token marginal (x with probability a_s); sigma_t = 0 is the
        ancestral step. With remask_eta = 0, "cap" gives bitwise the ancestral samples; "loop"
        does not: it still warps time, so it gives the ancestral steps on the warped times tau(t)
        of the grid (the network called at tau(t), nothing revealed inside the window, where alpha
        is held), bitwise. remask_strategy:
          "cap": sigma_t = min(remask_eta, sigma_max) on every step.
          "loop": three phases by the step's upper time t: t > t_on, ancestral (sigma 0);
            t_off < t <= t_on, alpha held at a(t_on) (so a_s = a_t) with
            sigma_t = min(remask_eta, sigma_max): the masked fraction stays put while tokens are
            remasked and redrawn; t <= t_off, ancestral on a(t t_on / t_off), the rest of the
            schedule compressed into [0, t_off]. The network is called at the warped time.
        The last step reveals everything. Not exact even with the exact denoiser: positions are
        drawn independently given z_t, and remasking changes several at once with a probability
        per step that does not shrink with the step size. On the 3-token toy of the tests (exact
        denoiser, linear schedule, uniform grid) the total variation to p is 0.0007 for ancestral
        at 400 steps; about 0.008 at 400 steps and 0.004 at 1600 for "cap" with remask_eta in
        [0.1, 1] (detectable with 10^4 samples); about 0.04 at both for "loop" with remask_eta = 1.
    top_p: nucleus filtering of the denoiser's distribution (None = off).
    time_grid_kind: "uniform" or "cosine" (see samplers.grid.time_grid).
    reuse_unchanged: skip the network call on a step whose input did not change since the last call.
      Valid only when denoise_fn ignores t (a time-free denoiser), and for maskgit, remdm and the
      grid samplers under a state-dependent schedule: the others (REVEAL_FIRST) call the network
      for a row only on its steps that reveal something anyway.
    temperature: maskgit only (float >= 0; other methods raise unless it is 1.0).
    remask_eta: remdm only (float in [0, 1]; other methods raise unless it is 0).
    remask_strategy: "cap" or "loop" (read by remdm only).
    remask_t_on, remask_t_off: the loop's window, 1 >= t_on > t_off >= 0 (read by remdm's "loop"
      only; checked always). The defaults 0.55 and 0.05 are the ReMDM scripts' t_on and t_off, but
      ReMDM holds alpha at a separate alpha_on (0.9 there), reached at t_on by rescaling the first
      phase, where this loop holds a(t_on) (0.45 for the linear schedule at 0.55): for ReMDM's
      plateau, pick t_on with a(t_on) = 0.9.
  """
  return sample_with_info(denoise_fn, rng, init, schedule, vocab_size=vocab_size,
                          num_steps=num_steps, method=method, top_p=top_p,
                          time_grid_kind=time_grid_kind, reuse_unchanged=reuse_unchanged,
                          temperature=temperature, remask_eta=remask_eta,
                          remask_strategy=remask_strategy, remask_t_on=remask_t_on,
                          remask_t_off=remask_t_off).samples
