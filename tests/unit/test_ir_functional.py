"""IR through what a block does between its modules (docs/ir_functional_ops.md): channel concat/split/chunk made
exact, everything else refused by name before or at the numeric check, and no cost for families without them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpd_ds.gpd import UnsupportedModelError, check_equivalence, expand, extract
from gpd_ds.gpd.layers import narrow
from gpd_ds.losses import GPDLoss
from gpd_ds.models import create_model
from tests.helpers import NUM_CLASSES, assert_close_logits, build_kwargs, images, make_student

# One real timm model per capability (smallest of its family): channel concat (DenseNet, DLA), channel split +
# concat (FasterNet), chunk (CSPNet's cross-stage split), a squeeze-excite gate that is not timm's (legacy SENet),
# GroupNorm and MetaFormer's per-channel Scale (PoolFormer), channel slices x[:, :c] (GhostNet), a layer scale known
# by its name (InceptionNeXt's gamma), scaled weight-standardised convs (NFNet); and Swin (window attention, relative
# position bias, patch merging); StarReLU (PoolFormer-v2), a distillation head of container classifiers (RepViT);
# attention with learned per-head biases and attention downsampling (LeViT; TinyViT's with a norm inside), ReLU
# linear attention over concatenated scales (EfficientViT), the effective SE gate (VoVNet), a learnable affine
# after activations (HGNet-v2), timm's LayerScale next to a split (MambaOut), root tokens known by name (PiT),
# relative position bias in NCHW and channels-last attention (CoAtNet, MaxViT), spatial-reduction attention with
# [k | v] projections (PVT-v2) and locally-grouped window attention (Twins), talking heads and class attention
# (CaiT), split attention across radix groups (ResNeSt); and small Swin / Swin-v2 models built here (SMALL: window
# attention, cosine attention with a position MLP kept plain, both patch mergings).
REPRESENTATIVES = ["densenet121", "dla46x_c", "fasternet_t0", "cs3darknet_focus_s", "legacy_seresnet18",
                   "poolformer_s12", "ghostnet_050", "inception_next_atto", "test_nfnet", "poolformerv2_s12",
                   "repvit_m1", "levit_128s", "tiny_vit_5m_224", "efficientvit_b0", "ese_vovnet19b_slim_dw",
                   "hgnetv2_b0", "test_mambaout", "pit_ti_224", "test_coatnet", "test_maxvit",
                   "pvt_v2_b0", "twins_svt_small", "cait_xxs24_224", "resnest14d"]


def _without_dropout(model: nn.Module) -> nn.Module:
    """Train-mode outputs compare only without random masks (SENet applies its head dropout functionally)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "drop_rate", None), float):
            m.drop_rate = 0.0
    return model


def _swin() -> nn.Module:
    """A small Swin (window attention with relative position bias, shifted windows, patch merging)."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                           num_classes=NUM_CLASSES, drop_path_rate=0.0).eval()


def _swinv2() -> nn.Module:
    """A small Swin-v2 (cosine attention, q/v biases, continuous position bias MLP, post-norm, v2 patch merging),
    with non-zero q/v biases and distinct per-head logit scales (timm starts them at 0 and log 10)."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    torch.manual_seed(0)
    model = SwinTransformerV2(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2),
                              num_heads=(2, 4), num_classes=NUM_CLASSES, drop_path_rate=0.0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_(0, 0.1)
            elif name.endswith("logit_scale"):
                p.uniform_(1.0, 3.0)
    return model


SMALL = {"swin": _swin, "swinv2": _swinv2}


