"""Any image shape and pixel depth: the data keys (image_size, channels, levels), the conversions
they make, the networks built for them, the grids samples are written as, and released image
models of other shapes converted through config overrides alone."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

import released_reference as ref
from md4 import config as config_lib
from md4 import convert, generate, model
from md4.data import pipeline, pixels
from md4.data.base import DatasetSpec


def _cfg(dataset, **data):
  config = config_lib.base_config()
  config.data.dataset = dataset
  for key, value in data.items():
    config.data[key] = value
  return config_lib.from_configdict(config).data


# ------------------------------------------------------------------------------ the conversions

def test_reformat_averages_blocks_then_takes_luma_then_quantises():
  image = np.zeros((1, 4, 4, 3), np.uint8)
  image[0, :2, :2] = [255, 0, 0]  # A red block: luma 0.299 * 255 = 76.245.
  # Green twice and blue once in four pixels: mean green 127.5, mean blue 63.75.
  image[0, :2, 2:] = [[[0, 255, 0], [0, 255, 0]], [[0, 0, 0], [0, 0, 255]]]
  image[0, 2:, :2] = 200
  fmt = pixels.ImageFormat(2, 1, 4)
  out = pixels.reformat(image, fmt)
  luma = np.array([[76.245, 0.587 * 127.5 + 0.114 * 63.75], [200.0, 0.0]])
  assert out.dtype == np.int32 and out.shape == (1, 2, 2, 1)
  np.testing.assert_array_equal(out[0, ..., 0], np.floor(luma * 4 / 256).astype(np.int32))
  assert out[0, ..., 0].tolist() == [[1, 1], [3, 0]]


def test_grey_becomes_colour_by_repetition_and_full_depth_is_the_identity():
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, (3, 6, 6, 1), dtype=np.uint8)
  np.testing.assert_array_equal(pixels.reformat(grey, pixels.ImageFormat(6, 1, 256)), grey)
  colour = pixels.reformat(grey, pixels.ImageFormat(6, 3, 256))
  assert colour.shape == (3, 6, 6, 3) and (colour == grey.astype(np.int32)).all()
  binary = pixels.reformat(grey, pixels.ImageFormat(6, 1, 2))
  np.testing.assert_array_equal(binary, (grey >= 128).astype(np.int32))


def test_levels_map_back_to_pixel_values_from_black_to_white():
  np.testing.assert_array_equal(pixels.to_pixels(np.arange(4), 4), [0, 85, 170, 255])
  np.testing.assert_array_equal(pixels.to_pixels(np.array([0, 1]), 2), [0, 255])
  np.testing.assert_array_equal(pixels.to_pixels(np.arange(256), 256), np.arange(256))
  with pytest.raises(ValueError, match=r"levels must lie in \[0, 4\)"):
    pixels.to_pixels(np.array([4]), 4)


@pytest.mark.parametrize("dataset,data,message", [
    ("mnist", dict(image_size=5), r"data.image_size=5 must divide dataset 'mnist'.s side 28"),
    ("cifar10", dict(image_size=64), r"data.image_size=64 must divide"),
    ("mnist", dict(levels=1), r"data.levels=1 is invalid"),
    ("mnist", dict(levels=300), r"data.levels=300 is invalid"),
    ("mnist", dict(channels=2), r"data.channels=2 is invalid"),
    ("text8", dict(levels=4), r"data.levels=4 applies to image datasets; 'text8' is text"),
    ("openwebtext", dict(image_size=8), r"data.image_size=8 applies to image datasets"),
])
def test_an_image_key_no_dataset_can_give_is_refused_naming_it(dataset, data, message):
  with pytest.raises(ValueError, match=message):
    pipeline.get_spec(_cfg(dataset, **data))


def test_each_image_dataset_has_the_format_it_is_asked_for():
  assert pipeline.get_spec(_cfg("cifar10", image_size=8, levels=16)) == DatasetSpec(
      16, (8, 8, 3), "image", "dim", 10)
  assert pipeline.get_spec(_cfg("imagenet32")) == DatasetSpec(256, (32, 32, 3), "image", "dim", 0)
  assert pipeline.get_spec(_cfg("imagenet64", channels=1, image_size=16)) == DatasetSpec(
      256, (16, 16, 1), "image", "dim", 0)
  assert pipeline.get_spec(_cfg("mnist", channels=3, levels=2)) == DatasetSpec(
      2, (28, 28, 3), "image", "dim", 10)


def test_the_embedded_digits_are_read_in_the_asked_format():
  cfg = _cfg("mnist", image_size=14, levels=4)
  dataset = pipeline.load(cfg)
  assert dataset.spec == DatasetSpec(4, (14, 14, 1), "image", "dim", 10)
  index = np.arange(5)
  batch = dataset.read_train(index)
  raw = dataset.train_images[index]
  expected = np.floor(raw.reshape(5, 14, 2, 14, 2).mean((2, 4)) * 4 / 256).astype(np.int32)
  np.testing.assert_array_equal(batch["x"][..., 0], expected)
  assert set(np.unique(dataset.eval_example("test", index)["x"])) <= {0, 1, 2, 3}
  bits, _ = dataset.baseline()
  assert 0 < bits <= 2.0  # The entropy of 4 levels is at most 2 bits.


def test_samples_are_written_as_a_grid_scaled_to_at_least_448_pixels(tmp_path):
  dataset = pipeline.load(_cfg("mnist", levels=2))
  samples = np.zeros((64, 28, 28, 1), np.int32)
  samples[:, 10:18, 10:18] = 1
  path = generate.write_samples(dataset, samples, str(tmp_path / "grid"))
  image = np.asarray(PIL.Image.open(path))
  # 8 x 8 images of 28 pixels with 1-pixel gaps: 233 pixels, scaled by 2.
  assert image.shape == (466, 466)
  assert set(np.unique(image)) == {0, 255}
  assert image[2 * 11, 2 * 11] == 255 and image[2 * 2, 2 * 2] == 0


# ------------------------------------------------------------------ released models, other shapes

def _released_cfg(dataset, network, net, vocab, **data):
  config = config_lib.base_config()
  config.data.dataset = dataset
  for key, value in data.items():
    config.data[key] = value
  config.model.vocab_size = vocab
  config.model.network = network
  config.model.net = net
  return config_lib.from_configdict(config)


@pytest.mark.parametrize("name", ["unet_8x8x3_16_levels", "uvit_imagenet32"])
def test_a_released_image_model_of_another_shape_gives_the_released_logits(name):
  if name == "unet_8x8x3_16_levels":
    cfg = _released_cfg("cifar10", "unet", dict(features=32, num_res_blocks=1), 16,
                        image_size=8, levels=16)
    shapes = ref.unet_tree(32, 1, vocab=16)
    logits = lambda p, z, t: ref.unet_logits(p, z, t, 32, 1, vocab=16)
  else:
    cfg = _released_cfg("imagenet32", "uvit", dict(features=32, num_res_blocks=1, num_layers=1,
                                                   num_heads=2, d_model=32), 256)
    shapes = ref.uvit_tree(32, 1, 1, 32, image=32)
    logits = lambda p, z, t: ref.uvit_logits(p, z, t, 32, 1, 1, 32, 2)
  spec = pipeline.config_spec(cfg)
  released = ref.random_tree(shapes, seed=0)
  params = convert.convert_params(ref.nest(released), cfg, spec)
  rng = np.random.default_rng(1)
  z = rng.integers(0, spec.vocab_size + 1, (2,) + spec.example_shape).astype(np.int32)
  t = np.array([0.2, 0.8], np.float32)
  ours = np.asarray(model.build_network(cfg, spec).apply({"params": params["net"]}, z, t))
  expected = logits(released, z, t)
  assert ours.shape == expected.shape == z.shape + (spec.vocab_size,)
  np.testing.assert_allclose(ours, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)
