#!/usr/bin/env bash
# usage: launch/tpu_vm.sh TPU_NAME ZONE [md4 args...]
#   e.g. launch/tpu_vm.sh my-v4-32 us-central2-b train --config=configs/md4/openwebtext.py --workdir=/mnt/shared/runs/owt
#
# md4 on every worker (host) of a Cloud TPU VM slice at once, through
# `gcloud compute tpus tpu-vm ssh --worker=all --command=...`. md4 finds the other workers itself
# (JAX reads the slice from the TPU metadata): no coordinator flags are needed, and on a single-host
# slice nothing distributed is started. Each worker needs the repository at REMOTE_DIR with md4
# installed, and the data; the workdir must be a filesystem every worker sees (Filestore/NFS or a
# gcsfuse mount), since checkpoints are written by all workers together. Environment:
#   PROJECT     Google Cloud project (default: gcloud's configured one)
#   REMOTE_DIR  the repository on the workers (default: ~/md4)
#   PYTHON      interpreter on the workers (default: python3)
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2p' "${BASH_SOURCE[0]}" | sed 's/^# //' >&2
  exit 2
fi
TPU_NAME="$1"
ZONE="$2"
shift 2

# Quote every md4 argument for the remote shell.
remote_args=""
if [[ $# -gt 0 ]]; then
  remote_args="$(printf ' %q' "$@")"
fi
# shellcheck disable=SC2088  # The remote shell expands the ~.
remote_dir="${REMOTE_DIR:-~/md4}"
command="cd ${remote_dir} && exec ${PYTHON:-python3} -m md4.main${remote_args}"

project_flag=()
if [[ -n "${PROJECT:-}" ]]; then
  project_flag=("--project=${PROJECT}")
fi
echo "tpu_vm.sh: on every worker of ${TPU_NAME}: ${command}" >&2
exec gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" "${project_flag[@]}" \
  --worker=all --command="${command}"
