"""Attention variants of the dynamic teacher (docs/ir_functional_ops.md, section 4).

Every variant reads the teacher's ``r x H`` heads as a free view of its replica-major projections (teacher head
``p * H + h`` is replica ``p`` of student head ``h``). Softmax attention folds the ``r^2`` of ``q @ k^T`` into the
softmax scale; what differs is where the heads sit in the channels and what else touches the logits (bias tables,
talking heads). The others say what they do instead: cosine attention is scale-free, linear attention rescales its
normaliser's epsilon, split attention gates each replica's own splits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpd_ds.gpd.layers import TensorSpec, WideLinear, WideModule
from gpd_ds.gpd.mode import replicas
from gpd_ds.models.rvt import masked_attention


class WideAttention(WideModule):
    """Multi-head self-attention of the dynamic teacher (gpd_method.md 4.2).

    ``qkv`` and ``proj`` are :class:`WideLinear` (rule A). The wide qkv rows are laid out
    ``[q | k | v][replica][C]`` (not the reference's ``[replica][q | k | v][C]``): then the teacher's
    ``r * H`` heads (head ``p * H + h``, replica-major like every channel) are a free view of the qkv
    output and the fused (flash) attention kernel applies; the student's rows are three blocks,
    gathered by its (already copying) x r view. The ``r * r`` that ``q @ k^T`` needs is folded into
    the softmax scale; the head outputs stay 1/r, as the invariant wants.

    ``att_mask`` (RVT's PAAS, ``(H, N, N)``) multiplies each head's scaled logits by ``sigmoid(mask)``: a per-head
    factor on logits that are already at the student's scale, so teacher head ``p * H + h`` uses mask ``h``
    (replicated along the head axis, neither divided nor noised).
    """

    def __init__(self, qkv: WideLinear, proj: WideLinear, num_heads: int, head_dim: int, width_ratio: int,
                 attn_drop: nn.Dropout, proj_drop: nn.Module, att_mask: Tensor | None = None) -> None:
        super().__init__(width_ratio)
        self.qkv, self.proj, self.attn_drop, self.proj_drop = qkv, proj, attn_drop, proj_drop
        self.num_heads, self.head_dim = num_heads, head_dim
        if att_mask is not None:
            self.register_wide("att_mask", att_mask, TensorSpec((0,), scaled=False, noisy=False))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        batch, tokens, _ = x.shape
        r = replicas(self.width_ratio)
        heads, scale = self.num_heads * r, self.head_dim**-0.5 * r * r
        qkv = self.qkv(x)  # (B, N, 3 * heads * head_dim), [q | k | v] blocks
        q, k, v = qkv.reshape(batch, tokens, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if "att_mask" in self.specs:
            (mask,) = self.mode_tensors("att_mask")
            x = masked_attention(q, k, v, mask, scale, self.attn_drop)
        else:
            dropout = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                               is_causal=is_causal, scale=scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, tokens, -1)))

    def extra_repr(self) -> str:
        return (f"student_heads={self.num_heads}, head_dim={self.head_dim}, r={self.width_ratio}"
                f"{', PAAS mask' if 'att_mask' in self.specs else ''}")


class WideWindowAttention(WideAttention):
    """Swin's window attention: :class:`WideAttention` plus a per-head additive bias (the relative position bias,
    looked up from a ``(positions, heads)`` table, and the shifted-window mask). Teacher head ``p * H + h`` uses
    head ``h``'s bias (the table tiled along its head axis, neither divided nor noised), and the bias adds to
    logits that are at the student's scale, so it is exact in both modes."""

    def __init__(self, qkv: WideLinear, proj: WideLinear, num_heads: int, head_dim: int, width_ratio: int,
                 attn_drop: nn.Dropout, proj_drop: nn.Module, table: Tensor, index: Tensor, window_area: int) -> None:
        super().__init__(qkv, proj, num_heads, head_dim, width_ratio, attn_drop, proj_drop)
        self.window_area = window_area
        self.register_wide("relative_position_bias_table", table, TensorSpec((1,), scaled=False, noisy=False))
        self.register_buffer("relative_position_index", index.clone(), persistent=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        batch, tokens, _ = x.shape
        r = replicas(self.width_ratio)
        heads, scale = self.num_heads * r, self.head_dim**-0.5 * r * r
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        (table,) = self.mode_tensors("relative_position_bias_table")
        area = self.window_area
        bias = table[self.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            mask = mask.view(1, windows, 1, tokens, tokens).expand(batch // windows, -1, heads, -1, -1)
            bias = bias + mask.reshape(-1, heads, tokens, tokens)
        dropout = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout, scale=scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, tokens, -1)))


class WideSubsampledAttention(nn.Module):
    """Spatial-reduction attention (PVT-v2, Twins' global sub-sampled attention): queries from every token, keys and
    values from a reduced map (a strided conv + LayerNorm, or PVT-v2's linear variant: pool, 1x1 conv, LayerNorm,
    GELU, all converted children). ``kv``'s ``[k | v]`` blocks are widened block by block, so the teacher's heads
    are free views of ``q`` and ``kv``; the ``r^2`` of ``q @ k^T`` is folded into the softmax scale."""

    def __init__(self, m: nn.Module, width_ratio: int) -> None:
        super().__init__()
        self.q, self.kv, self.proj, self.attn_drop, self.proj_drop = m.q, m.kv, m.proj, m.attn_drop, m.proj_drop
        self.sr, self.norm = m.sr, m.norm
        self.pool, self.act = getattr(m, "pool", None), getattr(m, "act", None)
        self.num_heads, self.scale, self.width_ratio = m.num_heads, m.scale, width_ratio

    def forward(self, x: Tensor, size: list[int]) -> Tensor:
        r = replicas(self.width_ratio)
        batch, tokens, channels = x.shape
        heads = self.num_heads * r
        q = self.q(x).reshape(batch, tokens, heads, -1).transpose(1, 2)
        if self.sr is not None:
            x = x.transpose(1, 2).reshape(batch, channels, *size)
            x = self.sr(x if self.pool is None else self.pool(x)).flatten(2).transpose(1, 2)
            x = self.norm(x)
            x = x if self.act is None else self.act(x)
        k, v = self.kv(x).reshape(batch, -1, 2, heads, q.shape[-1]).permute(2, 0, 3, 1, 4)
        dropout = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale * r * r)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, tokens, -1)))

    def extra_repr(self) -> str:
        return f"student_heads={self.num_heads}, r={self.width_ratio}"


