"""The digit classifier that judges samples of the MNIST digits: trained here on the embedded
digits' labels, accurate on the held-out digits, unsure of noise, trained once and then read from
its cache."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import pytest

from md4 import digits
from md4.data import pixels
from md4.data.base import DatasetSpec

BINARY = pixels.ImageFormat(28, 1, 2)


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
  with pytest.MonkeyPatch.context() as patch:
    home = tmp_path_factory.mktemp("xdg_cache")
    patch.setenv("XDG_CACHE_HOME", str(home))
    digits.classifier.cache_clear()
    yield home
  digits.classifier.cache_clear()


def test_the_classifier_knows_held_out_digits_and_doubts_noise(cache_home):
  classifier = digits.classifier(BINARY)
  real, labels = digits.held_out_digits(BINARY)
  probabilities = classifier.probabilities(real)
  assert np.mean(probabilities.argmax(-1) == labels) >= 0.93  # Measured: 0.952.
  assert digits.confident_share(probabilities) >= 0.75  # Measured: 0.846.
  # Pixel noise with the digits' ink density: measured 1% confident (25% without the shifts).
  density = digits.training_digits(BINARY)[0].mean()
  noise = (np.random.default_rng(0).random((500, 28, 28, 1)) < density).astype(np.int32)
  assert digits.confident_share(classifier.probabilities(noise)) <= 0.05


def test_it_is_trained_once_and_then_read_from_its_cache(cache_home, monkeypatch):
  first = digits.classifier(BINARY)
  files = os.listdir(cache_home / "md4" / "digit_classifier")
  assert len(files) == 1 and files[0].endswith(".npz")
  digits.classifier.cache_clear()

  def no_training(*args, **kwargs):
    raise AssertionError("trained again despite the cache")

  monkeypatch.setattr(digits, "train_classifier", no_training)
  again = digits.classifier(BINARY)
  for name, value in first.params.items():
    np.testing.assert_array_equal(again.params[name], value)


def test_an_unwritable_cache_costs_a_retraining_only(tmp_path, monkeypatch):
  blocker = tmp_path / "not_a_directory"
  blocker.write_text("")
  monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
  fmt = pixels.ImageFormat(7, 1, 2)  # 7 x 7: trains in a fraction of the time of 28 x 28.
  digits.classifier.cache_clear()
  try:
    real, labels = digits.held_out_digits(fmt)
    accuracy = np.mean(digits.classifier(fmt).probabilities(real).argmax(-1) == labels)
  finally:
    digits.classifier.cache_clear()
  assert accuracy > 0.5  # Digits shrunk to 7 x 7 and binarised are still mostly told apart.


def test_random_shifts_move_each_image_whole_within_the_bound():
  images = np.zeros((50, 9, 9, 1), np.float32)
  images[:, 4, 4] = 1.0
  images[:, 3, 4] = 0.5
  shifted = digits.random_shifts(images, 2, np.random.default_rng(0))
  moves = set()
  for out in shifted:
    (y,), (x,) = np.nonzero(out[..., 0] == 1.0)
    dy, dx = y - 4, x - 4
    assert abs(dy) <= 2 and abs(dx) <= 2
    assert out[3 + dy, 4 + dx, 0] == 0.5 and out.sum() == 1.5
    moves.add((dy, dx))
  assert len(moves) > 10  # Shifts vary from image to image.


def test_the_judgement_compares_samples_with_real_digits(cache_home):
  spec = DatasetSpec(2, (28, 28, 1), "image", "dim", 10)
  real, _ = digits.held_out_digits(BINARY)
  blank = np.zeros((8, 28, 28, 1), np.int32)
  judgement = digits.judge(np.concatenate([real[:8], blank]), spec)
  expected = digits.confident_share(digits.classifier(BINARY).probabilities(real[:8])) / 2
  assert judgement.samples_share == pytest.approx(expected)  # Blank images are not digits...
  assert digits.confident_share(digits.classifier(BINARY).probabilities(blank)) == 0.0
  assert judgement.num_samples == 16 and judgement.num_real == 500
  assert judgement.line().startswith(f"{100 * expected:.0f}% of 16 classified as a digit")


def test_a_conditional_model_is_judged_on_the_digits_it_was_asked_for(cache_home):
  spec = DatasetSpec(2, (28, 28, 1), "image", "dim", 10)
  real, labels = digits.held_out_digits(BINARY)
  probabilities = digits.classifier(BINARY).probabilities(real)
  right = digits.judge(real, spec, labels)
  confident = probabilities.max(-1) >= digits.CONFIDENCE
  assert right.asked_share == pytest.approx(np.mean(confident & (probabilities.argmax(-1) == labels)))
  assert right.asked_share > 0.7  # Confident and right on most held-out digits.
  wrong = digits.judge(real, spec, (labels + 1) % 10)
  assert wrong.asked_share < 0.05  # Asked for another digit: confident and right only by error.
  assert "as the digit asked for" in right.line()


# ------------------------------------------------------------------------------- the pixel demo

def _train_demo(tmp_path, *overrides):
  import subprocess
  import sys
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
  return subprocess.run([sys.executable, "-m", "md4.main", "train", "--config=configs/mnist_demo.py",
                         "--config.train.progress_bar=False", *overrides], cwd=tmp_path,
                        capture_output=True, text=True, timeout=1800, env=env)


def _shares(line):
  """(samples', asked-for, real digits') percentages from the line the trainer prints."""
  import re
  match = re.search(r"(\d+)% of (\d+) classified as a digit with confidence >= 0.9 by a digit "
                    r"classifier, (\d+)% as the digit asked for \(held-out real digits: (\d+)% of "
                    r"500; its accuracy on them ([\d.]+)%\)", line)
  assert match, line
  return int(match[1]), int(match[3]), int(match[4])


def test_the_pixel_demo_prints_the_digit_share_beside_the_bound(tmp_path):
  done = _train_demo(tmp_path, "--config.train.num_steps=4", "--config.train.sample_every=4",
                     "--config.sample.num_samples=4", "--config.sample.num_steps=4",
                     "--config.eval.max_examples=100")
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  bound = next(i for i, line in enumerate(lines) if line.startswith("eval (valid): "))
  assert lines[bound + 1].startswith("  reference: ")
  assert lines[bound + 2].startswith("  samples of step 4: ")
  _, _, real = _shares(lines[bound + 2])
  assert 50 <= real <= 80  # The 14 x 14 binarised held-out digits: measured 63%.
  grid = PIL.Image.open(tmp_path / "runs" / "mnist_demo" / "samples" / "step_4.png")
  assert min(grid.size) >= 448


@pytest.mark.slow
def test_the_pixel_demo_s_samples_are_digits(tmp_path):
  """The demo as shipped (minutes on 2 CPU cores): most samples are the digit they were asked for."""
  done = _train_demo(tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  line = next(line for line in done.stdout.splitlines() if line.startswith("  samples of step"))
  samples, asked, real = _shares(line)
  assert asked >= 40 and samples >= 0.6 * real  # Measured: 57% and 57%, against 63% real.
  grid = PIL.Image.open(tmp_path / "runs" / "mnist_demo" / "samples" / "step_3000.png")
  assert grid.size == (453, 453)  # 10 x 10 digits of 14 pixels, 1-pixel gaps, scaled by 3.
