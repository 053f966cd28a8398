"""`md4 compile` (md4/aot.py, md4/fit.py, md4/chips.py): a tiny config compiled for a TPU slice with
no TPU attached, the HLO reading, the fit search's economy, and the one-line answers."""

import dataclasses
import os
import subprocess
import sys

import jax
import pytest

from configs.md4 import openwebtext
from md4 import aot, chips, fit
from md4 import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_owt(num_layers=1, **train):
  c = openwebtext.get_config("tiny")
  c.model.net.num_layers = num_layers
  # Sequence 128 (one tile of the splash kernel), GPT-2's vocabulary in chunks of 32 positions.
  c.data.seq_length = 128
  c.model.net.attention_impl = "splash"
  c.model.net.attention_dropout = False
  c.model.logits_chunk = 32
  cfg = config_lib.from_configdict(c)
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def test_tiny_config_compiles_for_a_tpu_slice_and_fsdp_costs_what_data_parallelism_costs():
  """MD4-S's vocabulary (50258 embedding rows, which 8 does not divide) at width 16, two blocks,
  with the splash kernel and chunked logits, 2 sequences of 128 per chip, compiled for a v5e-8 from
  shapes.

  The FLOPs counted in the compiled step are those of its matrix products by hand: per token
  6 N (N = 809,232 weights: two blocks' 2,560 and the output layer's 16 x 50257), the output
  layer's forward again (the chunk recomputed in the backward pass) and, per block, the splash
  kernels' 9 products of 2 L H (forward 2, backward 7) for L = 128, H = 16 (adaLN and the time
  embedding add under 1%). Per chip, FSDP over the 8 chips keeps those FLOPs within 5% of data
  parallelism's, holds 1/8 of the state, and needs no more temporaries than data parallelism plus
  one layer's gathered weights (the output layer, the largest: 16 x 50257 float32). This is where
  the temporaries are checked: XLA:TPU schedules the gathers (tests/test_sharding.py says why the
  CPU compile is not the place)."""
  sl = chips.get_slice("v5e-8")
  devices = aot.slice_devices(sl)
  assert len(devices) == 8 and devices[0].platform == "tpu"
  dp, dp_state = aot.compile_train(aot.make_setup(
      _tiny_owt(num_layers=2, mesh_fsdp=1, batch_size=16), devices))
  fsdp, fsdp_state = aot.compile_train(aot.make_setup(
      _tiny_owt(num_layers=2, mesh_fsdp=8, batch_size=16), devices))
  per_token = 6 * (2 * 2560 + 16 * 50257) + 2 * 16 * 50257 + 2 * 9 * 2 * 128 * 16
  assert 1.0 <= dp.flops / (2 * 128 * per_token) < 1.01, dp.flops
  assert fsdp.flops <= 1.05 * dp.flops, (fsdp.flops, dp.flops)
  assert fsdp_state <= dp_state / 8 * 1.05, (fsdp_state, dp_state)
  assert fsdp.temp_bytes <= dp.temp_bytes + 16 * 50257 * 4, (fsdp.temp_bytes, dp.temp_bytes)
  assert dp.collective_bytes > 0 and fsdp.collective_bytes > 0  # Gradients are reduced.
  line = aot.fit_line(_tiny_owt(mesh_fsdp=8), sl, fsdp)
  assert line.startswith("fits: 0.0")


def test_splash_kernel_compiles_for_a_sampler_batch_that_does_not_divide_over_the_chips():
  """A Pallas kernel cannot be partitioned by XLA: the sampler's 2 sequences on 8 chips run it
  whole on each chip (sharding.per_device), instead of failing to compile."""
  cfg = _tiny_owt(batch_size=8)
  cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, num_samples=2))
  compiled = aot.compile_all(cfg, aot.slice_devices(chips.get_slice("v5e-8")))
  for m in (compiled.train, compiled.eval, compiled.sample):
    assert not m.refused and m.flops > 0, m


