"""Functional operations in a block's own forward, in the dynamic teacher (design: docs/ir_functional_ops.md).

* Channel concat / split / chunk: recorded in the student, decided per call site by measuring the teacher's sizes
  once, then run replica-aware in teacher mode: each tensor viewed as ``(..., r, S, ...)`` along the widened
  dimension, the same op one dimension further in, the result viewed back. Only the modules that own such a call
  get hooks; other families run exactly as before.
* Non-homogeneous functions applied in a block's own forward to a tensor derived from the input (``sigmoid``,
  ``softmax``, functional norms, ...): found in the student's trace, refused before any conversion.
* Diagnostics: the module stack while a forward runs, to name where a teacher pass failed or first disagreed.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from gpd_ds.errors import UserInputError
from gpd_ds.gpd.mode import STUDENT, TEACHER, current_mode, mode_scope


class UnsupportedModelError(UserInputError, ValueError):
    """The student contains a module or an operation IR has no rule for (raised while expanding or tracing it)."""

# The channel ops, by the function object a TorchFunctionMode sees: torch.split is a Python function, x.split a
# Tensor method, x.chunk / torch.cat C functions.
CAT, SPLIT, SLICE = "cat", "split", "slice"
_CHANNEL_OPS: dict[Callable, str] = {
    torch.cat: CAT, torch.concat: CAT, torch.concatenate: CAT,
    torch.split: SPLIT, torch.Tensor.split: SPLIT, torch.Tensor.split_with_sizes: SPLIT,
    torch.split_with_sizes: SPLIT, torch.chunk: SPLIT, torch.Tensor.chunk: SPLIT,
}
# Along a widened dimension these cut across replicas and have no replica-aware form here: refused.
_UNCOVERED_SPLITS: dict[Callable, str] = {
    torch.unbind: "unbind", torch.Tensor.unbind: "unbind", torch.tensor_split: "tensor_split",
    torch.Tensor.tensor_split: "tensor_split",
}
# Not positively homogeneous: teacher mode would need f(r x) / r (or f(r x) for a gate), which only the module's
# author knows. Matched by name, so the torch.*, Tensor.* and F.* spellings are all caught.
NON_HOMOGENEOUS = frozenset({
    "sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax", "gelu", "silu", "mish", "hardswish",
    "hardsigmoid", "elu", "selu", "celu", "softplus", "exp", "exp_", "log", "sqrt", "rsqrt", "reciprocal",
    "normalize", "layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm", "relu6", "hardtanh",
    "erf", "logsigmoid", "scaled_dot_product_attention",
})
# Products (and quotients) of two input-derived tensors: 1/r^2 (or 1) where the invariant wants 1/r.
_PRODUCTS = frozenset({"mul", "mul_", "__mul__", "__rmul__", "matmul", "__matmul__", "bmm", "einsum", "baddbmm",
                       "div", "div_", "__truediv__", "true_divide"})


def _name(func: Callable) -> str:
    return getattr(func, "__name__", str(func))


def _tensors(obj: object) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _dim(func: Callable, args: tuple, kwargs: dict) -> int:
    """The ``dim`` argument of a channel op, non-negative."""
    kind = _CHANNEL_OPS.get(func)
    first = args[0] if args else kwargs.get("tensors", kwargs.get("input"))
    ndim = first[0].ndim if kind == CAT else first.ndim
    position = 1 if kind == CAT else 2
    dim = args[position] if len(args) > position else kwargs.get("dim", kwargs.get("axis", 0))
    return dim % ndim


def site_key(path: str, kind: str, dim: int, tensor: Tensor) -> tuple[str, str, int, int]:
    """A channel-op call site: the module running it, the op, its dim and the tensor's rank (so a concat along dim
    1 of NCHW maps and one along dim 1 of (B, N, C) tokens in the same forward are told apart)."""
    return path, kind, dim, tensor.ndim


class ModuleStack:
    """Which module is executing, from pre/post forward hooks on ``modules`` (path -> module)."""

    def __init__(self, modules: dict[str, nn.Module], unwind: bool = True) -> None:
        self.stack: list[tuple[str, nn.Module]] = []
        self.modules, self.unwind = modules, unwind  # unwind=False: after an error the stack shows where it was
        self.handles: list = []

    def __enter__(self) -> ModuleStack:
        stack = self.stack

        def pop(m: nn.Module, args: tuple, out: object) -> None:
            if stack and stack[-1][1] is m:
                stack.pop()

        # closures, not bound methods: a deepcopy of the model (an EMA) keeps sharing this one stack
        for path, m in self.modules.items():
            self.handles.append(m.register_forward_pre_hook(self._push(path)))
            self.handles.append(m.register_forward_hook(pop, always_call=self.unwind))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _push(self, path: str) -> Callable:
        stack = self.stack

        def hook(m: nn.Module, args: tuple) -> None:
            stack.append((path, m))
        return hook

    @property
    def top(self) -> tuple[str, nn.Module] | None:
        return self.stack[-1] if self.stack else None


@dataclass
class StudentTrace:
    """What the student's forward did between its modules."""

    # site_key -> the student's sizes along dim at each call (a list per call)
    sites: dict[tuple[str, str, int, int], list[list[int]]] = field(default_factory=dict)
    # the first non-homogeneous function on an input-derived tensor outside the covered modules
    refusal: tuple[str, nn.Module, str] | None = None
    # (module path) -> products of two input-derived tensors in its own forward (for diagnostics)
    products: dict[str, int] = field(default_factory=dict)


