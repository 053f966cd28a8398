"""Image formats: the size, channels and pixel depth a model sees, made from a dataset's images.

A dataset's images are uint8[N, H, W, C] with 256 values per channel. The data config may ask for
another format (`data.image_size`, `data.channels`, `data.levels`; 0 keeps the dataset's own):

  size      a divisor s of the side H = W: each k x k block (k = H / s) is averaged (box filter).
  channels  1 from 3: the ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B; 3 from 1: repeated.
  levels    L in [2, 256]: a value v in [0, 255] (after the two steps above) becomes the level
            floor(v L / 256) in [0, L); with L = 256 and no averaging, the value itself.

Levels are the model's tokens (its vocabulary is L); `to_pixels` maps them back for display:
level l -> round(l * 255 / (L - 1)), so 0 is black and L - 1 is white at every depth.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from md4.config import DataConfig

_LUMA = np.array([0.299, 0.587, 0.114], np.float64)
MAX_LEVELS = 256


@dataclasses.dataclass(frozen=True)
class ImageFormat:
  """What a model's images are: side (square), channels, levels per channel."""
  size: int
  channels: int
  levels: int

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.size, self.size, self.channels)


def image_format(cfg: DataConfig, source_shape: tuple[int, int, int]) -> ImageFormat:
  """The format cfg asks for, from images of source_shape (H, W, C), checked.

  Raises:
    ValueError: naming the key whose value this dataset's images cannot give.
  """
  height, width, channels = source_shape
  size = cfg.image_size or height
  if height != width:
    raise ValueError(f"dataset {cfg.dataset!r} has {height}x{width} images; only square images "
                     "can be resized")
  if height % size:
    raise ValueError(f"data.image_size={size} must divide dataset {cfg.dataset!r}'s side "
                     f"{height} (images are shrunk by averaging k x k blocks, k a whole number)")
  out_channels = cfg.channels or channels
  if out_channels not in (1, 3) or (out_channels != channels and channels not in (1, 3)):
    raise ValueError(f"data.channels={out_channels} cannot be made from dataset "
                     f"{cfg.dataset!r}'s {channels} channels (valid: 1 or 3)")
  levels = cfg.levels or MAX_LEVELS
  if not 2 <= levels <= MAX_LEVELS:
    raise ValueError(f"data.levels={levels} is invalid; valid: 2 to {MAX_LEVELS} (0: the "
                     "dataset's 256)")
  return ImageFormat(size, out_channels, levels)


def reformat(images: np.ndarray, fmt: ImageFormat) -> np.ndarray:
  """uint8[N, H, W, C] (values 0..255) -> int32[N, s, s, c] levels in [0, fmt.levels)."""
  images = np.asarray(images)
  n, height, width, channels = images.shape
  if (height, width, channels) == fmt.shape and fmt.levels == MAX_LEVELS:
    return images.astype(np.int32)
  x = images.astype(np.float64)
  if fmt.size != height:
    k = height // fmt.size
    x = x.reshape(n, fmt.size, k, fmt.size, k, channels).mean(axis=(2, 4))
  if fmt.channels == 1 and channels == 3:
    x = (x @ _LUMA)[..., None]
  elif fmt.channels == 3 and channels == 1:
    x = np.repeat(x, 3, axis=-1)
  levels = np.floor(x * (fmt.levels / MAX_LEVELS)).astype(np.int32)
  return np.minimum(levels, fmt.levels - 1)


def to_pixels(levels: np.ndarray, num_levels: int) -> np.ndarray:
  """int[..., C] levels in [0, L = num_levels) -> uint8 pixel values: l -> round(255 l / (L - 1))."""
  if not 2 <= num_levels <= MAX_LEVELS:
    raise ValueError(f"an image model has 2 to {MAX_LEVELS} levels per channel, got {num_levels}")
  levels = np.asarray(levels)
  if levels.size and (levels.min() < 0 or levels.max() >= num_levels):
    raise ValueError(f"pixel levels must lie in [0, {num_levels}), got values in "
                     f"[{levels.min()}, {levels.max()}]")
  if num_levels == MAX_LEVELS:
    return levels.astype(np.uint8)
  return np.rint(levels * (255.0 / (num_levels - 1))).astype(np.uint8)
