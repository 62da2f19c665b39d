"""Named configs. Each follows the paper's released hyperparameters (gpd_method.md section 5) unless noted.

Batch sizes are global; the lr is given at ``lr_ref_batch`` and scales linearly with the actual global batch
(``lr * global_batch / lr_ref_batch``), so a recipe keeps its schedule on any number of GPUs.
"""

from __future__ import annotations

from collections.abc import Callable

from gpd_ds.config import (
    Augment,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from gpd_ds.registry import Registry

# Every named config, in the order `gpd-ds recipes` lists them; a recipe of your own is one @recipe function in a
# module passed to `gpd-ds train --plugin`
RECIPES = Registry("recipe", "--recipe")
Builder = Callable[[], TrainConfig]


def recipe(scenario: str, paper: str = "-") -> Callable[[Builder], Builder]:
    """Register the decorated function (it returns a fresh TrainConfig) as the recipe of its name, with what
    `gpd-ds recipes` and `gpd-ds train --help` say of it besides its config: the ``scenario`` and the paper's ImageNet
    top-1 (baseline -> GPD)."""
    def add(build: Builder) -> Builder:
        build.scenario, build.paper = scenario, paper
        return RECIPES.register(build.__name__)(build)
    return add


def _cnn_data() -> DataConfig:
    """RandomResizedCrop 224 (bilinear) + flip; eval resize 256 / crop 224."""
    return DataConfig(image_size=224, workers=8, crop_pct=0.875, interpolation="bilinear")


def _cnn_optim(**overrides) -> OptimConfig:
    """SGD 0.1 at batch 512, momentum 0.9, wd 1e-4 on everything, x0.1 at epochs 30/60/90, clip 5, EMA."""
    return OptimConfig(**{"optimizer": "sgd", "lr": 0.1, "lr_ref_batch": 512, "weight_decay": 1e-4,
                          "decay_norm_and_bias": True, "schedule": "step", "epochs": 100,
                          "milestones": (30, 60, 90), "ema_decay": 0.99996, "global_batch_size": 512,
                          "grad_clip": 5.0, **overrides})


# The static teacher of the paper's rows runs in train mode: the reference never calls .eval() on it in a GPD run,
# so its BatchNorm normalises with the batch statistics (and keeps updating its running statistics). The paper's
# baselines without GPD (DKD, ReviewKD) are those papers' numbers, trained with the teacher in eval mode: a baseline
# run is model.method=plain with model.static_teacher_train_mode=false.
_PAPER_TEACHER_MODE = {"static_teacher_train_mode": True}


@recipe("(a) static teacher", "- (offline demo data)")
def demo() -> TrainConfig:
    """The embedded default: GPD with DKD from timm resnet10t (4.9 M parameters, trained first by
    ``demo_teacher``) to timm test_resnet (0.37 M), on the offline shapes dataset at 32 px. Minutes on a CPU."""
    return TrainConfig(
        recipe="demo",
        model=ModelConfig(student="test_resnet", static_teacher="resnet10t"),
        data=DataConfig(image_size=32, workers=1, shuffle_buffer=500, eval_batch_size=200, crop_pct=1.0,
                        augment=Augment(scale=(0.5, 1.0))),
        loss=LossConfig(kd="dkd", dkd_beta=0.5),
        optim=OptimConfig(optimizer="sgd", lr=0.1, lr_ref_batch=64, weight_decay=5e-4, schedule="cosine",
                          epochs=5, warmup_epochs=0.5, min_lr=1e-3, ema_decay=0.98, global_batch_size=64,
                          grad_clip=5.0),
        run=RunConfig(log_every_steps=10, checkpoint_every_steps=100, keep_checkpoints=2))


@recipe("plain (the demo teacher)", "-")
def demo_teacher() -> TrainConfig:
    """The demo's static teacher: resnet10t trained from scratch without GPD on the demo data."""
    cfg = demo()
    cfg.recipe = "demo_teacher"
    cfg.model = ModelConfig(student="resnet10t", method="plain")
    cfg.loss = LossConfig(kd="none")
    cfg.optim.epochs = 6
    return cfg


@recipe("(a) static teacher", "DKD 71.70 -> DKD + GPD 72.71")
def resnet18_from_resnet34() -> TrainConfig:
    """Scenario (a): ResNet34 (torchvision weights, 73.31) -> ResNet18, DKD + GPD (paper: 72.71). The static
    teacher in train mode and the student's last BatchNorm gammas starting at 1 (not timm's 0), as the reference
    ran it."""
    return TrainConfig(
        recipe="resnet18_from_resnet34",
        model=ModelConfig(student="resnet18", static_teacher="resnet34.tv_in1k", branches=True,
                          zero_init_last=False, **_PAPER_TEACHER_MODE),
        data=_cnn_data(), loss=LossConfig(kd="dkd", dkd_beta=0.5), optim=_cnn_optim(),
        run=RunConfig(checkpoint_every_steps=2500))


@recipe("(a) static teacher", "DIST 72.07 -> DIST + GPD (not published)")
def resnet18_from_resnet34_dist() -> TrainConfig:
    """Scenario (a) with DIST (Huang et al. 2022: ResNet34 -> ResNet18 72.07 with their own recipe) as the static
    teacher's term: the DKD + GPD recipe with loss.kd=dist at the paper's beta = gamma = tau = 1. Whether GPD adds to
    DIST is an open question (no published number); this recipe is how to ask it."""
    cfg = resnet18_from_resnet34()
    cfg.recipe, cfg.loss = "resnet18_from_resnet34_dist", LossConfig(kd="dist", dist_beta=1.0, dist_gamma=1.0)
    return cfg


@recipe("(a) static teacher", "DKD 72.05 -> DKD + GPD 73.63")
def mobilenet_from_resnet50() -> TrainConfig:
    """Scenario (a): ResNet50 (torchvision weights, 76.13) -> MobileNet-v1, DKD (beta 2) + GPD (paper: 73.63). The
    static teacher in train mode, as the reference ran it.

    The student is the paper's MobileNet-v1, ``mobilenetv1_relu`` (:mod:`gpd_ds.models.mobilenet`: ReLU, the DKD /
    ReviewKD state-dict layout, so weights saved by those code bases load strictly). timm's
    ``mobilenetv1_100`` remains an option via ``--set model.student=mobilenetv1_100``: same widths and parameter
    count, but ReLU6 and timm's own layout, so those weights do not load into it."""
    return TrainConfig(
        recipe="mobilenet_from_resnet50",
        model=ModelConfig(student="mobilenetv1_relu", static_teacher="resnet50.tv_in1k", branches=True,
                          **_PAPER_TEACHER_MODE),
        data=_cnn_data(), loss=LossConfig(kd="dkd", dkd_beta=2.0), optim=_cnn_optim(),
        run=RunConfig(checkpoint_every_steps=2500))


def _reviewkd(recipe: str, student: str, teacher: str, mid_channels: int, **model: object) -> TrainConfig:
    """ReviewKD + GPD as the reference's train_reviewkd.py runs it (reviewkd_rvt.md 1.8): HCL of both modes' ABF
    outputs against the static teacher's five feature levels, weight 1.0, no DKD, no warm-up; SGD 0.1 at global
    batch 256 (the reference does not scale it), x0.1 at 30/60/90 of 100 epochs, wd 1e-4 on everything (ABFs
    included), clip 5, EMA 0.99996, multi-branch dynamic teacher, static teacher in train mode; what the reference's
    code computes where it differs from its paper: ResNet stage features after their last ReLU
    (``loss.reviewkd_post_relu``) and ResNet students without timm's zero-init of the last BatchNorm."""
    return TrainConfig(
        recipe=recipe,
        model=ModelConfig(student=student, static_teacher=teacher, branches=True, **_PAPER_TEACHER_MODE, **model),
        data=_cnn_data(), loss=LossConfig(kd="reviewkd", reviewkd_weight=1.0, reviewkd_mid_channels=mid_channels,
                                          reviewkd_post_relu=True),
        optim=_cnn_optim(lr_ref_batch=256, global_batch_size=256), run=RunConfig(checkpoint_every_steps=5000))


@recipe("(a) static teacher", "ReviewKD 71.61 -> ReviewKD + GPD 72.50")
def resnet18_from_resnet34_reviewkd() -> TrainConfig:
    """Scenario (a): ResNet34 (73.31) -> ResNet18, ReviewKD + GPD (paper: 72.50; ReviewKD alone 71.61). ABF
    width 512."""
    return _reviewkd("resnet18_from_resnet34_reviewkd", "resnet18", "resnet34.tv_in1k", 512, zero_init_last=False)


@recipe("(a) static teacher", "ReviewKD 72.56 -> ReviewKD + GPD 73.21")
def mobilenet_from_resnet50_reviewkd() -> TrainConfig:
    """Scenario (a): ResNet50 (76.16) -> MobileNet-v1 (ReLU), ReviewKD + GPD (paper: 73.21; ReviewKD alone 72.56).
    ABF width 256; weight 1.0 as the reference (the original ReviewKD used 8.0 for this pair)."""
    return _reviewkd("mobilenet_from_resnet50_reviewkd", "mobilenetv1_relu", "resnet50.tv_in1k", 256)


@recipe("(b) from scratch", "70.07 -> GPD 71.87")
def resnet18_scratch() -> TrainConfig:
    """Scenario (b): ResNet18 from scratch with GPD, no static teacher (paper: 70.07 -> 71.87)."""
    return TrainConfig(recipe="resnet18_scratch",
                       model=ModelConfig(student="resnet18", branches=True, zero_init_last=False),
                       data=_cnn_data(), loss=LossConfig(kd="none"), optim=_cnn_optim(),
                       run=RunConfig(checkpoint_every_steps=2500))


@recipe("(c) fine-tuning (set model.student_checkpoint)", "70.23 -> GPD 71.12")
def resnet18_finetune() -> TrainConfig:
    """Scenario (c): fine-tune a pretrained ResNet18 with GPD for 50 epochs at lr x0.1, one decay at epoch 30
    (paper: 69.75 -> 71.12). Set ``model.student_checkpoint`` to the pretrained weights (a local file)."""
    return TrainConfig(recipe="resnet18_finetune",
                       model=ModelConfig(student="resnet18", branches=True, zero_init_last=False),
                       data=_cnn_data(), loss=LossConfig(kd="none"),
                       optim=_cnn_optim(epochs=50, milestones=(30,)), run=RunConfig(checkpoint_every_steps=2500))


def _deit(recipe: str, student: str, teacher: str, drop_path: float, **model: object) -> TrainConfig:
    """The DeiT recipe: AdamW 5e-4 at batch 512 (2e-3 at the default global batch 2048; scale lr linearly with
    the global batch), wd 0.05 (not on 1-D tensors, biases, tokens), cosine 300 + 10 cooldown epochs, 5 warm-up
    epochs, RandAugment m9, random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1, bicubic, drop-path,
    repeated augmentation x3 (each image on 3 ranks per epoch, :mod:`gpd_ds.data.loader`).
    The reference clips no gradients; the shipped ds_configs clip at 5.0 (set gradient_clipping to 0 to match)."""
    augment = Augment(auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", random_erasing=0.25,
                      mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    return TrainConfig(
        recipe=recipe,
        model=ModelConfig(student=student, student_kwargs={"drop_path_rate": drop_path}, static_teacher=teacher,
                          **model),
        data=DataConfig(image_size=224, workers=10, crop_pct=0.875, interpolation="bicubic", augment=augment,
                        repeated_aug=3),
        loss=LossConfig(kd="dkd", dkd_beta=0.5),
        optim=OptimConfig(optimizer="adamw", lr=5e-4, lr_ref_batch=512, weight_decay=0.05,
                          decay_norm_and_bias=False, schedule="cosine", epochs=310, warmup_epochs=5,
                          warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=10, ema_decay=0.99996,
                          global_batch_size=2048, grad_clip=None),
        run=RunConfig(checkpoint_every_steps=2500))


@recipe("(a) static teacher", "-")
def deit_tiny_from_deit_small() -> TrainConfig:
    """DeiT-S (79.9) -> DeiT-Ti (5.7 M; dynamic teacher 22 M), DKD + GPD on the DeiT recipe. ZeRO-2."""
    return _deit("deit_tiny_from_deit_small", "deit_tiny_patch16_224", "deit_small_patch16_224", 0.0)


@recipe("(a) static teacher", "-")
def deit_small_from_deit_base() -> TrainConfig:
    """DeiT-B (81.8) -> DeiT-S (22 M; dynamic teacher 87 M), DKD + GPD on the DeiT recipe, drop-path 0.1. ZeRO-2
    fits on 40/80 GB GPUs at 256 images per GPU; ZeRO-3 + activation checkpointing for larger per-GPU batches."""
    return _deit("deit_small_from_deit_base", "deit_small_patch16_224", "deit_base_patch16_224", 0.1)


@recipe("(a) static teacher", "-")
def vit_base_from_vit_large() -> TrainConfig:
    """ViT-L/16 (AugReg, 85.6 at 224) -> ViT-B/16 (86 M; dynamic teacher 344 M, the size of a ViT-L), DKD + GPD on
    the DeiT recipe, drop-path 0.1, global batch 1024 (lr 1e-3). Use ds_configs/zero3.json: the dynamic teacher's
    fp32 weights, gradients and AdamW states (5.5 GB) are partitioned; activation checkpointing is on."""
    cfg = _deit("vit_base_from_vit_large", "vit_base_patch16_224", "vit_large_patch16_224", 0.1)
    cfg.optim.global_batch_size = 1024
    cfg.run.activation_checkpointing = True
    return cfg


@recipe("(a) static teacher", "-")
def deit_tiny_distilled_from_deit_small() -> TrainConfig:
    """The distillation-token variant: DeiT-Ti distilled <- DeiT-S. The class head learns from the labels and the
    dynamic teacher; the distillation head from the static teacher (psi = DKD), in the student and the dynamic
    teacher alike (``model.distillation_token``). Evaluation averages the two heads, as DeiT does."""
    return _deit("deit_tiny_distilled_from_deit_small", "deit_tiny_distilled_patch16_224", "deit_small_patch16_224",
                 0.0, distillation_token=True)


@recipe("(a) static teacher", "-")
def deit_tiny_from_deit_small_fitnet() -> TrainConfig:
    """Feature distillation on a ViT: DeiT-S -> DeiT-Ti, DKD + FitNets hints + GPD on the DeiT recipe. The hints read
    the blocks ending each quarter of the depth (3, 6, 9, 12: tokens folded into the 14 x 14 grid) and the pooled
    class token of both networks (gpd_ds/tap_sets.py), through one 1x1 conv + BN per level for the student and one
    for the dynamic teacher; weight 1 (not tuned). ReviewKD instead: ``--set loss.kd=dkd+reviewkd
    loss.reviewkd_mid_channels=256``."""
    cfg = _deit("deit_tiny_from_deit_small_fitnet", "deit_tiny_patch16_224", "deit_small_patch16_224", 0.0)
    cfg.loss.kd, cfg.loss.fitnet_weight = "dkd+fitnet", 1.0
    return cfg


def _rvt(recipe: str, static_teacher: str | None) -> TrainConfig:
    """The reference's RVT runs (reviewkd_rvt.md 2.6): the DeiT recipe with drop-path 0 (the GPD commands pass none;
    official RVT trains with 0.1), DKD alpha 1 / beta 0.5, the static teacher in train-mode BN, a single-branch
    dynamic teacher (the reference's branch conversion skips every RVT conv). The lr follows gpd_ds's per-step
    warm-up and cosine, not the reference's per-epoch staircase (its epochs 0 and 1 both run at 1e-6)."""
    cfg = _deit(recipe, "rvt_tiny", static_teacher, 0.0, branches=False,
                **(_PAPER_TEACHER_MODE if static_teacher else {}))
    if static_teacher is None:
        cfg.loss = LossConfig(kd="none")
    return cfg


@recipe("(a) static teacher", "DKD 79.12 -> DKD + GPD 80.14")
def rvt_tiny_from_rvt_small() -> TrainConfig:
    """RVT-S (81.69) -> RVT-Ti (8.65 M; dynamic teacher 33.4 M), DKD + GPD (paper: DKD 79.12 -> 80.14). Convert the
    official rvt_small.pth with ``gpd-ds convert-weights`` and set ``model.static_teacher_checkpoint``."""
    return _rvt("rvt_tiny_from_rvt_small", "rvt_small")


@recipe("(b) from scratch", "78.45 -> GPD 79.85")
def rvt_tiny_scratch() -> TrainConfig:
    """RVT-Ti from scratch with GPD, no static teacher (paper: 78.45 -> 79.85)."""
    return _rvt("rvt_tiny_scratch", None)


@recipe("(a) static teacher", "- (docs/results_cifar10.md)")
def cifar10() -> TrainConfig:
    """The CIFAR-10 protocol of docs/results_cifar10.md (its arm (a) by default): DKD + GPD from cifar_resnet18
    (trained first by ``cifar10_teacher``; set ``model.static_teacher_checkpoint``) to cifar_resnet10, 32 px,
    pad-4 crop + flip, decoded in memory, SGD 0.1 at batch 128, wd 5e-4, cosine, no EMA.
    experiments/cifar10/run.sh varies ``model.method``, ``loss.kd`` and the seed from here."""
    return TrainConfig(
        recipe="cifar10",
        model=ModelConfig(student="cifar_resnet10", static_teacher="cifar_resnet18"),
        data=DataConfig(image_size=32, workers=1, in_memory=True, eval_batch_size=500, crop_pct=1.0,
                        augment=Augment(pad_crop=4)),
        loss=LossConfig(kd="dkd", dkd_beta=0.5),
        optim=OptimConfig(optimizer="sgd", lr=0.1, lr_ref_batch=128, weight_decay=5e-4, schedule="cosine",
                          epochs=10, warmup_epochs=1, min_lr=0.0, ema_decay=None, global_batch_size=128,
                          grad_clip=5.0),
        run=RunConfig(log_every_steps=20, eval_every_epochs=2, checkpoint_every_steps=200, keep_checkpoints=1))


@recipe("plain (the CIFAR-10 teacher)", "-")
def cifar10_teacher() -> TrainConfig:
    """The CIFAR-10 static teacher: cifar_resnet18 from scratch without GPD, same schedule."""
    cfg = cifar10()
    cfg.recipe = "cifar10_teacher"
    cfg.model = ModelConfig(student="cifar_resnet18", method="plain")
    cfg.loss = LossConfig(kd="none")
    return cfg


def describe() -> list[dict[str, str]]:
    """One row per recipe: name, scenario, method, student, static teacher, epochs, paper, first docstring line."""
    rows = []
    for name, build in RECIPES.items():
        cfg = build()
        scenario, paper = build.scenario, build.paper
        m = cfg.model
        rows.append({"recipe": name, "scenario": scenario, "method": m.method, "student": m.student,
                     "static teacher": m.static_teacher or "-",
                     "dynamic teacher": (f"r={m.width_ratio}" + (", branches" if m.branches else ""))
                     if m.method == "gpd" else "-",
                     "epochs": str(cfg.optim.epochs), "paper (ImageNet top-1)": paper,
                     "about": (build.__doc__ or "").strip().split("\n")[0]})
    return rows


def get_recipe(name: str) -> TrainConfig:
    """A fresh config of the recipe ``name``."""
    if name not in RECIPES:
        close = RECIPES.close_to(name)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"--recipe {name!r} is unknown; recipes: {', '.join(RECIPES)}.{hint}")
    return RECIPES.get(name)()
