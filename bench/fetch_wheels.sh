#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh needs on a device machine (Python 3.12 there) into .whl/ (git-ignored).
# Run here, where PyPI is reachable, before carrying .whl/ to the device.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform any)
for pkg in deepspeed==0.19.8 hjson py-cpuinfo ninja msgpack webdataset braceexpand wandb==0.31.0 \
           safetensors tqdm; do
    python3 -m pip download -q --no-deps --python-version 3.12 --implementation cp "${platforms[@]}" \
        --only-binary=:all: -d .whl "$pkg" || python3 -m pip download -q --no-deps -d .whl "$pkg"
done
ls .whl
