"""The baseline registry: every entry builds and runs at the smallest image size we allow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dala_search.config import TrialConfig
from dala_search.errors import ConfigError
from dala_search.model.baselines import (
    available_baselines,
    baseline_builder,
    build_baseline,
)

SMALLEST = TrialConfig(pretrained="none", image_size=32, device="cpu")


def test_registry_is_the_papers_comparison() -> None:
    assert available_baselines() == (
        "resnet50",
        "seresnet50",
        "densenet121",
        "vgg16",
        "vit_b_16",
        "swin_t",
    )


@pytest.mark.parametrize("name", available_baselines())
def test_every_baseline_builds_and_runs_a_tiny_batch(name: str) -> None:
    torch.manual_seed(0)
    model = build_baseline(name, SMALLEST)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    logits = model(x)
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()
    # What train.py's optimiser asks for: every trainable parameter in exactly one group.
    groups = model.parameter_groups(1e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert groups[1]["weight_decay"] == 0.0


def test_subtype_task_has_eight_outputs() -> None:
    model = build_baseline("densenet121", SMALLEST.replace(task="subtype")).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 8)


def test_resnet50_has_no_attention_and_seresnet50_se_in_every_bottleneck() -> None:
    from torchvision.ops import SqueezeExcitation

    plain = build_baseline("resnet50", SMALLEST.replace(attention="cbam"))
    assert plain.attention_modules() == {}
    se = build_baseline("seresnet50", SMALLEST)
    modules = se.attention_modules()
    assert len(modules) == 3 + 4 + 6 + 3  # ResNet50's bottlenecks
    assert all(isinstance(m, SqueezeExcitation) for m in modules.values())
    # On the residual branch (wrapped bn3), before the add: the SE-ResNet placement.
    assert all(name.endswith(".bn3.1") for name in modules)
    assert se.backbone.layer1[0].bn3[1].fc1.out_channels == 256 // 16


def test_vit_refuses_an_image_size_off_its_patch_grid() -> None:
    with pytest.raises(ConfigError, match=r"'vit_b_16'.*multiple of its 16 px.*40 px"):
        baseline_builder("vit_b_16")(SMALLEST.replace(image_size=40))


def test_unknown_baseline_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown baseline model 'alexnet'; valid: resnet50"):
        baseline_builder("alexnet")


def test_resnet50_weights_file_is_refused_by_other_families(tmp_path: Path) -> None:
    config = SMALLEST.replace(pretrained=str(tmp_path / "resnet50.pth"))
    with pytest.raises(ConfigError, match=r"'densenet121'.*takes 'imagenet' or 'none'"):
        build_baseline("densenet121", config)


def test_imagenet_without_weights_says_where_to_put_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_downloads: list[str]
) -> None:
    from torchvision.models import DenseNet121_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = hub_downloads
    with pytest.raises(ConfigError) as info:
        build_baseline("densenet121", SMALLEST.replace(pretrained="imagenet"))
    url = DenseNet121_Weights.IMAGENET1K_V1.url
    message = str(info.value)
    assert calls == [url]
    assert str(tmp_path / "hub" / "checkpoints" / Path(url).name) in message
    assert "pretrained: none" in message and "Name or service not known" in message


def test_imagenet_weights_from_the_cache_are_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_downloads: list[str]
) -> None:
    from torchvision.models import DenseNet121_Weights, densenet121

    torch.manual_seed(1)
    state = densenet121().state_dict()  # stands in for the ImageNet file
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / Path(DenseNet121_Weights.IMAGENET1K_V1.url).name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = hub_downloads
    torch.manual_seed(2)
    model = build_baseline("densenet121", SMALLEST.replace(pretrained="imagenet"))
    assert calls == []
    conv = model.net.features.denseblock4.denselayer16.conv2.weight
    assert torch.equal(conv, state["features.denseblock4.denselayer16.conv2.weight"])
    assert model.net.classifier.out_features == 2  # the 1000-class layer was replaced


def test_pretrained_vit_gets_its_position_embeddings_resampled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torchvision.models as tvm
    from torchvision.models.vision_transformer import interpolate_embeddings

    real = tvm.vit_b_16
    torch.manual_seed(3)
    pretrained = real(weights=None).state_dict()  # a stand-in ImageNet ViT at 224 px

    def fake_vit(*, weights: object = None, **kwargs: object) -> nn.Module:
        model = real(weights=None, **kwargs)
        if weights is not None:  # what torchvision does with weights: 224 px, their values
            model.load_state_dict(pretrained)
        return model

    monkeypatch.setattr(tvm, "vit_b_16", fake_vit)
    model = build_baseline("vit_b_16", SMALLEST.replace(pretrained="imagenet"))
    net = model.net
    assert net.image_size == 32
    expected = interpolate_embeddings(32, 16, dict(pretrained))["encoder.pos_embedding"]
    assert net.encoder.pos_embedding.shape == (1, 2 * 2 + 1, 768)
    assert torch.equal(net.encoder.pos_embedding, expected)
    assert torch.equal(net.conv_proj.weight, pretrained["conv_proj.weight"])
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 2)


def test_baselines_and_evaluate_import_no_framework() -> None:
    # model/ is core (DESIGN.md); evaluate.py and comparison.py reach MLflow only inside
    # their functions.
    import subprocess
    import sys

    code = (
        "import sys, dala_search.model.baselines, dala_search.evaluate, dala_search.comparison\n"
        "bad = [m for m in ('ray', 'optuna', 'mlflow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
