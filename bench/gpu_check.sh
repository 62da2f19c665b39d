#!/usr/bin/env bash
# One prepared GPU check for a lent device machine (no network there), results under $OUT.
#
# The machine has torch and timm but not deepspeed, webdataset or their needs: carry them as wheels in .whl/ (see
# bench/fetch_wheels.sh, run here first), then:   bash bench/gpu_check.sh
# Steps run in order of importance within GPU_CHECK_SECONDS (default 360 = 6 minutes): host syncs in the step, eager
# step throughput of the three pairs (with ablations), peak memory, torch.compile of the DeiT pair with what is left
# but 90 s, then a short real training run (compiling five steps takes minutes: give it GPU_CHECK_SECONDS=560).
# Rehearse it on a CPU machine with GPU_CHECK_DEVICE=cpu (small sizes, same steps).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
BUDGET="${GPU_CHECK_SECONDS:-360}"
# shellcheck source=bench/device_env.sh
. bench/device_env.sh   # wheels, environment, limit
if [ "$DEVICE" = cuda ]; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    size=(--image-size 224 --batch 256 --steps 10 --rounds 3)
else
    size=(--image-size 64 --batch 16 --steps 2 --rounds 2)
fi
python3 -c "import torch, deepspeed, timm; print(torch.__version__, deepspeed.__version__, timm.__version__)" \
    | tee "$OUT/versions.txt"

# 1. host-device syncs inside the framework step (goal: none)                          (~40 s)
timeout "$(limit 60)" python3 bench/host_syncs.py --pairs deits_deitti --zero 0 2 2>&1 | tee "$OUT/host_syncs.txt" || true
# 2. framework vs hand-written GPD step, all three pairs, ZeRO 0/2, eager, with ablations  (~3 min on an H100)
timeout "$(limit 240)" python3 bench/step_throughput.py --device "$DEVICE" "${size[@]}" --zero 0 2 --ablations 2>&1 \
    | tee "$OUT/step_eager.txt" || true
# 3. peak memory, ResNet and DeiT pairs, one fresh process per variant   (~2 min: 10 process starts on an H100)
timeout "$(limit 150)" python3 bench/memory.py --device "$DEVICE" --pairs r34_r18 deits_deitti "${size[@]:0:4}" 2>&1 \
    | tee "$OUT/memory.txt" || true
# 4. torch.compile (framework: engine.compile), DeiT pair, ZeRO 0 and 2: what is left of the budget but 90 s
if ((BUDGET - SECONDS > 150)); then
    timeout "$(limit $((BUDGET - SECONDS - 90)))" python3 bench/step_throughput.py --device "$DEVICE" "${size[@]}" \
        --pairs deits_deitti --zero 0 2 --compile 2>&1 | tee "$OUT/step_compile.txt" || true
fi
# 5. a short real training run through the launcher (the demo recipe, ZeRO-0: one GPU)  (~1 min)
timeout "$(limit 90)" python3 -m deepspeed.launcher.runner --num_gpus 1 launch/train.py \
    --deepspeed_config ds_configs/zero0.json --run-dir "$OUT/demo_run" 2>&1 | tail -40 | tee "$OUT/demo.txt" || true
echo "results in $OUT after ${SECONDS}s"
