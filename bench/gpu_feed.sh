#!/usr/bin/env bash
# One prepared GPU run for "feed the GPUs" (no network there), results under $OUT: loader img/s with CPU vs device
# decoding, the GPD step fed by each, and compiled vs eager GPD steps for the ResNet and DeiT pairs.
#
# Carry deepspeed and webdataset as wheels in .whl/ (bash bench/fetch_wheels.sh here first), then:
#     bash bench/gpu_feed.sh
# About 8 minutes on an H100 (GPU_FEED_SECONDS, default 540, bounds it; later steps are skipped when it is spent).
# Rehearse on a CPU with GPU_FEED_DEVICE=cpu (small sizes, the same steps).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_feed_out}"
DEVICE="${GPU_FEED_DEVICE:-cuda}"
BUDGET="${GPU_FEED_SECONDS:-540}"
# shellcheck source=bench/device_env.sh
. bench/device_env.sh   # wheels, environment, limit
if [ "$DEVICE" = cuda ]; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    images=4096; size=224; batch=256; steps=60; log=5; workers=(4 8 12); cnn=(resnet18 resnet34); vit=(deit_tiny_patch16_224 deit_small_patch16_224)
else
    images=96; size=64; batch=8; steps=8; log=2; workers=(1 2); cnn=(test_resnet test_resnet); vit=(test_vit test_vit)
fi
python3 -c "import torch, deepspeed, timm; print(torch.__version__, deepspeed.__version__, timm.__version__)" \
    | tee "$OUT/versions.txt"

# 1. JPEG shards (ImageNet-like 500x375, train + val)                                        (~1 min for 4096)
data=$(python3 bench/feed_throughput.py write "$OUT/data" --images "$images" | tail -1)
# 2. loader -> normalised batches on the device, CPU vs device decoding                      (~1 min)
timeout "$(limit 120)" python3 bench/feed_throughput.py loader "$data" --device "$DEVICE" --workers "${workers[@]}" \
    --batch "$batch" --image-size "$size" 2>&1 | tee "$OUT/loader.txt" || true
# 2b. the device path's crops against the CPU pipeline's (the tolerance README.md states: nvJPEG and the CUDA resize)
timeout "$(limit 60)" python3 bench/feed_throughput.py pixels "$data" --device "$DEVICE" --image-size "$size" 2>&1 \
    | tee "$OUT/pixels.txt" || true
# one GPD training run on the shards (ZeRO-0: one GPU); $1 run name, $2 student, $3 static teacher (random weights:
# these runs time steps and compare losses, they do not learn anything), rest: --set pairs
train() {
    local name=$1 student=$2 teacher=$3; shift 3
    [ -f "$OUT/$teacher.safetensors" ] || python3 bench/feed_throughput.py teacher "$teacher" \
        "$OUT/$teacher.safetensors" --image-size "$size"
    local sets=(data.root="$data" data.image_size="$size" data.workers="${workers[-1]}" optim.global_batch_size="$batch"
                optim.epochs=100 run.max_steps="$steps" run.log_every_steps="$log" run.eval_at_start=false
                run.checkpoint_every_steps=100000 run.export_at_end=false model.student="$student"
                model.static_teacher="$teacher" model.static_teacher_checkpoint="$OUT/$teacher.safetensors"
                loss.kd=kl "$@")
    local args=(); for s in "${sets[@]}"; do args+=(--set "$s"); done
    timeout "$(limit 240)" python3 -m deepspeed.launcher.runner --num_gpus 1 launch/train.py \
        --deepspeed_config ds_configs/zero0.json --run-dir "$OUT/runs/$name" "${args[@]}" \
        > "$OUT/runs_$name.log" 2>&1 || echo "run $name: exit $?" | tee -a "$OUT/failures.txt"
}
# 3. the GPD ResNet34 -> ResNet18 step fed by each decoder (eager)                           (~2 min)
train cnn_cpu_decode "${cnn[@]}" data.decode=cpu run.compile=false
train cnn_device_decode "${cnn[@]}" data.decode=device run.compile=false
python3 bench/feed_throughput.py runs "$OUT"/runs/cnn_*_decode 2>&1 | tee "$OUT/decode_runs.txt" || true
# 4. compiled vs eager, ResNet and DeiT pairs, device decoding, deterministic order           (~4 min with compiles)
for pair in cnn vit; do
    ((BUDGET - SECONDS > 120)) || break
    models=("${cnn[@]}"); [ "$pair" = vit ] && models=("${vit[@]}")
    [ "$pair" = cnn ] || train "${pair}_eager" "${models[@]}" data.decode=device run.compile=false
    train "${pair}_compiled" "${models[@]}" data.decode=device run.compile=true
    eager="$OUT/runs/${pair}_eager"; [ "$pair" = cnn ] && eager="$OUT/runs/cnn_device_decode"
    python3 bench/feed_throughput.py runs "$eager" "$OUT/runs/${pair}_compiled" --compare "$eager" \
        "$OUT/runs/${pair}_compiled" 2>&1 | tee "$OUT/compile_$pair.txt" || true
done
rm -rf "$OUT/data" "$OUT/cache" "$OUT"/*.safetensors   # only the measurements come back
echo "results in $OUT after ${SECONDS}s"
