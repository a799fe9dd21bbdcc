"""DALAResNet50: attention placement, head, freezing, frozen BatchNorm and pretrained weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from dala_search.config import TrialConfig
from dala_search.errors import ConfigError
from dala_search.model import attention as attention_module
from dala_search.model.attention import available_attention, create_attention
from dala_search.model.dalaresnet import (
    IMAGENET_WEIGHTS,
    NUM_CLASSES,
    DALAResNet50,
    PostAttention,
    build_dalaresnet,
)

GATES = [n for n in available_attention() if n != "none"]
BLOCKS_PER_STAGE = {1: 3, 2: 4, 3: 6, 4: 3}  # ResNet50: 3-4-6-3 bottlenecks
CHANNELS = {1: 256, 2: 512, 3: 1024, 4: 2048}
RESNET50_PARAMS_WITHOUT_FC = 25_557_032 - (2048 * 1000 + 1000)  # torchvision's count minus fc
IMAGENET_FILE = "resnet50-11ad3fa6.pth"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny inputs gain nothing from intra-op threads, and on a busy 2-core machine torch's
    # spinning OpenMP threads made this file ~5x slower (150 s vs 30 s): use one, then restore.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _x(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size)


@pytest.mark.parametrize("position", ["post", "residual"])
@pytest.mark.parametrize("blocks", ["last", "all"])
@pytest.mark.parametrize("stages", [(4,), (1, 2, 3, 4)])
@pytest.mark.parametrize("name", GATES)
def test_every_placement_builds_trains_and_counts(
    name: str, stages: tuple[int, ...], blocks: str, position: str
) -> None:
    torch.manual_seed(0)
    model = DALAResNet50(
        2,
        pretrained="none",
        attention=name,
        attention_stages=stages,
        attention_blocks=blocks,
        attention_position=position,
    )
    expected = sum(BLOCKS_PER_STAGE[k] if blocks == "all" else 1 for k in stages)
    modules = model.attention_modules()
    assert len(modules) == expected
    reference = type(create_attention(name, 8))
    for qualname, module in modules.items():
        assert isinstance(module, reference)
        # "backbone.layer{k}.{i}...": stage k's blocks have CHANNELS[k] output channels.
        k, i = int(qualname.split(".")[1][-1]), int(qualname.split(".")[2])
        assert k in stages
        assert i == BLOCKS_PER_STAGE[k] - 1 or blocks == "all"
        if name != "simam":
            first = next(module.parameters())
            assert CHANNELS[k] in first.shape or name == "eca"
        parent = model.get_submodule(qualname.rsplit(".", 1)[0])
        if position == "post":
            assert isinstance(parent, PostAttention) and parent.attn is module
        else:
            assert qualname.endswith(".bn3.1") and isinstance(parent[0], nn.BatchNorm2d)

    model.train()
    logits = model(_x())
    assert logits.shape == (2, 2)
    logits.square().sum().backward()
    for qualname, module in modules.items():
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{qualname}.{pname}"


@pytest.mark.parametrize(
    ("stages", "blocks", "count"),
    [((4,), "all", 3), ((3,), "all", 6), ((1, 2, 3, 4), "all", 16), ((2, 3), "last", 2)],
)
def test_inserted_module_counts(stages: tuple[int, ...], blocks: str, count: int) -> None:
    model = DALAResNet50(
        pretrained="none", attention="simam", attention_stages=stages, attention_blocks=blocks
    )
    assert len(model.attention_modules()) == count


@pytest.mark.parametrize("name", ["none", "eca"])  # the grid above covers every module
def test_subtype_task_has_eight_logits(name: str) -> None:
    model = build_dalaresnet(TrialConfig(task="subtype", pretrained="none", attention=name))
    model.eval()
    with torch.no_grad():
        assert model(_x()).shape == (2, NUM_CLASSES["subtype"]) == (2, 8)


@pytest.mark.parametrize(
    ("stages", "blocks", "position"), [((4,), "last", "post"), ((1, 2, 3, 4), "all", "residual")]
)
def test_none_inserts_nothing_and_keeps_plain_resnet50(
    stages: tuple[int, ...], blocks: str, position: str
) -> None:
    model = DALAResNet50(
        pretrained="none",
        attention="none",
        attention_stages=stages,
        attention_blocks=blocks,
        attention_position=position,
    )
    assert model.attention_modules() == {}
    plain = set(torchvision.models.resnet50().state_dict()) - {"fc.weight", "fc.bias"}
    assert set(model.backbone.state_dict()) == plain


def test_default_config_is_eca_after_last_block_of_stage_4_and_documented_head() -> None:
    model = build_dalaresnet(TrialConfig(pretrained="none"))
    assert list(model.attention_modules()) == ["backbone.layer4.2.attn"]
    assert isinstance(model.backbone.layer4[2].attn, type(create_attention("eca", 2048)))
    assert model.backbone.layer4[2].attn.conv.kernel_size == (7,)
    kinds = [type(m) for m in model.head]
    assert kinds == [
        nn.AdaptiveAvgPool2d,
        nn.Flatten,
        nn.Linear,
        nn.LeakyReLU,
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
    ]
    assert (model.head.fc1.in_features, model.head.fc1.out_features) == (2048, 512)
    assert (model.head.fc2.out_features, model.head.out.out_features) == (256, 2)


def test_head_follows_the_config() -> None:
    config = TrialConfig(pretrained="none", fc1=64, fc2=32, leaky_slope=0.2, dropout=0.5)
    head = build_dalaresnet(config).head
    assert (head.fc1.out_features, head.fc2.in_features, head.fc2.out_features) == (64, 64, 32)
    assert head.act1.negative_slope == 0.2
    assert head.drop1.p == head.drop2.p == 0.5
    assert head.out.in_features == 32


class _Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0


@pytest.fixture
def zero_attention(monkeypatch: pytest.MonkeyPatch) -> str:
    """A registered test attention that zeroes its input (private registry copy)."""
    registry = dict(attention_module._REGISTRY)
    registry["zero"] = lambda channels, *, reduction=16: _Zero()
    monkeypatch.setattr(attention_module, "_REGISTRY", registry)
    return "zero"


def test_post_position_acts_on_the_block_output(zero_attention: str) -> None:
    # Zeroing the output of stage 4's last block zeroes the pooled features: the logits are
    # then head(0) whatever the image.
    model = DALAResNet50(pretrained="none", attention=zero_attention).eval()
    with torch.no_grad():
        assert torch.equal(model(_x()), model(_x() * 5 + 1))
        assert torch.count_nonzero(model.backbone(_x())) == 0


def test_residual_position_acts_before_the_add(zero_attention: str) -> None:
    # Zeroing the residual branch leaves relu(0 + identity): block(x) == relu(x).
    model = DALAResNet50(
        pretrained="none", attention=zero_attention, attention_position="residual"
    ).eval()
    block = model.backbone.layer4[2]
    x = torch.randn(2, 2048, 3, 3)
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(x))


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_freeze_stages_freezes_exactly_stem_and_first_k_stages(k: int) -> None:
    # Attention in every block of every stage: those inside frozen stages must stay trainable.
    model = DALAResNet50(
        pretrained="none",
        freeze_stages=k,
        attention="se",
        attention_stages=(1, 2, 3, 4),
        attention_blocks="all",
        attention_position="residual",
    )
    frozen_prefixes = ("backbone.conv1.", "backbone.bn1.") if k else ()
    frozen_prefixes += tuple(f"backbone.layer{s}." for s in range(1, k + 1))
    attention_prefixes = tuple(f"{n}." for n in model.attention_names)
    expected = {
        n
        for n, _ in model.named_parameters()
        if n.startswith(frozen_prefixes) and not n.startswith(attention_prefixes)
    }
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == expected
    assert all(p.requires_grad for m in model.attention_modules().values() for p in m.parameters())
    if k == 4:  # the whole torchvision backbone: its well-known parameter count
        assert sum(p.numel() for n, p in model.named_parameters() if n in frozen) == (
            RESNET50_PARAMS_WITHOUT_FC
        )
        assert RESNET50_PARAMS_WITHOUT_FC == 23_508_032
    model(_x()).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n in frozen), n


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics() -> None:
    torch.manual_seed(0)
    model = DALAResNet50(pretrained="none", freeze_stages=2, attention="cbam")
    frozen_bn = model.backbone.layer2[0].bn1
    free_bn = model.backbone.layer3[0].bn1
    stem_bn = model.backbone.bn1
    before = (frozen_bn.running_mean.clone(), stem_bn.running_mean.clone())
    free_before = free_bn.running_mean.clone()

    model.eval()
    model.train()  # train() again after eval(): frozen BNs must not flip back
    assert not frozen_bn.training and not stem_bn.training
    assert free_bn.training and model.head.training
    with torch.no_grad():
        model(_x(64))
    assert torch.equal(frozen_bn.running_mean, before[0])
    assert torch.equal(stem_bn.running_mean, before[1])
    assert not torch.equal(free_bn.running_mean, free_before)

    model.eval()
    assert not free_bn.training


def test_no_freezing_leaves_every_batchnorm_training() -> None:
    model = DALAResNet50(pretrained="none", freeze_stages=0).train()
    assert all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_parameter_groups_cover_trainable_parameters_once() -> None:
    model = DALAResNet50(pretrained="none", freeze_stages=3, attention="eca")
    decay, no_decay = model.parameter_groups(weight_decay=0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is model.head.fc1.bias for p in no_decay["params"])
    assert any(p is model.head.fc1.weight for p in decay["params"])
    assert any(p is model.backbone.layer4[2].attn.conv.weight for p in decay["params"])
    torch.optim.AdamW([decay, no_decay], lr=1e-3)  # accepted as optimizer groups


# ---- pretrained weights ----------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A state dict saved from a randomly initialised torchvision ResNet50 (with its fc)."""
    torch.manual_seed(123)
    state = torchvision.models.resnet50().state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("position", ["post", "residual"])
