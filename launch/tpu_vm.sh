#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM slice (e.g. v5litepod-16: 4 workers).
#
# Usage: launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.FIELD=VALUE ...]
# CONFIG is relative to the repository root (it is read on the workers).
# Example: launch/tpu_vm.sh my-v5e-16 us-west4-a experiments/tiny.py /mnt/shared/runs/tiny \
#            --config.mesh.data=-1 --config.mesh.fsdp=4 --config.mesh.expert=1
#
# Copies this checkout (without .git, .venv and caches) to ~/mmjax on every
# worker, installs it into ~/mmjax/.venv with the `tpu` extra (Python 3.12; installed
# with apt when missing) and runs `python -m mmjax.train` on all workers at once.
# The workers find each other from the TPU VM metadata (mmjax/train/distributed.py).
#
# WORKDIR must be one directory that every worker sees: checkpoints are written
# by all workers together and resuming reads them back. Use a shared file system
# mounted at the same path on all workers (a Cloud Storage bucket through
# gcsfuse, Filestore/NFS). gs:// paths are refused: the trainer writes its
# outputs with local file APIs.
#
# Environment:
#   MMJAX_SETUP=0            skip the copy and install (reuse what is on the workers)
#   MMJAX_REMOTE_DIR=mmjax   checkout directory on the workers (relative to home)
#   MMJAX_REMOTE_PYTHON=python3.12
#   GCLOUD_SSH_FLAGS         extra flags for `gcloud compute tpus tpu-vm ssh/scp`,
#                            e.g. "--project=P --internal-ip" or "--tunnel-through-iap"
set -euo pipefail

usage() {
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
}
[ $# -ge 4 ] || usage
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
case "$workdir" in
  gs://*)
    echo "$0: WORKDIR=$workdir: gs:// paths are not supported; mount the bucket (gcsfuse) at the same path" \
      "on every worker and pass that path." >&2
    exit 2 ;;
esac
command -v gcloud >/dev/null || { echo "$0: gcloud is not installed" >&2; exit 2; }

setup=${MMJAX_SETUP:-1}
remote_dir=${MMJAX_REMOTE_DIR:-mmjax}
remote_python=${MMJAX_REMOTE_PYTHON:-python3.12}
read -r -a ssh_flags <<< "${GCLOUD_SSH_FLAGS:-}"
repo=$(cd "$(dirname "$0")/.." && pwd)

if [ "$setup" != 0 ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  tar -czf "$tmp/mmjax.tgz" -C "$repo" --exclude=.git --exclude=.venv --exclude=.pytest_cache \
    --exclude=.ruff_cache --exclude=__pycache__ --exclude='*.egg-info' .
  gcloud compute tpus tpu-vm scp "$tmp/mmjax.tgz" "$tpu:mmjax.tgz" --zone "$zone" --worker=all ${ssh_flags[@]+"${ssh_flags[@]}"}
fi

# The command each worker runs, with every argument quoted for the remote shell.
train_cmd=$(printf '%q ' python -m mmjax.train --config "$config" --workdir "$workdir" "$@")
q_dir=$(printf '%q' "$remote_dir")
q_py=$(printf '%q' "$remote_python")
remote="set -euo pipefail; cd ~"
if [ "$setup" != 0 ]; then
  remote+="; mkdir -p $q_dir && tar -xzf mmjax.tgz -C $q_dir && rm mmjax.tgz"
  remote+="; command -v $q_py >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $q_py $q_py-venv; }"
  remote+="; cd $q_dir; [ -d .venv ] || $q_py -m venv .venv; . .venv/bin/activate"
  remote+="; pip install -q -e '.[tpu]'"
else
  remote+="; cd $q_dir; . .venv/bin/activate"
fi
remote+="; exec $train_cmd"
remote="bash -c $(printf '%q' "$remote")"  # whatever the login shell, bash runs it

gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all ${ssh_flags[@]+"${ssh_flags[@]}"} --command "$remote"
