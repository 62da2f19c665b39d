"""RVT, the Robust Vision Transformer (Mao et al., CVPR 2022), as GPD's transformer results use it (RVT-S -> RVT-Ti),
registered with timm as ``rvt_tiny``, ``rvt_small``, ``rvt_tiny_plus`` and ``rvt_small_plus``.

Built from the architecture description in reviewkd_rvt.md part 2:

* stem ``patch_embed.proj``: conv 7x7 stride 2 padding 2 (3 -> 32), BN, max-pool 3/2/1, conv 4x4 stride 4
  (32 -> dim), no activation: 224 px -> 14 x 14 tokens; no position embedding, no class token;
* stages ``transformers.{s}``: pre-norm blocks (LayerNorm eps 1e-6, timm ``Attention`` with a qkv bias, the
  convolutional MLP: 1x1 conv, BN, GELU, depthwise 3x3 conv, BN, GELU, 1x1 conv, BN, on the token grid);
* between stages ``pools.{s}.conv``: a depthwise-style 3x3 stride-2 conv that doubles the width (groups = C in);
* head: global average pool, LayerNorm, linear.

The ``plus`` variants (RVT-Ti*, RVT-S*) add position-aware attention scaling (PAAS) to the first blocks of stage
0: a learnable ``att_mask`` per head multiplies the scaled attention logits by ``sigmoid(att_mask)`` before the
softmax (:class:`MaskedAttention`).

State-dict keys are those of the official release (``patch_embed.proj.0.weight``,
``transformers.0.blocks.3.mlp.dwconv.weight``, ``pools.0.conv.weight``, ``norm``, ``head``...), so its weights load
strictly once the ``model`` entry is converted to safetensors (``gpd-ds convert-weights``). Where the official code
differs and it does not change the function, this one follows the GPD copy: ``flatten`` instead of ``squeeze``
after the pool (batch 1 works), the PAAS mask initialised truncated-normal 0.02 (the official one is left
uninitialised) and sliced to the token count, no empty ``Transformer.layers`` list (it holds no weights), and the
timm ``Attention`` module (the same numbers and parameter names as RVT's own attention, and IR knows it).
Differences that change nothing at 224 px but let the model run at other sizes: the token grid's height and
width are carried to the MLP (the official one assumes a square grid of sqrt(N)).
"""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, trunc_normal_
from timm.models import register_model
from torch import Tensor, nn

STEM_WIDTH = 32


def token_grid(img_size: int) -> int:
    """Side of the token grid the stem makes of an ``img_size`` image (224 -> 14)."""
    side = (img_size + 2 * 2 - 7) // 2 + 1  # conv 7x7, stride 2, padding 2
    side = (side + 2 * 1 - 3) // 2 + 1  # max-pool 3, stride 2, padding 1
    return side // 4  # conv 4x4, stride 4


