"""Gradient, BatchNorm and branch invariants of the GPD model (gpd_method.md section 8)."""

from __future__ import annotations

import collections
import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpd_ds.gpd import expand, extract
from gpd_ds.gpd.branches import WideBranchConv2d
from gpd_ds.gpd.layers import WideBatchNorm2d, WideConv2d, WideModule, narrow
from gpd_ds.gpd.mode import mode_scope
from gpd_ds.gpd.model import GPDModel
from gpd_ds.losses import GPDLoss, soft_cross_entropy
from gpd_ds.models import create_model
from tests.helpers import NUM_CLASSES, images, make_student

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

GRAD_FAMILIES = ["torchvision:resnet18", "mobilenetv2_100", "deit_tiny_patch16_224"]


def _wide_tensors(model: GPDModel):
    """(label, wide tensor, spec) for every tensor with a student slice."""
    for path, m in model.net.named_modules():
        if isinstance(m, WideModule):
            for name, spec in m.specs.items():
                yield f"{path}.{name}", getattr(m, name), spec
    for path, name, spec in model.raw_parameters:
        yield f"{path}.{name}", model.net.get_submodule(path).parametrizations[name].original, spec


def _assert_zero_outside_slices(model: GPDModel) -> None:
    checked = 0
    for label, wide, spec in _wide_tensors(model):
        if wide.grad is None or not spec.dims:
            continue
        outside = wide.grad.clone()
        narrow(outside, spec, model.width_ratio).zero_()
        assert outside.abs().max().item() == 0.0, f"{label}: gradient outside the student slice"
        checked += 1
    assert checked > 5


@pytest.mark.parametrize("name", GRAD_FAMILIES)
def test_student_loss_has_zero_gradient_outside_its_slice(name: str) -> None:
    model = expand(make_student(name)).train()
    model(images(name), mode="student").square().mean().backward()
    _assert_zero_outside_slices(model)


@pytest.mark.parametrize("name", GRAD_FAMILIES)
def test_sce_term_is_stopped_at_the_dynamic_teacher(name: str) -> None:
    model = expand(make_student(name)).train()
    out = model(images(name), mode="both")
    soft_cross_entropy(out.student, out.teacher).backward()
    _assert_zero_outside_slices(model)


def test_student_gradient_is_r_times_plain_gradient_for_dense_and_1_otherwise() -> None:
    model = expand(make_student("torchvision:resnet18"), noise_std=0.0).train()
    plain = extract(model).train()
    x, y = images("torchvision:resnet18"), torch.arange(4) % NUM_CLASSES
    F.cross_entropy(model(x, mode="student"), y).backward()
    F.cross_entropy(plain(x), y).backward()
    r = model.width_ratio
    cases = {"conv1": ("weight", r), "layer1.0.conv2": ("weight", r), "layer2.0.downsample.0": ("weight", r),
             "bn1": ("weight", 1), "layer3.1.bn2": ("bias", 1), "fc": ("weight", 1)}
    for path, (name, factor) in cases.items():
        wide = model.net.get_submodule(path)
        slice_grad = narrow(getattr(wide, name).grad, wide.specs[name], r)
        expected = factor * getattr(plain.get_submodule(path), name).grad
        torch.testing.assert_close(slice_grad, expected, rtol=1e-4, atol=1e-7, msg=path)


def _loss_parts(out, y, static, loss_fn):
    terms = loss_fn(out.student, out.teacher, y, static).terms
    teacher = terms["ce_dynamic_teacher"] + terms["kd_static_to_dynamic_teacher"]
    student = terms["ce_student"] + terms["kd_static_to_student"] + 3 * terms["sce_dynamic_to_student"]
    return teacher, student