class _Tracer(TorchFunctionMode):
    """Records channel ops and flags non-homogeneous functions on input-derived ("tainted") tensors."""

    def __init__(self, stack: ModuleStack, covered: Callable[[nn.Module], bool], probe: Tensor) -> None:
        super().__init__()
        self.stack, self.covered, self.trace = stack, covered, StudentTrace()
        # id -> weak reference: an id alone could be reused by a later tensor; keeping the tensors alive would hold
        # every activation of the trace
        self.tainted = {id(probe): weakref.ref(probe)}

    def _is_tainted(self, t: Tensor) -> bool:
        ref = self.tainted.get(id(t))
        return ref is not None and ref() is t

    def _uncovered(self) -> tuple[str, nn.Module] | None:
        """The innermost executing module, unless it or an ancestor on the stack has an IR rule."""
        if any(self.covered(m) for _, m in self.stack.stack):
            return None
        return self.stack.top or ("", None)

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        inputs = [t for t in _tensors((args, kwargs)) if self._is_tainted(t)]
        out = func(*args, **kwargs)
        if not inputs:
            return out
        for t in _tensors(out):
            self.tainted[id(t)] = weakref.ref(t)
        where = self._uncovered()
        if where is None:
            return out
        path, module = where
        site, name = channel_site(func, args, kwargs), _name(func)
        if site is not None:
            kind, dim, tensors = site
            self.trace.sites.setdefault(site_key(path, kind, dim, tensors[0]), []).append(
                [t.shape[dim] for t in tensors])
        elif name in NON_HOMOGENEOUS and self.trace.refusal is None:
            self.trace.refusal = (path, module, f"{name}() on an activation in its own forward")
        elif name in _PRODUCTS and len(inputs) > 1:
            self.trace.products[path] = self.trace.products.get(path, 0) + 1
        return out


def _dim_plain(args: tuple, kwargs: dict) -> int:
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    return dim % args[0].ndim


def _slice_dim(tensor: Tensor, index: object) -> tuple[int, slice] | None:
    """``(dim, slice)`` where ``tensor[index]`` is a slice along one dimension (``x[:, :c]``, ``x[..., a:b]``)."""
    items = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) or i is Ellipsis for i in items) or sum(i is Ellipsis for i in items) > 1:
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + (slice(None),) * (tensor.ndim - len(items) + 1) + items[at + 1:]
    cut = [(d, i) for d, i in enumerate(items) if i != slice(None)]
    return cut[0] if len(cut) == 1 else None


def channel_site(func: Callable, args: tuple, kwargs: dict) -> tuple[str, int, list[Tensor]] | None:
    """(op kind, dim, the tensors cut or joined) of a call that may act along channels, else None."""
    if func in _CHANNEL_OPS:
        kind = _CHANNEL_OPS[func]
        tensors = list(args[0] if args else kwargs["tensors"]) if kind == CAT else [args[0]]
        return kind, _dim(func, args, kwargs), tensors
    if func in _UNCOVERED_SPLITS:
        return _UNCOVERED_SPLITS[func], _dim_plain(args, kwargs), [args[0]]
    if func is Tensor.__getitem__ and isinstance(args[0], Tensor):
        cut = _slice_dim(args[0], args[1])
        return (SLICE, cut[0], [args[0]]) if cut else None
    return None


def trace_student(student: nn.Module, probe: Tensor, covered: Callable[[nn.Module], bool]
                  ) -> tuple[Tensor, StudentTrace]:
    """Run the plain student once (no grad) and record what its blocks do between their modules."""
    with ModuleStack(dict(student.named_modules())) as stack, torch.no_grad(), \
            _Tracer(stack, covered, probe) as tracer:
        logits = student(probe)
    return logits, tracer.trace