class PatchEmbed(nn.Module):
    """The convolutional stem (no activation). ``img_size`` tells IR and the builders the training input size."""

    def __init__(self, img_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.proj = nn.Sequential(nn.Conv2d(in_chans, STEM_WIDTH, 7, 2, 2), nn.BatchNorm2d(STEM_WIDTH),
                                  nn.MaxPool2d(3, 2, 1), nn.Conv2d(STEM_WIDTH, embed_dim, 4, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class MaskedAttention(Attention):
    """PAAS: timm ``Attention`` whose scaled logits are multiplied by ``sigmoid(att_mask)`` per head before the
    softmax. The mask is made for ``tokens`` tokens; a smaller grid uses its top-left ``[:N, :N]`` block."""

    def __init__(self, dim: int, num_heads: int, tokens: int, attn_drop: float = 0.0, proj_drop: float = 0.0
                 ) -> None:
        super().__init__(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
        self.att_mask = nn.Parameter(torch.empty(num_heads, tokens, tokens))
        trunc_normal_(self.att_mask, std=0.02)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = masked_attention(q, k, v, self.att_mask, self.scale, self.attn_drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, tokens, -1)))


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, attn_drop: nn.Module) -> Tensor:
    """``softmax(scale * q k^T * sigmoid(mask)) v`` over (B, heads, N, head_dim) tensors, mask (heads, >=N, >=N)."""
    tokens = q.shape[2]
    if mask.shape[-1] < tokens:
        raise ValueError(f"the PAAS attention mask covers {mask.shape[-1]} tokens but the input has {tokens}: build "
                         "the model with the image size it is run at (img_size=...)")
    logits = (q * scale) @ k.transpose(-2, -1) * torch.sigmoid(mask[:, :tokens, :tokens])
    return attn_drop(logits.softmax(dim=-1)) @ v


class ConvMlp(nn.Module):
    """RVT's MLP on the token grid: 1x1 conv, BN, GELU, dropout, depthwise 3x3 conv, BN, GELU, 1x1 conv, BN,
    dropout. One GELU module is applied twice (as in RVT; it has no state)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.bn3 = nn.BatchNorm2d(dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        batch, _, channels = x.shape
        x = x.transpose(1, 2).reshape(batch, channels, *size)
        x = self.drop(self.act(self.bn1(self.fc1(x))))
        x = self.act(self.bn2(self.dwconv(x)))
        x = self.drop(self.bn3(self.fc2(x)))
        return x.flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block with the convolutional MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float, attn_drop: float, drop_path: float,
                 mask_tokens: int | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = (MaskedAttention(dim, num_heads, mask_tokens, attn_drop, drop) if mask_tokens else
                     Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=drop))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x), size))


class Transformer(nn.Module):
    """One stage: NCHW -> tokens -> blocks -> NCHW."""

    def __init__(self, blocks: list[Block]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x, (height, width))
        return x.transpose(1, 2).reshape(batch, channels, height, width)


class Pooling(nn.Module):
    """Between stages: 3x3 stride-2 conv with one group per input channel, doubling the width."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, 2, 1, groups=in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def _cfg(name: str, num_classes: int, img_size: int) -> dict:
    # ImageNet default statistics, as RVT and GPD normalise (not timm's ViT default of 0.5)
    return {"architecture": name, "url": "", "num_classes": num_classes, "input_size": (3, img_size, img_size),
            "pool_size": None, "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj.0", "classifier": "head"}


class RVT(nn.Module):
    """RVT: stem, stages of transformer blocks with pooling between them, pooled LayerNorm head."""

    def __init__(self, name: str, depths: tuple[int, ...], heads: tuple[int, ...], base_dim: int,
                 mlp_ratio: float = 4.0, masked_blocks: int = 0, img_size: int = 224, in_chans: int = 3,
                 num_classes: int = 1000, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        dims = [base_dim * h for h in heads]
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = dims[-1]
        self.patch_embed = PatchEmbed(img_size, in_chans, dims[0])
        self.pos_drop = nn.Dropout(drop_rate)
        tokens = token_grid(img_size) ** 2
        rates = [drop_path_rate * k / sum(depths) for k in range(sum(depths))]  # k / K, as RVT (and PiT)
        stages, first = [], 0
        for s, (depth, dim, n_heads) in enumerate(zip(depths, dims, heads, strict=True)):
            stages.append(Transformer([
                Block(dim, n_heads, mlp_ratio, drop_rate, attn_drop_rate, rates[first + i],
                      tokens if s == 0 and i < masked_blocks else None) for i in range(depth)]))
            first += depth
        self.transformers = nn.ModuleList(stages)
        self.pools = nn.ModuleList(Pooling(dims[s], dims[s + 1]) for s in range(len(dims) - 1))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = self.default_cfg = _cfg(name, num_classes, img_size)
        for m in self.modules():  # RVT sets only the LayerNorms; everything else keeps PyTorch's default init
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("att_mask")}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"RVT pools by average only; global_pool={global_pool!r} is not supported")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = self.default_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and stages: (N, C_last, H/32, W/32) at 224 px (7 x 7 for the two-stage RVT-Ti)."""
        x = self.pos_drop(self.patch_embed(x))
        for s, stage in enumerate(self.transformers):
            x = stage(x)
            if s < len(self.pools):
                x = self.pools[s](x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.norm(torch.flatten(self.global_pool(x), 1))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


_VARIANTS = {  # name: (depths, heads, base dim, PAAS-masked blocks of stage 0)
    "rvt_tiny": ((10, 2), (6, 12), 32, 0),
    "rvt_tiny_plus": ((10, 2), (6, 12), 32, 10),
    "rvt_small": ((12,), (6,), 64, 0),
    "rvt_small_plus": ((12,), (6,), 64, 5),
}


def _create(name: str, pretrained: bool, kwargs: dict) -> RVT:
    if pretrained:
        raise ValueError(f"{name} has no downloadable weights here: convert the official release with "
                         "'gpd-ds convert-weights' and pass the .safetensors file as a checkpoint")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    depths, heads, base_dim, masked = _VARIANTS[name]
    return RVT(name, depths, heads, base_dim, masked_blocks=masked, **kwargs)


@register_model
def rvt_tiny(pretrained: bool = False, **kwargs) -> RVT:
    """RVT-Ti: 10 blocks of 192 (6 heads), pool, 2 blocks of 384 (12 heads); 8.65 M parameters, 1.28 GMACs."""
    return _create("rvt_tiny", pretrained, kwargs)


@register_model
def rvt_tiny_plus(pretrained: bool = False, **kwargs) -> RVT:
    """RVT-Ti*: RVT-Ti with PAAS in the 10 blocks of stage 0; 10.95 M parameters."""
    return _create("rvt_tiny_plus", pretrained, kwargs)


@register_model
def rvt_small(pretrained: bool = False, **kwargs) -> RVT:
    """RVT-S: 12 blocks of 384 (6 heads); 22.15 M parameters, 4.65 GMACs."""
    return _create("rvt_small", pretrained, kwargs)


@register_model
def rvt_small_plus(pretrained: bool = False, **kwargs) -> RVT:
    """RVT-S*: RVT-S with PAAS in its first 5 blocks; 23.30 M parameters."""
    return _create("rvt_small_plus", pretrained, kwargs)

