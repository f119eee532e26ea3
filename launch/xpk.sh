#!/usr/bin/env bash
# Submit a training run to a GKE cluster with TPU node pools through xpk
# (https://github.com/AI-Hypercomputer/xpk; `pip install xpk`).
#
# Usage: launch/xpk.sh CLUSTER TPU_TYPE NUM_SLICES CONFIG WORKDIR [--config.FIELD=VALUE ...]
# Example: launch/xpk.sh my-cluster v5litepod-16 2 experiments/tiny.py /mnt/shared/runs/tiny \
#            --config.mesh.data=-1 --config.mesh.fsdp=4 --config.mesh.expert=1
#
# xpk builds an image from this checkout (--script-dir) on top of a Python 3.12
# base image, and every TPU host of every slice runs, inside it,
#   pip install -e '.[tpu]' && python -m mmjax.train --config CONFIG --workdir WORKDIR ...
# The hosts find each other from the TPU_WORKER_* / MEGASCALE_* variables that
# GKE sets (mmjax/train/distributed.py). CONFIG is relative to the repository root.
#
# Multislice (NUM_SLICES > 1; ICI inside a slice, the data-center network
# between slices): the trainer counts the slices from its devices'
# slice_index and spreads the mesh over them as config.mesh.dcn_* says
# (mmjax/parallel/mesh.py). The default, config.mesh.dcn_data=-1, puts the data
# axis across the slices (MaxText's dcn_data_parallelism=-1), so config.mesh.data
# (the whole axis) must be a multiple of NUM_SLICES: e.g. --config.mesh.data=-1
# with the other axes fixed, or --config.mesh.data=NUM_SLICES --config.mesh.fsdp=-1.
# Other splits: --config.mesh.dcn_fsdp=2 (and dcn_data the remaining slices).
# Check a layout first on this machine, without TPUs:
#   python -m mmjax.bench.aot --config CONFIG --topology v5e:4x4 --num_slices NUM_SLICES [overrides]
#
# WORKDIR must be one directory that every host sees at the same path (a
# Cloud Storage bucket through the GCS FUSE CSI driver, Filestore): checkpoints
# are written by all hosts together and a restarted workload resumes from them.
# gs:// paths are refused: the trainer writes its outputs with local file APIs.
#
# Environment:
#   XPK_WORKLOAD       workload name (default mmjax-MMDD-HHMMSS; lowercase, at most 40 characters)
#   XPK_BASE_IMAGE     base image for the layered build (default python:3.12-slim); a base
#                      image with the dependencies preinstalled makes the pip step instant
#   XPK_DOCKER_IMAGE   use this ready image instead (it must hold the checkout in its
#                      working directory, dependencies installed); no layering, no pip step
#   XPK_PROJECT, XPK_ZONE   passed as --project / --zone when set
#   XPK_EXTRA_ARGS     more `xpk workload create` flags, e.g. "--max-restarts=10 --priority=high"
#   XPK=xpk            the xpk command ("python3 xpk.py" for a source checkout)
set -euo pipefail

usage() {
  echo "usage: $0 CLUSTER TPU_TYPE NUM_SLICES CONFIG WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
}
[ $# -ge 5 ] || usage
cluster=$1 tpu_type=$2 num_slices=$3 config=$4 workdir=$5
shift 5
[[ $num_slices =~ ^[1-9][0-9]*$ ]] || { echo "$0: NUM_SLICES=$num_slices is not a positive integer" >&2; exit 2; }
case "$workdir" in
  gs://*)
    echo "$0: WORKDIR=$workdir: gs:// paths are not supported; mount the bucket in the pods (GCS FUSE)" \
      "and pass the mount path." >&2
    exit 2 ;;
esac

read -r -a xpk <<< "${XPK:-xpk}"
read -r -a extra <<< "${XPK_EXTRA_ARGS:-}"
workload=${XPK_WORKLOAD:-mmjax-$(date +%m%d-%H%M%S)}
[[ $workload =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] || {
  echo "$0: XPK_WORKLOAD=$workload must be lowercase letters, digits and '-', start with a letter," \
    "at most 40 characters" >&2
  exit 2
}
repo=$(cd "$(dirname "$0")/.." && pwd)

train_cmd=$(printf '%q ' python -m mmjax.train --config "$config" --workdir "$workdir" "$@")
args=(workload create --cluster "$cluster" --workload "$workload" --tpu-type "$tpu_type"
      --num-slices "$num_slices")
if [ -n "${XPK_DOCKER_IMAGE:-}" ]; then
  args+=(--docker-image "$XPK_DOCKER_IMAGE" --command "$train_cmd")
else
  args+=(--base-docker-image "${XPK_BASE_IMAGE:-python:3.12-slim}" --script-dir "$repo"
         --command "pip install -q -e '.[tpu]' && $train_cmd")
fi
if [ -n "${XPK_PROJECT:-}" ]; then args+=(--project "$XPK_PROJECT"); fi
if [ -n "${XPK_ZONE:-}" ]; then args+=(--zone "$XPK_ZONE"); fi

echo "submitting workload $workload to cluster $cluster ($num_slices x $tpu_type)" >&2
"${xpk[@]}" "${args[@]}" ${extra[@]+"${extra[@]}"}
echo "follow it with: ${xpk[*]} workload list --cluster $cluster --wait-for-job-completion=$workload" >&2
