"""Width-sliceable layers of the dynamic teacher.

Every layer here holds the dynamic teacher's (wide) tensors and runs in one of two modes:

* ``teacher``: the full width, with the rescalings of the IR rules (gpd_method.md 2.3-2.4);
* ``student``: the student slice of the same tensors (the first ``1/r`` of every widened dimension),
  times ``r`` where IR divided by ``r``. Nothing is copied: the student has no parameters of its own.

Channel layout is replica-major: student channel ``c`` of replica ``p`` sits at ``p * C + c``.

The mode is set by :meth:`gpd_ds.gpd.model.GPDModel.forward` for the duration of one call
(:func:`gpd_ds.gpd.mode.mode_scope`); calling a wide layer outside that scope is an error, never a silent default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers.padding import pad_same
from torch import Tensor, nn

from gpd_ds.gpd.mode import STUDENT, TEACHER, current_mode, paired_views


@dataclass(frozen=True)
class TensorSpec:
    """How one wide tensor relates to the student's tensor.

    dims: the widened dimensions (replica-major tiling along each).
    scaled: IR divided the tensor by r, so the student view multiplies its slice by r.
    noisy: IR adds symmetry-breaking noise to it (outside the student slice).
    """

    dims: tuple[int, ...]
    scaled: bool
    noisy: bool = True
    out_groups: int = 1  # dim 0 holds this many blocks, each widened on its own: [block][replica][C] (attention qkv)


def _grouped(t: Tensor, spec: TensorSpec) -> tuple[Tensor, tuple[int, ...]]:
    """``t`` with dim 0 split into (out_groups, rest) when grouped, and ``spec.dims`` shifted to match."""
    if spec.out_groups == 1:
        return t, spec.dims
    return t.reshape(spec.out_groups, -1, *t.shape[1:]), tuple(d + 1 for d in spec.dims)


def widen(t: Tensor, spec: TensorSpec, r: int) -> Tensor:
    """IR of one tensor: tile r times along ``spec.dims`` (replica-major), divide by r if scaled."""
    shape, (t, dims) = t.shape, _grouped(t, spec)
    for d in dims:
        t = torch.cat([t] * r, dim=d)
    t = t / r if spec.scaled else t.clone()
    return t.reshape(-1, *t.shape[2:]) if spec.out_groups > 1 and len(shape) else t


def narrow(t: Tensor, spec: TensorSpec, r: int) -> Tensor:
    """The student slice of a wide tensor: a view, no scaling (grouped: in the (groups, rest, ...) shape)."""
    t, dims = _grouped(t, spec)
    for d in dims:
        t = t.narrow(d, 0, t.shape[d] // r)
    return t


class _ScaledSlice(torch.autograd.Function):
    """``scale * wide[index]`` as one autograd node: its backward writes ``scale * grad`` into one zero tensor of
    the wide shape, where chained ``narrow`` and ``mul`` would build a zero-padded gradient per sliced dimension."""

    @staticmethod
    def forward(ctx, wide: Tensor, index: tuple[slice, ...], scale: float) -> Tensor:
        ctx.shape, ctx.index, ctx.scale = wide.shape, index, scale
        return wide[index] * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        out = grad.new_zeros(ctx.shape)
        out[ctx.index] = grad * ctx.scale
        return out, None, None


@dataclass(frozen=True)
class StudentSlice:
    """Where the student's value sits in one wide tensor, worked out once from its spec and shape (paired views)."""

    index: tuple[slice, ...]  # into the wide tensor, or into its grouped view
    grouped: tuple[int, ...] | None  # the (out_groups, rest, ...) view of a grouped tensor
    scale: int  # r where IR divided the tensor by r, else 1

    @staticmethod
    def of(shape: torch.Size, spec: TensorSpec, r: int) -> StudentSlice:
        grouped = (spec.out_groups, shape[0] // spec.out_groups, *shape[1:]) if spec.out_groups > 1 else None
        full, dims = grouped or tuple(shape), tuple(d + (grouped is not None) for d in spec.dims)
        index = tuple(slice(0, n // r) if d in dims else slice(None) for d, n in enumerate(full))
        return StudentSlice(index, grouped, r if spec.scaled else 1)

    def take(self, wide: Tensor) -> Tensor:
        view = (wide if self.grouped is None else wide.view(self.grouped))[self.index]
        view = view * self.scale if self.scale != 1 else view
        return view if self.grouped is None else view.reshape(-1, *view.shape[2:])

    def value(self, wide: Tensor) -> Tensor:
        """:meth:`take` as an autograd-tracked value of ``wide`` on its own (a scaled slice is one node)."""
        if self.scale == 1:
            return self.take(wide)
        view = _ScaledSlice.apply(wide if self.grouped is None else wide.view(self.grouped), self.index,
                                  float(self.scale))
        return view if self.grouped is None else view.reshape(-1, *view.shape[2:])

    def add_grad(self, teacher_grad: Tensor, student_grad: Tensor) -> None:
        target = (teacher_grad if self.grouped is None else teacher_grad.view(self.grouped))[self.index]
        target.add_(student_grad.view(target.shape), alpha=self.scale)


class _PairViews(torch.autograd.Function):
    """The teacher values (the whole tensors) and student values (slices, times r where scaled) of one layer's
    wide parameters as one autograd node. Autograd calls its backward once both modes' gradients have arrived
    (either may be missing), so each student gradient is added into its teacher gradient's slice in place.

    In place is safe because every wide layer feeds its tensors to conv, matmul, norm or elementwise ops, whose
    backward returns a fresh gradient that nothing else reads (tested against the unpaired path for every
    supported family, at batch 1 too).
    """

    @staticmethod
    def forward(ctx, slices: tuple[StudentSlice, ...], *wides: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.slices, ctx.shapes = slices, [w.shape for w in wides]
        return (*(w.view_as(w) for w in wides), *(s.take(w) for s, w in zip(slices, wides, strict=True)))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        n = len(ctx.slices)
        out = []
        for s, shape, teacher_grad, student_grad in zip(ctx.slices, ctx.shapes, grads[:n], grads[n:], strict=True):
            if student_grad is not None:
                if teacher_grad is None:
                    teacher_grad = student_grad.new_zeros(shape)
                s.add_grad(teacher_grad, student_grad)
            out.append(teacher_grad)
        return (None, *out)


def student_view(t: Tensor, spec: TensorSpec, r: int) -> Tensor:
    """The student's value of a wide tensor: its slice, times r where IR divided by r."""
    return StudentSlice.of(t.shape, spec, r).value(t)


class WideModule(nn.Module):
    """Base of every dynamic-teacher layer: wide tensors plus their :class:`TensorSpec`."""

    def __init__(self, width_ratio: int) -> None:
        super().__init__()
        self.width_ratio = width_ratio
        self.specs: dict[str, TensorSpec] = {}
        self.slices: dict[str, StudentSlice] = {}

    def register_wide(self, name: str, student_tensor: Tensor | None, spec: TensorSpec,
                      buffer: bool = False) -> None:
        """Register the IR-initialised wide copy of ``student_tensor`` as a parameter (or buffer)."""
        if student_tensor is None:
            self.register_parameter(name, None)
            return
        self.specs[name] = spec
        wide = widen(student_tensor.detach().float(), spec, self.width_ratio)
        self.slices[name] = StudentSlice.of(wide.shape, spec, self.width_ratio)
        if buffer:
            self.register_buffer(name, wide)
        else:
            self.register_parameter(name, nn.Parameter(wide))

    def teacher_tensors(self, *names: str) -> list[Tensor | None]:
        """The teacher's values of wide tensors (the tensors themselves). In a pair call the student's values are
        taken from the same autograd node (one per layer) and kept for the student pass."""
        wides = [getattr(self, name) for name in names]
        pairs = paired_views()
        if pairs is None:
            return wides
        paired = [i for i, w in enumerate(wides) if w is not None and w.requires_grad]
        if not paired:
            return wides
        views = _PairViews.apply(tuple(self.slices[names[i]] for i in paired), *(wides[i] for i in paired))
        for k, i in enumerate(paired):
            wides[i] = views[k]
            pairs[(self, names[i])] = views[len(paired) + k]
        return wides

    def student_tensor(self, name: str) -> Tensor | None:
        """The student's value of a wide tensor: its slice, times r where IR divided by r."""
        wide = getattr(self, name)
        if wide is None:
            return None
        pairs = paired_views()
        paired = None if pairs is None else pairs.pop((self, name), None)
        return paired if paired is not None else self.slices[name].value(wide)

    def mode_tensors(self, *names: str) -> list[Tensor | None]:
        """The values of wide tensors in the current mode: :meth:`teacher_tensors` or :meth:`student_tensor`."""
        if current_mode() == TEACHER:
            return self.teacher_tensors(*names)
        return [self.student_tensor(name) for name in names]

    @torch.no_grad()
    def add_noise(self, std: float) -> None:
        """Add N(0, std^2) to every noisy wide tensor outside its student slice.

        The student slice is left untouched so the student view stays bit-identical to the source
        student; the replicas still differ, which is all the noise is for (gpd_method.md 2.5).
        """
        for name, spec in self.specs.items():
            wide = getattr(self, name)
            if not spec.noisy or not spec.dims or not isinstance(wide, nn.Parameter):
                continue
            noise = torch.randn_like(wide) * std
            narrow(noise, spec, self.width_ratio).zero_()
            wide.add_(noise)

    def student_state(self) -> dict[str, Tensor]:
        """The plain student layer's state dict (same keys as the module this layer replaced)."""
        return {name: self.student_tensor(name).detach().clone() for name in self.specs}


def _dense_specs(in_expanded: bool, out_expanded: bool, grouped: bool, out_groups: int = 1
                 ) -> tuple[TensorSpec, TensorSpec]:
    """Specs of (weight, bias) of a conv or linear layer, weight laid out [out, in, ...].

    Dense (rule A/B/C): tile expanded dims, divide by r iff the output is widened.
    Grouped/depthwise (rule D): tile the output dim only, never divide (the forward rescales instead).
    ``out_groups``: the output holds that many blocks widened each on its own (attention's q, k, v).
    """
    if grouped:
        return TensorSpec((0,), scaled=False), TensorSpec((0,), scaled=False)
    dims = tuple(d for d, widened in ((0, out_expanded), (1, in_expanded)) if widened)
    bias_dims = (0,) if out_expanded else ()
    return (TensorSpec(dims, scaled=out_expanded, out_groups=out_groups),
            TensorSpec(bias_dims, scaled=out_expanded, out_groups=out_groups))


def _scaled(weight: Tensor, bias: Tensor | None, weight_scale: float, bias_scale: float
            ) -> tuple[Tensor, Tensor | None]:
    return weight * weight_scale, bias if bias is None or bias_scale == 1.0 else bias * bias_scale


class WideConv2d(WideModule):
    """Conv2d of the dynamic teacher (rules A, B and D).

    Teacher mode: a dense conv runs as is; a grouped conv runs with ``r * groups`` groups and its
    bias divided by r, which equals ``conv(r * x) / r`` without the two extra passes.
    """

    def __init__(self, conv: nn.Conv2d, width_ratio: int, in_expanded: bool, out_expanded: bool) -> None:
        super().__init__(width_ratio)
        self.copy_geometry(conv)
        w_spec, b_spec = _dense_specs(in_expanded, out_expanded, self.grouped)
        self.register_wide("weight", conv.weight, w_spec)
        self.register_wide("bias", conv.bias, b_spec)

    def copy_geometry(self, conv: nn.Conv2d) -> None:
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups
        self.grouped = conv.groups > 1

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, mode: str) -> Tensor:
        groups = self.groups
        if mode == TEACHER and self.grouped:
            groups *= self.width_ratio
            bias = None if bias is None else bias / self.width_ratio
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def forward(self, x: Tensor, scale: tuple[float, float] | None = None) -> Tensor:
        """``scale`` (:meth:`teacher_scaled`): the teacher-mode output with the weight and bias scaled."""
        if scale is not None:
            weight, bias = _scaled(*self.teacher_tensors("weight", "bias"), *scale)
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        mode = current_mode()
        if mode == TEACHER:
            return self.conv(x, *self.teacher_tensors("weight", "bias"), mode)
        return self.conv(x, self.student_tensor("weight"), self.student_tensor("bias"), mode)

    def teacher_scaled(self, x: Tensor, weight_scale: float, bias_scale: float) -> Tensor:
        """The teacher-mode output with the weight and bias scaled (a dense conv: ``scale * conv`` folded). Through
        the module's call, so its hooks run: ZeRO-3 gathers the parameters there (also when activation checkpointing
        recomputes the caller in backward)."""
        return self(x, scale=(weight_scale, bias_scale))

    def extra_repr(self) -> str:
        return (f"student={self.in_channels}->{self.out_channels}, k={self.kernel_size}, s={self.stride}, "
                f"groups={self.groups}, r={self.width_ratio}")


class WideConv2dSame(WideConv2d):
    """timm's ``Conv2dSame``: TF "same" padding computed from the input's spatial size (channels untouched), then
    the convolution."""

    def forward(self, x: Tensor, scale: tuple[float, float] | None = None) -> Tensor:
        return super().forward(pad_same(x, self.kernel_size, self.stride, self.dilation), scale)


class WideStdConv2d(WideConv2d):
    """timm's weight-standardised convolutions (``StdConv2d``, ``ScaledStdConv2d`` and their ``Same`` variants).

    Each output channel's weight is standardised over its ``in x k x k`` elements, which removes any scale: the
    wide weight is therefore tiled but never divided by r (its student slice is the student's weight exactly), and
    tiling along the input leaves each row's mean and variance unchanged, so the teacher's standardised weight is
    the student's, tiled. The teacher then divides it by r where the output is widened (a dense conv sums r input
    replicas at 1/r each, or reads the image): the invariant's 1/r. ``ScaledStdConv2d``'s ``gain`` is per output
    channel (tiled) and its ``scale`` stays the student's fan-in scale.
    """

    def __init__(self, conv: nn.Conv2d, width_ratio: int, in_expanded: bool, out_expanded: bool) -> None:
        WideModule.__init__(self, width_ratio)
        self.copy_geometry(conv)
        w_spec, b_spec = _dense_specs(in_expanded, out_expanded, self.grouped)
        self.register_wide("weight", conv.weight, TensorSpec(w_spec.dims, scaled=False))
        self.register_wide("bias", conv.bias, b_spec)
        gain = getattr(conv, "gain", None)
        self.register_wide("gain", gain, TensorSpec((0,), scaled=False, noisy=False))
        self.eps, self.scale = conv.eps, getattr(conv, "scale", None)
        self.same_pad = getattr(conv, "same_pad", False)
        self.divide = out_expanded and not self.grouped

    def standardised(self, weight: Tensor, gain: Tensor | None) -> Tensor:
        affine = None if gain is None else (gain * self.scale).view(-1)
        return F.batch_norm(weight.reshape(1, weight.shape[0], -1), None, None, weight=affine, training=True,
                            momentum=0.0, eps=self.eps).reshape_as(weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        mode = current_mode()
        names = ("weight", "bias", "gain") if "gain" in self.specs else ("weight", "bias")
        if mode == TEACHER:
            weight, bias, *gain = self.teacher_tensors(*names)
            weight = self.standardised(weight, gain[0] if gain else None)
            weight = weight / self.width_ratio if self.divide else weight
        else:
            weight, bias = self.standardised(self.student_tensor("weight"), self.student_tensor("gain")), \
                self.student_tensor("bias")
        return self.conv(x, weight, bias, mode)


class WideLinear(WideModule):
    """Linear of the dynamic teacher (rules A, B, C); no correction needed in either mode."""

    def __init__(self, linear: nn.Linear, width_ratio: int, in_expanded: bool, out_expanded: bool,
                 out_groups: int = 1) -> None:
        super().__init__(width_ratio)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w_spec, b_spec = _dense_specs(in_expanded, out_expanded, grouped=False, out_groups=out_groups)
        self.register_wide("weight", linear.weight, w_spec)
        self.register_wide("bias", linear.bias, b_spec)

    def forward(self, x: Tensor, scale: tuple[float, float] | None = None) -> Tensor:
        """``scale`` (:meth:`teacher_scaled`): the teacher-mode output with the weight and bias scaled."""
        if scale is not None:
            return F.linear(x, *_scaled(*self.teacher_tensors("weight", "bias"), *scale))
        if current_mode() == TEACHER:
            return F.linear(x, *self.teacher_tensors("weight", "bias"))
        return F.linear(x, self.student_tensor("weight"), self.student_tensor("bias"))

    def teacher_scaled(self, x: Tensor, weight_scale: float, bias_scale: float) -> Tensor:
        """The teacher-mode output with the weight and bias scaled, through the module's call (its hooks run: ZeRO-3
        gathers the parameters there, also when activation checkpointing recomputes the caller in backward)."""
        return self(x, scale=(weight_scale, bias_scale))

    def extra_repr(self) -> str:
        return f"student={self.in_features}->{self.out_features}, r={self.width_ratio}"


_AFFINE = TensorSpec((0,), scaled=False)


def _teacher_affine(weight: Tensor | None, bias: Tensor | None, width: int, scale: float, like: Tensor
                    ) -> tuple[Tensor, Tensor | None]:
    """Affine of a teacher-mode norm whose output is multiplied by ``scale`` (1/r, or 1 before an activation)."""
    if weight is None:
        weight = torch.ones(width, dtype=like.dtype, device=like.device)
    if scale == 1.0:
        return weight, bias
    return weight * scale, None if bias is None else bias * scale


class WideBatchNorm2d(WideModule):
    """BatchNorm2d (and timm BatchNormAct2d) of the dynamic teacher (rule E).

    The affine is shared; running statistics are separate per mode. Teacher mode computes
    ``BN(r * x) / r`` as ``BN(x)`` with eps / r^2 and affine / r, which is the same number with no
    extra passes; its running stats therefore live at the teacher's scale (the student's divided by
    r, variance by r^2). Student mode reads and updates only the ``student_*`` buffers.
    ``act`` and ``drop`` (from BatchNormAct2d) run after the norm; ``act`` is itself converted.
    """

    def __init__(self, bn: nn.BatchNorm2d, width_ratio: int, act: nn.Module | None = None,
                 drop: nn.Module | None = None) -> None:
        super().__init__(width_ratio)
        r = width_ratio
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.track_running_stats = bn.track_running_stats
        self.register_wide("weight", bn.weight, _AFFINE)
        self.register_wide("bias", bn.bias, _AFFINE)
        if bn.track_running_stats:
            mean, var = bn.running_mean.detach().float(), bn.running_var.detach().float()
            self.register_buffer("running_mean", mean.repeat(r) / r)
            self.register_buffer("running_var", var.repeat(r) / r**2)
            self.register_buffer("num_batches_tracked", bn.num_batches_tracked.detach().clone())
            self.register_buffer("student_running_mean", mean.clone())
            self.register_buffer("student_running_var", var.clone())
            self.register_buffer("student_num_batches_tracked", bn.num_batches_tracked.detach().clone())
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked", "student_running_mean",
                         "student_running_var", "student_num_batches_tracked"):
                self.register_buffer(name, None)
        self.drop = drop
        self.act = act

    def _norm(self, x: Tensor, mean: Tensor | None, var: Tensor | None, count: Tensor | None,
              weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            count.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(count)
        use_batch_stats = self.training or mean is None
        update = not self.training or self.track_running_stats
        return F.batch_norm(x, mean if update else None, var if update else None, weight, bias,
                            use_batch_stats, factor, eps)

    def forward(self, x: Tensor) -> Tensor:
        r = self.width_ratio
        if current_mode() == TEACHER:
            # A non-homogeneous activation needs act(r * y) / r: leave the norm's output at r * y (affine not
            # divided) and divide once after the activation, instead of dividing and multiplying back.
            fold = isinstance(self.act, WideActivation) and self.act.rescales
            weight, bias = _teacher_affine(*self.teacher_tensors("weight", "bias"), self.num_features * r,
                                           1.0 if fold else 1 / r, x)
            x = self._norm(x, self.running_mean, self.running_var, self.num_batches_tracked, weight, bias,
                           self.eps / r**2)
            if fold:
                if self.drop is not None:
                    x = self.drop(x)
                return self.act.act(x) / r
        else:
            x = self._norm(x, self.student_running_mean, self.student_running_var,
                           self.student_num_batches_tracked, self.student_tensor("weight"),
                           self.student_tensor("bias"), self.eps)
        return _drop_act(self, x)

    def student_state(self) -> dict[str, Tensor]:
        state = super().student_state()
        if self.track_running_stats:
            state["running_mean"] = self.student_running_mean.detach().clone()
            state["running_var"] = self.student_running_var.detach().clone()
            state["num_batches_tracked"] = self.student_num_batches_tracked.detach().clone()
        return state

    def extra_repr(self) -> str:
        return f"student={self.num_features}, eps={self.eps}, r={self.width_ratio}"


class WideLayerNorm(WideModule):
    """LayerNorm over channels (rule F): ``LN(r * x) / r`` computed as LN with eps / r^2, affine / r.

    ``channels_first`` handles timm's LayerNorm2d (NCHW input, normalised over C).
    """

    def __init__(self, ln: nn.LayerNorm, width_ratio: int, channels_first: bool) -> None:
        super().__init__(width_ratio)
        (self.num_features,) = ln.normalized_shape
        self.eps, self.channels_first = ln.eps, channels_first
        self.register_wide("weight", ln.weight, _AFFINE)
        self.register_wide("bias", ln.bias, _AFFINE)
        self.drop, self.act = getattr(ln, "drop", None), getattr(ln, "act", None)  # timm's LayerNormAct(2d)

    def forward(self, x: Tensor) -> Tensor:
        r = self.width_ratio
        if current_mode() == TEACHER:
            width, eps = self.num_features * r, self.eps / r**2
            weight, bias = _teacher_affine(*self.teacher_tensors("weight", "bias"), width, 1 / r, x)
        else:
            weight, bias = self.student_tensor("weight"), self.student_tensor("bias")
            width, eps = self.num_features, self.eps
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (width,), weight, bias, eps)
        return _drop_act(self, x.permute(0, 3, 1, 2) if self.channels_first else x)

    def extra_repr(self) -> str:
        return f"student={self.num_features}, eps={self.eps}, channels_first={self.channels_first}"


def _drop_act(norm: nn.Module, x: Tensor) -> Tensor:
    """The dropout and (already converted) activation that timm's norm-act layers run after the norm."""
    if norm.drop is not None:
        x = norm.drop(x)
    return x if norm.act is None else norm.act(x)


class WideGroupNorm(WideModule):
    """GroupNorm (and timm's GroupNorm, GroupNorm1) of the dynamic teacher: ``r * G`` groups, so that group
    ``p * G + g`` is student group ``g`` of replica ``p`` (replica-major), with eps / r^2 and affine / r like LayerNorm
    (rule F): ``GN(r * x) / r`` on each replica."""

    def __init__(self, gn: nn.GroupNorm, width_ratio: int) -> None:
        super().__init__(width_ratio)
        self.num_groups, self.num_channels, self.eps = gn.num_groups, gn.num_channels, gn.eps
        self.register_wide("weight", gn.weight, _AFFINE)
        self.register_wide("bias", gn.bias, _AFFINE)
        self.drop, self.act = getattr(gn, "drop", None), getattr(gn, "act", None)  # timm's GroupNormAct

    def forward(self, x: Tensor) -> Tensor:
        r = self.width_ratio
        if current_mode() == TEACHER:
            weight, bias = _teacher_affine(*self.teacher_tensors("weight", "bias"), self.num_channels * r, 1 / r, x)
            x = F.group_norm(x, self.num_groups * r, weight, bias, self.eps / r**2)
        else:
            x = F.group_norm(x, self.num_groups, self.student_tensor("weight"), self.student_tensor("bias"),
                             self.eps)
        return _drop_act(self, x)

    def extra_repr(self) -> str:
        return f"student={self.num_channels}, groups={self.num_groups}, eps={self.eps}, r={self.width_ratio}"


class WideActivation(nn.Module):
    """A non-homogeneous activation (rule G'): ``act(r * x) / r`` in teacher mode.

    ``gate=True`` is for a multiplicative gate (squeeze-excite): its output multiplies an activation
    that already carries the 1/r, so the gate itself must stay at scale 1: ``act(r * x)``.
    A clamp (ReLU6, Hardtanh) has the closed form ``clamp(r * x, lo, hi) / r = clamp(x, lo / r, hi / r)`` (exact
    for r = 2): the teacher clamps at scaled bounds, with no rescaling passes over the activations.
    """

    def __init__(self, act: nn.Module, width_ratio: int, gate: bool = False) -> None:
        super().__init__()
        self.act, self.width_ratio, self.gate = act, width_ratio, gate
        self.clamp = isinstance(act, nn.Hardtanh) and not gate

    @property
    def rescales(self) -> bool:
        """Whether teacher mode computes ``act(r * x) / r`` with rescaling passes (which a producer can fold)."""
        return not (self.gate or self.clamp)

    def forward(self, x: Tensor) -> Tensor:
        if current_mode() == STUDENT:
            return self.act(x)
        r = self.width_ratio
        if self.clamp:
            return F.hardtanh(x, self.act.min_val / r, self.act.max_val / r, self.act.inplace)
        y = self.act(x * r)
        return y if self.gate else y / r

    def extra_repr(self) -> str:
        return f"gate={self.gate}, clamp={self.clamp}, r={self.width_ratio}"


class WideStarReLU(WideModule):
    """MetaFormer's StarReLU ``s * relu(x)^2 + b`` (rule G'): ``act(r * x) / r`` in teacher mode. Its two scalars
    are shared by every channel, so they are neither widened nor divided: both modes read the same tensors."""

    def __init__(self, act: nn.Module, width_ratio: int) -> None:
        super().__init__(width_ratio)
        self.register_wide("scale", act.scale, TensorSpec((), scaled=False, noisy=False))
        self.register_wide("bias", act.bias, TensorSpec((), scaled=False, noisy=False))

    def forward(self, x: Tensor) -> Tensor:
        if current_mode() == TEACHER:
            r = self.width_ratio
            scale, bias = self.teacher_tensors("scale", "bias")
            return (scale * F.relu(x * r) ** 2 + bias) / r
        return self.student_tensor("scale") * F.relu(x) ** 2 + self.student_tensor("bias")


class WideAffine(WideModule):
    """HGNet's LearnableAffineBlock ``s * x + b`` after an activation, with scalars shared by every channel. In
    teacher mode ``x`` carries the 1/r, so the output must too: ``s * x + b / r``. Both scalars are one tensor for
    both modes (nothing to widen); the bias is stored as ``b / r`` (the teacher's) and read times r by the student.
    """

    def __init__(self, block: nn.Module, width_ratio: int) -> None:
        super().__init__(width_ratio)
        self.register_wide("scale", block.scale, TensorSpec((), scaled=False, noisy=False))
        self.register_wide("bias", block.bias, TensorSpec((), scaled=True, noisy=False))

    def forward(self, x: Tensor) -> Tensor:
        scale, bias = self.mode_tensors("scale", "bias")
        return scale * x + bias


class WideMlp(nn.Module):
    """timm's ``Mlp`` / ``ConvMlp`` (fc1, activation, dropout, fc2) of the dynamic teacher.

    Rule G' needs ``act(r * h) / r`` between fc1 and fc2; here the ``r`` is folded into fc1's weight and bias and
    the ``1 / r`` into fc2's weight: ``fc2'(act(fc1'(x)))`` with ``fc1' = r * fc1`` and ``fc2' = fc2 / r`` (bias
    unchanged). The same numbers and gradients, with weight-sized instead of activation-sized rescaling.
    """

    def __init__(self, fc1: nn.Module, act: WideActivation, drop1: nn.Module, fc2: nn.Module, drop2: nn.Module,
                 width_ratio: int) -> None:
        super().__init__()
        self.fc1, self.act, self.drop1, self.fc2, self.drop2 = fc1, act, drop1, fc2, drop2
        self.width_ratio = width_ratio

    def forward(self, x: Tensor) -> Tensor:
        if current_mode() == STUDENT:
            return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
        r = self.width_ratio
        h = self.drop1(self.act.act(self.fc1.teacher_scaled(x, r, r)))
        return self.drop2(self.fc2.teacher_scaled(h, 1.0 / r, 1.0))


class WideScale(WideModule):
    """Per-channel multiplicative scale, e.g. timm LayerScale (rule J): replicated, never scaled."""

    def __init__(self, gamma: Tensor, width_ratio: int, channels_first: bool, inplace: bool = False,
                 name: str = "gamma") -> None:
        super().__init__(width_ratio)
        self.channels_first, self.inplace, self.name = channels_first, inplace, name  # name: the source's key
        self.register_wide(name, gamma, TensorSpec((0,), scaled=False, noisy=False))

    def forward(self, x: Tensor) -> Tensor:
        name = self.name
        (gamma,) = self.mode_tensors(name)
        if self.channels_first:
            gamma = gamma.view(1, -1, 1, 1)
        return x.mul_(gamma) if self.inplace else x * gamma


class WidePatchMerging(nn.Module):
    """Swin's patch merging: 2 x 2 neighbours concatenated along channels (NHWC), then norm and reduction (v2:
    reduction and norm). The
    teacher keeps the concatenation replica-major (``[replica][neighbour][C]``), so each replica merges its own
    channels as the student does."""

    def __init__(self, norm: nn.Module, reduction: nn.Module, width_ratio: int, norm_last: bool = False) -> None:
        super().__init__()
        self.norm, self.reduction, self.width_ratio = norm, reduction, width_ratio
        self.norm_last = norm_last  # Swin-v2 reduces, then normalises

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        _, height, width, _ = x.shape
        if current_mode() == TEACHER:
            r = self.width_ratio
            x = x.reshape(batch, height // 2, 2, width // 2, 2, r, channels // r).permute(0, 1, 3, 5, 4, 2, 6)
        else:
            x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 4, 2, 5)
        x = x.flatten(3)
        return self.norm(self.reduction(x)) if self.norm_last else self.reduction(self.norm(x))


class StudentView(nn.Module):
    """Parametrization for a raw parameter of a container module (pos_embed, cls_token, gamma...).

    Registered with ``torch.nn.utils.parametrize`` so the owning module's own forward reads the wide
    tensor in teacher mode and the (scaled) student slice in student mode.
    """

    def __init__(self, spec: TensorSpec, width_ratio: int) -> None:
        super().__init__()
        self.spec, self.width_ratio = spec, width_ratio

    def forward(self, wide: Tensor) -> Tensor:
        return wide if current_mode() == TEACHER else student_view(wide, self.spec, self.width_ratio)