class WideLocalWindowAttention(nn.Module):
    """Twins' locally-grouped attention: self-attention inside ``ws x ws`` windows of the zero-padded token map, a
    fused ``[q | k | v]`` projection widened block by block (as timm's ``Attention``)."""

    def __init__(self, m: nn.Module, width_ratio: int) -> None:
        super().__init__()
        self.qkv, self.proj, self.attn_drop, self.proj_drop = m.qkv, m.proj, m.attn_drop, m.proj_drop
        self.num_heads, self.scale, self.ws, self.width_ratio = m.num_heads, m.scale, m.ws, width_ratio

    def forward(self, x: Tensor, size: list[int]) -> Tensor:
        r = replicas(self.width_ratio)
        batch, tokens, channels = x.shape
        (height, width), ws, heads = size, self.ws, self.num_heads * r
        x = F.pad(x.view(batch, height, width, channels), (0, 0, 0, -width % ws, 0, -height % ws))
        rows, cols = x.shape[1] // ws, x.shape[2] // ws
        x = x.reshape(batch, rows, ws, cols, ws, channels).transpose(2, 3)
        q, k, v = self.qkv(x).reshape(batch, rows * cols, ws * ws, 3, heads, -1).permute(3, 0, 1, 4, 2, 5)
        dropout = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale * r * r)
        x = x.transpose(2, 3).reshape(batch, rows, cols, ws, ws, channels).transpose(2, 3)
        x = x.reshape(batch, rows * ws, cols * ws, channels)[:, :height, :width].reshape(batch, tokens, channels)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"student_heads={self.num_heads}, window={self.ws}, r={self.width_ratio}"


