"""Accelerator chips and slices as data: what `md4 compile` compiles for and measures against.

Each chip's numbers are its vendor's published specification (the page is cited next to it); they
are peaks, so every time derived from them is a lower bound (a roofline), not a measurement.

Slice names are Cloud TPU accelerator types: for v4 and v5p the number counts TensorCores (two per
chip, which JAX drives as one "megacore" device), for v5e (v5litepod) and v6e it counts chips. Each
maps to the topology Google lists for it. "h100" is one NVIDIA H100 SXM 80GB, "h100-8" an HGX
node of eight.
"""

from __future__ import annotations

import dataclasses
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  platform: str  # "tpu" or "cuda".
  hbm_bytes: int  # Memory per chip.
  peak_bf16_flops: float  # Dense bfloat16 matrix FLOP/s per chip.
  hbm_bytes_per_s: float
  # Inter-chip bandwidth per chip (bidirectional, bytes/s), where published; None: not published.
  ici_bytes_per_s: float | None
  source: str


CHIPS: dict[str, Chip] = {
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOPs (bf16), 32 GiB HBM2 at 1200 GBps.
    "v4": Chip("TPU v4", "tpu", 32 * GiB, 275e12, 1200e9, None, "cloud.google.com/tpu/docs/v4"),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOPs (bf16), 16 GiB HBM at 819 GBps, ICI 400 GBps.
    "v5e": Chip("TPU v5e", "tpu", 16 * GiB, 197e12, 819e9, 400e9, "cloud.google.com/tpu/docs/v5e"),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOPs (bf16), 95 GB HBM2e at 2765 GBps, ICI
    # 4800 Gbps.
    "v5p": Chip("TPU v5p", "tpu", 95 * 10**9, 459e12, 2765e9, 600e9,
                "cloud.google.com/tpu/docs/v5p"),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOPs (bf16), 32 GB HBM at 1638 GBps, ICI 800 GBps.
    "v6e": Chip("TPU v6e", "tpu", 32 * 10**9, 918e12, 1638e9, 800e9,
                "cloud.google.com/tpu/docs/v6e"),
    # NVIDIA H100 SXM5 datasheet (nvidia.com/en-us/data-center/h100): 1,979 TFLOPS bf16 with 2:4
    # sparsity, so 989.4 dense; 80 GB HBM3 at 3.35 TB/s; NVLink 900 GB/s.
    "h100": Chip("NVIDIA H100 80GB", "cuda", 80 * 10**9, 989.4e12, 3.35e12, 900e9,
                 "nvidia.com/en-us/data-center/h100"),
}

# Chips -> the slice's shape, as Google lists the default topologies: 2D tori (v5e, v6e) and 3D
# ones (v4, v5p).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16)}
_GENERATIONS = {"v4": ("v4", 2, _SHAPES_3D), "v5p": ("v5p", 2, _SHAPES_3D),
                "v5e": ("v5e", 1, _SHAPES_2D), "v5litepod": ("v5e", 1, _SHAPES_2D),
                "v6e": ("v6e", 1, _SHAPES_2D)}
GPU_SLICES = {"h100": 1, "h100-8": 8}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # As given, e.g. "v5e-8".
  chip: Chip
  num_chips: int
  # TPU: the topology's name for jax.experimental.topologies.get_topology_desc ("v5e:2x4"), the
  # chips each host drives and the chip configuration; GPU: the topology string ("1x1x1").
  topology: str
  chips_per_host: tuple[int, int, int] | None = None
  chip_config: str = "default"


def valid_names() -> str:
  tpu = [f"{g}-{n * cores}" for g, (_, cores, shapes) in _GENERATIONS.items() if g != "v5litepod"
         for n in sorted(shapes)]
  return ", ".join(tpu + list(GPU_SLICES))


def get_slice(name: str) -> Slice:
  """The slice named like a Cloud TPU accelerator type ("v5e-8", "v5litepod-8", "v4-8",
  "v5p-128") or "h100" / "h100-8"; ValueError naming the valid ones otherwise."""
  if name in GPU_SLICES:
    n = GPU_SLICES[name]
    return Slice(name, CHIPS["h100"], n, f"1x1x{n}")  # Slices x hosts x GPUs per host.
  match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
  if match is None:
    raise ValueError(f"unknown slice {name!r}; valid: {valid_names()}")
  generation, cores_per_chip, shapes = _GENERATIONS[match.group(1)]
  count = int(match.group(2))
  if count % cores_per_chip or count // cores_per_chip not in shapes:
    sizes = ", ".join(str(n * cores_per_chip) for n in sorted(shapes))
    what = "TensorCores (2 per chip)" if cores_per_chip == 2 else "chips"
    raise ValueError(f"there is no slice {name!r}: a {match.group(1)} slice counts {what}: "
                     f"{sizes}")
  chips = count // cores_per_chip
  shape = shapes[chips]
  if len(shape) == 2:  # One host drives 8 chips on a single-host slice, 4 on a larger one.
    per_host = (2, 4, 1) if chips <= 8 else (2, 2, 1)
  else:
    per_host = (2, 2, 1)
  per_host = tuple(min(a, b) for a, b in zip(per_host, shape + (1,) * (3 - len(shape))))
  return Slice(name, CHIPS[generation], chips, f"{generation}:{'x'.join(map(str, shape))}",
               per_host, "megacore" if cores_per_chip == 2 else "default")
