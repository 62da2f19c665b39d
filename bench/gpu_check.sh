#!/usr/bin/env bash
# One prepared GPU check for a lent device machine (no network there), <= 6 minutes, results under $OUT.
#
# The machine has torch and timm but not deepspeed, webdataset or wandb: carry them as wheels in .whl/ (see
# bench/fetch_wheels.sh, run here first), then:   bash bench/gpu_check.sh
# Rehearse it on a CPU machine with GPU_CHECK_DEVICE=cpu (small sizes, same steps).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
mkdir -p "$OUT"
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled GPD_DS_CACHE="$OUT/cache"
if [ "$DEVICE" = cuda ]; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    size=(--image-size 224 --batch 256 --steps 20 --rounds 3)
else
    size=(--image-size 64 --batch 16 --steps 2 --rounds 2)
fi
python3 -c "import torch, deepspeed, timm; print(torch.__version__, deepspeed.__version__, timm.__version__)" \
    | tee "$OUT/versions.txt"

# 1. framework vs hand-written GPD step, all three pairs, ZeRO 0/1/2, eager            (~2 min on an H100)
timeout 200 python3 bench/step_throughput.py --device "$DEVICE" "${size[@]}" 2>&1 | tee "$OUT/step_eager.txt" || true
# 2. the same with torch.compile (framework: engine.compile), ResNet pair, ZeRO 0 and 2   (~1.5 min)
timeout 150 python3 bench/step_throughput.py --device "$DEVICE" "${size[@]}" --pairs r34_r18 --zero 0 2 --compile \
    2>&1 | tee "$OUT/step_compile.txt" || true
# 3. peak memory, ResNet pair                                                            (~0.5 min)
timeout 90 python3 bench/memory.py --device "$DEVICE" --pairs r34_r18 "${size[@]:0:4}" 2>&1 \
    | tee "$OUT/memory.txt" || true
# 4. a short real training run through the launcher (the demo recipe)                   (~1 min)
timeout 150 python3 -m deepspeed.launcher.runner --num_gpus 1 launch/train.py \
    --deepspeed_config ds_configs/zero2.json --run-dir "$OUT/demo_run" 2>&1 | tail -40 | tee "$OUT/demo.txt" || true
echo "results in $OUT"
