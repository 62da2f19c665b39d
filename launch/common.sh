#!/usr/bin/env bash
# Shared by the launch scripts (source it; do not run it). Reads the job description from options or environment
# variables, loads the cluster environment file, runs the preflight checks, prints the command and runs it.
#
# Options (environment variable in brackets):
#   --recipe NAME      [RECIPE]     gpd_ds recipe (default: demo)
#   --ds-config FILE   [DS_CONFIG]  DeepSpeed config (default: ds_configs/zero2.json)
#   --data DIR|URL     [DATA]       shards root holding _info.json (default: the recipe's; demo: built-in data)
#   --run-dir DIR      [RUN_DIR]    run directory; must be on a file system every node mounts
#   --gpus N           [GPUS]       GPUs per node (default: all visible, or the hostfile's slots)
#   --hostfile FILE    [HOSTFILE]   DeepSpeed hostfile: one '<host> slots=<gpus>' line per node
#   --node-rank K      [NODE_RANK]  this node's index in the hostfile (per-node mode)
#   --master-addr A    [MASTER_ADDR] address of node 0 (default: the hostfile's first host)
#   --master-port P    [MASTER_PORT] (default: 29500)
#   --env-file FILE    [ENV_FILE]   cluster environment (default: launch/env/cluster.env)
#   --dry-run          [DRY_RUN=1]  print the command, run nothing
#   -- ARGS...                      passed to launch/train.py as they are (e.g. -- --set optim.epochs=90)

GPD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RECIPE="${RECIPE:-demo}"
DS_CONFIG="${DS_CONFIG:-ds_configs/zero2.json}"
DATA="${DATA:-}"
RUN_DIR="${RUN_DIR:-}"
GPUS="${GPUS:-}"
HOSTFILE="${HOSTFILE:-}"
NODE_RANK="${NODE_RANK:-}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
ENV_FILE="${ENV_FILE:-$GPD_ROOT/launch/env/cluster.env}"
DRY_RUN="${DRY_RUN:-0}"
PYTHON="${PYTHON:-python3}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
EXTRA=()

die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 2
}

absolute() {  # a path the job can use after cd-ing to the repository; URLs pass through
    case "$1" in
        "" | *://*) printf '%s' "$1" ;;
        *) realpath -m "$1" ;;
    esac
}

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --recipe) RECIPE="$2"; shift 2 ;;
            --ds-config) DS_CONFIG="$2"; shift 2 ;;
            --data) DATA="$2"; shift 2 ;;
            --run-dir) RUN_DIR="$2"; shift 2 ;;
            --gpus) GPUS="$2"; shift 2 ;;
            --hostfile) HOSTFILE="$2"; shift 2 ;;
            --node-rank) NODE_RANK="$2"; shift 2 ;;
            --master-addr) MASTER_ADDR="$2"; shift 2 ;;
            --master-port) MASTER_PORT="$2"; shift 2 ;;
            --env-file) ENV_FILE="$2"; shift 2 ;;
            --dry-run) DRY_RUN=1; shift ;;
            --) shift; EXTRA=("$@"); break ;;
            -h | --help) sed -n '2,22p' "$GPD_ROOT/launch/common.sh"; exit 0 ;;
            *) die "unknown option '$1' (see --help; arguments for train.py go after --)" ;;
        esac
    done
    if [ ! -f "$DS_CONFIG" ] && [ -f "$GPD_ROOT/$DS_CONFIG" ]; then
        DS_CONFIG="$GPD_ROOT/$DS_CONFIG"
    fi
    [ -f "$DS_CONFIG" ] || die "ds_config '$DS_CONFIG' does not exist (the shipped ones are in ds_configs/)"
    DS_CONFIG="$(absolute "$DS_CONFIG")"
    DATA="$(absolute "$DATA")"
    RUN_DIR="$(absolute "$RUN_DIR")"
    if [ -n "$HOSTFILE" ]; then
        HOSTFILE="$(absolute "$HOSTFILE")"
    fi
}

load_env() {  # export the env file's KEY=VALUE lines and mirror them to .deepspeed_env for the other nodes
    [ -f "$ENV_FILE" ] || return 0
    set -a
    # shellcheck disable=SC1090
    . "$ENV_FILE"
    set +a
    if [ "$DRY_RUN" != 1 ]; then
        grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$ENV_FILE" | sed -E 's/[[:space:]]+#.*$//; s/[[:space:]]+$//' \
            > "$GPD_ROOT/.deepspeed_env"
    fi
}

hostfile_query() {  # hostfile_query FILE first|count: its first host or its number of nodes; a bad file: one line
    "$PYTHON" - "$1" "$2" "$(basename "$0")" <<'PY'
import sys
from gpd_ds.cluster import PreflightError, parse_hostfile
try:
    hosts = parse_hostfile(sys.argv[1])
except PreflightError as e:
    print(f"{sys.argv[3]}: error: {e}", file=sys.stderr)
    sys.exit(2)
print(next(iter(hosts)) if sys.argv[2] == "first" else len(hosts))
PY
}

first_host() {
    hostfile_query "$1" first
}

check_node_rank() {  # NODE_RANK is a whole number below the hostfile's node count
    local nodes
    nodes="$(hostfile_query "$HOSTFILE" count)" || exit 2
    case "$NODE_RANK" in
        '' | *[!0-9]*) die "--node-rank '$NODE_RANK' is not a node index: use 0 .. $((nodes - 1))" ;;
    esac
    [ "$NODE_RANK" -lt "$nodes" ] || die "--node-rank $NODE_RANK is not in the hostfile's $nodes node(s): use 0 .. $((nodes - 1))"
}

train_args() {  # the arguments of launch/train.py, into the array TRAIN_ARGS
    TRAIN_ARGS=(--deepspeed_config "$DS_CONFIG" --recipe "$RECIPE")
    if [ -n "$DATA" ]; then
        TRAIN_ARGS+=(--set "data.root=$DATA")
    fi
    if [ -n "$RUN_DIR" ]; then
        TRAIN_ARGS+=(--run-dir "$RUN_DIR")
    fi
    TRAIN_ARGS+=("${EXTRA[@]}")
}

preflight() {  # fail fast on this node: hostfile, GPU count, data visibility
    local args=()
    if [ -n "$HOSTFILE" ]; then args+=(--hostfile "$HOSTFILE"); fi
    if [ -n "$GPUS" ]; then args+=(--gpus "$GPUS"); fi
    if [ -n "$DATA" ]; then args+=(--data "$DATA"); fi
    if [ "$DRY_RUN" = 1 ]; then
        echo "+ $PYTHON -m gpd_ds.cli preflight ${args[*]}"
        return 0
    fi
    "$PYTHON" -m gpd_ds.cli preflight "${args[@]}" || exit 2
}

run() {  # print the command exactly as it runs, then run it from the repository root
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [ "$DRY_RUN" = 1 ]; then
        return 0
    fi
    cd "$GPD_ROOT" || exit 2
    exec "$@"
}
