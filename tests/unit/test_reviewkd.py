"""ReviewKD ABF chain and HCL (docs reviewkd_rvt.md 1.3, 1.4; invariants R1, R3, R4, R6).

Golden values are worked out by hand in the comments (or by a few lines of independent torch), never by
calling the code under test twice.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpd_ds.reviewkd import ABF, ReviewKDConnector, hcl

RESNET_SPATIAL = (56, 28, 14, 7, 1)  # ResNet taps at 224 px, shallow -> deep (spec 1.2)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _features(batch: int, channels: tuple[int, ...], spatial: tuple[int, ...], seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=g) for c, s in zip(channels, spatial, strict=True)]


# ---------------------------------------------------------------- R6 parameter counts (table 1.3)

R18_IN = (64, 128, 256, 512, 512)
MBN_IN = (128, 256, 512, 1024, 1024)


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "mid", "expected"),
    [
        pytest.param(R18_IN, R18_IN, 512, 7_552_904, id="resnet18-student-set"),
        pytest.param(tuple(2 * c for c in R18_IN), R18_IN, 512, 8_306_568, id="resnet18-dynamic-teacher-set"),
        pytest.param(MBN_IN, (256, 512, 1024, 2048, 2048), 256, 14_338_056, id="mobilenet-student-set"),
        pytest.param(tuple(2 * c for c in MBN_IN), (256, 512, 1024, 2048, 2048), 256, 15_091_720,
                     id="mobilenet-dynamic-teacher-set"),
        pytest.param((192,) * 5, (384,) * 5, 256, 4_679_944, id="rvt-tiny-student-set"),
        pytest.param((384,) * 5, (384,) * 5, 256, 4_925_704, id="rvt-tiny-dynamic-teacher-set"),
    ],
)
def test_parameter_counts_match_spec_table(
    in_channels: tuple[int, ...], out_channels: tuple[int, ...], mid: int, expected: int
) -> None:
    # per level: conv1 c_in*mid + bn1 2*mid + conv2 9*mid*c_out + bn2 2*c_out, plus att 4*mid + 2 on the 4
    # fusing levels; e.g. ResNet18 S set: 753,664 + 5,120 + 6,782,976 + 2,944 + 8,200 = 7,552,904
    pairs = zip(in_channels, out_channels, strict=True)
    by_hand = sum(c_in * mid + 2 * mid + 9 * mid * c_out + 2 * c_out for c_in, c_out in pairs)
    by_hand += (len(in_channels) - 1) * (4 * mid + 2)
    assert by_hand == expected
    assert _n_params(ReviewKDConnector(in_channels, out_channels, mid)) == expected


# ---------------------------------------------------------------- structure and R1 shapes


def test_structure_deepest_level_has_no_att() -> None:
    conn = ReviewKDConnector((4, 8, 16), (8, 16, 32), 6)
    assert isinstance(conn.abfs, nn.ModuleList)
    assert len(conn.abfs) == 3
    assert [abf.fuse for abf in conn.abfs] == [True, True, False]
    assert conn.abfs[2].att is None
    for abf, c_in, c_out in zip(conn.abfs, (4, 8, 16), (8, 16, 32), strict=True):
        assert abf.conv1.weight.shape == (6, c_in, 1, 1)
        assert abf.conv1.bias is None
        assert abf.conv2.weight.shape == (c_out, 6, 3, 3)
        assert abf.conv2.bias is None
        assert abf.bn1.num_features == 6
        assert abf.bn2.num_features == c_out
    for abf in conn.abfs[:2]:
        assert abf.att.weight.shape == (2, 12, 1, 1)
        assert abf.att.bias is not None


def test_output_shapes_small_channels_at_224_geometry() -> None:
    ins, outs = (4, 8, 8, 16, 16), (8, 8, 16, 16, 32)
    conn = ReviewKDConnector(ins, outs, 8)
    got = conn(_features(2, ins, RESNET_SPATIAL))
    assert [tuple(o.shape) for o in got] == [(2, c, s, s) for c, s in zip(outs, RESNET_SPATIAL, strict=True)]


def test_output_shapes_at_real_resnet18_widths() -> None:
    # 64 px-equivalent spatial sizes; eval mode because train-mode BN cannot normalise one value per channel
    # (batch 1 at the 1x1 deepest level)
    spatial = (16, 8, 4, 2, 1)
    conn = ReviewKDConnector(R18_IN, R18_IN, 512).eval()
    with torch.no_grad():
        got = conn(_features(1, R18_IN, spatial))
    assert [tuple(o.shape) for o in got] == [(1, c, s, s) for c, s in zip(R18_IN, spatial, strict=True)]


def test_one_level_connector() -> None:
    conn = ReviewKDConnector([3], [5], 4)
    assert conn.abfs[0].att is None
    (out,) = conn([torch.randn(2, 3, 4, 4)])
    assert out.shape == (2, 5, 4, 4)


def test_abf_fused_map_has_mid_channels_and_non_square_resize() -> None:
    abf = ABF(3, 6, 5, fuse=True)
    out, mid = abf(torch.randn(2, 3, 6, 10), torch.randn(2, 6, 3, 5))
    assert out.shape == (2, 5, 6, 10)
    assert mid.shape == (2, 6, 6, 10)


# ---------------------------------------------------------------- R4 ABF golden values


def _set_identity_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_(1.0)
        bn.bias.zero_()


def _hand_set_fusing_abf(gate_bias: tuple[float, float]) -> ABF:
    abf = ABF(2, 2, 3, fuse=True).eval()
    with torch.no_grad():
        abf.conv1.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        abf.att.weight.zero_()
        abf.att.bias.copy_(torch.tensor(gate_bias))
        abf.conv2.weight.copy_(torch.arange(54, dtype=torch.float32).view(3, 2, 3, 3) / 54 - 0.5)
    _set_identity_bn(abf.bn1)
    _set_identity_bn(abf.bn2)
    return abf


def test_abf_golden_value_with_hand_set_weights() -> None:
    abf = _hand_set_fusing_abf((0.5, -1.0))
    x = torch.arange(32, dtype=torch.float32).view(1, 2, 4, 4) / 8 - 2
    deeper = torch.tensor([[[[1.0, -2.0], [3.0, 0.5]], [[-1.0, 4.0], [0.25, 2.0]]]])
    with torch.no_grad():
        out, mid = abf(x, deeper)
    # independent: eval BN with stats 0/1 is x / sqrt(1 + eps); nearest 2x upsampling is repeat_interleave;
    # zero att weights make the gate the constant sigmoid(bias)
    s = 1 / math.sqrt(1 + abf.bn1.eps)
    a = x * s
    u = deeper.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    g0, g1 = 1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(1.0))
    expected_mid = a * g0 + u * g1
    expected_out = F.conv2d(expected_mid, abf.conv2.weight, padding=1) * s
    torch.testing.assert_close(mid, expected_mid, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-5)


def test_abf_saturated_gate_keeps_own_map() -> None:
    # gate logits (+inf, -inf): the fused map is a itself, the deeper map is ignored (R4)
    abf = _hand_set_fusing_abf((100.0, -100.0))
    x = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        _, mid = abf(x, torch.randn(2, 2, 2, 2) * 10)
    torch.testing.assert_close(mid, x / math.sqrt(1 + abf.bn1.eps), rtol=0, atol=1e-6)


def test_deepest_abf_is_bn_conv3x3_bn_conv1x1() -> None:
    torch.manual_seed(0)
    abf = ABF(3, 4, 5, fuse=False)  # train mode: batch statistics
    x = torch.randn(4, 3, 3, 3)
    out, mid = abf(x, None)
    bn = lambda t: F.batch_norm(t, None, None, training=True, eps=1e-5)  # noqa: E731  (weight 1, bias 0)
    expected_mid = bn(F.conv2d(x, abf.conv1.weight))
    torch.testing.assert_close(mid, expected_mid, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, bn(F.conv2d(expected_mid, abf.conv2.weight, padding=1)), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- init (spec 1.3)


def test_init_kaiming_uniform_a1_and_bn() -> None:
    torch.manual_seed(0)
    abf = ABF(256, 256, 256, fuse=True)
    for conv, fan_in in ((abf.conv1, 256), (abf.conv2, 256 * 9)):
        bound = math.sqrt(3 / fan_in)  # gain sqrt(2 / (1 + a^2)) = 1 at a = 1
        w = conv.weight.detach()
        assert w.abs().max().item() <= bound
        assert w.abs().max().item() > 0.99 * bound  # uses the whole range, not a narrower default
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
        assert w.mean().item() == pytest.approx(0.0, abs=0.02 * bound)
    for bn in (abf.bn1, abf.bn2):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    # att keeps PyTorch's default Conv2d init: uniform within 1/sqrt(fan_in) for weight (a=sqrt(5)) and bias
    att_bound = 1 / math.sqrt(2 * 256)
    assert abf.att.weight.abs().max().item() <= att_bound
    assert abf.att.bias.abs().max().item() <= att_bound


# ---------------------------------------------------------------- R3 HCL golden values


def _map(rows: list[list[float]]) -> Tensor:
    return torch.tensor(rows).view(1, 1, len(rows), len(rows[0]))


# 4x4: 2x2 blocks of value 1, 2, 3, 6 plus a zero-mean +-1 checker inside every block
BASE4 = _map([[2, 0, 3, 1], [0, 2, 1, 3], [4, 2, 7, 5], [2, 4, 5, 7]])


def test_hcl_h1_is_plain_mse() -> None:
    f = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    assert hcl([f], [torch.zeros_like(f)]).item() == pytest.approx(5.0)  # (1 + 9) / 2
    # only h is inspected: h = 1 with w = 8 uses no pooled terms either
    g = torch.full((1, 1, 1, 8), 2.0)
    g[..., 0] = 10.0  # mse = (100 + 7 * 4) / 8 = 16
    assert hcl([g], [torch.zeros_like(g)]).item() == pytest.approx(16.0)


def test_hcl_h2_uses_pool1_with_half_weight() -> None:
    f = _map([[1, 2], [3, 6]])  # mse = (1 + 4 + 9 + 36) / 4 = 12.5; pooled mean 3 -> 9
    assert hcl([f], [torch.zeros_like(f)]).item() == pytest.approx((12.5 + 0.5 * 9) / 1.5)  # 11.333...


def test_hcl_h3_uses_pool2_and_pool1() -> None:
    f = _map([[0, 0, 0], [0, 9, 0], [0, 0, 0]])
    # mse 81/9 = 9; adaptive 3->2 windows overlap at the centre: every cell 9/4 -> 81/16; pool1 mean 1 -> 1
    expected = (9 + 0.5 * 81 / 16 + 0.25 * 1) / 1.75  # = 377/56
    assert hcl([f], [torch.zeros_like(f)]).item() == pytest.approx(expected)
    assert expected == pytest.approx(377 / 56)


def test_hcl_h4_uses_sizes_2_and_1_total_weight_1_75() -> None:
    # mse = mean(v^2) + 1 = 12.5 + 1; pool2 = [[1,2],[3,6]] -> 12.5; pool1 = 3 -> 9
    got = hcl([BASE4], [torch.zeros_like(BASE4)]).item()
    assert got == pytest.approx((13.5 + 12.5 / 2 + 9 / 4) / 1.75)
    assert got == pytest.approx(88 / 7)


def test_hcl_h8_uses_sizes_4_2_1_total_weight_1_875() -> None:
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(4, 4).view(1, 1, 8, 8)
    f = BASE4.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) + checker
    # mse = 13.5 + 1 = 14.5; pool4 = BASE4 -> 13.5; pool2 -> 12.5; pool1 -> 9
    got = hcl([f], [torch.zeros_like(f)]).item()
    assert got == pytest.approx((14.5 + 13.5 / 2 + 12.5 / 4 + 9 / 8) / 1.875)
    assert got == pytest.approx(13.6)


def test_hcl_h14_formula_with_random_maps() -> None:
    g = torch.Generator().manual_seed(1)
    f, t = torch.randn(2, 3, 14, 14, generator=g), torch.randn(2, 3, 14, 14, generator=g)

    def m(s: int) -> float:
        return ((F.adaptive_avg_pool2d(f, s) - F.adaptive_avg_pool2d(t, s)) ** 2).mean().item()

    m0 = ((f - t) ** 2).mean().item()
    assert hcl([f], [t]).item() == pytest.approx((m0 + m(4) / 2 + m(2) / 4 + m(1) / 8) / 1.875, rel=1e-6)


def test_hcl_sums_levels_without_averaging() -> None:
    f1 = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    f2 = _map([[1, 2], [3, 6]])
    got = hcl([f2, BASE4, f1], [torch.zeros_like(f2), torch.zeros_like(BASE4), torch.zeros_like(f1)])
    assert got.item() == pytest.approx(17 / 1.5 + 88 / 7 + 5.0)


def test_hcl_constant_offset_gives_c_squared_per_level() -> None:
    teacher = _features(2, (3, 3, 3, 3, 3), RESNET_SPATIAL)
    student = [t + 0.5 for t in teacher]
    assert hcl(student, teacher).item() == pytest.approx(5 * 0.25, rel=1e-5)


def test_hcl_identical_inputs_give_zero() -> None:
    feats = _features(2, (3, 4, 5, 6, 7), RESNET_SPATIAL)
    assert hcl(feats, [f.clone() for f in feats]).item() == 0.0


def test_hcl_does_not_backpropagate_into_teacher() -> None:
    student = [torch.randn(2, 3, 4, 4, requires_grad=True)]
    teacher = [torch.randn(2, 3, 4, 4, requires_grad=True)]
    hcl(student, teacher).backward()
    assert teacher[0].grad is None
    assert student[0].grad is not None
    assert student[0].grad.abs().sum().item() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hcl_low_precision_inputs_give_float32(dtype: torch.dtype) -> None:
    f = (BASE4.expand(2, 3, 4, 4) / 4).to(dtype)  # exactly representable in both dtypes
    got = hcl([f], [torch.zeros_like(f)])
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(88 / 7 / 16, rel=1e-6)


# ---------------------------------------------------------------- clear errors


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"in_channels has 3 levels but out_channels has 2"):
        ReviewKDConnector((4, 8, 16), (8, 16), 6)
    with pytest.raises(ValueError, match=r"in_channels is empty"):
        ReviewKDConnector((), (), 6)
    with pytest.raises(ValueError, match=r"out_channels\[1\] = 0 is not a positive int"):
        ReviewKDConnector((4, 8), (8, 0), 6)
    with pytest.raises(ValueError, match=r"mid_channels = -1 is not a positive int"):
        ReviewKDConnector((4, 8), (8, 8), -1)


def test_forward_errors() -> None:
    conn = ReviewKDConnector((4, 8, 16), (8, 16, 32), 6)
    feats = _features(2, (4, 8, 16), (8, 4, 2))
    with pytest.raises(ValueError, match=r"got 2 features but the connector has 3 levels"):
        conn(feats[:2])
    bad = [*feats[:2], torch.randn(2, 32, 2, 2)]
    with pytest.raises(ValueError, match=r"features\[2\] has shape \(2, 32, 2, 2\) but level 2 expects \(B, 16"):
        conn(bad)


def test_abf_deeper_errors() -> None:
    with pytest.raises(ValueError, match=r"fuse=True\) needs the deeper"):
        ABF(2, 2, 2, fuse=True)(torch.randn(2, 2, 2, 2), None)
    with pytest.raises(ValueError, match=r"fuse=False\) is the deepest"):
        ABF(2, 2, 2, fuse=False)(torch.randn(2, 2, 2, 2), torch.randn(2, 2, 1, 1))


def test_hcl_errors() -> None:
    a, b = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"hcl level 1: student shape \(2, 3, 4, 4\) vs teacher shape \(2, 3, 2, 2\)"):
        hcl([a, a], [a, b])
    with pytest.raises(ValueError, match=r"2 student levels but 1 teacher levels"):
        hcl([a, a], [a])
    with pytest.raises(ValueError, match=r"no levels"):
        hcl([], [])


# ---------------------------------------------------------------- gradients


def test_backward_reaches_every_abf_parameter_and_the_inputs() -> None:
    torch.manual_seed(0)
    ins, outs = (4, 8, 8, 16, 16), (8, 8, 16, 16, 32)
    spatial = (16, 8, 4, 2, 1)
    conn = ReviewKDConnector(ins, outs, 8)
    feats = [f.requires_grad_() for f in _features(2, ins, spatial)]
    teacher = _features(2, outs, spatial, seed=1)
    hcl(conn(feats), teacher).backward()
    for name, p in conn.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum().item() > 0, name
    names = {name for name, _ in conn.named_parameters()}
    assert {f"abfs.{i}.att.weight" for i in range(4)} <= names
    assert not any(n.startswith("abfs.4.att") for n in names)
    for i, f in enumerate(feats):
        assert f.grad is not None, i
        assert f.grad.abs().sum().item() > 0, i
