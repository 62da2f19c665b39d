#!/usr/bin/env bash
# The per-node body of a SLURM job (launch/slurm.sbatch starts it once per node with srun). Derives the node
# rank, the node list, the master address and the GPUs per node from SLURM's environment, writes a hostfile, and
# hands over to launch/per_node.sh. Options as in launch/common.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation (SLURM_JOB_NODELIST is unset)}"
: "${SLURM_NODEID:?SLURM_NODEID is unset: start this script with srun, one task per node}"

if command -v scontrol > /dev/null 2>&1; then
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else  # no scontrol (a rehearsal): a plain comma-separated list only
    case "$SLURM_JOB_NODELIST" in
        *\[*) echo "slurm_node.sh: error: cannot expand '$SLURM_JOB_NODELIST' without scontrol" >&2; exit 2 ;;
    esac
    IFS=',' read -r -a hosts <<< "$SLURM_JOB_NODELIST"
fi
gpus="${GPUS:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}"
gpus="${gpus##*:}"  # "a100:8" -> "8"
[ -n "$gpus" ] || { echo "slurm_node.sh: error: GPUs per node unknown: set --gpus-per-node or GPUS" >&2; exit 2; }

hostfile="${TMPDIR:-/tmp}/gpd_ds-hostfile-${SLURM_JOB_ID:-job}-${SLURM_NODEID}"
: > "$hostfile"
for host in "${hosts[@]}"; do
    printf '%s slots=%s\n' "$host" "$gpus" >> "$hostfile"
done
export HOSTFILE="$hostfile" NODE_RANK="$SLURM_NODEID" GPUS="$gpus"
export MASTER_ADDR="${MASTER_ADDR:-${hosts[0]}}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-9500} % 10000))}"
# SLURM signals every process of the step. Left at their defaults, SIGUSR1 and SIGTERM would kill the deepspeed
# runner (this task's main process), and SLURM would then SIGKILL the ranks mid-save. Ignored signals stay ignored
# across exec: the runner ignores both, DeepSpeed's per-node launcher ignores SIGUSR1 (SIGTERM it forwards to the
# ranks, then SIGKILLs them after 30 s), and the ranks install their own handlers (gpd_ds.preemption): they stop
# at an agreed step with a checkpoint and exit 75.
trap '' USR1 TERM
exec bash "$here/per_node.sh" "$@"
