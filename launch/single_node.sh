#!/usr/bin/env bash
# One node, all (or --gpus N) GPUs:
#   launch/single_node.sh --recipe resnet18_from_resnet34 --data /data/imagenet-wds --run-dir runs/r18 \
#       -- --set model.static_teacher_checkpoint=/weights/resnet34.safetensors
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
load_env
preflight
train_args
cmd=("$DEEPSPEED")
if [ -n "$GPUS" ]; then cmd+=(--num_gpus "$GPUS"); fi
cmd+=(--master_port "$MASTER_PORT" launch/train.py "${TRAIN_ARGS[@]}")
run "${cmd[@]}"
