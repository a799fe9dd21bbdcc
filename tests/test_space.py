"""Search spaces: every shipped YAML is a test case; every bad input names file and key."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

from dala_search.config import LOSS_WEIGHTINGS, SAMPLINGS, TrialConfig
from dala_search.errors import ConfigError
from dala_search.model.attention import available_attention
from dala_search.space import PRUNERS, SAMPLERS, SearchSettings
from dala_search.space_file import SPACES_DIR, list_spaces, load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHIPPED = sorted(SPACES_DIR.glob("*.yaml"))

# A minimal valid space; the bad cases below replace one part of it.
BASE_FIXED = "fixed: {pretrained: none, epochs: 2}\n"
BASE_PARAMS = "params:\n  lr: {type: float, low: 1e-4, high: 1e-2, log: true}\n"
FOCAL_GAMMA = "  focal_gamma: {type: float, low: 1, high: 2, condition: {loss_weighting: focal}}\n"


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def sample(space, n: int = 20, seed: int = 0) -> list[tuple[dict, TrialConfig]]:
    """n define-by-run samples from an in-memory study, as Ray's OptunaSearch would draw."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = space.suggest(trial)
        out.append((dict(trial.params), space.trial_config({**trial.params, **constants})))
        study.tell(trial, 0.5)
    return out


# --- the shipped spaces ---------------------------------------------------------------------


def test_shipped_spaces_are_the_three_named_by_their_files():
    names = [s.name for s in list_spaces()]
    assert {"default", "paper", "smoke"} <= set(names)
    assert names == [p.stem for p in SHIPPED]  # name matches the file: loadable by name


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_space_samples_valid_trial_configs(path: Path):
    space = load_space(path)
    assert space.description  # shown by `dala-search spaces`
    assert space.fixed["pretrained"] in ("imagenet", "none") or "pretrained" in space.params
    for params, cfg in sample(space):
        assert isinstance(cfg, TrialConfig)
        for key, value in space.fixed.items():
            expected = tuple(value) if isinstance(value, list) else value
            assert getattr(cfg, key) == expected
        for name, spec in space.params.items():
            decoded = {k: space.params[k].decode(v) for k, v in params.items()}
            # A conditional param is sampled exactly when its condition holds (worked out
            # here from the spec, not with the code under test).
            active = all(
                k in decoded and decoded[k] in allowed
                for k, allowed in (spec.condition or {}).items()
            )
            assert (name in params) == active, name
            if name not in params:
                continue
            value = getattr(cfg, name)
            if spec.type == "categorical":
                assert value in spec.choices
            else:
                assert spec.low <= value <= spec.high
                if spec.step is not None:
                    assert (value - spec.low) % spec.step == pytest.approx(0)


def test_smoke_space_is_tiny_and_offline():
    space = load_space("smoke")
    assert space.settings == SearchSettings(
        metric="balanced_accuracy",
        trials=4,
        magnifications=("40X", "100X"),
        sampler="tpe",
        pruner="median",
        max_concurrent=2,
    )
    assert space.fixed["pretrained"] == "none"
    assert (space.fixed["image_size"], space.fixed["epochs"], space.fixed["batch_size"]) == (
        48,
        3,
        16,
    )
    assert space.fixed["freeze_stages"] == 0
    assert space.params["focal_gamma"].condition == {"loss_weighting": ("focal",)}
    assert space.params["sampling"].choices == ("none", "oversample")


def test_smoke_focal_gamma_sampled_only_with_focal_loss():
    seen = set()
    for params, cfg in sample(load_space("smoke")):
        focal = params["loss_weighting"] == "focal"
        assert ("focal_gamma" in params) == focal
        if not focal:
            assert cfg.focal_gamma == TrialConfig().focal_gamma  # the default applies
        seen.add(focal)
    assert seen == {True, False}  # 20 samples reach both branches