class WideTalkingHeadAttention(nn.Module):
    """CaiT's talking-heads attention: ``proj_l`` mixes the heads' logits before the softmax, ``proj_w`` their
    probabilities after it. Both act on tensors at the student's scale (the ``r^2`` of ``q @ k^T`` is folded into
    the scale), whose ``r x H`` teacher heads are the student's replicated: each is a :class:`WideLinear` whose
    replica blocks ``W / r`` sum back to ``W``, read with its bias at full scale (``b``, not ``b / r``)."""

    def __init__(self, m: nn.Module, width_ratio: int) -> None:
        super().__init__()
        self.qkv, self.proj_l, self.proj_w, self.proj = m.qkv, m.proj_l, m.proj_w, m.proj
        self.attn_drop, self.proj_drop = m.attn_drop, m.proj_drop
        self.num_heads, self.scale, self.width_ratio = m.num_heads, m.scale, width_ratio

    def _mix(self, layer: nn.Module, attn: Tensor, r: int) -> Tensor:
        attn = attn.permute(0, 2, 3, 1)  # heads last: the layer mixes heads
        attn = layer.teacher_scaled(attn, 1.0, float(r)) if r > 1 else layer(attn)
        return attn.permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        r = replicas(self.width_ratio)
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads * r, -1).permute(2, 0, 3, 1, 4)
        attn = self._mix(self.proj_l, (q * (self.scale * r * r)) @ k.transpose(-2, -1), r)
        attn = self.attn_drop(self._mix(self.proj_w, attn.softmax(dim=-1), r))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, -1)))

    def extra_repr(self) -> str:
        return f"student_heads={self.num_heads}, r={self.width_ratio}"


class WideClassAttention(nn.Module):
    """CaiT's class attention: the class token's query against every token's key and value, from three separate
    projections (each plain replica-major, so the teacher's ``r x H`` heads are free views)."""

    def __init__(self, m: nn.Module, width_ratio: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.proj = m.q, m.k, m.v, m.proj
        self.attn_drop, self.proj_drop = m.attn_drop, m.proj_drop
        self.num_heads, self.scale, self.width_ratio = m.num_heads, m.scale, width_ratio

    def forward(self, x: Tensor) -> Tensor:
        r = replicas(self.width_ratio)
        batch, tokens, _ = x.shape
        heads = self.num_heads * r
        q = self.q(x[:, :1]).reshape(batch, 1, heads, -1).transpose(1, 2)
        k = self.k(x).reshape(batch, tokens, heads, -1).transpose(1, 2)
        v = self.v(x).reshape(batch, tokens, heads, -1).transpose(1, 2)
        dropout = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale * r * r)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, 1, -1)))

    def extra_repr(self) -> str:
        return f"student_heads={self.num_heads}, r={self.width_ratio}"