class _ReplicaOps(TorchFunctionMode):
    """Teacher mode: channel ops of the decided call sites run replica-aware; everything else passes through.

    ``decide`` (calibration) instead compares the teacher's sizes with the student's and records the decision.
    """

    def __init__(self, stack: ModuleStack, channel: ChannelOps, calibrate: bool = False) -> None:
        super().__init__()
        self.stack, self.channel, self.calibrate = stack, channel, calibrate

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        top = self.stack.top
        site = None if top is None or current_mode() != TEACHER else channel_site(func, args, kwargs)
        if site is None:
            return func(*args, **kwargs)
        kind, dim, tensors = site
        key = site_key(top[0], kind, dim, tensors[0])
        if self.calibrate:
            self.channel.decide(key, top[1], tensors, kind, dim)
        if key not in self.channel.wide:
            return func(*args, **kwargs)
        return _replica_aware(func, kind, args, kwargs, dim, self.channel.width_ratio)


def _replica_aware(func: Callable, kind: str, args: tuple, kwargs: dict, dim: int, r: int) -> object:
    """``func`` on the view that exposes the replicas of ``dim``: ``(..., r * S, ...) -> (..., r, S, ...)``."""
    if kind == CAT:
        parts = [t.unflatten(dim, (r, -1)) for t in args[0]]
        return torch.cat(parts, dim + 1).flatten(dim, dim + 1)
    if kind == SLICE:
        view = args[0].unflatten(dim, (r, -1))
        return view[(slice(None),) * (dim + 1) + (_slice_dim(args[0], args[1])[1],)].flatten(dim, dim + 1)
    tensor, size = args[0], args[1] if len(args) > 1 else kwargs.get(
        "split_size_or_sections", kwargs.get("split_size", kwargs.get("split_sizes", kwargs.get("chunks"))))
    chunk = func in (torch.chunk, torch.Tensor.chunk)
    view = tensor.unflatten(dim, (r, -1))
    pieces = torch.chunk(view, size, dim + 1) if chunk else torch.split(view, size, dim + 1)
    return tuple(p.flatten(dim, dim + 1) for p in pieces)