def test_default_space_covers_the_card():
    space = load_space("default")
    assert space.fixed["pretrained"] == "imagenet"
    assert (space.fixed["epochs"], space.fixed["image_size"]) == (30, 224)
    assert (space.settings.trials, space.settings.pruner, space.settings.sampler) == (
        50,
        "median",
        "tpe",
    )
    p = space.params
    assert set(p["attention"].choices) == set(available_attention())
    assert set(p["loss_weighting"].choices) == set(LOSS_WEIGHTINGS)
    assert set(p["sampling"].choices) == set(SAMPLINGS)
    assert p["attention_stages"].choices == ((4,), (3, 4), (1, 2, 3, 4))
    assert p["leaky_slope"].log and (p["leaky_slope"].low, p["leaky_slope"].high) == (0.001, 0.3)
    assert p["lr"].log and p["lr"].low == 1e-5  # written `1e-5` in the file: read as a float
    assert p["weight_decay"].log
    assert p["batch_size"].choices == (16, 32, 64)
    assert (p["freeze_stages"].low, p["freeze_stages"].high) == (0, 3)
    assert p["focal_gamma"].condition == {"loss_weighting": ("focal",)}
    assert p["effective_beta"].condition == {"loss_weighting": ("effective_number",)}
    for name in ("fc1", "fc2", "dropout", "color_jitter", "stain_jitter", "crop_scale"):
        assert name in p
    # Parents come before the params conditioned on them.
    order = list(p)
    assert order.index("attention") < order.index("attention_stages")
    assert order.index("loss_weighting") < order.index("focal_gamma")


def test_paper_space_is_one_fixed_point_and_says_it_is_our_reading():
    space = load_space("paper")
    assert space.params == {}
    assert (space.settings.trials, space.settings.pruner) == (1, "none")
    assert "OUR reading" in space.description
    assert "ours" in space.path.read_text()
    cfg = space.trial_config(space.suggest(optuna.create_study().ask()))
    assert (cfg.attention, cfg.attention_stages, cfg.attention_blocks) == ("eca", (4,), "last")
    assert (cfg.fc1, cfg.fc2, cfg.leaky_slope) == (512, 256, 0.01)
    assert cfg.pretrained == "imagenet"


# --- define-by-run details ------------------------------------------------------------------


def test_list_choices_round_trip_to_tuples(tmp_path: Path):
    space = load_space(
        write(
            tmp_path,
            BASE_FIXED
            + "params:\n  attention_stages: {type: categorical, choices: [[4], [3, 4], 2]}\n",
        )
    )
    spec = space.params["attention_stages"]
    assert spec.choices == ((4,), (3, 4), (2,))  # a bare int is a one-stage tuple
    assert spec.optuna_choices == ("4", "3,4", "2")  # what Optuna may store
    assert spec.decode("3,4") == (3, 4)
    assert space.trial_config({"attention_stages": "3,4"}).attention_stages == (3, 4)
    # Already-decoded values (a list from a caller) pass through TrialConfig's coercion.
    assert space.trial_config({"attention_stages": [2]}).attention_stages == (2,)
    stages = {cfg.attention_stages for _, cfg in sample(space)}
    assert stages == {(4,), (3, 4), (2,)}


def test_suggest_returns_a_copy_of_the_fixed_values(tmp_path: Path):
    space = load_space(
        write(tmp_path, "fixed: {pretrained: none, epochs: 2, attention_stages: [4]}")
    )
    constants = space.suggest(optuna.create_study().ask())
    assert constants == {"pretrained": "none", "epochs": 2, "attention_stages": [4]}
    constants["attention_stages"].append(3)
    assert space.fixed["attention_stages"] == [4]