class WideSplitAttention(nn.Module):
    """ResNeSt's split attention: a grouped conv makes ``radix`` splits (``[radix][C]`` channels), their sum is
    pooled into a gate, a softmax across the splits (a sigmoid for radix 1) weighs them. The teacher's channels are
    ``[replica][radix][C]``: each replica sums, gates and weighs its own splits. The gate's logits carry 1/r and
    the gate must not (it multiplies an activation that already does), so the teacher gates on ``r x`` them."""

    def __init__(self, m: nn.Module, width_ratio: int) -> None:
        super().__init__()
        self.conv, self.bn0, self.drop, self.act0 = m.conv, m.bn0, m.drop, m.act0
        self.fc1, self.bn1, self.act1, self.fc2 = m.fc1, m.bn1, m.act1, m.fc2
        self.radix, self.cardinality, self.width_ratio = m.radix, m.rsoftmax.cardinality, width_ratio

    def forward(self, x: Tensor) -> Tensor:
        r = replicas(self.width_ratio)
        x = self.act0(self.drop(self.bn0(self.conv(x))))
        batch, channels, height, width = x.shape
        splits = x.view(batch, r, self.radix, channels // (r * self.radix), height, width)
        gap = splits.sum(dim=2).flatten(1, 2).mean((2, 3), keepdim=True)
        logits = self.fc2(self.act1(self.bn1(self.fc1(gap)))) * r
        if self.radix > 1:
            gate = logits.view(batch, r, self.cardinality, self.radix, -1).transpose(2, 3).softmax(dim=2)
        else:
            gate = torch.sigmoid(logits)
        return (splits * gate.reshape(batch, r, self.radix, -1, 1, 1)).sum(dim=2).flatten(1, 2).contiguous()

    def extra_repr(self) -> str:
        return f"radix={self.radix}, cardinality={self.cardinality}, r={self.width_ratio}"


class WideBiasedAttention(WideModule):
    """Attention with a learned per-head bias on the logits and a per-head ``[q | k | v]`` layout (LeViT, TinyViT,
    EfficientFormer): ``qkv(x)`` viewed ``(B, N, heads, 2 * key_dim + val_dim)``, or a separate ``q`` (on
    subsampled tokens) and ``kv`` (LeViT's attention downsampling).

    The teacher's qkv is a plain replica-major layer, so its ``r * H`` heads are a free view (head ``p * H + h`` is
    replica ``p`` of head ``h``); the ``r * r`` of ``q @ k^T`` is folded into the softmax scale and the bias table is
    tiled along its head axis (neither divided nor noised), as in :class:`WideWindowAttention`.
    """

    def __init__(self, m: nn.Module, width_ratio: int) -> None:
        super().__init__(width_ratio)
        self.norm = getattr(m, "norm", nn.Identity())
        self.qkv, self.kv, self.q = getattr(m, "qkv", None), getattr(m, "kv", None), getattr(m, "q", None)
        self.proj = m.proj
        self.num_heads, self.key_dim, self.val_dim, self.scale = m.num_heads, m.key_dim, m.val_dim, m.scale
        self.register_wide("attention_biases", m.attention_biases, TensorSpec((0,), scaled=False, noisy=False))
        # EfficientFormer saves the index table in its state dict, LeViT and TinyViT do not: keep the source's keys
        self.index_persistent = "attention_bias_idxs" in m.state_dict()
        self.register_buffer("attention_bias_idxs", m.attention_bias_idxs.clone(), persistent=self.index_persistent)

    def forward(self, x: Tensor) -> Tensor:
        r = replicas(self.width_ratio)
        heads, key_dim = self.num_heads * r, self.key_dim
        (table,) = self.mode_tensors("attention_biases")
        batch, tokens = x.shape[:2]
        x = self.norm(x)
        if self.qkv is not None:
            q, k, v = self.qkv(x).view(batch, tokens, heads, -1).split([key_dim, key_dim, self.val_dim], dim=3)
        else:
            k, v = self.kv(x).view(batch, tokens, heads, -1).split([key_dim, self.val_dim], dim=3)
            q = self.q(x).view(batch, -1, heads, key_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        bias = table[:, self.attention_bias_idxs].to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale * r * r)
        return self.proj(x.transpose(1, 2).reshape(batch, q.shape[2], -1))

    def student_state(self) -> dict[str, Tensor]:
        state = super().student_state()
        if self.index_persistent:
            state["attention_bias_idxs"] = self.attention_bias_idxs.clone()
        return state

    def extra_repr(self) -> str:
        return f"student_heads={self.num_heads}, key_dim={self.key_dim}, val_dim={self.val_dim}, r={self.width_ratio}"


class WideRelPosBias(WideModule):
    """timm's RelPosBias (MaxViT, CoAtNet): a ``(positions, heads)`` table looked up per pair of tokens in a window.
    Tiled along its head axis (neither divided nor noised) like Swin's: teacher head ``p * H + h`` adds head ``h``'s
    bias to logits that are at the student's scale."""

    def __init__(self, m: nn.Module, width_ratio: int) -> None:
        super().__init__(width_ratio)
        self.tokens = m.bias_shape[:2]
        self.register_wide("relative_position_bias_table", m.relative_position_bias_table,
                           TensorSpec((1,), scaled=False, noisy=False))
        self.register_buffer("relative_position_index", m.relative_position_index.clone(), persistent=False)

    def get_bias(self) -> Tensor:
        """``(1, heads, N, N)``: the teacher's ``r x`` heads in teacher mode."""
        (table,) = self.mode_tensors("relative_position_bias_table")
        bias = table[self.relative_position_index].view(*self.tokens, table.shape[-1])
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, attn: Tensor, shared_rel_pos: Tensor | None = None) -> Tensor:
        return attn + self.get_bias()


