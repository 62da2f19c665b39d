"""The ds_config JSON: loaded and checked with no torch or DeepSpeed import, so the command line refuses a bad file
in a fraction of a second (:func:`load_ds_config`). :func:`gpd_ds.engine.resolve_ds_config` completes it for one job
(batch sizes, clipping, precision) once torch is imported."""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable
from pathlib import Path

from gpd_ds.config import ConfigError
from gpd_ds.errors import json_type

# Every top-level key DeepSpeed 0.19.8 reads from a ds_config: those DeepSpeedConfig (deepspeed/runtime/config.py:
# __init__, _initialize_params, _do_warning_check) looks up itself or through the getters and sub-config classes it
# calls (names in runtime/constants.py, runtime/zero/config.py, runtime/precision_config.py, monitor/config.py,
# comm/config.py, compile/config.py, utils/config.py...), and data_parallel_size / sequence_parallel_size, which
# deepspeed.initialize reads itself (deepspeed/__init__.py). DeepSpeed ignores every other key, so a typo silently
# drops its setting. tests/unit/test_config_validation.py re-derives the list from the installed DeepSpeed.
DS_CONFIG_KEYS = (
    "activation_checkpointing", "aio", "autotuning", "bf16", "bfloat16", "checkpoint", "comet", "comms_logger",
    "communication_data_type", "compile", "csv_monitor", "data_efficiency", "data_parallel_size", "data_types",
    "dataloader_drop_last", "datastates_ckpt", "disable_allgather", "disable_python_gc", "dump_state",
    "expert_parallel", "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op",
    "gradient_clipping", "gradient_predivide_factor", "hybrid_engine", "log_level", "managed_gradient_accumulation",
    "memory_breakdown", "optimizer", "pipeline", "prescale_gradients", "scheduler",
    "seq_parallel_communication_data_type", "sequence_parallel_size", "steps_per_print", "tensor_parallel",
    "tensorboard", "timers", "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu",
    "use_data_before_expert_parallelism", "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization",
)
# Features DeepSpeed 0.19.8 removed: it refuses these keys (_REMOVED_TOP_LEVEL_CONFIG_KEYS in runtime/config.py),
# but only inside deepspeed.initialize, after the data and the model are ready.
DS_REMOVED_KEYS = ("amp", "compression_training", "curriculum_learning", "eigenvalue", "elasticity",
                   "graph_harvesting", "nebula", "progressive_layer_drop", "quantize_training", "sparse_attention",
                   "sparse_gradients")
# Keys whose value DeepSpeed reads as a block of keys: anything else breaks deep inside it (or in resolve_ds_config).
_DS_BLOCKS = ("activation_checkpointing", "aio", "autotuning", "bf16", "bfloat16", "checkpoint", "comet",
              "comms_logger", "compile", "csv_monitor", "data_efficiency", "data_types", "datastates_ckpt",
              "expert_parallel", "flops_profiler", "fp16", "hybrid_engine", "optimizer", "pipeline", "scheduler",
              "tensor_parallel", "tensorboard", "timers", "torch_autocast", "wandb", "weight_quantization",
              "zero_optimization")
# The keys of the blocks DeepSpeed reads with plain dict lookups, so that it ignores unknown ones (the other blocks
# are pydantic models that refuse them): runtime/constants.py TORCH_AUTOCAST_*, utils/config.py TIMERS_*,
# runtime/activation_checkpointing/config.py ACT_CHKPT_DEFAULT.
_DS_BLOCK_KEYS = {
    "torch_autocast": ("enabled", "dtype", "lower_precision_safe_modules"),
    "timers": ("throughput",),
    "activation_checkpointing": ("partition_activations", "number_checkpoints", "contiguous_memory_optimization",
                                 "synchronize_checkpoint_boundary", "profile", "cpu_checkpointing"),
}
# the torch_autocast dtypes autocast_dtype maps
_AUTOCAST_DTYPES = ("bfloat16", "bf16", "float16", "fp16", "half")


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


def _finite_number(v: object) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))