def test_trial_config_overrides_and_refusals(tmp_path: Path):
    space = load_space(
        write(tmp_path, "search: {metric: f1}\n" + BASE_FIXED + BASE_PARAMS, name="mine.yaml")
    )
    assert space.name == "mine"  # no name: the file stem
    cfg = space.trial_config({"lr": 1e-3}, epochs=5, seed=None, image_size=32)
    assert (cfg.lr, cfg.epochs, cfg.seed, cfg.image_size) == (1e-3, 5, 0, 32)
    assert cfg.select_metric == "f1"  # trials pick epochs by the metric the search maximises
    assert space.trial_config({}, select_metric="accuracy").select_metric == "accuracy"
    with pytest.raises(ConfigError, match=r"mine\.yaml.*'fc1'.*not part of space 'mine'"):
        space.trial_config({"fc1": 64})
    with pytest.raises(ConfigError, match=r"mine\.yaml: key 'epochs'"):
        space.trial_config({}, epochs=0)


def test_conditions_follow_dependency_order_not_file_order(tmp_path: Path):
    text = BASE_FIXED + textwrap.dedent(
        """\
        params:
          focal_gamma: {type: float, low: 1.0, high: 3.0, condition: {loss_weighting: focal}}
          loss_weighting: {type: categorical, choices: [focal]}
        """
    )
    space = load_space(write(tmp_path, text))
    assert list(space.params) == ["loss_weighting", "focal_gamma"]
    for params, cfg in sample(space, n=5):
        assert params["loss_weighting"] == "focal"
        assert 1.0 <= cfg.focal_gamma <= 3.0 and params["focal_gamma"] == cfg.focal_gamma


def test_condition_on_a_conditional_parent_needs_the_whole_chain(tmp_path: Path):
    text = BASE_FIXED + textwrap.dedent(
        """\
        params:
          attention: {type: categorical, choices: [se, none]}
          attention_stages:
            {type: categorical, choices: [[4], [3, 4]], condition: {attention: se}}
          attention_blocks:
            {type: categorical, choices: [last, all], condition: {attention_stages: [[3, 4]]}}
        """
    )
    space = load_space(write(tmp_path, text))
    assert space.params["attention_blocks"].condition == {"attention_stages": ((3, 4),)}
    for params, _ in sample(space, n=30):
        both = params["attention"] == "se" and params.get("attention_stages") == "3,4"
        assert ("attention_blocks" in params) == both


def test_describe_lines(tmp_path: Path):
    text = textwrap.dedent(
        """\
        fixed: {pretrained: none, epochs: 2}
        params:
          lr: {type: float, low: 1e-5, high: 0.01, log: true}
          fc1: {type: int, low: 64, high: 256, step: 64}
          loss_weighting: {type: categorical, choices: [none, focal]}
          focal_gamma: {type: float, low: 0.5, high: 5, condition: {loss_weighting: focal}}
          attention_stages: {type: categorical, choices: [[4], [3, 4]]}
        """
    )
    assert load_space(write(tmp_path, text)).describe() == [
        "lr                float        [1e-05, 0.01] log",
        "fc1               int          [64, 256] step 64",
        "loss_weighting    categorical  {none, focal}",
        "focal_gamma       float        [0.5, 5.0]  if loss_weighting in {focal}",
        "attention_stages  categorical  {[4], [3, 4]}",
        "pretrained        fixed        none",
        "epochs            fixed        2",
    ]


def test_ray_optuna_search_hands_trials_a_config_that_builds(tmp_path: Path):
    # The way the tuner uses a space: OptunaSearch(space=callable) merges params + constants.
    from ray.tune.search.optuna import OptunaSearch

    space = load_space("smoke")
    searcher = OptunaSearch(space=space.suggest, metric="balanced_accuracy", mode="max", seed=3)
    config = searcher.suggest("trial_0")
    assert config["pretrained"] == "none" and config["epochs"] == 3  # constants merged
    cfg = space.trial_config(config)
    assert cfg.fc1 == config["fc1"] and cfg.image_size == 48


def test_space_module_imports_without_optuna():
    code = "import sys, dala_search.space; assert 'optuna' not in sys.modules, 'optuna imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sampler_and_pruner_names_are_the_search_package_contract():
    assert SAMPLERS == ("tpe", "random", "cmaes", "gp", "nsga2")
    assert PRUNERS == ("median", "percentile", "sha", "hyperband", "asha", "none")