def test_pretrained_file_values_are_copied(resnet50_file: tuple[Path, dict], position: str) -> None:
    path, state = resnet50_file
    torch.manual_seed(7)  # a different seed: equality below can only come from the file
    model = DALAResNet50(
        pretrained=str(path),
        attention="se",
        attention_blocks="all",
        attention_position=position,
    )
    block = model.backbone.layer4[2]
    if position == "post":
        block = block.block
        bn3 = block.bn3
    else:
        bn3 = block.bn3[0]
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(block.conv3.weight, state["layer4.2.conv3.weight"])
    assert torch.equal(bn3.weight, state["layer4.2.bn3.weight"])
    assert torch.equal(model.backbone.bn1.running_var, state["bn1.running_var"])
    assert not torch.equal(
        torchvision.models.resnet50().conv1.weight, state["conv1.weight"]
    )  # a fresh init differs, so the comparisons above are meaningful


def test_imagenet_without_network_or_cache_says_how_to_provide_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_downloads: list[str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = hub_downloads
    with pytest.raises(ConfigError) as info:
        DALAResNet50(pretrained="imagenet")
    message = str(info.value)
    assert calls == [IMAGENET_WEIGHTS.url]
    assert IMAGENET_WEIGHTS.url.endswith(IMAGENET_FILE)
    assert "TORCH_HOME" in message
    assert str(tmp_path / "hub" / "checkpoints" / IMAGENET_FILE) in message
    assert "pretrained: /path/to/resnet50.pth" in message
    assert "Name or service not known" in message


def test_imagenet_uses_the_torch_home_cache(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    hub_downloads: list[str],
    resnet50_file: tuple[Path, dict],
) -> None:
    path, state = resnet50_file
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / IMAGENET_FILE).symlink_to(path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = hub_downloads
    model = DALAResNet50(pretrained="imagenet")
    assert calls == []
    assert torch.equal(model.backbone.layer3[5].conv2.weight, state["layer3.5.conv2.weight"])


def test_imagenet_corrupt_cache_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_downloads: list[str]
) -> None:
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / IMAGENET_FILE).write_bytes(b"truncated download")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        DALAResNet50(pretrained="imagenet")
    message = str(info.value)
    assert f"the cached file {cache / IMAGENET_FILE} cannot be loaded" in message
    assert "delete it" in message and "weights_only=False" not in message


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.pth"
    with pytest.raises(ConfigError, match=f"no such file {path}"):
        DALAResNet50(pretrained=str(path))


