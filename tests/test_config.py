"""TrialConfig: unknown keys refused, bad values named, YAML round trip."""

from __future__ import annotations

import pytest
import yaml

from dala_search.config import TRIAL_KEYS, TrialConfig, load_trial_config
from dala_search.errors import ConfigError


def test_defaults_are_valid_and_round_trip() -> None:
    c = TrialConfig()
    assert c.attention_stages == (4,)
    again = TrialConfig.from_dict(c.to_dict())
    assert again == c
    assert set(c.to_dict()) == set(TRIAL_KEYS)


def test_unknown_key_is_refused_and_named() -> None:
    with pytest.raises(ConfigError, match="'fc_width'") as e:
        TrialConfig.from_dict({"fc_width": 3})
    assert "valid keys" in str(e.value)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("leaky_slope", 0.0, "leaky_slope"),
        ("leaky_slope", 1.5, "leaky_slope"),
        ("dropout", -0.1, "dropout"),
        ("lr", 0.0, "lr"),
        ("attention", "transformer", "transformer"),
        ("loss_weighting", "dice", "dice"),
        ("sampling", "smote", "smote"),
        ("attention_stages", [5], "attention_stages"),
        ("attention_stages", [4, 4], "repeats"),
        ("attention_stages", [], "attention_stages"),
        ("batch_size", 1, "batch_size"),
        ("epochs", 2.5, "epochs"),
        ("epochs", "ten", "epochs"),
        ("flip", "yes", "flip"),
        ("fc1", True, "fc1"),
        ("pretrained", "resnet", "pretrained"),
        ("device", "tpu", "device"),
        ("warmup_epochs", 10, "warmup_epochs"),
        ("crop_scale", 1.2, "crop_scale"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        TrialConfig.from_dict({key: value})


def test_int_valued_floats_and_lists_are_coerced() -> None:
    c = TrialConfig.from_dict({"epochs": 3.0, "lr": 1, "attention_stages": [3, 4]})
    assert c.epochs == 3 and isinstance(c.epochs, int)
    assert c.lr == 1.0 and isinstance(c.lr, float)
    assert c.attention_stages == (3, 4)


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        TrialConfig().lr = 1.0  # type: ignore[misc]


def test_load_yaml_with_overrides_and_file_named_in_errors(tmp_path) -> None:
    p = tmp_path / "trial.yaml"
    p.write_text(yaml.safe_dump({"pretrained": "none", "epochs": 4, "fc1": 64}))
    c = load_trial_config(p, epochs=2, seed=None)
    assert (c.pretrained, c.epochs, c.fc1) == ("none", 2, 64)
    bad = tmp_path / "bad.yaml"
    bad.write_text("fc1: 64\nwidth: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'width'"):
        load_trial_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("fc1: [64\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml.*not valid YAML"):
        load_trial_config(broken)
    with pytest.raises(ConfigError, match="no such config file"):
        load_trial_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_trial_config(listy)
