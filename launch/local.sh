#!/usr/bin/env bash
# usage: launch/local.sh [md4 args...]
#   e.g. launch/local.sh train --config=configs/demo.py --workdir=runs/demo
#
# One process on this host, using all its accelerators (or its CPU). md4 shards each batch over
# every local device by itself; no distributed runtime is started. Environment:
#   PYTHON       interpreter with md4 installed (default: python3)
#   CPU_DEVICES  on a CPU-only host, pretend to have this many devices (tests sharding); unset: 1
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

if [[ -n "${CPU_DEVICES:-}" ]]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES}"
fi

cd "${ROOT}"
exec "${PYTHON}" -m md4.main "$@"