def test_one_backward_of_the_sum_equals_two_accumulated_backwards() -> None:
    name = "torchvision:resnet18"
    torch.manual_seed(0)
    one = expand(make_student(name)).train()
    two = copy.deepcopy(one)
    x, y = images(name), torch.tensor([1, 2, 3, 4])
    static = torch.randn(4, NUM_CLASSES)
    loss_fn = GPDLoss(kd="dkd")

    out = one(x, mode="both")
    total = loss_fn(out.student, out.teacher, y, static).total
    total.backward()

    teacher_logits = two(x, mode="teacher")
    l_t = loss_fn.static_kd(teacher_logits, static, y) + F.cross_entropy(teacher_logits, y)
    l_t.backward()
    student_logits = two(x, mode="student")
    l_s = (F.cross_entropy(student_logits, y) + loss_fn.static_kd(student_logits, static, y)
           + 3 * soft_cross_entropy(student_logits, teacher_logits))
    l_s.backward()

    torch.testing.assert_close(total, l_t + l_s)
    for (n, p1), (_, p2) in zip(one.named_parameters(), two.named_parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_replicas_differ_after_one_step() -> None:
    model = expand(make_student("torchvision:resnet18"), noise_std=0.0).train()
    conv = model.net.get_submodule("layer1.0.conv1")
    co, ci = conv.out_channels, conv.in_channels
    assert torch.equal(conv.weight[:co, :ci], conv.weight[co:, ci:])  # symmetric before training
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(images("torchvision:resnet18"), mode="both")
    GPDLoss(kd="none")(out.student, out.teacher, torch.tensor([0, 1, 2, 3])).total.backward()
    opt.step()
    assert not torch.equal(conv.weight[:co, :ci], conv.weight[co:, ci:])


def test_batchnorm_buffers_are_isolated_per_mode() -> None:
    model = expand(make_student("torchvision:resnet18")).train()
    bn = model.net.get_submodule("layer1.0.bn1")
    assert isinstance(bn, WideBatchNorm2d)
    teacher_stats = ("running_mean", "running_var")
    student_stats = ("student_running_mean", "student_running_var")

    def snapshot():
        return {n: getattr(bn, n).clone() for n in teacher_stats + student_stats}

    x = images("torchvision:resnet18")
    before = snapshot()
    with torch.no_grad():
        model(x, mode="teacher")
    after = snapshot()
    assert all(not torch.equal(before[n], after[n]) for n in teacher_stats)
    assert all(torch.equal(before[n], after[n]) for n in student_stats)

    with torch.no_grad():
        model(x, mode="student")
    final = snapshot()
    assert all(torch.equal(after[n], final[n]) for n in teacher_stats)
    assert all(not torch.equal(after[n], final[n]) for n in student_stats)

    model.eval()
    with torch.no_grad():
        model(x, mode="both")
    assert all(torch.equal(final[n], v) for n, v in snapshot().items())


def test_branch_block_with_origin_only_init_equals_the_source_conv() -> None:
    student = make_student("torchvision:resnet18")
    model = expand(student, branches=True, pretrained_student=True, noise_std=0.0)
    blocks = {p: m for p, m in model.net.named_modules() if isinstance(m, WideBranchConv2d)}
    assert len(blocks) == 13  # the stride-1 3x3 convs of the residual blocks
    for path, block in blocks.items():
        assert torch.equal(block.student_state()["weight"], student.get_submodule(path).weight), path
    # the merged kernel is what the block convolves with, in both modes
    block = blocks["layer2.1.conv1"]
    x = torch.randn(2, 2 * block.in_channels, 8, 8)
    with torch.no_grad(), mode_scope("teacher"):
        expected = F.conv2d(x, block.branch_kernel("teacher"), None, 1, 1)
        torch.testing.assert_close(block(x), expected)


def test_new_branch_kernels_follow_the_reference_init() -> None:
    """The added branch kernels are Kaiming-uniform with a=0, as the reference's: bound sqrt(6 / fan_in), std
    sqrt(2 / fan_in) (PyTorch's conv default a=sqrt(5) would give 1/sqrt(3) of that std)."""
    from gpd_ds.gpd.branches import branch_tensors

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False)
    tensors = branch_tensors(conv, pretrained_student=False)
    for name in ("avg", "prior", "post", "extra", "dw", "pw"):
        t = tensors[name]
        fan_in = t[0].numel()
        bound = math.sqrt(6 / fan_in)
        assert t.abs().max() <= bound, name
        assert t.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02), name
    assert torch.equal(tensors["origin"], conv.weight)
    assert not tensors["pre"].any()


def test_branches_convert_depthwise_convs_of_mobilenet() -> None:
    model = expand(make_student("mobilenetv1_100"), branches=True)
    blocks = [m for m in model.modules() if isinstance(m, WideBranchConv2d)]
    assert blocks
    assert all(b.groups == b.in_channels for b in blocks)
    plain_convs = [m for m in model.modules() if type(m) is WideConv2d and m.kernel_size == (3, 3)
                   and m.stride == (1, 1)]
    assert not plain_convs


@pytest.mark.parametrize(("branches", "student_m", "teacher_m"), [(False, 11.69, 45.69), (True, 42.33, 167.79)])
def test_parameter_counts_match_the_reference(branches: bool, student_m: float, teacher_m: float) -> None:
    model = expand(create_model("torchvision:resnet18"), branches=branches, verify=False)
    assert round(model.num_parameters("student") / 1e6, 2) == student_m
    assert round(model.num_parameters("teacher") / 1e6, 2) == teacher_m


def test_vit_teacher_has_twice_the_heads_at_the_same_head_dim() -> None:
    model = expand(make_student("deit_tiny_patch16_224"))
    attn = model.net.blocks[0].attn
    assert attn.num_heads == 3
    assert attn.head_dim == 64
    assert attn.qkv.weight.shape == (2 * 3 * 192, 2 * 192)
    assert model.net.head.weight.shape == (NUM_CLASSES, 2 * 192)
    assert model.net.parametrizations.pos_embed.original.shape[-1] == 2 * 192