@pytest.mark.parametrize("name", [*REPRESENTATIVES, *SMALL])
def test_representative_is_exact_in_both_modes_and_extracts_after_training(name: str) -> None:
    student = SMALL[name]() if name in SMALL else _without_dropout(make_student(name))
    x = torch.randn(4, 3, 32, 32) if name in SMALL else images(name)
    with torch.no_grad():
        original = student(x)
        train_original = copy.deepcopy(student).train()(x)
    model = expand(student, noise_std=0.0, input_size=tuple(x.shape[1:]))
    with torch.no_grad():
        out = model.eval()(x, mode="both")
        assert_close_logits(out.teacher, original)
        assert_close_logits(out.student, original)
        out = model.train()(x, mode="both")
        assert_close_logits(out.teacher, train_original)
        assert_close_logits(out.student, train_original)
    model = expand(student, input_size=tuple(x.shape[1:]))  # default noise: the replica-aware ops really act
    assert check_equivalence(model, extract(model), x) <= 1e-5
    # lr 0.01: at 0.05 EfficientViT's ReLU linear attention overflows to NaN in the plain timm model too
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(2):
        out = model.train()(x + 0.1 * step, mode="both")
        y = torch.arange(4) % NUM_CLASSES
        opt.zero_grad()
        GPDLoss(kd="none")(out.student, out.teacher, y).total.backward()
        opt.step()
    plain = extract(model)
    check_equivalence(model, plain, x)  # raises above 1e-5 x max|logit| (LeViT's grow to ~1e3 in two steps)
    fresh = SMALL[name]() if name in SMALL else create_model(name, num_classes=NUM_CLASSES, **build_kwargs(name))
    fresh.load_state_dict(plain.state_dict(), strict=True)


@pytest.mark.parametrize("name", [*REPRESENTATIVES, *SMALL])
def test_student_gradient_stays_in_its_slice_through_channel_ops(name: str) -> None:
    student = SMALL[name]() if name in SMALL else make_student(name)
    x = torch.randn(4, 3, 32, 32) if name in SMALL else images(name)
    model = expand(student, input_size=tuple(x.shape[1:])).train()
    model(x, mode="student").square().mean().backward()
    checked = 0
    for m in model.net.modules():
        for tensor_name, spec in getattr(m, "specs", {}).items():
            wide = getattr(m, tensor_name)
            if isinstance(wide, nn.Parameter) and wide.grad is not None and spec.dims:
                outside = wide.grad.clone()
                narrow(outside, spec, model.width_ratio).zero_()  # the student slice (attention: per q/k/v block)
                assert outside.abs().max().item() == 0.0
                checked += 1
    assert checked > 5


def test_channel_sites_are_found_and_families_without_them_get_no_hooks() -> None:
    dense = expand(make_student("densenet121"))
    assert dense.channel_sites
    assert all("cat along dim 1" in s for s in dense.channel_sites)
    for name in ("resnet18", "vit_tiny_patch16_224"):  # the ViT's class-token cat is along tokens: left plain
        model = expand(make_student(name))
        assert model.channel_sites == ()
        hooked = [p for p, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]
        assert hooked == [], f"{name}: hooks on {hooked[:3]}"


def test_a_deepcopy_like_an_ema_computes_the_same() -> None:
    model = expand(make_student("densenet121")).eval()
    twin = copy.deepcopy(model)
    x = images("densenet121")
    with torch.no_grad():
        assert torch.equal(model(x, mode="teacher"), twin(x, mode="teacher"))


class _SplitCat(nn.Module):
    """split by sizes, chunk and concat along channels, and a concat along the flattened tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(12, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        left, right = torch.split(x, [4, 8], dim=1)
        p, q = right.chunk(2, 1)
        x = torch.cat([self.a(left), self.b(torch.cat([q, p], dim=1))], dim=1)
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C): a concat along tokens must stay plain
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
        return self.head(tokens[:, 0])


def test_split_chunk_and_token_concat_are_told_apart() -> None:
    torch.manual_seed(0)
    student = _SplitCat().eval()
    model = expand(student, input_size=(3, 8, 8))
    assert sorted(model.channel_sites) == ["<root>: cat along dim 1", "<root>: split along dim 1"]
    x = torch.randn(2, 3, 12, 12)  # another size than the probe: the decisions do not depend on it
    with torch.no_grad():
        assert_close_logits(model(x, mode="teacher"), student(x), rtol=1e-3)
    assert check_equivalence(model, extract(model), x) <= 1e-5


class _Tokens(nn.Module):
    """Root tokens and a position embedding known only by their names, and a slice along tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8))
        self.gamma_1 = nn.Parameter(torch.rand(8))
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        tokens = tokens + self.gamma_1 * F.relu(self.fc(tokens))
        return self.head(tokens[:, :1].mean(1))


