#!/usr/bin/env bash
# usage: launch/multiprocess.sh N [md4 args...]
#   e.g. launch/multiprocess.sh 2 train --config=configs/tiny.py --workdir=/tmp/md4_2proc
#
# N processes of md4 on this one machine, joined through a coordinator on localhost: process i gets
# --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i. Meant for testing the
# multi-process code paths on a CPU (each process then has one CPU device and the processes talk
# over gloo), or for one process per GPU on a single machine (JAX_PLATFORMS=cuda).
# Process 0 prints to the terminal; process i > 0 logs to LOG_DIR/process_i.log. Ctrl-C or SIGTERM
# is passed on to every process (SIGTERM: they agree on a step, save a checkpoint and stop).
# The exit status is the first non-zero one among the processes, else 0. Environment:
#   PYTHON        interpreter with md4 installed (default: python3)
#   PORT          coordinator port (default: a free one)
#   LOG_DIR       where processes 1..N-1 log (default: a new directory under /tmp)
#   JAX_PLATFORMS cpu (default) or cuda; with cuda, process i sees only GPU i (CUDA_VISIBLE_DEVICES)
#   CPU_DEVICES_PER_PROCESS  CPU devices in each process (default: 1)
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2p' "${BASH_SOURCE[0]}" | sed 's/^# //' >&2
  exit 2
fi
NUM_PROCESSES="$1"
shift

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
PORT="${PORT:-$("${PYTHON}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
LOG_DIR="${LOG_DIR:-$(mktemp -d /tmp/md4_multiprocess.XXXXXX)}"
mkdir -p "${LOG_DIR}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
if [[ "${JAX_PLATFORMS}" == cpu ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES_PER_PROCESS:-1}"
fi

cd "${ROOT}"
pids=()
# shellcheck disable=SC2329  # Called by the traps below.
forward() {
  for pid in "${pids[@]}"; do
    kill -s "$1" "${pid}" 2>/dev/null || true
  done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < NUM_PROCESSES; i++)); do
  args=("$@" "--coordinator_address=127.0.0.1:${PORT}" "--num_processes=${NUM_PROCESSES}"
        "--process_id=${i}")
  if [[ "${JAX_PLATFORMS}" == cuda || "${JAX_PLATFORMS}" == gpu ]]; then
    export CUDA_VISIBLE_DEVICES="${i}"
  fi
  if ((i == 0)); then
    "${PYTHON}" -m md4.main "${args[@]}" &
  else
    "${PYTHON}" -m md4.main "${args[@]}" >"${LOG_DIR}/process_${i}.log" 2>&1 &
  fi
  pids+=("$!")
done
if ((NUM_PROCESSES > 1)); then
  echo "multiprocess.sh: ${NUM_PROCESSES} processes, coordinator 127.0.0.1:${PORT}; processes" \
    "1..$((NUM_PROCESSES - 1)) log to ${LOG_DIR}" >&2
fi

status=0
for i in "${!pids[@]}"; do
  # `wait` returns early when a trapped signal arrives: wait again until the process is gone.
  while true; do
    set +e
    wait "${pids[i]}"
    rc=$?
    set -e
    if ! kill -0 "${pids[i]}" 2>/dev/null; then
      break
    fi
  done
  if ((rc != 0)); then
    echo "multiprocess.sh: process ${i} exited with status ${rc}" >&2
    if ((status == 0)); then
      status="${rc}"
    fi
  fi
done
exit "${status}"
