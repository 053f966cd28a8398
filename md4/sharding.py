"""Device mesh and sharding rules: one path from 1 CPU to many accelerators and hosts.

Mesh axes: "data" (pure data parallelism) and "fsdp" (data parallelism that also shards the state).
The batch is split over both axes. The state (parameters, optimizer moments, EMA) is sharded by
rules that are data: each parameter's path names the logical axes of its dimensions
(`PARAM_AXES`: embed, mlp, heads, vocab, ...), and `LOGICAL_TO_MESH` maps logical axes to mesh
axes. Only the model width ("embed") and the convolutions' output channels go to "fsdp": every
large matrix has one such dimension, and sharding it leaves the batch as the one dimension the
activations are split on. (The vocabulary is never split: 50258 rows do not divide by 8.)

Inside a jitted step, `constrain_batch` tells XLA that an activation is split along its batch;
without it, XLA's sharding propagation follows the parameters' split of the width into the
activations and replicates the batch on every device of the fsdp axis, which multiplied the work of
each chip by 2.45 and its temporaries by 2.4 for MD4-S on 8 chips (docs/training.md).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
MESH_AXES = (DATA, FSDP)

# Parameter path (a regex searched in the "/"-joined path of a state leaf, so optimizer moments and
# the EMA follow their parameter) -> the logical axes of its dimensions. The first match wins.
# Leaves that match no rule (biases, norms' scales, GenMD4's exponents, scalars) are replicated:
# they are a negligible part of the state (tests/test_sharding.py checks this for every config).
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Transformer blocks (text transformer, the U-ViT's DiT blocks).
    (r"attn/(query|key|value)/kernel$", ("embed", "heads", "head_dim")),
    (r"attn/(query|key|value)/bias$", ("heads", "head_dim")),
    (r"attn/out/kernel$", ("heads", "head_dim", "embed")),
    (r"mlp/(gate|up|fc1)/kernel$", ("embed", "mlp")),
    (r"mlp/(down|fc2)/kernel$", ("mlp", "embed")),
    (r"(adaln|modulation|cond_proj)/kernel$", ("cond", "embed")),
    # Token and pixel embeddings, the output layers.
    (r"embed/embedding$", ("vocab", "embed")),
    (r"embed_proj/kernel$", ("embed_in", "embed")),
    (r"final/proj/kernel$", ("embed", "vocab")),
    (r"patch_out/proj/kernel$", ("embed", "patch")),
    (r"pos_embed$", ("length", "embed")),
    # MDLM's DIT (md4/networks/dit.py).
    (r"vocab_embed$", ("vocab", "embed")),
    (r"attn_qkv/kernel$", ("embed", "qkv")),
    (r"attn_out/kernel$", ("qkv", "embed")),
    (r"mlp_0/kernel$", ("embed", "mlp")),
    (r"mlp_2/kernel$", ("mlp", "embed")),
    (r"output_linear/kernel$", ("embed", "vocab")),
    (r"sigma_map_\d/kernel$", ("cond", "cond")),
    # Conditioning MLP (time, class).
    (r"cond_embed/time_hidden/kernel$", ("cond", "embed")),
    (r"cond_embed/time_out/kernel$", ("embed", "cond")),
    # Convolutions [kh, kw, in, out] and 1x1 projections of the image networks.
    (r"(conv\w*|patch_embed)/kernel$", ("conv_h", "conv_w", "channels_in", "channels")),
    (r"skip/kernel$", ("channels_in", "channels")),
)

# Logical axis -> mesh axis (None: replicated). A dimension is split only when the mesh axis's size
# divides it; otherwise it is replicated.
LOGICAL_TO_MESH: Mapping[str, str | None] = {
    "embed": FSDP, "channels": FSDP,
    "mlp": None, "heads": None, "head_dim": None, "qkv": None, "vocab": None, "cond": None,
    "embed_in": None,
    "patch": None, "length": None, "conv_h": None, "conv_w": None, "channels_in": None,
}


def make_mesh(fsdp: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"train.mesh_fsdp={fsdp} must divide the number of devices ({len(devices)})")
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def path_string(path) -> str:
  """A pytree key path as "opt_state/0/mu/net/block_0/attn/query/kernel"."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def logical_axes(path: str, ndim: int) -> tuple[str, ...] | None:
  """The logical axes of the state leaf at `path` (path_string), or None: no rule, replicated."""
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, path):
      if len(axes) != ndim:
        raise ValueError(f"sharding rule {pattern!r} names {len(axes)} axes {axes} but {path} has "
                         f"{ndim} dimensions")
      return axes
  return None


def leaf_spec(path: str, shape: tuple[int, ...], mesh_shape: Mapping[str, int]) -> P:
  """The PartitionSpec of a state leaf: its logical axes mapped by LOGICAL_TO_MESH, each dimension
  split only where the mesh axis divides it."""
  axes = logical_axes(path, len(shape))
  if axes is None:
    return P()
  spec = []
  for axis, size in zip(axes, shape):
    mesh_axis = LOGICAL_TO_MESH[axis]
    split = mesh_axis is not None and mesh_shape[mesh_axis] > 1 and size % mesh_shape[mesh_axis] == 0
    spec.append(mesh_axis if split else None)
  return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedSharding for every leaf of a pytree of ShapeDtypeStructs (a TrainState or parameters)."""
  mesh_shape = dict(mesh.shape)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, leaf_spec(path_string(path), x.shape, mesh_shape)),
      abstract_state)


def bytes_per_device(abstract: Any, shardings: Any) -> int:
  """Bytes of the largest shard of each leaf, summed: what one device holds of the pytree."""
  total = 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return total


def constrain_batch(x: jax.Array) -> jax.Array:
  """x: [B, ...] constrained to be split along B over the mesh axes of the mesh in context (see
  `in_mesh`); x itself when there is no such mesh or B does not divide evenly."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) or x.shape[0] % mesh.size:
    return x
  return jax.lax.with_sharding_constraint(x, P(MESH_AXES))


def gathered(tree: Any) -> Any:
  """tree's arrays constrained to be whole on every device of the mesh in context: a parameter
  split by FSDP is all-gathered where it is used (its gradient is reduce-scattered back)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return tree
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, P()), tree)


def in_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """fn traced with `mesh` in context, so that constrain_batch (and the attention kernels that run
  per device) see it; wrap a function before jitting it."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def per_device(fn: Callable) -> Callable:
  """fn(*arrays) applied to each device's slice of the batch (dimension 0 of every argument and
  result), through shard_map over the mesh in context (`in_mesh`); to the whole batch on every
  device when it does not divide over them; fn itself when there is no such mesh. For kernels
  that XLA cannot partition (Pallas)."""

  def mapped(*args):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
      return fn(*args)
    spec = P(MESH_AXES) if all(a.shape[0] % mesh.size == 0 for a in args) else P()
    return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(*args)

  return mapped


def target_platform() -> str:
  """The platform the computation being traced is for: that of the mesh in context (a TPU slice's
  when compiling for one from a CPU host, md4/aot.py), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return jax.default_backend() if device is None else device.platform


def check_batch_size(batch_size: int, mesh: Mesh, what: str) -> None:
  if batch_size % mesh.size:
    raise ValueError(f"{what}={batch_size} must be a multiple of the number of devices "
                     f"({mesh.size})")


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of a batch into global arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  out = {}
  for name, value in local.items():
    shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    out[name] = jax.make_array_from_process_local_data(sharding, value, shape)
  return out