class WideHeadFirstAttention(nn.Module):
    """MaxViT/CoAtNet attention with ``head_first`` projections: per-head ``[q k v]`` channels, NCHW
    (``Attention2d``) or channels-last (``AttentionCl``), and an optional :class:`WideRelPosBias`. The projection
    stays plain replica-major, so the teacher's ``r x`` heads are a free view; the ``r^2`` of ``q @ k^T`` is folded
    into the softmax scale."""

    def __init__(self, m: nn.Module, width_ratio: int, channels_first: bool) -> None:
        super().__init__()
        self.qkv, self.rel_pos, self.attn_drop, self.proj, self.proj_drop = (
            m.qkv, m.rel_pos, m.attn_drop, m.proj, m.proj_drop)
        self.num_heads, self.dim_head, self.scale = m.num_heads, m.dim_head, m.scale
        self.width_ratio, self.channels_first = width_ratio, channels_first

    def forward(self, x: Tensor, shared_rel_pos: Tensor | None = None) -> Tensor:
        if shared_rel_pos is not None:
            raise ValueError("MaxViT attention given a shared relative-position bias: IR widens only a "
                                        "block's own RelPosBias")
        r = replicas(self.width_ratio)
        heads, width = self.num_heads * r, 3 * self.dim_head
        if self.channels_first:
            batch, _, height, width_px = x.shape
            q, k, v = self.qkv(x).view(batch, heads, width, -1).transpose(-1, -2).chunk(3, dim=3)
        else:
            shape = x.shape[:-1]
            q, k, v = self.qkv(x).view(x.shape[0], -1, heads, width).transpose(1, 2).chunk(3, dim=3)
        bias = None if self.rel_pos is None else self.rel_pos.get_bias().to(q.dtype)
        dropout = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=self.scale * r * r)
        if self.channels_first:
            out = out.transpose(-1, -2).reshape(batch, -1, height, width_px)
        else:
            out = out.transpose(1, 2).reshape(*shape, -1)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"student_heads={self.num_heads}, dim_head={self.dim_head}, r={self.width_ratio}"