def test_garbage_weights_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=f"cannot load {path}"):
        DALAResNet50(pretrained=str(path))


def test_weights_file_with_code_is_refused(tmp_path: Path) -> None:
    # weights_only=True: a pickle that would build arbitrary objects is not loaded.
    path = tmp_path / "code.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": Path("x")}, path)
    with pytest.raises(ConfigError, match=f"cannot load {path}.*refused.*PosixPath"):
        DALAResNet50(pretrained=str(path))


def test_non_mapping_weights_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(ConfigError, match="holds a list, not a ResNet50 state dict"):
        DALAResNet50(pretrained=str(path))


def test_incomplete_or_wrong_state_dict_is_refused(
    tmp_path: Path, resnet50_file: tuple[Path, dict]
) -> None:
    _, state = resnet50_file
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if k != "layer4.2.bn3.weight"}, partial)
    with pytest.raises(ConfigError, match=r"missing keys \[layer4\.2\.bn3\.weight\] \(1\)"):
        DALAResNet50(pretrained=str(partial))
    resnet18 = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet18)
    with pytest.raises(ConfigError, match="not a ResNet50 state dict"):
        DALAResNet50(pretrained=str(resnet18))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"pretrained": "weights.bin"}, "'imagenet', 'none'"),
        ({"pretrained": "none", "attention": "nope"}, "cbam, eca, none, se, simam"),
        ({"pretrained": "none", "attention_position": "pre"}, "valid: post, residual"),
        ({"pretrained": "none", "attention_blocks": "first"}, "valid: last, all"),
        ({"pretrained": "none", "attention_stages": (5,)}, "attention_stages"),
        ({"pretrained": "none", "freeze_stages": 5}, "freeze_stages"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        DALAResNet50(**kwargs)
