"""`md4 compile --fit`: the fastest setting of a config that fits a slice with >= 10% of each
chip's memory left, found by compiling the training step for it (md4/aot.py).

Searched: the remat policy (model.net.remat), gradient accumulation (train.grad_accum_steps, which
sets the per-chip microbatch) and the FSDP degree (train.mesh_fsdp). The global batch
(train.batch_size) is the optimisation's and is kept; everything else is the config's (dtype,
attention kernel, logits chunk). "Fastest" is by the roofline estimate of md4/aot.py.

A compile of a paper-size step takes minutes, so the search does not sweep. Memory is close to
affine in the per-chip microbatch b for a fixed policy and mesh, so for each policy (`POLICIES`,
in order of increasing recomputation) with the state sharded over every chip:
  1. compile b = the whole per-chip batch (no accumulation); if it fits, this policy needs no
     accumulation and no heavier policy can be faster: the search of policies stops here;
  2. else compile b = 1/8 of it (or the least divisor), and draw the line through the two totals
     (through b and 2b instead when the compiler refused the whole batch: it then reports only part
     of what it would need, and near the chip's limit it rematerialises on its own), taking the
     largest b the line says fits;
  3. compile that b to check it (stepping down while the check fails).
Then, for the fastest of these, the smallest FSDP degree whose predicted total fits (the state
and the gradient grow by what sharding them saved, computed from shapes) is compiled to check,
and kept if it is no slower (less traffic between chips). Nothing is cached: every number printed
comes from a compile of this run.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

from md4 import aot, chips
from md4.config import Config
from md4.networks import remat as remat_lib

# Policies in order of increasing recomputation in the backward pass ("dots_no_batch" is left out:
# with the splash kernel the transformer has no batched products for it to recompute, so it is
# "dots"; in the image networks it recomputes the convolutions, as "full" does).
POLICIES = ("none", "dots", "attention_and_mlp", "full")


class Candidate(NamedTuple):
  remat: str
  accum: int
  fsdp: int
  measured: aot.Measured
  estimate: aot.Estimate

  def overrides(self) -> str:
    return (f"--config.model.net.remat={self.remat} --config.train.grad_accum_steps={self.accum} "
            f"--config.train.mesh_fsdp={self.fsdp}")


class FitResult(NamedTuple):
  best: Candidate | None
  tried: list[Candidate]  # Every compile, in order.


def with_settings(cfg: Config, remat: str, accum: int, fsdp: int) -> Config:
  net = dict(cfg.model.net, remat=remat)
  return dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, net=net),
      train=dataclasses.replace(cfg.train, grad_accum_steps=accum, mesh_fsdp=fsdp))


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def compile_train(cfg: Config, devices: list) -> aot.Measured:
  return aot.compile_train(aot.make_setup(cfg, devices))[0]


def search(cfg: Config, sl: chips.Slice, devices: list, log: Callable[[str], None] = print,
           measure: Callable[[Config, list], aot.Measured] = compile_train) -> FitResult:
  """The fastest fitting setting (None if nothing fits) and every compile made to find it;
  measure(cfg, devices) compiles cfg's training step."""
  n, global_batch = sl.num_chips, cfg.train.batch_size
  if global_batch % n:
    raise ValueError(f"train.batch_size={global_batch} must be a multiple of the {n} chips of "
                     f"{sl.name}")
  per_chip = global_batch // n
  budget = aot.FIT_FRACTION * sl.chip.hbm_bytes
  sizes = _divisors(per_chip)
  tried: list[Candidate] = []
  fits = lambda c: c.measured.total_bytes <= budget and not c.measured.refused

  def compile_(remat: str, b: int, fsdp: int) -> Candidate:
    measured = measure(with_settings(cfg, remat, per_chip // b, fsdp), devices)
    cand = Candidate(remat, per_chip // b, fsdp, measured, aot.roofline(measured, sl.chip))
    tried.append(cand)
    verdict = "fits" if fits(cand) else (
        "refused by the compiler" if measured.refused else "does not fit")
    estimate = ("" if measured.refused else
                f"; estimate {cand.estimate.seconds * 1e3:.4g} ms/step")
    log(f"  remat {remat}, microbatch {b} per chip x {per_chip // b}, mesh_fsdp {fsdp}: "
        f"{aot.gib(measured.total_bytes)} GiB, {verdict}{estimate} ({measured.compile_s:.0f} s "
        "to compile)")
    return cand

  found: list[Candidate] = []
  for remat in POLICIES:
    remat_lib.check_remat(remat)
    whole = compile_(remat, per_chip, n)
    if fits(whole):
      found.append(whole)
      break
    small_b = sizes[max(0, sizes.index(per_chip) - 3)]
    if small_b == per_chip:
      continue
    small = compile_(remat, small_b, n)
    if not fits(small):
      continue
    # A program larger than the chip is refused with a partial count, and near the limit XLA
    # rematerialises on its own: draw the line through a second program that fits, if needed.
    upper = whole
    if whole.measured.refused and sizes.index(small_b) + 1 < sizes.index(per_chip):
      upper = compile_(remat, sizes[sizes.index(small_b) + 1], n)
      if not fits(upper):
        found.append(small)
        continue
    upper_b = per_chip // upper.accum
    slope = (upper.measured.total_bytes - small.measured.total_bytes) / (upper_b - small_b)
    predict = lambda b: small.measured.total_bytes + slope * (b - small_b)
    for b in reversed([b for b in sizes if b < per_chip and predict(b) <= budget]):
      if b in (small_b, upper_b):
        found.append(small if b == small_b else upper)
        break
      check = compile_(remat, b, n)
      if fits(check):
        found.append(check)
        break
  if not found:
    return FitResult(None, tried)
  best = min(found, key=lambda c: (c.estimate.seconds, c.accum))
  return FitResult(_fewer_shards(cfg, sl, devices, best, budget, compile_, fits), tried)


def _fewer_shards(cfg, sl, devices, best: Candidate, budget: float, compile_, fits) -> Candidate:
  """best with the smallest FSDP degree predicted to fit, if its compile fits and is no slower."""
  from md4 import sharding, train  # pylint: disable=g-import-not-at-top
  per_chip = cfg.train.batch_size // sl.num_chips

  def state_and_params(fsdp: int) -> tuple[int, int]:
    setup = aot.make_setup(with_settings(cfg, best.remat, best.accum, fsdp), devices)
    abstract = train.abstract_state(setup)
    shardings = sharding.state_shardings(abstract, setup.mesh)
    return (sharding.bytes_per_device(abstract, shardings),
            sharding.bytes_per_device(abstract.params, shardings.params))

  fewer = [f for f in _divisors(sl.num_chips) if f < best.fsdp]
  if not fewer:
    return best
  state_n, params_n = state_and_params(best.fsdp)
  for fsdp in fewer:
    state, params = state_and_params(fsdp)
    # The state and the gradient (a temporary shaped and sharded like the parameters) grow.
    if best.measured.total_bytes + (state - state_n) + (params - params_n) > budget:
      continue
    cand = compile_(best.remat, per_chip // best.accum, fsdp)
    if fits(cand) and (cand.estimate.seconds, cand.measured.collective_bytes) <= (
        best.estimate.seconds, best.measured.collective_bytes):
      return cand
    break
  return best
