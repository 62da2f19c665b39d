"""RVT students and teachers (reviewkd_rvt.md 2.9): sizes, MACs, key layout, attention, IR, release conversion."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gpd_ds.cli import main as cli_main
from gpd_ds.gpd import check_equivalence, expand, extract
from gpd_ds.gpd.attention import WideAttention
from gpd_ds.models import create_model
from gpd_ds.models.rvt import MaskedAttention, token_grid
from gpd_ds.models.weights import WeightsError, convert_weights, load_weights
from gpd_ds.recipes import get_recipe

# (parameters at 1000 classes, state-dict keys): the official plain counts and the plus variants'
SIZES = {"rvt_tiny": (8_646_376, 363), "rvt_small": (22_148_392, 361), "rvt_tiny_plus": (10_951_336, 373),
         "rvt_small_plus": (23_300_872, 366)}
GMACS = {"rvt_tiny": 1.284, "rvt_small": 4.645}  # convs, linears and the two attention matmuls, at 224 px


@pytest.mark.parametrize("name", SIZES)
def test_parameter_and_key_counts(name: str) -> None:
    model = create_model(name)
    params, keys = SIZES[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys


def test_official_key_layout() -> None:
    state = create_model("rvt_tiny").state_dict()
    shapes = {
        "patch_embed.proj.0.weight": (32, 3, 7, 7), "patch_embed.proj.1.running_var": (32,),
        "patch_embed.proj.3.weight": (192, 32, 4, 4), "transformers.0.blocks.9.norm1.weight": (192,),
        "transformers.0.blocks.0.attn.qkv.weight": (576, 192), "transformers.0.blocks.0.attn.proj.bias": (192,),
        "transformers.0.blocks.0.mlp.fc1.weight": (768, 192, 1, 1), "transformers.0.blocks.0.mlp.dwconv.weight":
        (768, 1, 3, 3), "transformers.0.blocks.0.mlp.bn3.num_batches_tracked": (), "transformers.1.blocks.1.mlp."
        "fc2.weight": (384, 1536, 1, 1), "pools.0.conv.weight": (384, 1, 3, 3), "norm.weight": (384,),
        "head.weight": (1000, 384)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    # 29 tensors per block, the stem's 9 and pool/norm/head's 6
    assert sum(k.startswith("transformers.0.blocks.0.") for k in state) == 29
    plus = create_model("rvt_tiny_plus").state_dict()
    assert plus["transformers.0.blocks.9.attn.att_mask"].shape == (6, 196, 196)
    assert "transformers.1.blocks.0.attn.att_mask" not in plus


@pytest.mark.parametrize(("name", "stem", "pooled"), [("rvt_tiny", 192, (384, 7, 7)), ("rvt_small", 384, None)])
def test_shapes_at_224_and_batch_one(name: str, stem: int, pooled: tuple | None) -> None:
    model = create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model.patch_embed(x).shape == (1, stem, 14, 14)
        if pooled:
            assert model.pools[0](model.transformers[0](model.patch_embed(x))).shape == (1, *pooled)
        assert model(x).shape == (1, 1000)
    assert token_grid(224) == 14


@pytest.mark.parametrize("name", GMACS)
def test_macs_at_224(name: str) -> None:
    model = create_model(name).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # explicit q @ k^T and attn @ v, which the counter sees as matmuls
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert counter.get_total_flops() / 2 / 1e9 == pytest.approx(GMACS[name], rel=0.01)


def _direct_attention(attn: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """RVT's attention written out (reviewkd_rvt.md 2.2) on the module's weights."""
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(batch, tokens, 3, heads, dim // heads).permute(
        2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * (dim // heads) ** -0.5
    if mask is not None:
        logits = logits * torch.sigmoid(mask)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("name", ["rvt_tiny", "rvt_tiny_plus"])
def test_attention_equals_the_formula(name: str) -> None:
    attn = create_model(name).transformers[0].blocks[0].attn.eval()
    x = torch.randn(2, 196, 192)
    mask = attn.att_mask if isinstance(attn, MaskedAttention) else None
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _direct_attention(attn, x, mask), rtol=1e-5, atol=1e-5)


def test_dynamic_teacher_of_rvt_tiny() -> None:
    """T_d of RVT-Ti at r = 2: 33,413,608 trained tensors (1000 classes), 12 / 24 heads of dim 32."""
    model = expand(create_model("rvt_tiny", image_size=32), noise_std=0.0)
    assert sum(p.numel() for p in model.parameters()) == 33_413_608
    heads = [(m.num_heads * m.width_ratio, m.head_dim) for m in model.modules() if isinstance(m, WideAttention)]
    assert heads == [(12, 32)] * 10 + [(24, 32)] * 2


@pytest.mark.parametrize("name", ["rvt_small", "rvt_small_plus"])
def test_ir_of_rvt_small_is_exact(name: str) -> None:
    """RVT-S has no pooling stage (an empty module list) and, as S*, five PAAS blocks; the IR table runs RVT-Ti."""
    torch.manual_seed(0)
    student = create_model(name, num_classes=10, image_size=32).eval()
    model = expand(student, noise_std=0.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, mode="teacher"), student(x), rtol=1e-4, atol=1e-4)
    assert check_equivalence(model, extract(model), x) <= 1e-5


def test_paas_mask_is_replicated_per_head_without_noise() -> None:
    model = expand(create_model("rvt_tiny_plus", num_classes=10, image_size=32))  # default noise 1e-6
    attn = model.net.transformers[0].blocks[0].attn
    assert attn.att_mask.shape == (12, *attn.att_mask.shape[1:])
    assert torch.equal(attn.att_mask[:6], attn.att_mask[6:])


def test_rvt_recipes_keep_the_dynamic_teacher_single_branch() -> None:
    for recipe in ("rvt_tiny_from_rvt_small", "rvt_tiny_scratch"):
        cfg = get_recipe(recipe)
        assert cfg.model.student == "rvt_tiny"
        assert not cfg.model.branches  # the reference converts no RVT conv (reviewkd_rvt.md 2.4)
        assert cfg.data.repeated_aug == 3  # the RASampler of the reference's RVT (and DeiT) runs


def _official_release(path, model: torch.nn.Module) -> None:
    """A file laid out like the official RVT training checkpoint: weights under 'model' beside pickled extras."""
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 2e-3}]},
                "lr_scheduler": {"last_epoch": 299}, "epoch": 299,
                "args": argparse.Namespace(model="rvt_small", lr=5e-4)}, path)


def test_official_release_converts_and_loads_strictly(tmp_path) -> None:
    source = create_model("rvt_small", num_classes=10, image_size=32).eval()
    _official_release(tmp_path / "rvt_small.pth", source)
    with pytest.raises(WeightsError, match=r"argparse\.Namespace.*gpd-ds convert-weights"):
        load_weights(create_model("rvt_small", num_classes=10), tmp_path / "rvt_small.pth", "static teacher")
    assert cli_main(["convert-weights", str(tmp_path / "rvt_small.pth"), str(tmp_path / "rvt_small.safetensors")]) == 0
    loaded = create_model("rvt_small", num_classes=10, image_size=32).eval()
    load_weights(loaded, tmp_path / "rvt_small.safetensors", "static teacher")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_convert_refuses_other_objects_without_running_them(tmp_path, capsys) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload()}, f, pickle_module=pickle)
    with pytest.raises(WeightsError, match=r"only tensors, plain data and argparse\.Namespace"):
        convert_weights(path, tmp_path / "out.safetensors")
    assert "pwned" not in capsys.readouterr().out
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(WeightsError, match=r"must end in \.safetensors"):
        convert_weights(path, tmp_path / "out.pth")


def test_drop_path_grows_with_the_global_block_index() -> None:
    model = create_model("rvt_tiny", drop_path_rate=0.12)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.transformers for b in s.blocks]
    assert rates == pytest.approx([0.12 * k / 12 for k in range(12)])  # k / K over both stages, as RVT
