#!/usr/bin/env bash
# One SLURM task of launch/slurm/train.sbatch: the same training command on every node, with
# this task's process id from SLURM. Not meant to be run by hand.
set -euo pipefail

: "${KF_CONFIG:?}" "${KF_WORKDIR:?}" "${KF_CODE_DIR:?}" "${KF_COORDINATOR:?}"
: "${SLURM_NTASKS:?}" "${SLURM_PROCID:?}"
if [[ -n "${KF_VENV:-}" ]]; then
  # shellcheck disable=SC1091  # The virtualenv exists on the nodes, not here.
  source "$KF_VENV/bin/activate"
fi
cd "$KF_CODE_DIR"
device_flags=()
if [[ -n "${KF_LOCAL_DEVICE_IDS:-}" ]]; then
  device_flags=(--local_device_ids "$KF_LOCAL_DEVICE_IDS")
fi
exec "${KF_PYTHON:-python}" -u -m kforcing_jax.train --config "$KF_CONFIG" --workdir "$KF_WORKDIR" \
  --coordinator_address "$KF_COORDINATOR" --num_processes "$SLURM_NTASKS" \
  --process_id "$SLURM_PROCID" --expected_processes "$SLURM_NTASKS" "${device_flags[@]}" "$@"