def test_slice_names_and_their_topologies():
  assert chips.get_slice("v5e-8").topology == "v5e:2x4"
  assert chips.get_slice("v5litepod-8").num_chips == 8
  v4 = chips.get_slice("v4-8")  # 8 TensorCores: 4 chips, one megacore device each.
  assert (v4.num_chips, v4.topology, v4.chip_config) == (4, "v4:2x2x1", "megacore")
  assert chips.get_slice("v5p-128").topology == "v5p:4x4x4"
  assert chips.get_slice("v5e-32").chips_per_host == (2, 2, 1)
  with pytest.raises(ValueError, match=r"there is no slice 'v5e-12': a v5e slice counts chips: 1, "):
    chips.get_slice("v5e-12")
  with pytest.raises(ValueError, match=r"unknown slice 'v7-8'; valid: v4-8, "):
    chips.get_slice("v7-8")


def test_a_missing_compiler_is_named_with_the_extra_that_brings_it(monkeypatch):
  monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ValueError, match=r"needs libtpu, which is not installed: pip install -e "
                                       r"'\.\[tpu\]'"):
    aot.slice_devices(chips.get_slice("v5e-8"))
  with pytest.raises(ValueError, match=r"needs jax's CUDA plugin.*pip install -e '\.\[gpu\]'"):
    aot.slice_devices(chips.get_slice("h100"))


def test_fit_finds_the_fastest_setting_with_few_compiles():
  """A made-up chip of 10 GiB (9 usable) and a step whose memory is affine in the microbatch b,
  1 GiB + b x (per-example GiB of the policy), and whose FLOPs grow with recomputation. "none"
  (1 GiB per example): the whole batch of 64 is refused by the compiler (which then reports part of
  the need only), b = 8 fits (9 GiB), b = 16 does not: 8 microbatches, three compiles. "dots"
  (0.5 GiB): 64 does not fit, 8 does, the line through both says 16, which a third compile checks.
  "attention_and_mlp" (0.1 GiB) fits all 64 at once and ends the search. The fastest by the
  roofline is "none" with 8 microbatches."""
  chip = dataclasses.replace(chips.CHIPS["v5e"], hbm_bytes=10 * chips.GiB, ici_bytes_per_s=None)
  sl = chips.Slice("test-1", chip, 1, "test")
  per_example = {"none": 1.0, "dots": 0.5, "attention_and_mlp": 0.1, "full": 0.1}
  flops = {"none": 1.0, "dots": 1.1, "attention_and_mlp": 1.3, "full": 1.4}

  def measure(cfg, devices):
    del devices
    remat, accum = cfg.model.net["remat"], cfg.train.grad_accum_steps
    b = cfg.train.batch_size // accum
    total = (1 + b * per_example[remat]) * chips.GiB
    refused = total > 60 * chips.GiB
    return aot.Measured("training step", 0, 0, 0, int(12 * chips.GiB if refused else total),
                        1e12 * flops[remat] * 64, 0.0, 0.0, 0.0, refused)

  cfg = _tiny_owt(batch_size=64)
  result = fit.search(cfg, sl, [], log=lambda line: None, measure=measure)
  tried = [(c.remat, c.accum) for c in result.tried]
  assert tried == [("none", 1), ("none", 8), ("none", 4), ("dots", 1), ("dots", 8), ("dots", 4),
                   ("attention_and_mlp", 1)]
  assert (result.best.remat, result.best.accum) == ("none", 8)
  assert result.best.overrides().startswith("--config.model.net.remat=none "
                                            "--config.train.grad_accum_steps=8")


def test_compile_answers_in_one_line():
  """An unknown slice, and a missing --topology: exit status 1 and one line naming the problem."""
  for args, message in ((["--topology=v5e-12"], "there is no slice 'v5e-12'"),
                        ([], "--topology=SLICE is required")):
    out = subprocess.run([sys.executable, "-m", "md4.main", "compile",
                          "--config=configs/md4/openwebtext.py:tiny"] + args,
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith(f"md4 compile: error: {message}")
    assert "Traceback" not in out.stderr
