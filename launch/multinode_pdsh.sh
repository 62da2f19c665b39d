#!/usr/bin/env bash
# Several nodes through DeepSpeed's own launcher, which starts the other nodes over pdsh/ssh (passwordless ssh
# to every host in the hostfile). Run it once, on the first node:
#   launch/multinode_pdsh.sh --hostfile hostfile --recipe resnet18_from_resnet34 --data /shared/imagenet-wds \
#       --run-dir /shared/runs/r18 -- --set model.static_teacher_checkpoint=/shared/weights/resnet34.safetensors
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
[ -n "$HOSTFILE" ] || die "--hostfile is required (one '<host> slots=<gpus>' line per node)"
[ -n "$RUN_DIR" ] || die "--run-dir is required for multi-node jobs (a directory every node mounts)"
load_env
preflight
MASTER_ADDR="${MASTER_ADDR:-$(first_host "$HOSTFILE")}"
train_args
run "$DEEPSPEED" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    launch/train.py "${TRAIN_ARGS[@]}"