def test_root_tokens_and_scales_are_known_by_name() -> None:
    torch.manual_seed(0)
    student = _Tokens().eval()
    model = expand(student, input_size=(3, 8, 8))
    assert {name for _, name, _ in model.raw_parameters} == {"cls_token", "pos_embed", "gamma_1"}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close_logits(model(x, mode="teacher"), student(x), rtol=1e-3)
    assert check_equivalence(model, extract(model), x) <= 1e-5


class _Unbind(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(1, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.conv(x).unbind(1)[0]
        return self.fc(first.mean((1, 2)).unsqueeze(1))


class _HardCodedWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc(h.reshape(h.shape[0], 8, h.shape[2], h.shape[3]).mean((2, 3)))


class _Product(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc((h * h).mean((2, 3)))


@pytest.mark.parametrize(("model", "message"), [
    (_Unbind(), r"module '<root>' \(tests.unit.test_ir_functional._Unbind\) calls unbind\(\) along its channel"),
    (_HardCodedWidth(), r"module '<root>' \(tests.unit.test_ir_functional._HardCodedWidth\) fails in the dynamic "
                        r"teacher's forward \(RuntimeError"),
    (_Product(), r"module '<root>' \(tests.unit.test_ir_functional._Product\) multiplies two activations"),
])
def test_what_cannot_be_covered_is_refused_by_module_and_operation(model: nn.Module, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        expand(model.eval(), input_size=(3, 8, 8))


@pytest.mark.parametrize(("name", "message"), [
    ("levit_conv_128s", r"levit_conv_\*\); use the linear-mode model"),
    ("maxvit_rmlp_pico_rw_256", r"MaxViT attention with RelPosMlp; only RelPosBias is supported"),
])
def test_attention_variants_outside_the_converters_are_refused_by_name(name: str, message: str) -> None:
    student = create_model(name, num_classes=NUM_CLASSES, img_size=64).eval()
    with pytest.raises(UnsupportedModelError, match=message):
        expand(student, input_size=(3, 64, 64))


def test_subclass_that_computes_differently_is_not_taken_for_its_base() -> None:
    class Clamped(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).clamp(-1, 1)

    model = nn.Sequential(Clamped(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(UnsupportedModelError, match=r"'0' \(tests.unit.test_ir_functional.*Clamped\) holds"):
        expand(model.eval(), input_size=(3, 8, 8))


def test_standardised_and_same_padded_convs_are_exact() -> None:
    import timm.layers as tl
    from timm.layers.pool2d_same import MaxPool2dSame

    torch.manual_seed(0)
    model = nn.Sequential(tl.StdConv2d(3, 8, 3), tl.GroupNormAct(8, num_groups=2), tl.StdConv2d(8, 8, 3, groups=2),
                          tl.ScaledStdConv2dSame(8, 8, 3, stride=2), nn.ReLU(), tl.Conv2dSame(8, 8, 3, stride=2),
                          MaxPool2dSame(3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    gpd = expand(model, input_size=(3, 15, 15))
    x = torch.randn(2, 3, 17, 17)
    with torch.no_grad():
        assert_close_logits(gpd(x, mode="teacher"), model(x), rtol=1e-3)
    assert check_equivalence(gpd, extract(gpd), x) <= 1e-5
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(extract(gpd).state_dict(), strict=True)
