"""Samples from a trained model: unconditional, from a text prompt, or filling in a template's blanks;
written as text files or PNG grids."""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from md4 import checks, long_generation, model, readout, samplers, sampling
from md4.config import Config
from md4.data import text8
from md4.data.base import Decodes, DatasetSpec

BLANK = "_"
# Image grids narrower than this are scaled up by a whole factor (nearest neighbour) to reach it.
MIN_GRID_PIXELS = 448


def _check_text8(spec: DatasetSpec, what: str) -> None:
  if spec.kind != "text" or spec.vocab_size != text8.VOCAB_SIZE:
    raise ValueError(f"{what} needs a character-level text model (text8 vocabulary); this model "
                     f"has vocabulary {spec.vocab_size} over {spec.kind}")


def prompt_init(spec: DatasetSpec, prompt: str, num_samples: int, mask_id: int,
                length: int | None = None) -> np.ndarray:
  """int32[N, length]: the prompt's characters first, every later position mask_id (the model's
  vocab_size). length: default the model's sequence length."""
  _check_text8(spec, "--prompt")
  ids = text8.encode(prompt)
  length = length or spec.example_shape[0]
  if len(ids) > length:
    raise ValueError(f"the prompt has {len(ids)} characters; the samples have {length}")
  init = np.full((num_samples, length), mask_id, np.int32)
  init[:, :len(ids)] = ids
  return init


def infill_init(spec: DatasetSpec, template: str, num_samples: int, mask_id: int,
                length: int | None = None) -> np.ndarray:
  """int32[N, length]: the template with each '_' set to mask_id (the model's vocab_size); positions
  past its end are generated too. length: default the model's sequence length."""
  _check_text8(spec, "--infill")
  length = length or spec.example_shape[0]
  if len(template) > length:
    raise ValueError(f"the template has {len(template)} characters; the samples have {length}")
  if BLANK not in template:
    raise ValueError(f"the infill template has no blank {BLANK!r} to fill")
  row = np.full(length, mask_id, np.int32)
  for i, ch in enumerate(template):
    if ch != BLANK:
      row[i] = text8.encode(ch)[0]
  return np.tile(row, (num_samples, 1))


class Sampler:
  """Draws samples with cfg.sample's method; compiled once per instance.

  sample.guidance_scale w (a class-conditional model with a null class when w != 1): 1 samples the
  conditional model; 0 the unconditional one, with the null class in place of every label; any other
  w the classifier-free guided p_u^(1 - w) p_c^w (model.guided_denoiser). A guided denoiser call is
  one network call on the doubled batch [z; z]: SampleResult.num_calls counts it once, as it counts
  the calls of w = 0 or 1, though each costs about twice as much.
  """

  def __init__(self, network: nn.Module, cfg: Config, *, window: int | None = None):
    """window: None samples init's shape whole; an int samples text of any length in blocks
    (long_generation.sample_blocks) of the model's sequence length, each seeing the `window` tokens
    before it."""
    checks.check_guidance(cfg)
    self.cfg = cfg
    self._run = jax.jit(functools.partial(self._sample, network=network, cfg=cfg, window=window))

  @staticmethod
  def _sample(params, rng, init, labels, *, network, cfg, window):
    s = cfg.sample
    scale, null = s.guidance_scale, model.null_label(cfg)
    if scale == 1.0:
      denoise_fn = model.denoiser(network, params, labels)
    elif scale == 0.0:  # Exactly the null-class model, at the cost of one batch.
      denoise_fn = model.denoiser(network, params, jnp.full_like(labels, null))
    else:
      denoise_fn = model.guided_denoiser(network, params, labels, null=null, scale=scale)
    if cfg.model.extra_tokens:  # Ids that never occur in the data are never drawn.
      real = jnp.arange(cfg.model.vocab_size) < cfg.model.vocab_size - cfg.model.extra_tokens
      denoise_fn = readout.map_logits(denoise_fn, lambda logits: jnp.where(real, logits, -jnp.inf))
    options = dict(vocab_size=cfg.model.vocab_size, num_steps=s.num_steps, method=s.method,
                   top_p=None if s.top_p >= 1.0 else s.top_p, time_grid_kind=s.time_grid,
                   reuse_unchanged=s.reuse_unchanged, temperature=s.temperature,
                   remask_eta=s.remask_eta, remask_strategy=s.remask_strategy,
                   remask_t_on=s.remask_t_on, remask_t_off=s.remask_t_off)
    schedule = model.make_schedule(cfg.model, params)
    if window is None:
      return sampling.sample_with_info(denoise_fn, rng, init, schedule, **options)
    return long_generation.sample_blocks(denoise_fn, rng, init, schedule,
                                         seq_length=cfg.data.seq_length, window=window, **options)

  @staticmethod
  def _args(params, rng, init, labels):
    return (params, rng, jnp.asarray(init, jnp.int32),
            None if labels is None else jnp.asarray(labels, jnp.int32))

  def __call__(self, params, rng: jax.Array, init: np.ndarray,
               labels: np.ndarray | None = None) -> samplers.SampleResult:
    return self._run(*self._args(params, rng, init, labels))

  def compile(self, params, rng: jax.Array, init: np.ndarray, labels: np.ndarray | None = None):
    """The sampler compiled ahead for these arguments' shapes, called like the Sampler (so a
    timed call measures sampling, not compilation)."""
    compiled = self._run.lower(*self._args(params, rng, init, labels)).compile()
    return lambda params, rng, init, labels=None: compiled(*self._args(params, rng, init, labels))