class WideLiteMLA(nn.Module):
    """EfficientViT's multi-scale ReLU linear attention (LiteMLA). Per head, with ``v1 = [v, 1]``:
    ``o = q (k^T v1)``, output ``o[:-1] / (o[-1] + eps)``.

    The student's channels are ``[scale][head][q | k | v]``, so the teacher's (replica-major: each replica concatenates
    its own scales) give ``r x`` the heads, replica ``p`` of head ``h`` at
    ``p * heads + h``. ``q``, ``k``, ``v`` carry 1/r, the padded ones do not: the numerator carries 1/r^3, the
    denominator 1/r^2, so with ``eps / r^2`` the quotient is exactly the student's times 1/r.
    """

    def __init__(self, m: nn.Module, width_ratio: int) -> None:
        super().__init__()
        self.qkv, self.aggreg, self.kernel_func, self.proj = m.qkv, m.aggreg, m.kernel_func, m.proj
        self.dim, self.eps, self.width_ratio = m.dim, m.eps, width_ratio

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        r = replicas(self.width_ratio)
        qkv = self.qkv(x)
        scales = [t.unflatten(1, (r, -1)) for t in (qkv, *(op(qkv) for op in self.aggreg))]
        qkv = torch.cat(scales, dim=2).flatten(1, 2)  # the teacher's replicas concatenate their own scales
        q, k, v = qkv.reshape(batch, -1, 3 * self.dim, height * width).transpose(-1, -2).chunk(3, dim=-1)
        q, k, v = self.kernel_func(q), self.kernel_func(k), F.pad(v, (0, 1), value=1.0)
        eps = self.eps / r**2
        with torch.autocast(device_type=x.device.type, enabled=False):  # the quotient wants fp32, as in timm
            out = q.float() @ (k.float().transpose(-1, -2) @ v.float())
            out = (out[..., :-1] / (out[..., -1:] + eps)).to(v.dtype)
        return self.proj(out.transpose(-1, -2).reshape(batch, -1, height, width))

    def extra_repr(self) -> str:
        return f"head_dim={self.dim}, eps={self.eps}, r={self.width_ratio}"


class WideCosineWindowAttention(WideModule):
    """Swin-v2's window attention: cosine similarity of ``q`` and ``k`` times a per-head learned scale, plus a
    continuous relative-position bias that a small MLP computes from fixed coordinates.

    Cosine similarity is scale-free: the teacher's heads (replicas of the student's at 1/r) give the student's
    logits with no ``r^2`` to fold. ``q_bias`` / ``v_bias`` are widened and divided like ``[q | k | v]`` biases; the
    logit scale is tiled along heads. The position MLP (``cpb_mlp``) reads constants, not activations: it is left as
    it is, shared by both modes, and its ``(positions, heads)`` output is tiled along heads for the teacher.
    """

    def __init__(self, m: nn.Module, width_ratio: int) -> None:
        super().__init__(width_ratio)
        self.qkv, self.proj, self.attn_drop, self.proj_drop, self.cpb_mlp = (
            m.qkv, m.proj, m.attn_drop, m.proj_drop, m.cpb_mlp)
        self.num_heads, self.window_area = m.num_heads, m.window_size[0] * m.window_size[1]
        self.register_wide("logit_scale", m.logit_scale, TensorSpec((0,), scaled=False, noisy=False))
        self.register_wide("q_bias", m.q_bias, TensorSpec((0,), scaled=True))
        self.register_wide("v_bias", m.v_bias, TensorSpec((0,), scaled=True))
        self.register_buffer("relative_coords_table", m.relative_coords_table.clone(), persistent=False)
        self.register_buffer("relative_position_index", m.relative_position_index.clone(), persistent=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        r = replicas(self.width_ratio)
        batch, tokens, _ = x.shape
        heads = self.num_heads * r
        logit_scale, q_bias, v_bias = self.mode_tensors("logit_scale", "q_bias", "v_bias")
        qkv = self.qkv(x)
        if q_bias is not None:
            qkv = qkv + torch.cat((q_bias, torch.zeros_like(q_bias), v_bias))
        q, k, v = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads).repeat(1, r)
        area = self.window_area
        bias = table[self.relative_position_index.view(-1)].view(area, area, heads).permute(2, 0, 1)
        attn = attn + 16 * torch.sigmoid(bias)
        if mask is not None:
            windows = mask.shape[0]
            attn = (attn.view(-1, windows, heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0))
            attn = attn.view(-1, heads, tokens, tokens)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, -1)))

    def student_state(self) -> dict[str, Tensor]:
        state = super().student_state()
        state.update({f"cpb_mlp.{k}": v.detach().clone() for k, v in self.cpb_mlp.state_dict().items()})
        return state

    def extra_repr(self) -> str:
        return f"student_heads={self.num_heads}, r={self.width_ratio}"
