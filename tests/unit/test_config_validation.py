"""One validation pass before any work: every run-config field (type, range, cross-field rules, model names) and
the ds_config (a JSON object, known keys, block shapes, batch sizes, clipping, precision, ZeRO stage)."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from gpd_ds.config import _RULES, ConfigError, TrainConfig, _all_keys, apply_overrides
from gpd_ds.config_checks import check_config
from gpd_ds.ds_config import (
    _AUTOCAST_DTYPES,
    _DS_BLOCK_KEYS,
    DS_CONFIG_KEYS,
    DS_REMOVED_KEYS,
    check_ds_config,
    load_ds_config,
)
from gpd_ds.engine import autocast_dtype
from gpd_ds.errors import UserInputError
from gpd_ds.models import create_model
from gpd_ds.recipes import RECIPES, get_recipe

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "ds_configs").glob("*.json"))


def _validate(*overrides: str) -> TrainConfig:
    return check_config(apply_overrides(get_recipe("demo"), list(overrides)))


@pytest.mark.parametrize(("override", "message"), [
    # each observed failure: a traceback late in the run, or silently accepted
    ("run.eval_every_epochs=0", "run.eval_every_epochs=0 is invalid: use >= 1"),
    ("run.checkpoint_every_steps=0", "run.checkpoint_every_steps=0 is invalid: use >= 1"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer=0 is invalid: use >= 1 samples"),
    ("data.crop_pct=0", "data.crop_pct=0.0 is invalid: use a fraction in (0, 1]"),
    ("loss.temperature=0", "loss.temperature=0.0 is invalid: use a positive temperature"),
    ("optim.lr=inf", "optim.lr=inf is invalid: use a finite number"),
    ("optim.lr=nan", "optim.lr=nan is invalid: use a finite number"),
    ("data.eval_batch_size=0", "data.eval_batch_size=0 is invalid: use >= 1 images per rank"),
    ("data.max_bad_fraction=-1", "data.max_bad_fraction=-1.0 is invalid: use a fraction in [0, 1)"),
    ("run.max_steps=0", "run.max_steps=0 is invalid: use >= 1 optimizer steps, or none"),
    ("optim.global_batch_size=-4", "optim.global_batch_size=-4 is invalid: use a positive number of images"),
    ("model.student=resnet81", "model.student='resnet81' is invalid: unknown model 'resnet81': not a timm model "
                               "name (use the 'torchvision:' prefix for torchvision models). Did you mean: resnet18"),
    ("model.static_teacher=resnet35", "model.static_teacher='resnet35' is invalid: unknown model 'resnet35' ... "
                                      "Did you mean: ... resnet34"),
    ("model.static_teacher=torchvision:resnet35", "model.static_teacher='torchvision:resnet35' is invalid: unknown "
                                                  "torchvision model 'resnet35' ... Did you mean: ... resnet34"),
    ("model.static_teacher=resnet34.tv_in1kk", "'resnet34' has no pretrained tag 'tv_in1kk'. Did you mean: tv_in1k"),
    ('model.student_kwargs={"bogus": 1}', "model.student_kwargs={'bogus': 1} is invalid: test_resnet's constructor "
                                          "refuses them ( ... unexpected keyword argument 'bogus'); fix or drop"),
    ('model.student_kwargs={"num_classes": 3}', "model.student_kwargs={'num_classes': 3} is invalid: drop "
                                                "num_classes (it comes from the data)"),
    # the rest of the table, one per kind of rule
    ("model.width_ratio=1", "model.width_ratio=1 is invalid: use an integer >= 2"),
    ("model.method=distill", "model.method='distill' is invalid: use gpd, plain or peer"),
    ("model.noise_std=-1e-6", "model.noise_std=-1e-06 is invalid: use a standard deviation >= 0"),
    ("data.image_size=4", "data.image_size=4 is invalid: use the training resolution"),
    ("data.interpolation=nearest", "data.interpolation='nearest' is invalid: use bilinear or bicubic"),
    ("data.mean=0.5,0.5", "data.mean=(0.5, 0.5) is invalid: use a list of 3 finite numbers"),
    ("data.mean=0.5,0.5,inf", "data.mean=(0.5, 0.5, inf) is invalid: use a list of 3 finite numbers"),
    ("data.mean=124,116,104", "data.mean=(124.0, 116.0, 104.0) is invalid: use 3 per-channel means of pixels "
                              "scaled to [0, 1]"),
    ("data.std=0.2,0,0.2", "data.std=(0.2, 0.0, 0.2) is invalid: use 3 positive per-channel"),
    ("data.in_memory_max_gb=0", "data.in_memory_max_gb=0.0 is invalid: use a positive size in GB"),
    ("data.max_image_pixels=0", "data.max_image_pixels=0 is invalid: use a positive pixel count"),
    ("data.augment.scale=1.0,0.08", "data.augment.scale=(1.0, 0.08) is invalid: use 2 increasing area fractions"),
    ("data.augment.scale=0.5,1.5", "data.augment.scale=(0.5, 1.5) is invalid: use 2 increasing area fractions"),
    ("data.augment.ratio=0,1", "data.augment.ratio=(0.0, 1.0) is invalid: use 2 increasing positive aspect"),
    ("data.augment.hflip=1.5", "data.augment.hflip=1.5 is invalid: use a probability in [0, 1]"),
    ("data.augment.mixup=-0.8", "data.augment.mixup=-0.8 is invalid: use an alpha >= 0"),
    ("data.augment.pad_crop=-4", "data.augment.pad_crop=-4 is invalid: use 0"),
    ("data.augment.auto_augment=rand-x9", "data.augment.auto_augment='rand-x9' is invalid: timm cannot read it"),
    ("loss.kd=kld", "loss.kd='kld' is invalid: use one of dkd, kl, dist, reviewkd, fitnet, dkd+reviewkd, "
     "kl+reviewkd, dist+reviewkd, dkd+fitnet, kl+fitnet, dist+fitnet, none"),
    ("loss.student_taps=stages.1", "loss.student_taps=('stages.1',) is invalid: taps are read by a feature loss only"),
    ("loss.dynamic_loss=bce", "loss.dynamic_loss='bce' is invalid: use one of sce, ce, mse, l1"),
    ("loss.kd_warmup_epochs=-1", "loss.kd_warmup_epochs=-1.0 is invalid: use 0 (no warm-up) or more epochs"),
    ("loss.dkd_beta=-0.5", "loss.dkd_beta=-0.5 is invalid: use a weight >= 0"),
    ("loss.dynamic_weight=-3", "loss.dynamic_weight=-3.0 is invalid: use a weight >= 0"),
    ("loss.smoothing=1", "loss.smoothing=1.0 is invalid: use a label smoothing in [0, 1)"),
    ("optim.lr=0", "optim.lr=0.0 is invalid: use a positive learning rate"),
    ("optim.momentum=1", "optim.momentum=1.0 is invalid: use a momentum in [0, 1)"),
    ("optim.betas=0.9", "optim.betas=(0.9,) is invalid: use a list of 2 finite numbers"),
    ("optim.betas=0.9,1.0", "optim.betas=(0.9, 1.0) is invalid: use 2 AdamW betas in [0, 1)"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay=-0.0001 is invalid: use a weight decay >= 0"),
    ("optim.epochs=0", "optim.epochs=0 is invalid: use at least 1 epoch"),
    ("optim.warmup_epochs=5", "optim.warmup_epochs=5.0 is invalid: use fewer warm-up epochs than optim.epochs=5"),
    ("optim.cooldown_epochs=-1", "optim.cooldown_epochs=-1 is invalid: use 0 or more epochs"),
    ("optim.cooldown_epochs=5", "optim.cooldown_epochs=5 is invalid: use fewer cool-down epochs than optim.epochs"),
    ("optim.gamma=0", "optim.gamma=0.0 is invalid: use a decay factor in (0, 1]"),
    ("optim.milestones=60,30", "optim.milestones=(60, 30) is invalid: use increasing epochs >= 0"),
    ("optim.milestones=-1", "optim.milestones=(-1,) is invalid: use increasing epochs >= 0"),
    ("optim.min_lr=-1", "optim.min_lr=-1.0 is invalid: use a learning rate >= 0"),
    ("optim.ema_decay=1", "optim.ema_decay=1.0 is invalid: use a value in (0, 1), e.g. 0.99996, or none"),
    ("optim.grad_clip=-5", "optim.grad_clip=-5.0 is invalid: use a max gradient norm >= 0"),
    ("optim.lr_ref_batch=0", "optim.lr_ref_batch=0 is invalid: use the global batch the lr is given at"),
    ("optim.finetune_lr_scale=0", "optim.finetune_lr_scale=0.0 is invalid: use a positive factor"),
    ("optim.eps=0", "optim.eps=0.0 is invalid: use a small positive number"),
    ("run.max_nonfinite_steps=-1", "run.max_nonfinite_steps=-1 is invalid: use 0"),
    ("run.seed=-1", "run.seed=-1 is invalid: use an integer >= 0"),
    ("track.init_timeout=0", "track.init_timeout=0.0 is invalid: use a positive number of seconds"),
    ("track.project= ", "track.project='' is invalid: name the W&B project"),
    ("track.tags=" + "t" * 65, f"track.tags=('{'t' * 65}',) is invalid: use tags of 1 to 64 characters"),
    ("recipe=a/b", "recipe='a/b' is invalid: use a name without '/'"),
])
def test_a_bad_override_names_the_key_the_value_and_the_fix(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        _validate(override)
    _assert_in_order(message, str(error.value))


def _assert_in_order(message: str, text: str) -> None:
    """Each part of ``message`` (split at " ... ") appears in ``text``, in order."""
    at = 0
    for part in message.split(" ... "):
        found = text.find(part, at)
        assert found >= 0, f"{part!r} not in {text[at:]!r}"
        at = found + len(part)


@pytest.mark.parametrize(("field", "value", "message"), [
    # values --set cannot produce (it parses by the field's type), but a recipe or a saved config.json can
    ("optim.epochs", 2.0, "optim.epochs=2.0 is invalid: use an integer"),
    ("optim.epochs", "2", "optim.epochs='2' is invalid: use an integer"),
    ("optim.nesterov", 1, "optim.nesterov=1 is invalid: use true or false"),
    ("optim.lr", True, "optim.lr=True is invalid: use a finite number"),
    ("optim.global_batch_size", 512.0, "optim.global_batch_size=512.0 is invalid: use none or an integer"),
    ("model.width_ratio", 1.5, "model.width_ratio=1.5 is invalid: use an integer"),
    ("model.student_kwargs", [("depth", 2)], "model.student_kwargs=[('depth', 2)] is invalid: use a JSON object"),
    ("data.std", (0.2, 0.2, "0.2"), "data.std=(0.2, 0.2, '0.2') is invalid: use a list of 3 finite numbers"),
    ("optim.milestones", (30, 60.5), "optim.milestones=(30, 60.5) is invalid: use a list of integers"),
    ("track.tags", "gpd", "track.tags='gpd' is invalid: use a list of strings"),
    ("data.augment", None, "data.augment=None is invalid: use the Augment dataclass"),
])
def test_a_value_of_the_wrong_type_is_refused(field: str, value: object, message: str) -> None:
    cfg = get_recipe("demo")
    *sections, name = field.split(".")
    target = cfg
    for section in sections:
        target = getattr(target, section)
    setattr(target, name, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg.validate()


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.static_teacher=torchvision:resnet34", "model.static_teacher_pretrained=true",
      "model.static_teacher_checkpoint=none"],
     "model.static_teacher_pretrained=True is invalid: torchvision weights are not downloaded"),
    (["model.static_teacher_pretrained=true"], "set either a local static_teacher_checkpoint or pretrained"),
    (["optim.optimizer=sgd", "optim.nesterov=true", "optim.momentum=0"],
     "optim.nesterov=True is invalid: Nesterov SGD needs optim.momentum > 0"),
    (["model.distillation_token=true", "loss.kd=none"], "model.distillation_token=True is invalid"),
    (["data.in_memory=true", "data.repeated_aug=3"], "data.repeated_aug=3 is invalid: repeated augmentation is a "
     "mode of the streaming loader"),
    (["optim.warmup_epochs=1", "optim.cooldown_epochs=4"], "optim.cooldown_epochs=4 is invalid: warm-up (1.0) and "
     "cool-down epochs leave no epoch of cosine decay within optim.epochs=5"),
])
def test_fields_that_depend_on_each_other(overrides: list[str], message: str, tmp_path: Path) -> None:
    # the demo has a static teacher; give it a local checkpoint where the rule is about pretrained weights
    with pytest.raises(ConfigError, match=re.escape(message)):
        _validate(f"model.static_teacher_checkpoint={tmp_path / 't.safetensors'}", *overrides)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_validates(name: str) -> None:
    assert check_config(get_recipe(name)).recipe == name


@pytest.mark.parametrize("override", [
    "model.student=torchvision:resnet18", "model.student=timm:resnet18", "model.static_teacher=resnet34.tv_in1k",
    "model.static_teacher=none", 'model.student_kwargs={"drop_path_rate": 0.1}', "optim.milestones=",
    "run.max_steps=1", "optim.grad_clip=0", "optim.global_batch_size=none", "data.augment.auto_augment=augmix-m5",
    "data.augment.scale=1,1", "track.tags=a,b",
])
def test_good_values_pass(override: str) -> None:
    _validate(override)


def test_every_field_has_a_range_rule_or_is_a_bool() -> None:
    """A new config field gets a row in _RULES (its range), or is a flag whose type check says all."""
    hints = {}

    def collect(cls: type, prefix: str) -> None:
        for name, hint in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(hint):
                collect(hint, f"{prefix}{name}.")
            else:
                hints[f"{prefix}{name}"] = hint

    collect(TrainConfig, "")
    assert set(hints) == set(_all_keys(TrainConfig()))
    ruled = [key for key, _, _ in _RULES]
    assert len(ruled) == len(set(ruled))
    assert set(ruled) <= set(hints)
    assert {key for key, hint in hints.items() if hint is not bool} == set(ruled)


def test_validation_builds_no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("validate() built a model")

    monkeypatch.setattr(timm, "create_model", refuse)
    _validate("model.static_teacher=resnet34.tv_in1k")  # no student_kwargs: no trial build either


def test_an_unknown_model_built_directly_is_a_user_input_error() -> None:
    """The CLI prints UserInputErrors in one line (gpd-ds inspect builds models without a config)."""
    with pytest.raises(UserInputError, match=r"unknown model 'resnet34\.tv_in1kk'.*Did you mean: tv_in1k"):
        create_model("resnet34.tv_in1kk")


def test_bad_student_kwargs_at_build_time_are_a_config_error() -> None:
    from gpd_ds.models.build import build_student

    cfg = get_recipe("demo")
    cfg.model.student_kwargs = {"bogus": 1}  # not validated: build_student refuses it on its own
    with pytest.raises(ConfigError, match=r"model.student_kwargs=\{'bogus': 1\} is invalid: .*'bogus'"):
        build_student(cfg, num_classes=10)


# --- ds_config --------------------------------------------------------------------------------------------------

ZERO2 = json.loads((REPO / "ds_configs" / "zero2.json").read_text())


def _write(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _with(**changes: object) -> dict:
    ds = copy.deepcopy(ZERO2)
    ds.update(changes)
    return ds


def _nested(block: str, **changes: object) -> dict:
    ds = copy.deepcopy(ZERO2)
    ds.setdefault(block, {}).update(changes)
    return ds


@pytest.mark.parametrize(("content", "message"), [
    ("[1, 2]", "holds a JSON list, not an object of DeepSpeed keys"),
    ("3", "holds a JSON number, not an object"),
    ('"zero2"', "holds a JSON string, not an object"),
    ("null", "holds a JSON null, not an object"),
    ('{"train_batch_size": 8, "train_batch_size": 16}', "key 'train_batch_size' appears twice in one object"),
    (_with(zero_optimisation={"stage": 2}), "unknown key 'zero_optimisation': DeepSpeed ignores keys it does not "
                                            "read, so this setting would be lost. Did you mean zero_optimization?"),
    (_with(gradient_cliping=1.0), "Did you mean gradient_clipping"),
    (_with(elasticity={"enabled": True}), "'elasticity' is a feature DeepSpeed 0.19.8 removed"),
    (_with(train_batch_size=0), "train_batch_size=0 is invalid: use a positive integer, the global batch over all "
                                "ranks (it mirrors optim.global_batch_size"),
    (_with(train_batch_size=64.0), "train_batch_size=64.0 is invalid: use a positive integer"),
    (_with(train_batch_size="64"), "train_batch_size='64' is invalid: use a positive integer"),
    (_with(train_micro_batch_size_per_gpu=-1), "train_micro_batch_size_per_gpu=-1 is invalid: use a positive integer"),
    (_with(gradient_accumulation_steps=0), "gradient_accumulation_steps=0 is invalid: use a positive integer"),
    (_with(gradient_clipping=-1), "gradient_clipping=-1 is invalid: use a max gradient norm >= 0"),
    (_with(gradient_clipping=True), "gradient_clipping=True is invalid: use a max gradient norm >= 0"),
    (_with(steps_per_print=0), "steps_per_print=0 is invalid: use a positive integer"),
    (_with(zero_optimization=2), "zero_optimization=2 is invalid: use a JSON object of zero_optimization keys"),
    (_with(zero_optimization=[{"stage": 2}]), "zero_optimization=[{'stage': 2}] is invalid: use a JSON object"),
    (_with(torch_autocast=True), "torch_autocast=True is invalid: use a JSON object"),
    (_with(wandb=False), "wandb=False is invalid: use a JSON object"),
    (_with(timers=None), "timers=None is invalid: use a JSON object"),
    (_nested("zero_optimization", stage=4), "zero_optimization.stage=4 is not a ZeRO stage; use 0, 1, 2 or 3"),
    (_nested("zero_optimization", stage="2"), "zero_optimization.stage='2' is not a ZeRO stage"),
    (_nested("zero_optimization", stage=2.0), "zero_optimization.stage=2.0 is not a ZeRO stage"),
    (_nested("torch_autocast", dtyp="float16"), "unknown key 'torch_autocast.dtyp' ... Did you mean "
                                                "torch_autocast.dtype?"),
    (_nested("torch_autocast", dtype="float32"), "torch_autocast.dtype='float32' is invalid: use bfloat16"),
    (_nested("torch_autocast", enabled="true"), "torch_autocast.enabled='true' is invalid: use true or false"),
    (_nested("wandb", enabled="false"), "wandb.enabled='false' is invalid: use true or false"),
    (_nested("timers", throughputs={"enabled": False}), "unknown key 'timers.throughputs' ... Did you mean "
                                                        "timers.throughput?"),
    (_nested("activation_checkpointing", partition_activation=True), "Did you mean "
                                                                     "activation_checkpointing.partition_activations?"),
])
def test_a_bad_ds_config_is_refused_when_loaded(content: object, message: str, tmp_path: Path) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as error:
        load_ds_config(path)
    _assert_in_order(f"--deepspeed_config {str(path)!r} ... {message}", str(error.value))


def test_comments_and_every_shipped_ds_config_load(tmp_path: Path) -> None:
    assert SHIPPED
    for path in SHIPPED:
        assert load_ds_config(path) == json.loads(path.read_text())
    ds = _with(_comment="a note", _notes=["x"], train_batch_size=64, gradient_accumulation_steps=2)
    ds["torch_autocast"]["_comment"] = "bf16 on A100"
    assert load_ds_config(_write(tmp_path, ds)) == ds


def test_check_ds_config_takes_a_dict_directly() -> None:
    assert check_ds_config({}) == {}
    with pytest.raises(ConfigError, match=r"ds_config: unknown key 'fp32'"):
        check_ds_config({"fp32": {"enabled": True}})


def test_the_autocast_dtypes_are_the_ones_gpd_ds_maps() -> None:
    for name in _AUTOCAST_DTYPES:
        assert autocast_dtype({"torch_autocast": {"enabled": True, "dtype": name}}) is not None


class _Recording(dict):
    """A ds_config that records every key DeepSpeed looks up in it."""

    seen: typing.ClassVar[set] = set()

    def get(self, key: object, *default: object) -> object:
        self.seen.add(key)
        return super().get(key, *default)

    def __contains__(self, key: object) -> bool:
        self.seen.add(key)
        return super().__contains__(key)

    def __getitem__(self, key: object) -> object:
        self.seen.add(key)
        return super().__getitem__(key)

    def keys(self) -> _RecordingKeys:
        return _RecordingKeys(super().keys())

    def __copy__(self) -> _Recording:
        return self  # DeepSpeedConfig parses a shallow copy


class _RecordingKeys(list):
    def __contains__(self, key: object) -> bool:
        _Recording.seen.add(key)
        return super().__contains__(key)


def test_the_known_keys_are_the_ones_deepspeed_reads() -> None:
    """DeepSpeed's config parser, run on a recording dict, looks up no top-level key outside the known and
    removed lists; every listed key is one it reads (or deepspeed.initialize does), so the lists follow DeepSpeed."""
    from deepspeed.runtime import config as ds_config
    from deepspeed.runtime.activation_checkpointing.config import ACT_CHKPT_DEFAULT

    _Recording.seen.clear()
    ds_config.DeepSpeedConfig(_Recording(_with(train_batch_size=8)))
    read = {k for k in _Recording.seen if isinstance(k, str)}
    assert {"zero_optimization", "train_batch_size", "torch_autocast", "optimizer"} <= read  # the recording works
    initialize_reads = {"data_parallel_size", "sequence_parallel_size"}
    assert read - initialize_reads <= set(DS_CONFIG_KEYS) | set(DS_REMOVED_KEYS)
    assert set(DS_CONFIG_KEYS) - initialize_reads <= read
    assert set(DS_REMOVED_KEYS) == set(ds_config._REMOVED_TOP_LEVEL_CONFIG_KEYS)
    assert set(_DS_BLOCK_KEYS["activation_checkpointing"]) == set(ACT_CHKPT_DEFAULT)
    assert {ds_config.TORCH_AUTOCAST_ENABLED, ds_config.TORCH_AUTOCAST_DTYPE,
            ds_config.TORCH_AUTOCAST_LOWER_PRECISION_SAFE_MODULES} == set(_DS_BLOCK_KEYS["torch_autocast"])


def test_deepspeed_refuses_unknown_zero_keys_itself() -> None:
    """Why zero_optimization's keys are not checked here: DeepSpeed's pydantic model forbids extra keys."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    with pytest.raises(ValueError, match="overlap_comms"):
        DeepSpeedZeroConfig(stage=2, overlap_comms=True)


def test_the_cli_prints_one_line_without_a_traceback() -> None:
    cmd = [sys.executable, "-m", "gpd_ds.cli", "train", "--set", "data.shuffle_buffer=0", "--deepspeed_config",
           "ds_configs/zero2.json"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert "data.shuffle_buffer=0 is invalid" in errors[0]
