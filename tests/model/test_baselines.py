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
        "dinov2_vitb14",
        "vgg16_inception",
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


# ---- DINOv2 ViT-B/14 (timm) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_size", "expected"), [(32, 28), (40, 42), (21, 28), (28, 28), (224, 224), (5, 14)]
)
def test_dinov2_input_is_the_nearest_multiple_of_14(image_size: int, expected: int) -> None:
    from dala_search.model.timm_backbones import vit_input_size

    assert vit_input_size(image_size) == expected


def _dinov2_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A stand-in for the published checkpoint: timm's DINOv2 at its native 518 px, no head."""
    import timm

    torch.manual_seed(4)
    state = timm.create_model("vit_base_patch14_dinov2", num_classes=0).state_dict()
    assert state["pos_embed"].shape == (1, 37 * 37 + 1, 768)
    torch.save(state, path)
    return state


@pytest.mark.slow  # ~18 s on the shared 2-core CPU: two ViT-B builds and a 350 MB file
def test_dinov2_off_the_patch_grid_is_resized_and_its_embeddings_resampled(
    tmp_path: Path,
) -> None:
    from timm.layers import resample_abs_pos_embed

    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    state = _dinov2_checkpoint(path)
    # 40 px is no multiple of 14: the model runs at 42 px, a 3x3 patch grid.
    model = build_baseline("dinov2_vitb14", SMALLEST.replace(image_size=40, pretrained=str(path)))
    net = model.net
    assert (model.image_size, model.input_size) == (40, 42)
    assert net.patch_embed.grid_size == (3, 3)
    assert "40 px images resized to 42 px" in model.note and "resampled" in model.note
    expected = resample_abs_pos_embed(
        state["pos_embed"], new_size=(3, 3), old_size=(37, 37), num_prefix_tokens=1
    )
    assert net.pos_embed.shape == (1, 3 * 3 + 1, 768)
    assert torch.allclose(net.pos_embed, expected)
    assert torch.equal(net.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    assert torch.equal(net.blocks[11].mlp.fc2.weight, state["blocks.11.mlp.fc2.weight"])
    assert net.head.out_features == 2
    seen: list[tuple[int, ...]] = []
    net.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 40, 40)).shape == (1, 2)
    assert seen == [(1, 3, 42, 42)]  # what the patch embedding saw: the resized batch


def test_dinov2_refuses_a_file_that_is_not_a_dinov2_checkpoint(tmp_path: Path) -> None:
    # timm loads non-strictly when the class count differs from the checkpoint's: we must
    # not, or a wrong file would silently leave random weights.
    path = tmp_path / "resnet50.pth"
    torch.save({"fc.weight": torch.zeros(2, 2048)}, path)
    with pytest.raises(ConfigError, match=r"'dinov2_vitb14'.*is not a DINOv2 ViT-B/14 state dict"):
        build_baseline("dinov2_vitb14", SMALLEST.replace(pretrained=str(path)))
    with pytest.raises(ConfigError, match=r"'dinov2_vitb14'.*is not a file"):
        build_baseline("dinov2_vitb14", SMALLEST.replace(pretrained=str(tmp_path / "no.pth")))


@pytest.fixture
def hf_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No network and an empty Hugging Face cache; returns the cache folder.

    huggingface_hub reads HF_HUB_OFFLINE and HF_HOME when imported, so the constants it
    derived are patched too (they are read at each download).
    """
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_dinov2_weights_offline_without_cache_say_where_to_put_them(hf_offline: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build_baseline("dinov2_vitb14", SMALLEST.replace(pretrained="imagenet"))
    message = str(info.value)
    assert "'dinov2_vitb14', pretrained='imagenet'" in message
    assert str(hf_offline / "models--timm--vit_base_patch14_dinov2.lvd142m") in message
    assert "HF_HUB_OFFLINE" in message
    assert "--pretrained /path/to/dinov2_vitb14_pretrain.pth" in message
    assert "--pretrained none" in message
    assert not any(hf_offline.rglob("*.safetensors"))


# ---- VGG16Inception ------------------------------------------------------------------------


def test_naive_inception_branches_and_concatenation() -> None:
    from dala_search.model.vgg_inception import NaiveInception

    block = NaiveInception(512, 64, 128, 32)
    x = torch.randn(2, 512, 5, 7)
    assert block.branch1(x).shape == (2, 64, 5, 7)
    assert block.branch3(x).shape == (2, 128, 5, 7)
    assert block.branch5(x).shape == (2, 32, 5, 7)
    assert block.pool(x).shape == (2, 512, 5, 7)
    out = block(x)
    assert out.shape == (2, 64 + 128 + 32 + 512, 5, 7) and block.out_channels == 736
    # The pool branch passes every input channel (no projection), in the last 512.
    assert torch.equal(out[:, 224:], nn.functional.max_pool2d(x, 3, stride=1, padding=1))
    assert (out[:, :224] >= 0).all()  # ReLU on the three conv branches


def test_vgg16_inception_is_vgg16_blocks_1_to_4_then_inception() -> None:
    from torchvision.models import vgg16

    model = build_baseline("vgg16_inception", SMALLEST.replace(image_size=64))
    reference = vgg16().features[:24]
    assert [type(m) for m in model.features] == [type(m) for m in reference]
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 10 and convs[-1].out_channels == 512
    assert model.features(torch.randn(1, 3, 64, 64)).shape == (1, 512, 4, 4)
    assert model.head[-1].in_features == 736 * 4 * 4 and model.head[-1].out_features == 2


def test_vgg16_inception_imagenet_without_weights_says_where_to_put_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_downloads: list[str]
) -> None:
    from torchvision.models import VGG16_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        build_baseline("vgg16_inception", SMALLEST.replace(pretrained="imagenet"))
    url = VGG16_Weights.IMAGENET1K_V1.url
    assert hub_downloads == [url]
    message = str(info.value)
    assert "'vgg16_inception', pretrained='imagenet'" in message
    assert str(tmp_path / "hub" / "checkpoints" / Path(url).name) in message


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