# (dotted key, check, fix) of the values gpd_ds or DeepSpeed would misread; checked where present.
_DS_RULES = (
    ("train_batch_size", _positive_int, "use a positive integer, the global batch over all ranks (it mirrors "
     "optim.global_batch_size; drop it to take the recipe's)"),
    ("train_micro_batch_size_per_gpu", _positive_int, "use a positive integer (images per rank and micro step), "
     "or drop it: the micro batch is then train_batch_size / ranks"),
    ("gradient_accumulation_steps", _positive_int, "use a positive integer, or drop it: it follows from the batch "
     "sizes"),
    ("gradient_clipping", lambda v: _finite_number(v) and v >= 0, "use a max gradient norm >= 0 (0 disables "
     "clipping; it mirrors optim.grad_clip)"),
    ("steps_per_print", _positive_int, "use a positive integer (gpd_ds logs progress itself; 1000000000 keeps "
     "DeepSpeed quiet)"),
    ("zero_allow_untested_optimizer", _is_bool, "use true or false"),
    ("torch_autocast.enabled", _is_bool, "use true or false"),
    ("torch_autocast.dtype", lambda v: v in _AUTOCAST_DTYPES, "use bfloat16 (A100/H100) or float16 (V100); for "
     "float32 set enabled to false"),
    ("torch_autocast.lower_precision_safe_modules", lambda v: isinstance(v, list) and all(
        isinstance(n, str) for n in v), "use a list of module class names"),
    ("fp16.enabled", _is_bool, "use true or false"),
    ("bf16.enabled", _is_bool, "use true or false"),
    ("wandb.enabled", _is_bool, "use true or false"),
    ("timers.throughput", lambda v: isinstance(v, dict), 'use a JSON object, e.g. {"enabled": false}'),
)


def load_ds_config(path: str | Path | None) -> dict:
    """The ds_config JSON file at ``path``, checked by :func:`check_ds_config`."""
    if path is None:
        raise ConfigError("no DeepSpeed config: pass --deepspeed_config ds_configs/zero2.json (or another file in "
                          "ds_configs/)")
    path = Path(path)
    source = f"--deepspeed_config {str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{source} does not exist; the shipped ones are in ds_configs/")
    try:
        ds = json.loads(path.read_text(), object_pairs_hook=_unique_keys(source))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source} is not valid JSON: {e}") from e
    return check_ds_config(ds, source)


def _unique_keys(source: str) -> Callable[[list], dict]:
    """A JSON object hook refusing a repeated key: json keeps the last silently, DeepSpeed's own loader refuses."""
    def hook(pairs: list) -> dict:
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ConfigError(f"{source}: key {key!r} appears twice in one object; keep one")
            seen.add(key)
        return dict(pairs)

    return hook


def check_ds_config(ds: object, source: str = "ds_config") -> dict:
    """Refuse what DeepSpeed would misread, ignore or refuse only late: a file that holds no JSON object, unknown
    or removed top-level keys (``_``-prefixed ones are comments), blocks that are no objects, unknown keys in the
    blocks DeepSpeed does not check, bad batch sizes, clipping, precision and ZeRO stage. Returns ``ds``."""
    if not isinstance(ds, dict):
        raise ConfigError(f"{source} holds a JSON {json_type(ds)}, not an object of DeepSpeed keys; write "
                          '{"zero_optimization": {"stage": 2}, ...} as in ds_configs/zero2.json')
    for key in ds:
        if key in DS_REMOVED_KEYS:
            raise ConfigError(f"{source}: {key!r} is a feature DeepSpeed 0.19.8 removed (it refuses the key); "
                              "remove it")
    _check_known_keys(ds, DS_CONFIG_KEYS, source, "")
    for block in _DS_BLOCKS:
        if block in ds and not isinstance(ds[block], dict):
            raise ConfigError(f"{source}: {block}={ds[block]!r} is invalid: use a JSON object of {block} keys "
                              "(see ds_configs/zero2.json)")
    for block, keys in _DS_BLOCK_KEYS.items():
        if block in ds:
            _check_known_keys(ds[block], keys, source, f"{block}.")
    for key, check, fix in _DS_RULES:
        value = _lookup(ds, key)
        if value is not _ABSENT and not check(value):
            raise ConfigError(f"{source}: {key}={value!r} is invalid: {fix}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage={stage!r} is not a ZeRO stage; use 0, 1, 2 or 3")
    return ds


def _check_known_keys(block: dict, known: tuple[str, ...], source: str, prefix: str) -> None:
    for key in block:
        if key.startswith("_") or key in known:
            continue
        close = difflib.get_close_matches(key, known, n=3)
        hint = (f" Did you mean {', '.join(prefix + c for c in close)}?" if close
                else " See https://www.deepspeed.ai/docs/config-json/.")
        raise ConfigError(f"{source}: unknown key {prefix + key!r}: DeepSpeed ignores keys it does not read, so this "
                          f"setting would be lost.{hint} (Keys starting with _ are comments.)")


_ABSENT = object()


def _lookup(ds: dict, dotted: str) -> object:
    """The value at ``a.b`` in nested objects, or _ABSENT."""
    value: object = ds
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