def _graph_node_names(root: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [root.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize(("name", "branches"), [("resnet18", True), ("mobilenetv2_100", False),
                                                ("efficientnet_b0", False), ("convnext_atto", False),
                                                ("deit_tiny_patch16_224", False)])
@pytest.mark.parametrize("batch", [1, 2])
def test_paired_views_give_the_same_gradients_as_separate_views(name: str, branches: bool, batch: int) -> None:
    """mode="both" takes each tensor's two views from one node and accumulates the student's gradient in place; the
    gradients must be those of separate views, bit for bit, also at batch 1 (where a reduction can be a no-op)."""
    model = expand(make_student(name), branches=branches).train()
    if name.startswith(("resnet", "mobilenet", "efficientnet")):
        batch += 1  # train-mode BatchNorm needs two values per channel at the 1x1 end
    x = images(name, batch=batch)
    grads = {}
    for paired in (True, False):
        model.paired_views = paired
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same drop-path masks in both runs
        out = model(x, mode="both")
        loss = out.teacher.square().mean() + out.student.pow(3).mean() + (out.teacher * out.student).mean()
        assert ("_PairViewsBackward" in _graph_node_names(loss)) == paired
        loss.backward()
        grads[paired] = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads[True].values())
    for n, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][n], rtol=0, atol=0, msg=n)


def test_paired_views_are_off_without_grad_and_leave_no_state() -> None:
    from gpd_ds.gpd.mode import paired_views

    model = expand(make_student("deit_tiny_patch16_224")).train()
    with torch.no_grad():
        out = model(images("deit_tiny_patch16_224"), mode="both")
    assert out.teacher.grad_fn is None
    assert paired_views() is None
    out = model(images("deit_tiny_patch16_224"), mode="both")
    assert "_PairViewsBackward" in _graph_node_names(out.student.sum())
    assert paired_views() is None


@pytest.mark.parametrize("act", [torch.nn.ReLU6(), torch.nn.Hardtanh(-0.5, 2.0)])
def test_teacher_clamp_activation_uses_scaled_bounds_exactly(act: torch.nn.Module) -> None:
    """ReLU6/Hardtanh in teacher mode clamp at bounds / r: the same numbers as act(r x) / r (bitwise for r = 2), with
    no rescaling passes (and the BatchNorm before it not folded)."""
    from gpd_ds.gpd.layers import WideActivation
    from gpd_ds.gpd.mode import TEACHER

    wide = WideActivation(act, width_ratio=2)
    assert wide.clamp
    assert not wide.rescales
    x = torch.randn(4, 8, 5, 5) * 4
    with mode_scope(TEACHER):
        got = wide(x.clone())
    torch.testing.assert_close(got, act(x * 2) / 2, rtol=0, atol=0)
    assert not WideActivation(act, width_ratio=2, gate=True).clamp


def _activation_sized_ops(fn, batch: int) -> collections.Counter:
    from op_count import OpCounter  # bench/op_count.py: the benchmark's own counter

    with OpCounter(batch) as counter:
        fn()
    return collections.Counter({name: n for (name, size), n in counter.counts.items() if size == "act"})


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenetv1_100", "mobilenetv2_100", "convnext_atto",
                                  "deit_tiny_patch16_224"])
def test_gpd_pass_runs_no_more_activation_sized_ops_than_two_plain_models(name: str) -> None:
    """Forward + backward of both GPD modes dispatch no more operators over activations than the plain student's
    forward + backward twice (a plain twice-wide model has the same operators): the IR rescalings are folded into
    weights, norm affines and clamp bounds, never paid as passes over activations (bench/op_count.py; on a GPU such
    a pass costs as much as the activation itself). Not for SiLU/Hardswish families: act(r x) / r there takes one
    extra pass per activation, by design."""
    batch = 11  # no layer width of these models is a multiple of 11, every activation's batch (or token) dim is
    student = make_student(name).train()
    model = expand(copy.deepcopy(student), branches=False).train()
    x = images(name, batch=batch)

    def gpd() -> None:
        out = model(x, mode="both")
        (out.teacher.sum() + out.student.sum()).backward()

    plain = _activation_sized_ops(lambda: student(x).sum().backward(), batch)
    got = _activation_sized_ops(gpd, batch)
    assert sum(got.values()) <= 2 * sum(plain.values()), {
        op: (got[op], 2 * plain[op]) for op in got.keys() | plain.keys() if got[op] != 2 * plain[op]}


def test_replica_divergence_is_the_noise_at_ir_and_measures_moved_replicas() -> None:
    from gpd_ds.gpd.layers import TensorSpec
    from gpd_ds.gpd.model import _replica_blocks

    torch.manual_seed(0)
    model = expand(create_model("resnet18", num_classes=10), input_size=(3, 32, 32), noise_std=0.0, verify=False)
    assert model.replica_divergence() == 0.0  # IR without noise: every replica equal
    # a (4, 2) tensor widened on both dims at r = 2 has four blocks, each one of the 2x1 corners
    t = torch.arange(8.0).reshape(4, 2)
    blocks = _replica_blocks(t, TensorSpec(dims=(0, 1), scaled=False), 2)
    assert blocks.tolist() == [[0.0, 2.0], [1.0, 3.0], [4.0, 6.0], [5.0, 7.0]]
    with torch.no_grad():  # move one replica of one wide tensor: the measure sees it
        wide = next(p for p in model.parameters() if p.ndim == 4)
        wide[: wide.shape[0] // 2].mul_(1.5)
    assert model.replica_divergence() > 1e-3
