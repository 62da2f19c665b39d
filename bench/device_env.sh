# Sourced by the prepared device scripts (bench/gpu_check.sh, bench/gpu_feed.sh) after they set OUT and BUDGET:
# installs the carried wheels (.whl/, from bench/fetch_wheels.sh) where there is no network, sets the environment
# every step runs in, and defines `limit N`: at most N seconds, never past the script's BUDGET.
mkdir -p "$OUT"
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled GPD_DS_CACHE="$OUT/cache"
limit() { local left=$((BUDGET - SECONDS)); echo $(( left < $1 ? (left > 5 ? left : 5) : $1 )); }
