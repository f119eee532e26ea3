#!/usr/bin/env bash
# Run one training job as several processes on this machine, connected with
# jax.distributed over 127.0.0.1 (CPU devices, gloo collectives): the multi-host
# code path without the hosts.
#
# Usage: launch/local_multiprocess.sh CONFIG WORKDIR [N_PROCESSES=2] [DEVICES_PER_PROCESS=4] [--config.FIELD=VALUE ...]
# Example: launch/local_multiprocess.sh experiments/tiny.py /tmp/mmjax-mp 2 4 --config.train.steps=20
#
# Every process gets --config.runtime.cpu_devices=DEVICES_PER_PROCESS (an
# override given after it wins). Output lines are prefixed with "[I] ", I the
# process id. The script waits for all processes; when one fails it stops the
# others and exits with the failed process's status.
# Environment: PYTHON (interpreter, default python), MMJAX_COORDINATOR_PORT
# (default: a free port), JAX_PLATFORMS (default cpu), MMJAX_GLOO_LOG=1 (keep
# Gloo's "[Gloo] Rank r is connected to n peer ranks" lines, one per
# collective group; by default they are counted and hidden; Gloo's threads
# write them concurrently, so any line holding a piece of one is hidden).
set -euo pipefail

usage() {
  echo "usage: $0 CONFIG WORKDIR [N_PROCESSES=2] [DEVICES_PER_PROCESS=4] [--config.FIELD=VALUE ...]" >&2
  exit 2
}
[ $# -ge 2 ] || usage
case "$1" in -h|--help) usage ;; esac
config=$1 workdir=$2
shift 2
nproc=2 devices=4
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then nproc=$1; shift; fi
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then devices=$1; shift; fi
if [ "$nproc" -lt 1 ] || [ "$devices" -lt 1 ]; then
  echo "$0: N_PROCESSES and DEVICES_PER_PROCESS must be at least 1" >&2
  exit 2
fi

python=${PYTHON:-python}
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
port=${MMJAX_COORDINATOR_PORT:-$("$python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')}

pids=()
stop_all() {  # TERM, then KILL whatever is still running after 10 s
  local pid alive
  for pid in "${pids[@]}"; do
    if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for _ in $(seq 20); do
    alive=0
    for pid in "${pids[@]}"; do
      if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    if [ "$alive" = 0 ]; then return 0; fi
    sleep 0.5
  done
  for pid in "${pids[@]}"; do
    if [ -n "$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

echo "starting $nproc processes x $devices CPU devices, coordinator 127.0.0.1:$port" >&2
for ((i = 0; i < nproc; i++)); do
  "$python" -u -m mmjax.train --config "$config" --workdir "$workdir" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$nproc" --process_id="$i" \
    --config.runtime.cpu_devices="$devices" "$@" \
    > >(awk -v p="[$i] " -v show="${MMJAX_GLOO_LOG:-0}" '
          show != "1" && (/\[Gloo\]/ || /connected peer ranks/) { hidden++; next }
          { print p $0; fflush() }
          END { if (hidden) print p hidden " Gloo connection lines hidden (MMJAX_GLOO_LOG=1 shows them)" }') 2>&1 &
  pids[i]=$!
done

status=0 running=$nproc
while [ "$running" -gt 0 ]; do
  running=0
  for ((i = 0; i < nproc; i++)); do
    pid=${pids[i]}
    [ -n "$pid" ] || continue
    if kill -0 "$pid" 2>/dev/null; then
      running=$((running + 1))
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    pids[i]=""
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$rc
      echo "$0: process $i exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  if [ "$running" -gt 0 ]; then sleep 0.5; fi
done
sleep 0.2  # let the line prefixers flush
exit "$status"
