#!/usr/bin/env bash
# Several nodes without ssh: run this on every node, each with its own --node-rank (0 on the node whose address
# is --master-addr). Schedulers that start one task per node (SLURM, Kubernetes, ...) use this mode.
#   launch/per_node.sh --hostfile hostfile --node-rank 1 --master-addr 10.0.0.1 --recipe ... --run-dir /shared/run
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
[ -n "$HOSTFILE" ] || die "--hostfile is required (one '<host> slots=<gpus>' line per node)"
[ -n "$NODE_RANK" ] || die "--node-rank is required (0 .. number of nodes - 1)"
[ -n "$RUN_DIR" ] || die "--run-dir is required for multi-node jobs (a directory every node mounts)"
load_env
preflight
check_node_rank
MASTER_ADDR="${MASTER_ADDR:-$(first_host "$HOSTFILE")}"
train_args
run "$DEEPSPEED" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" launch/train.py "${TRAIN_ARGS[@]}"
