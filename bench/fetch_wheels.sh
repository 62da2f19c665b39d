#!/usr/bin/env bash
# Gather the wheels bench/gpu_check.sh needs on a device machine (Python 3.12, torch, timm, numpy, psutil, einops,
# msgpack, ninja, py-cpuinfo, tqdm and safetensors already there; no network) into .whl/ (git-ignored).
# Run here, where PyPI is reachable, before carrying .whl/ to the device. DeepSpeed ships only a source archive:
# it is built into a pure-Python wheel here (its ops compile on demand). wandb is left out: the GPU check runs
# with WANDB_MODE=disabled and gpd_ds imports wandb only when tracking is on.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform any)
for pkg in hjson pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection webdataset braceexpand; do
    python3 -m pip download -q --no-deps --python-version 3.12 --implementation cp "${platforms[@]}" \
        --only-binary=:all: -d .whl "$pkg"
done
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl/src deepspeed==0.19.8
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl .whl/src/deepspeed-0.19.8.tar.gz
rm -rf .whl/src
ls .whl
