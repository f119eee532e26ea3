#!/usr/bin/env bash
# Train on this machine. Usage: launch/local.sh CONFIG WORKDIR [--config.FIELD=VALUE ...]
# Example: launch/local.sh experiments/tiny.py /tmp/mmjax-tiny --config.train.steps=100
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
exec python -m mmjax.train --config "$config" --workdir "$workdir" "$@"