# --- loading by name / path -----------------------------------------------------------------


def test_load_by_name_and_by_path_agree():
    by_name = load_space("smoke")
    by_path = load_space(SPACES_DIR / "smoke.yaml")
    by_str = load_space(str(SPACES_DIR / "smoke.yaml"))
    assert by_name == by_path == by_str
    assert by_name.path == SPACES_DIR / "smoke.yaml"


def test_unknown_name_lists_the_available_spaces():
    with pytest.raises(ConfigError, match=r"'nope'.*available: .*default.*paper.*smoke"):
        load_space("nope")


def test_missing_path_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such search space file"):
        load_space(tmp_path / "missing.yaml")


# --- every bad input names the file and the key (and the value) ------------------------------

BAD = {
    "empty file": ("", ["empty"]),
    "only comments": ("# nothing here\n", ["empty"]),
    "yaml syntax": ("fixed:\n  epochs: 2\n   pretrained: none\n", ["YAML syntax", "line 3"]),
    "top level list": ("- fixed\n- params\n", ["top level", "mapping", "list"]),
    "unknown top-level key": ("paramz: {}\n" + BASE_FIXED, ["'paramz'", "top level"]),
    "section not a mapping": (BASE_FIXED + "params: [lr]\n", ["'params'", "mapping"]),
    "unknown search key": ("search: {trails: 3}\n" + BASE_FIXED, ["'trails'", "'search'"]),
    "unknown param": (
        BASE_FIXED + "params:\n  lrr: {type: float, low: 0.1, high: 0.2}\n",
        ["params.lrr", "'lrr'", "did you mean 'lr'"],
    ),
    "unknown fixed key": ("fixed: {pretrained: none, epoch: 2}\n", ["fixed.epoch", "'epochs'"]),
    "fixed and searched": (
        "fixed: {pretrained: none, epochs: 2, lr: 0.001}\n" + BASE_PARAMS,
        ["'lr'", "both fixed and searched"],
    ),
    "unknown param field": (
        BASE_FIXED + "params:\n  lr: {type: float, lo: 0.1, high: 0.2}\n",
        ["params.lr", "'lo'"],
    ),
    "field of another type": (
        BASE_FIXED + "params:\n  fc1: {type: int, low: 1, high: 4, choices: [1]}\n",
        ["params.fc1.choices", "type: int"],
    ),
    "missing type": (
        BASE_FIXED + "params:\n  lr: {low: 0.1, high: 0.2}\n",
        ["params.lr", "'type'"],
    ),
    "unknown type": (
        BASE_FIXED + "params:\n  lr: {type: double, low: 0.1, high: 0.2}\n",
        ["params.lr.type", "'double'", "float, int, categorical"],
    ),
    "missing high": (
        BASE_FIXED + "params:\n  lr: {type: float, low: 0.1}\n",
        ["params.lr", "'high'"],
    ),
    "low not a number": (
        BASE_FIXED + "params:\n  lr: {type: float, low: abc, high: 0.2}\n",
        ["params.lr.low", "'abc'"],
    ),
    "log not a bool": (
        BASE_FIXED + "params:\n  lr: {type: float, low: 0.1, high: 0.2, log: maybe}\n",
        ["params.lr.log", "'maybe'"],
    ),
    "low above high": (
        BASE_FIXED + "params:\n  lr: {type: float, low: 0.5, high: 0.1}\n",
        ["params.lr", "low 0.5", "high 0.1"],
    ),
    "low equals high": (
        BASE_FIXED + "params:\n  fc1: {type: int, low: 64, high: 64}\n",
        ["params.fc1", "low 64", "high 64"],
    ),
    "log with low zero": (
        BASE_FIXED + "params:\n  dropout: {type: float, low: 0, high: 0.5, log: true}\n",
        ["params.dropout.low", "log", "0.0"],
    ),
    "step with log": (
        BASE_FIXED + "params:\n  fc1: {type: int, low: 64, high: 256, step: 64, log: true}\n",
        ["params.fc1.step", "log"],
    ),
    "step zero": (
        BASE_FIXED + "params:\n  fc1: {type: int, low: 64, high: 256, step: 0}\n",
        ["params.fc1.step", "> 0", "0"],
    ),
    "step negative": (
        BASE_FIXED + "params:\n  dropout: {type: float, low: 0.0, high: 0.5, step: -0.1}\n",
        ["params.dropout.step", "-0.1"],
    ),
    "step not reaching high": (
        BASE_FIXED + "params:\n  fc1: {type: int, low: 64, high: 250, step: 64}\n",
        ["params.fc1.step", "multiple", "250"],
    ),
    "int with float bound": (
        BASE_FIXED + "params:\n  fc1: {type: int, low: 64.5, high: 256}\n",
        ["params.fc1.low", "integer", "64.5"],
    ),
    "float type on an int key": (
        BASE_FIXED + "params:\n  fc1: {type: float, low: 64, high: 256}\n",
        ["params.fc1.type", "type: int"],
    ),
    "empty choices": (
        BASE_FIXED + "params:\n  attention: {type: categorical, choices: []}\n",
        ["params.attention.choices", "non-empty"],
    ),
    "duplicate choice": (
        BASE_FIXED + "params:\n  attention: {type: categorical, choices: [se, eca, se]}\n",
        ["params.attention.choices", "'se'", "twice"],
    ),
    "unknown attention choice": (
        BASE_FIXED + "params:\n  attention: {type: categorical, choices: [se, foo]}\n",
        ["params.attention", "'foo'", "cbam, eca, none, se, simam"],
    ),
    "unknown loss weighting choice": (
        BASE_FIXED + "params:\n  loss_weighting: {type: categorical, choices: [none, balanced]}\n",
        ["params.loss_weighting", "'balanced'", "inverse_frequency"],
    ),
    "bad stages choice": (
        BASE_FIXED + "params:\n  attention_stages: {type: categorical, choices: [[4], [5]]}\n",
        ["params.attention_stages", "[5]", "stages 1-4"],
    ),
    "bound outside the trial range": (
        BASE_FIXED + "params:\n  dropout: {type: float, low: 0.1, high: 0.99}\n",
        ["params.dropout", "0.99"],
    ),
    "numeric range on a string key": (
        BASE_FIXED + "params:\n  attention: {type: float, low: 0, high: 1}\n",
        ["params.attention", "must be a string"],
    ),
    "unknown fixed sampling": (
        "fixed: {pretrained: none, epochs: 2, sampling: smote}\n",
        ["fixed", "'sampling'", "'smote'", "oversample"],
    ),
    "unknown fixed attention": (
        "fixed: {pretrained: none, epochs: 2, attention: foo}\n",
        ["fixed", "'attention'", "'foo'", "cbam, eca, none, se, simam"],
    ),
    "fixed wrong type": (
        "fixed: {pretrained: none, epochs: ten}\n",
        ["fixed", "'epochs'", "'ten'"],
    ),
    "unknown sampler": (
        "search: {sampler: bayes}\n" + BASE_FIXED,
        ["search.sampler", "'bayes'", "tpe, random, cmaes, gp"],
    ),
    "unknown pruner": (
        "search: {pruner: early}\n" + BASE_FIXED,
        ["search.pruner", "'early'", "median, percentile"],
    ),
    "unknown metric": (
        "search: {metric: auc}\n" + BASE_FIXED,
        ["search.metric", "'auc'", "roc_auc"],
    ),
    "unknown prune_on": (
        "search: {prune_on: loss}\n" + BASE_FIXED,
        ["search.prune_on", "'loss'", "roc_auc"],
    ),
    "unknown magnification": (
        "search: {magnifications: [40X, 50X]}\n" + BASE_FIXED,
        ["search.magnifications", "'50X'", "40X, 100X, 200X, 400X"],
    ),
    "magnifications not a list": (
        "search: {magnifications: some}\n" + BASE_FIXED,
        ["search.magnifications", "'some'"],
    ),
    "trials zero": ("search: {trials: 0}\n" + BASE_FIXED, ["search.trials", "0"]),
    "max_concurrent negative": (
        "search: {max_concurrent: -1}\n" + BASE_FIXED,
        ["search.max_concurrent", "-1"],
    ),
    "condition on a missing param": (
        BASE_FIXED + "params:\n" + FOCAL_GAMMA,
        ["params.focal_gamma.condition.loss_weighting", "not a searched parameter"],
    ),
    "condition on a fixed param": (
        "fixed: {pretrained: none, epochs: 2, loss_weighting: focal}\n" + "params:\n" + FOCAL_GAMMA,
        ["params.focal_gamma.condition.loss_weighting", "fixed to 'focal'", "searched"],
    ),
    "condition on a numeric param": (
        BASE_FIXED
        + BASE_PARAMS
        + "  fc1: {type: int, low: 64, high: 128, condition: {lr: 0.001}}\n",
        ["params.fc1.condition.lr", "float parameter", "categorical"],
    ),
    "condition value not a choice": (
        BASE_FIXED
        + "params:\n  loss_weighting: {type: categorical, choices: [none, focal]}\n"
        + "  focal_gamma: {type: float, low: 1, high: 2, condition: {loss_weighting: focall}}\n",
        ["params.focal_gamma.condition.loss_weighting", "'focall'", "none, focal"],
    ),
    "condition not a mapping": (
        BASE_FIXED + "params:\n  focal_gamma: {type: float, low: 1, high: 2, condition: focal}\n",
        ["params.focal_gamma.condition", "'focal'"],
    ),
    "cyclic conditions": (
        BASE_FIXED
        + "params:\n"
        + "  attention: {type: categorical, choices: [se, eca], condition: {sampling: none}}\n"
        + "  sampling: {type: categorical, choices: [none, weighted], condition: {attention: se}}",
        ["params", "cyclic", "attention", "sampling"],
    ),
    "self condition": (
        BASE_FIXED
        + "params:\n  attention: {type: categorical, choices: [se], condition: {attention: se}}\n",
        ["params", "cyclic", "attention -> attention"],
    ),
    "pretrained unset": ("fixed: {epochs: 2}\n", ["'pretrained'", "must be stated"]),
    "epochs unset": ("fixed: {pretrained: none}\n" + BASE_PARAMS, ["'epochs'", "must be stated"]),
    "name not a string": ("name: [a]\n" + BASE_FIXED, ["'name'", "['a']"]),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_space_names_file_and_key(tmp_path: Path, case: str):
    text, fragments = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_the_minimal_base_space_itself_is_valid(tmp_path: Path):
    # The bad cases above differ from this by one part: it must load on its own.
    space = load_space(write(tmp_path, BASE_FIXED + BASE_PARAMS))
    assert space.params["lr"].low == 1e-4 and space.params["lr"].log
    assert space.settings == SearchSettings()


def test_the_documented_example_loads(tmp_path: Path):
    # search_spaces/README.md documents the format with a full example: it must stay valid.
    readme = (SPACES_DIR / "README.md").read_text()
    example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    space = load_space(write(tmp_path, example, name="example.yaml"))
    assert space.name == "default"
    assert (space.settings.trials, space.settings.max_concurrent) == (30, 4)
    assert space.params["effective_beta"].condition == {"loss_weighting": ("effective_number",)}
    assert space.params["attention_stages"].choices == ((4,), (3, 4), (1, 2, 3, 4))


def test_prune_on_is_read_from_the_search_section(tmp_path: Path):
    path = tmp_path / "s.yaml"
    path.write_text("search: {prune_on: roc_auc}\n" + BASE_FIXED)
    assert load_space(path).settings.prune_on == "roc_auc"
    path.write_text(BASE_FIXED)
    assert load_space(path).settings.prune_on is None  # the searched metric
