#!/usr/bin/env bash
# Cloud TPU VM / pod lifecycle for kforcing_jax: create, install, copy, run on all workers,
# watch, stop, delete. Every site value comes from the environment (see launch/README.md):
#
#   TPU_NAME      name of the TPU VM / slice                      (required)
#   TPU_ZONE      e.g. us-central2-b                              (required)
#   TPU_PROJECT   GCP project                                     (default: gcloud's config)
#   TPU_TYPE      accelerator type, e.g. v4-32, v5litepod-32      (create only)
#   TPU_RUNTIME   TPU software version, e.g. tpu-ubuntu2204-base  (create only)
#   TPU_SPOT      1 = spot (preemptible) capacity                 (default 0)
#   TPU_NUM_WORKERS  hosts in the slice                           (default: asked from gcloud)
#   KF_REMOTE_DIR    code directory on every worker               (default kforcing_jax)
#   KF_VENV          Python virtualenv on every worker            (default kf-venv)
#   KF_PYTHON_VERSION  Python installed by uv on the workers      (default 3.11)
#   KF_BUCKET        GCS bucket mounted on every worker (gcsfuse) (mount only)
#   KF_MOUNT         where the bucket is mounted                  (default /mnt/kf)
#   KF_LOG           training log on every worker                 (default kforcing_train.log)
#   KF_WORKER        host index for `ssh` (default all)
#   KF_DRY_RUN=1     print the gcloud commands instead of running them
#
# Usage: launch/tpu.sh COMMAND [ARGS]
#   create | copy | setup | mount | run CONFIG WORKDIR [FLAGS...] | tail [WORKER] | status |
#   stop | ssh 'COMMAND' (on KF_WORKER, default all) | delete
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Worker-side paths: relative ones are taken from the worker's home directory.
home_path() { if [[ "$1" == /* ]]; then echo "$1"; else echo "\$HOME/$1"; fi; }
REMOTE_DIR="$(home_path "${KF_REMOTE_DIR:-kforcing_jax}")"
VENV="$(home_path "${KF_VENV:-kf-venv}")"
LOG="$(home_path "${KF_LOG:-kforcing_train.log}")"
PID_FILE="$(home_path kforcing_train.pid)"
PY_VERSION="${KF_PYTHON_VERSION:-3.11}"
MOUNT="${KF_MOUNT:-/mnt/kf}"

die() { echo "launch/tpu.sh: $*" >&2; exit 2; }
need() { [[ -n "${!1:-}" ]] || die "set $1 ($2)"; }

# Runs (or, with KF_DRY_RUN=1, prints) one command.
x() {
  if [[ "${KF_DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

tpu_flags() {
  need TPU_ZONE "the zone of the TPU, e.g. us-central2-b"
  TPU_FLAGS=(--zone "$TPU_ZONE")
  if [[ -n "${TPU_PROJECT:-}" ]]; then
    TPU_FLAGS+=(--project "$TPU_PROJECT")
  fi
}

# ssh WORKER COMMAND: WORKER is a host index or "all" (all hosts run the same command).
on() {
  local worker="$1"
  shift
  x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU_FLAGS[@]}" --worker="$worker" \
    --command "$*"
}

num_workers() {
  if [[ -n "${TPU_NUM_WORKERS:-}" ]]; then
    echo "$TPU_NUM_WORKERS"
    return
  fi
  [[ "${KF_DRY_RUN:-0}" != 1 ]] || die "set TPU_NUM_WORKERS for a dry run"
  gcloud compute tpus tpu-vm describe "$TPU_NAME" "${TPU_FLAGS[@]}" \
    --format='value(networkEndpoints[].ipAddress)' | sed 's/[;,]/\n/g' | grep -c .
}

cmd_create() {
  need TPU_TYPE "accelerator type, e.g. v4-32 or v5litepod-32"
  need TPU_RUNTIME "TPU software version, e.g. tpu-ubuntu2204-base or v2-alpha-tpuv5-lite"
  local extra=()
  if [[ "${TPU_SPOT:-0}" == 1 ]]; then
    extra+=(--spot)
  fi
  x gcloud compute tpus tpu-vm create "$TPU_NAME" "${TPU_FLAGS[@]}" \
    --accelerator-type "$TPU_TYPE" --version "$TPU_RUNTIME" "${extra[@]}"
}

# Copies this checkout (tracked and untracked files, minus .gitignore) to every worker.
cmd_copy() {
  local archive
  archive="$(mktemp -d)/kforcing_jax.tar.gz"
  (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard |
    xargs -0 tar -czf "$archive")
  x gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":kforcing_jax.tar.gz \
    "${TPU_FLAGS[@]}" --worker=all
  on all "mkdir -p $REMOTE_DIR && tar -xzf \$HOME/kforcing_jax.tar.gz -C $REMOTE_DIR"
  if [[ "${KF_DRY_RUN:-0}" != 1 ]]; then
    rm -rf "$(dirname "$archive")"
  fi
}

# Installs uv, a pinned Python, the pinned requirements and jax[tpu] on every worker.
cmd_setup() {
  local jax_version
  jax_version="$(sed -n 's/^jax==//p' "$REPO_ROOT/requirements.txt")"
  [[ -n "$jax_version" ]] || die "requirements.txt pins no jax version"
  on all "set -e; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
export PATH=\$HOME/.local/bin:\$PATH; uv venv --allow-existing -p $PY_VERSION $VENV; \
. $VENV/bin/activate; uv pip install -r $REMOTE_DIR/requirements.txt \
'jax[tpu]==$jax_version'; python -c 'import jax; print(jax.device_count(), jax.devices()[0])'"
}

# Mounts KF_BUCKET at KF_MOUNT on every worker: one work dir all hosts share (checkpoints).
cmd_mount() {
  need KF_BUCKET "GCS bucket name (without gs://) shared by all workers"
  on all "set -e; command -v gcsfuse >/dev/null || { \
export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s); \
echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | \
sudo tee /etc/apt/sources.list.d/gcsfuse.list; \
curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -; \
sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }; \
sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT; \
mountpoint -q $MOUNT || gcsfuse --implicit-dirs $KF_BUCKET $MOUNT"
}

# Starts the SAME training command on every worker, detached, logging to KF_LOG.
cmd_run() {
  [[ $# -ge 2 ]] || die "usage: launch/tpu.sh run CONFIG WORKDIR [FLAGS...]"
  local config="$1" workdir="$2" n flags
  shift 2
  n="$(num_workers)"
  flags="--config $(printf '%q' "$config") --workdir $(printf '%q' "$workdir")"
  flags+=" --distributed=on --expected_processes=$n"
  if [[ $# -gt 0 ]]; then
    flags+=" $(printf '%q ' "$@")"
  fi
  on all "cd $REMOTE_DIR && . $VENV/bin/activate && \
nohup python -u -m kforcing_jax.train $flags > $LOG 2>&1 < /dev/null & \
echo \$! > $PID_FILE; echo started \$(hostname) pid \$!"
}

cmd_tail() {
  on "${1:-0}" "tail -n 40 -F $LOG"
}

cmd_status() {
  on all "if [ -f $PID_FILE ] && kill -0 \$(cat $PID_FILE) 2>/dev/null; \
then echo \$(hostname) running; else echo \$(hostname) not running; fi; tail -n 2 $LOG"
}

cmd_stop() {
  on all "if [ -f $PID_FILE ]; then kill \$(cat $PID_FILE) 2>/dev/null; \
rm -f $PID_FILE; fi; echo \$(hostname) stopped"
}

cmd_delete() {
  x gcloud compute tpus tpu-vm delete "$TPU_NAME" "${TPU_FLAGS[@]}" --quiet
}

main() {
  [[ $# -ge 1 ]] || die "usage: launch/tpu.sh create|copy|setup|mount|run|tail|status|stop|ssh|delete"
  local cmd="$1"
  shift
  need TPU_NAME "the name of the TPU VM or pod slice"
  tpu_flags
  case "$cmd" in
    create) cmd_create ;;
    copy) cmd_copy ;;
    setup) cmd_setup ;;
    mount) cmd_mount ;;
    run) cmd_run "$@" ;;
    tail) cmd_tail "$@" ;;
    status) cmd_status ;;
    stop) cmd_stop ;;
    ssh) on "${KF_WORKER:-all}" "$*" ;;
    delete) cmd_delete ;;
    *) die "unknown command $cmd" ;;
  esac
}

main "$@"
