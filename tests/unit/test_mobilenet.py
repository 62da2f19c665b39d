"""The paper's MobileNet-v1 (``mobilenetv1_relu``): size, DKD / ReviewKD state-dict layout, ReLU, loading."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from gpd_ds.models import create_model
from gpd_ds.models.weights import load_weights

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _model(num_classes: int = 1000, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("mobilenetv1_relu", num_classes=num_classes)


def _layout_keys() -> list[str]:
    """The keys the documented layout implies, in order: stem conv/BN, then 13 x (dw conv, BN, pw conv, BN), fc."""
    def bn(prefix: str) -> list[str]:
        return [f"{prefix}.{s}" for s in BN_SUFFIXES]
    keys = ["model.0.0.weight", *bn("model.0.1")]
    for k in range(1, 14):
        keys += [f"model.{k}.0.weight", *bn(f"model.{k}.1"), f"model.{k}.3.weight", *bn(f"model.{k}.4")]
    return [*keys, "fc.weight", "fc.bias"]


def test_parameter_count_is_mobilenet_v1() -> None:
    assert sum(p.numel() for p in _model().parameters()) == 4_231_976


def test_state_dict_keys_follow_the_reference_layout() -> None:
    keys = list(_model().state_dict())
    assert keys == _layout_keys()
    # 1 + 13 conv/BN groups: 27 convs, 27 BNs (5 entries each), fc weight + bias
    assert len(keys) == 27 + 27 * 5 + 2 == 164
    assert len([k for k in keys if not k.endswith("num_batches_tracked")]) == 137
    assert keys[0] == "model.0.0.weight"
    assert keys[-1] == "fc.bias"
    assert "model.13.4.running_var" in keys
    assert {k.split(".")[0] for k in keys} == {"model", "fc"}


def test_shapes_of_the_reference_layout() -> None:
    sd = _model().state_dict()
    assert sd["model.0.0.weight"].shape == (32, 3, 3, 3)
    assert sd["model.1.0.weight"].shape == (32, 1, 3, 3)  # depthwise
    assert sd["model.1.3.weight"].shape == (64, 32, 1, 1)  # pointwise
    assert sd["model.13.3.weight"].shape == (1024, 1024, 1, 1)
    assert sd["fc.weight"].shape == (1000, 1024)


def test_activations_are_relu_not_relu6() -> None:
    model = _model()
    acts = [m for m in model.modules() if isinstance(m, nn.ReLU | nn.ReLU6 | nn.Hardtanh)]
    assert len(acts) == 27
    assert all(type(m) is nn.ReLU for m in acts)


def test_output_shapes_and_timm_api() -> None:
    model = _model().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
        assert model.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 1024, 7, 7)
        features = model.forward_features(torch.randn(2, 3, 64, 64))
        assert features.shape == (2, 1024, 2, 2)
        assert model.forward_head(features, pre_logits=True).shape == (2, 1024)
        assert model.forward_head(features).shape == (2, 1000)
    assert model.num_classes == 1000
    assert model.num_features == 1024
    assert model.get_classifier() is model.fc
    cfg = {k: model.pretrained_cfg[k] for k in ("input_size", "first_conv", "classifier", "num_classes")}
    assert cfg == {"input_size": (3, 224, 224), "first_conv": "model.0.0", "classifier": "fc", "num_classes": 1000}
    data = timm.data.resolve_model_data_config(model)
    assert (data["crop_pct"], data["interpolation"]) == (0.875, "bilinear")
    model.reset_classifier(10)
    assert model.num_classes == 10
    assert model.pretrained_cfg["num_classes"] == 10
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_global_pool_matches_the_reference_avgpool7_at_224() -> None:
    model = _model().eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        reference = model.fc(nn.AvgPool2d(7)(model.model(x)).view(-1, 1024))
        assert torch.allclose(model(x), reference, atol=1e-6)


def test_pretrained_download_is_refused() -> None:
    with pytest.raises(ValueError, match="local checkpoint"):
        timm.create_model("mobilenetv1_relu", pretrained=True)


def test_reference_state_dict_loads_strictly_with_identical_logits(tmp_path) -> None:
    source = _model(seed=1)
    source.train()
    with torch.no_grad():  # non-default BN statistics
        for _ in range(2):
            source(torch.randn(4, 3, 64, 64) * 2 + 0.5)
    source.eval()
    # saved like a DDP-trained reference checkpoint: under 'state_dict', every key with a 'module.' prefix
    path = tmp_path / "mobilenet_v1.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    fresh = _model(seed=2).eval()
    load_weights(fresh, path, "student (mobilenetv1_relu)")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(fresh(x), source(x))