class ChannelOps:
    """The channel-op call sites of one dynamic teacher and the hooks that run them replica-aware."""

    def __init__(self, student_sites: dict[tuple[str, str, int, int], list[list[int]]], width_ratio: int) -> None:
        self.student_sites, self.width_ratio = student_sites, width_ratio
        self.wide: set[tuple[str, str, int, int]] = set()
        self.plain: set[tuple[str, str, int, int]] = set()
        self.handles: list = []

    def __bool__(self) -> bool:
        return bool(self.student_sites)

    def decide(self, key: tuple[str, str, int, int], module: nn.Module, tensors: list[Tensor], kind: str,
               dim: int) -> None:
        teacher = [t.shape[dim] for t in tensors]
        student = self.student_sites.get(key)
        where = f"module '{key[0] or '<root>'}' ({type(module).__module__}.{type(module).__qualname__})"
        if student is None:
            return  # not a call of the student's blocks (a wide layer's own op): left as it is
        is_wide = any(teacher == [n * self.width_ratio for n in sizes] for sizes in student)
        is_plain = any(teacher == sizes for sizes in student)
        if is_wide and kind not in (CAT, SPLIT, SLICE):
            raise UnsupportedModelError(f"cannot expand the student: {where} calls {kind}() along its channel "
                                        f"dimension {dim}, which cuts across the dynamic teacher's replicas; only "
                                        "cat/concat, split, chunk and slices along channels are supported")
        if is_wide == is_plain or (is_wide and key in self.plain) or (is_plain and key in self.wide):
            raise UnsupportedModelError(f"cannot expand the student: {where} calls {kind} along dim {dim} both "
                                        f"along channels and along another dimension (teacher sizes {teacher}, "
                                        f"student sizes {student}); IR cannot tell them apart")
        (self.wide if is_wide else self.plain).add(key)

    @contextlib.contextmanager
    def calibrating(self, net: nn.Module) -> Iterator[None]:
        """Inside: a teacher pass decides every recorded call site (plain or replica-aware)."""
        with ModuleStack(dict(net.named_modules())) as stack, _ReplicaOps(stack, self, calibrate=True):
            yield

    def install(self, net: nn.Module) -> None:
        """Hooks that enter the replica-aware mode around the modules owning a wide call site (teacher mode only).
        Every module inside them is tracked too, so each op is attributed to the module that runs it, as in
        calibration."""
        self.remove()
        wide_owners = {key[0] for key in self.wide}
        if not wide_owners:
            return
        stack = ModuleStack({p: m for p, m in net.named_modules()
                             if any(p == o or p.startswith(o + ".") for o in wide_owners)})
        stack.__enter__()
        self.handles.append(stack)
        mode = _ReplicaOps(stack, self)
        depth = [0]

        def enter(m: nn.Module, args: tuple) -> None:
            if depth[0] == 0 and _teacher():
                mode.__enter__()
                depth[0] = 1
            elif depth[0]:
                depth[0] += 1

        def leave(m: nn.Module, args: tuple, out: object) -> None:
            if depth[0] == 1:
                mode.__exit__(None, None, None)
            if depth[0]:
                depth[0] -= 1

        for path, m in net.named_modules():
            if path in wide_owners:
                self.handles.append(m.register_forward_pre_hook(enter))
                self.handles.append(m.register_forward_hook(leave, always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            if isinstance(h, ModuleStack):
                h.__exit__()
            else:
                h.remove()
        self.handles.clear()

    def describe(self) -> list[str]:
        return sorted(f"{p or '<root>'}: {k} along dim {d}" for p, k, d, _ in self.wide)


def _teacher() -> bool:
    try:
        return current_mode() == TEACHER
    except RuntimeError:
        return False


@torch.no_grad()
def first_disagreement(net: nn.Module, probe: Tensor, width_ratio: int, skip: Iterable[str] = (),
                       rtol: float = 1e-4) -> tuple[str, nn.Module, float] | None:
    """The first module (in the order modules finish) that turns a right input into a wrong output: its teacher-mode
    output is not the student-mode output tiled ``r`` times at ``1/r`` along one dimension (or equal, where the
    output is not widened), while its teacher-mode input is."""
    # per mode, in finishing order: (path, first input, output)
    outputs: dict[str, list[tuple[str, Tensor | None, Tensor]]] = {STUDENT: [], TEACHER: []}
    skip = tuple(skip)

    def record(path: str) -> Callable:
        def hook(m: nn.Module, args: tuple, out: object) -> None:
            if isinstance(out, Tensor) and not (skip and path.startswith(skip)):
                first = args[0].detach().float().clone() if args and isinstance(args[0], Tensor) else None
                outputs[current_mode()].append((path, first, out.detach().float().clone()))
        return hook

    handles = [m.register_forward_hook(record(p)) for p, m in net.named_modules()]
    try:
        for mode in (STUDENT, TEACHER):
            with mode_scope(mode):
                net(probe)
    finally:
        for h in handles:
            h.remove()
    modules = dict(net.named_modules())
    teacher: dict[str, list[tuple[Tensor | None, Tensor]]] = {}
    for path, t_in, t in outputs[TEACHER]:
        teacher.setdefault(path, []).append((t_in, t))
    seen: dict[str, int] = {}

    def wrong(s: Tensor | None, t: Tensor | None) -> float | None:
        err = None if s is None or t is None else _tiled_error(s, t, width_ratio)
        return err if err is not None and err > rtol * max(1.0, s.abs().max().item()) else None

    for path, s_in, s in outputs[STUDENT]:  # the k-th call of a module in one mode against its k-th in the other
        k = seen[path] = seen.get(path, -1) + 1
        if k >= len(teacher.get(path, ())):
            continue  # a wide layer folded into its parent in teacher mode (WideMlp's fc1, fc2)
        t_in, t = teacher[path][k]
        err = wrong(s, t)
        # the culprit turns a right input into a wrong output (a module fed a wrong value only passes it on)
        if err is not None and wrong(s_in, t_in) is None:
            return path, modules[path], err
    return None


def _tiled_error(student: Tensor, teacher: Tensor, r: int) -> float | None:
    """max |teacher - tiled student| where the shapes relate by IR (None where they do not: a grouped layout)."""
    if student.shape == teacher.shape:
        return (student - teacher).abs().max().item()
    if student.ndim != teacher.ndim:
        return None
    wide = [d for d in range(student.ndim) if teacher.shape[d] != student.shape[d]]
    if len(wide) != 1 or teacher.shape[wide[0]] != r * student.shape[wide[0]]:
        return None
    tiled = torch.cat([student] * r, dim=wide[0])
    # replicas at 1/r, or at 1 where the output is a gate's (it multiplies an activation that carries the 1/r)
    return min((tiled / r - teacher).abs().max().item(), (tiled - teacher).abs().max().item())
