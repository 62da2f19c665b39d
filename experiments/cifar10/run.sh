#!/usr/bin/env bash
# Reproduces docs/results_cifar10.md: CIFAR-10 through the project's own shard writer, loader, launcher and engine.
#   1. shards: a class-balanced train subset (PER_CLASS images per class) and the full 10,000-image test split;
#   2. the static teacher (recipe cifar10_teacher: cifar_resnet18, plain CE, from scratch);
#   3. per seed: (a) static teacher: CE baseline, KD, DKD, KD+GPD, DKD+GPD; (b) from scratch: GPD (its baseline is
#      the CE run of (a)); (c) fine-tuning the CE student of (a): plain vs GPD, FT_EPOCHS at lr x0.1;
#   4. experiments/cifar10/summarize.py: the results table and the report plots.
# Every run uses recipe cifar10 (same epochs and schedule) and differs only in the --set lines below. A finished run
# (its export exists) is skipped, an interrupted one resumes from its last checkpoint: re-run this script to go on.
#
# Environment: CIFAR_TGZ (../shared/data/cifar10-jpeg.tar.gz), OUT (runs/cifar10), SEEDS ("1 2"), PER_CLASS (1000),
# FT_EPOCHS (5), PARALLEL (2 runs at once, THREADS CPU threads each), DS_CONFIG (ds_configs/zero0.json),
# WANDB (offline), DRY_RUN=1 prints the commands only. EXTRA_SET="key=value ..." is added to every run.
set -euo pipefail
cd "$(dirname "$0")/../.."

CIFAR_TGZ=${CIFAR_TGZ:-../shared/data/cifar10-jpeg.tar.gz}
OUT=${OUT:-runs/cifar10}
SEEDS=${SEEDS:-"1 2"}
PER_CLASS=${PER_CLASS:-1000}
FT_EPOCHS=${FT_EPOCHS:-5}
PARALLEL=${PARALLEL:-2}
THREADS=${THREADS:-1}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero0.json}
WANDB=${WANDB:-offline}
DRY_RUN=${DRY_RUN:-0}
EXTRA_SET=${EXTRA_SET:-}
SHARDS=$OUT/shards
TEACHER=$OUT/runs/teacher/export/student.safetensors
NO_TEACHER=(--set model.static_teacher=none)
port=${MASTER_PORT:-29600}

prepare_data() {
  if [[ -f $SHARDS/_info.json ]] && grep -q '"val"' "$SHARDS/_info.json"; then
    return
  fi
  [[ -f $CIFAR_TGZ ]] || { echo "CIFAR_TGZ=$CIFAR_TGZ not found: point it at cifar10-jpeg.tar.gz" >&2; exit 2; }
  local jpeg=$OUT/jpeg
  mkdir -p "$jpeg"
  [[ -d $jpeg/test ]] || tar xzf "$CIFAR_TGZ" -C "$jpeg"
  rm -rf "$jpeg/train_subset"
  for dir in "$jpeg"/train/*/; do
    local cls
    cls=$(basename "$dir")
    mkdir -p "$jpeg/train_subset/$cls"
    find "$dir" -maxdepth 1 -name '*.jpg' | sort | sed -n "1,${PER_CLASS}p" | while read -r f; do
      ln -s "$(realpath "$f")" "$jpeg/train_subset/$cls/"
    done
  done
  gpd-ds make-shards "$jpeg/train_subset" "$SHARDS" --split train --shard-size 1000 --prefix cifar10
  gpd-ds make-shards "$jpeg/test" "$SHARDS" --split val --shard-size 1000 --prefix cifar10
}

# train NAME RECIPE SEED [--set key=value ...]: one run in $OUT/runs/NAME, logged to $OUT/runs/NAME.log.
train() {
  local name=$1 recipe=$2 seed=$3
  shift 3
  local dir=$OUT/runs/$name
  if [[ -f $dir/export/student.safetensors ]]; then
    echo "done already: $name"
    return
  fi
  local extra=()
  for kv in $EXTRA_SET; do extra+=(--set "$kv"); done
  local cmd=(env "OMP_NUM_THREADS=$THREADS" deepspeed --num_gpus 1 --master_port "$port" launch/train.py
             --deepspeed_config "$DS_CONFIG" --recipe "$recipe" --run-dir "$dir" --resume auto
             --set "data.root=$SHARDS" --set "run.seed=$seed" --set "track.wandb=$WANDB"
             --set "track.group=cifar10" --set "track.name=$name" "$@" "${extra[@]}")
  echo "+ ${cmd[*]}"
  [[ $DRY_RUN == 1 ]] && return
  mkdir -p "$OUT/runs"
  if ! "${cmd[@]}" > "$OUT/runs/$name.log" 2>&1; then
    echo "FAILED: $name (see $OUT/runs/$name.log)" >&2
    return 1
  fi
  echo "finished: $name"
}

# Runs the queued "name recipe seed args..." jobs, PARALLEL at a time.
run_queue() {
  local failed=0
  for job in "$@"; do
    while (( $(jobs -rp | wc -l) >= PARALLEL )); do wait -n || failed=1; done
    port=$((port + 1))  # here, not in the background job, so that parallel runs get different ports
    eval "train $job" &
  done
  while (( $(jobs -rp | wc -l) > 0 )); do wait -n || failed=1; done
  return $failed
}

teacher_set="--set model.static_teacher_checkpoint=$TEACHER"
distill_jobs=()
scratch_jobs=()
finetune_jobs=()
for seed in $SEEDS; do
  distill_jobs+=(
    "a_ce_s$seed cifar10 $seed --set model.method=plain --set loss.kd=none ${NO_TEACHER[*]}"
    "a_kd_s$seed cifar10 $seed --set model.method=plain --set loss.kd=kl $teacher_set"
    "a_dkd_s$seed cifar10 $seed --set model.method=plain --set loss.kd=dkd $teacher_set"
    "a_kd_gpd_s$seed cifar10 $seed --set model.method=gpd --set loss.kd=kl $teacher_set"
    "a_dkd_gpd_s$seed cifar10 $seed --set model.method=gpd --set loss.kd=dkd $teacher_set")
  scratch_jobs+=("b_gpd_s$seed cifar10 $seed --set model.method=gpd --set loss.kd=none ${NO_TEACHER[*]}")
  pretrained="--set model.student_checkpoint=$OUT/runs/a_ce_s$seed/export/student.safetensors"
  finetune_jobs+=(
    "c_plain_s$seed cifar10 $seed --set model.method=plain --set loss.kd=none ${NO_TEACHER[*]} $pretrained --set optim.epochs=$FT_EPOCHS"
    "c_gpd_s$seed cifar10 $seed --set model.method=gpd --set loss.kd=none ${NO_TEACHER[*]} $pretrained --set optim.epochs=$FT_EPOCHS")
done

[[ $DRY_RUN == 1 ]] || prepare_data
THREADS=$((THREADS * PARALLEL)) train teacher cifar10_teacher 0
run_queue "${distill_jobs[@]}" "${scratch_jobs[@]}"
run_queue "${finetune_jobs[@]}"
[[ $DRY_RUN == 1 ]] || python experiments/cifar10/summarize.py "$OUT"
