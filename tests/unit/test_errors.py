"""Bad input to the GPD core gives clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpd_ds.gpd import UnsupportedModelError, expand, extract
from gpd_ds.models import create_model
from tests.helpers import make_student


class _FunctionalGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.gelu(self.conv(x)).mean((2, 3)))


def test_unsupported_leaf_with_parameters_names_path_and_type() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Flatten(), nn.LazyLinear(4))
    with pytest.raises(UnsupportedModelError, match=r"'1' \(torch.nn.modules.activation.PReLU\).*Supported"):
        expand(model)


def test_unsupported_parameter_free_leaf() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Softmax(dim=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    with pytest.raises(UnsupportedModelError, match=r"'1' \(torch.nn.modules.activation.Softmax\) is a leaf"):
        expand(model)


def test_unsupported_timm_family_is_named() -> None:
    model = create_model("xcit_nano_12_p8_224", num_classes=4, img_size=64)
    with pytest.raises(UnsupportedModelError, match=r"'blocks.0.attn' \(timm.models.xcit.XCA\) holds parameters "
                                                    r"\['temperature'\]"):
        expand(model)


def test_a_student_that_does_not_run_at_the_probe_size_asks_for_input_size() -> None:
    model = create_model("levit_128s", num_classes=4, image_size=32)  # its bias tables fix the size; no patch_embed
    with pytest.raises(UnsupportedModelError, match=r"probe of the inferred input size \(3, 64, 64\) .*pass "
                                                    r"expand\(\.\.\., input_size=\(C, H, W\)\)"):
        expand(model)
    assert expand(model, input_size=(3, 32, 32)).width_ratio == 2


def test_functional_nonlinearity_is_refused_before_any_numeric_check() -> None:
    with pytest.raises(UnsupportedModelError, match=r"module '<root>' \(tests.unit.test_errors._FunctionalGelu\) "
                                                    r"applies gelu\(\) on an activation in its own forward"):
        expand(_FunctionalGelu(), input_size=(3, 16, 16))


@pytest.mark.parametrize("ratio", [1, 0, 1.5, True, "2"])
def test_width_ratio_must_be_an_integer_of_at_least_two(ratio: object) -> None:
    with pytest.raises(ValueError, match=r"width_ratio=.* is invalid: it must be an integer >= 2"):
        expand(make_student("resnet18"), width_ratio=ratio)


def test_negative_noise_is_rejected() -> None:
    with pytest.raises(ValueError, match="noise_std=-1"):
        expand(make_student("resnet18"), noise_std=-1)


def test_wrong_input_channels_and_mode() -> None:
    model = expand(make_student("resnet18"))
    with pytest.raises(ValueError, match=r"input must be \(batch, 3, height, width\).*\(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32), mode="student")
    with pytest.raises(ValueError, match="mode='teach' is not a GPD mode"):
        model(torch.randn(2, 3, 32, 32), mode="teach")


def test_the_inner_network_cannot_run_without_a_mode() -> None:
    model = expand(make_student("resnet18"))
    with pytest.raises(RuntimeError, match=r"outside GPDModel.forward\(x, mode=...\)"):
        model.net(torch.randn(2, 3, 32, 32))


def test_width_ratio_four_is_exact_too() -> None:
    student = make_student("resnet18")
    model = expand(student, width_ratio=4, noise_std=0.0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x, mode="teacher"), student(x), rtol=1e-4, atol=1e-4)


def test_extract_rejects_a_plain_model() -> None:
    with pytest.raises(TypeError, match="extract\\(\\) needs a GPDModel"):
        extract(make_student("resnet18"))


def test_unknown_model_name_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet81'.*Did you mean: resnet18"):
        create_model("resnet81")
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet81'"):
        create_model("torchvision:resnet81")
