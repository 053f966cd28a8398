"""Device mesh and sharding rules: one path from 1 CPU to many accelerators and hosts.

Mesh axes: "data" (pure data parallelism) and "fsdp" (data parallelism that also shards parameters).
The batch dimension is split over both axes; a parameter is sharded along "fsdp" on its largest
dimension divisible by the axis size, and replicated otherwise (and always when fsdp = 1).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
MESH_AXES = (DATA, FSDP)


def make_mesh(fsdp: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"train.mesh_fsdp={fsdp} must divide the number of devices ({len(devices)})")
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  if fsdp == 1 or not shape:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedSharding for every leaf of a pytree of ShapeDtypeStructs."""
  fsdp = mesh.shape[FSDP]
  return jax.tree.map(lambda x: NamedSharding(mesh, _param_spec(x.shape, fsdp)), abstract_state)


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