class Drawn(NamedTuple):
  samples: np.ndarray  # int32[N, *S]
  labels: np.ndarray | None  # int32[N]: the classes asked for (class-conditional models).
  num_calls: int  # Network calls made.
  path: str | None  # The file written (process 0), None elsewhere.


def draw(sampler: Sampler, params, rng: jax.Array, dataset: Decodes, cfg: Config, path_stem: str,
         init: np.ndarray | None = None) -> Drawn:
  """cfg.sample.num_samples samples (from `init`, default all masked; class-conditional models get
  classes 0, 1, 2, ... in turn), written by process 0 to path_stem.txt or .png.

  dataset: the model's dataset or its recorded description (md4.standalone.Decoder), which decodes
  the samples.

  Every process calls this: sampling is one computation over all of them.
  """
  n = cfg.sample.num_samples
  init = unconditional_init(dataset.spec, n, cfg.model.vocab_size) if init is None else init
  labels = default_labels(dataset.spec, n, model.is_conditional(cfg))
  result = sampler(params, rng, init, labels)
  samples = np.asarray(result.samples)
  path = write_samples(dataset, samples, path_stem) if jax.process_index() == 0 else None
  return Drawn(samples, labels, int(result.num_calls), path)


def unconditional_init(spec: DatasetSpec, num_samples: int, mask_id: int,
                       length: int | None = None) -> np.ndarray:
  """int32[N, *S] (int32[N, length] for text given a length), every position mask_id (the model's
  vocab_size)."""
  shape = spec.example_shape if length is None else (length,)
  return np.full((num_samples,) + shape, mask_id, np.int32)


def default_labels(spec: DatasetSpec, num_samples: int, conditional: bool) -> np.ndarray | None:
  """Classes 0, 1, 2, ... in turn for a class-conditional model."""
  return np.arange(num_samples, dtype=np.int32) % spec.num_classes if conditional else None


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """uint8[N, H, W, C] -> one uint8 image with the N images tiled row by row (1-pixel gaps)."""
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / columns))
  grid = np.zeros((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, columns)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = img
  return grid


def scale_up(image: np.ndarray, min_size: int = MIN_GRID_PIXELS) -> np.ndarray:
  """uint8[H, W, C] repeated k x k per pixel, k the least whole factor that makes min(H, W) >=
  min_size (1 if it is already)."""
  k = max(1, -(-min_size // min(image.shape[:2])))
  return np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def write_samples(dataset: Decodes, samples: np.ndarray, path_stem: str) -> str:
  """Writes samples as path_stem.txt (one per line) or path_stem.png (a grid, at least
  MIN_GRID_PIXELS on its shorter side); returns the path."""
  os.makedirs(os.path.dirname(path_stem) or ".", exist_ok=True)
  samples = np.asarray(samples)
  if dataset.spec.kind == "text":
    path = path_stem + ".txt"
    with open(path, "w") as f:
      f.writelines(dataset.decode(s) + "\n" for s in samples)
    return path
  path = path_stem + ".png"
  grid = scale_up(image_grid(np.stack([dataset.decode(s) for s in samples])))
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path


def sample_report(dataset: Decodes, samples: np.ndarray,
                  labels: np.ndarray | None = None) -> str | None:
  """A line judging image samples where a judge of them exists (the MNIST digits: md4.digits),
  else None; labels: the classes a class-conditional model was asked for."""
  if dataset.name != "mnist" or dataset.spec.kind != "image":
    return None
  from md4 import digits  # pylint: disable=g-import-not-at-top
  return digits.judge(np.asarray(samples), dataset.spec, labels).line()
