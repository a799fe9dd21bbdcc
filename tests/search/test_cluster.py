"""The Ray cluster: ``ray_cluster.yaml`` checked offline against the schema inside the ray
package, and real two-node searches on loopback (a head and a worker node started by
``ray.cluster_utils.Cluster``) logging to a real ``mlflow server`` started by the test:
trials land on both nodes, and a worker node killed mid-trial costs no trial.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dala_search.runs import schema

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "ray_cluster.yaml"


# ----------------------------------------------------------------- ray_cluster.yaml offline


def _prepared(config: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` checks: Ray's AWS defaults merged in, then the JSON schema
    (``ray/autoscaler/ray-schema.json``) and Ray's own consistency checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(config))
    validate_config(full)
    return full


@pytest.fixture(scope="module")
def cluster_config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_is_valid_for_the_launcher(cluster_config: dict[str, Any]) -> None:
    full = _prepared(cluster_config)
    assert full["provider"]["type"] == "aws"
    assert full["available_node_types"][full["head_node_type"]]["resources"] == {"CPU": 0}


def test_cluster_yaml_mutations_are_refused(cluster_config: dict[str, Any]) -> None:
    """The check can fail: a typo'd key, a wrong type, a head type that is not declared."""
    import jsonschema

    typo = copy.deepcopy(cluster_config)
    typo["setup_comands"] = typo.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        _prepared(typo)

    bad_type = copy.deepcopy(cluster_config)
    bad_type["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="'one'"):
        _prepared(bad_type)

    no_head = copy.deepcopy(cluster_config)
    no_head["head_node_type"] = "cpu_head"
    with pytest.raises(ValueError, match="head_node_type"):
        _prepared(no_head)


def test_cluster_yaml_runs_mlflow_gpu_workers_and_installs_the_project(
    cluster_config: dict[str, Any],
) -> None:
    full = _prepared(cluster_config)
    head_start = " ".join(full["head_start_ray_commands"])
    assert "mlflow server --host 0.0.0.0 --port 5000" in head_start
    assert "--backend-store-uri sqlite:///" in head_start
    assert "--serve-artifacts" in head_start
    assert "ray start --head" in head_start

    workers = {k: v for k, v in full["available_node_types"].items() if k != "head"}
    assert list(workers) == ["gpu_worker"]
    gpu = workers["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= full["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g4dn.", "g5.", "g6.", "p3.", "p4d."))

    # The project is mounted and installed (editable: its search_spaces/ stays next to it)
    # on every node, with the same Ray as the launcher's.
    mounts = full["file_mounts"]
    assert mounts["~/dala-search"] == "."
    assert (REPO / "search_spaces" / "default.yaml").is_file()
    for commands in (full["head_setup_commands"], full["worker_setup_commands"]):
        joined = " ".join(commands)
        assert "-e ~/dala-search" in joined
        import ray

        assert f"ray[default,train,tune]=={ray.__version__}" in joined
    assert "boto3" in " ".join(full["head_setup_commands"])  # the autoscaler needs it

    # Token auth, the same on every node: the mode in every `ray start`, the token mounted.
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    for cmd in (*full["head_start_ray_commands"], *full["worker_start_ray_commands"]):
        if "ray start" in cmd:
            assert cmd.startswith("export RAY_AUTH_MODE=token;"), cmd
    # Trials open the decoded-image cache by the driver's path: one shared folder (EFS).
    for commands in (full["head_setup_commands"], full["worker_setup_commands"]):
        joined = " ".join(commands)
        assert "export RAY_AUTH_MODE=token" in joined
        assert "mount -t nfs4" in joined and "export DALA_CACHE_DIR=/mnt/efs/" in joined


# ----------------------------------------------------------------- two nodes on loopback


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, start_mlflow_server) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite store, proxied artifacts), as on the
    cluster's head; stopped at the end."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield server.uri
    server.stop()


@pytest.fixture
def two_nodes() -> Iterator[Any]:
    """A head and a worker node, one CPU each, so two concurrent trials need both."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            # Declare a dead node after ~5 s instead of Ray's default ~15 s (test time).
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5},
        },
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _trial_runs(uri: str, name: str) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(schema.experiment_name(name))
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{schema.TAG_ROLE}` = 'trial'"
    )


def _check_record(plan: Any, outcomes: list[Any], uri: str) -> list[Any]:
    """Every requested trial finished once, in Optuna and on the server; nothing RUNNING;
    the best child run recorded on its parent and registered."""
    import optuna
    from mlflow import MlflowClient

    (outcome,) = outcomes
    assert not outcome.interrupted
    assert outcome.finished == plan.trials
    study = optuna.load_study(study_name=plan.study_name("40X"), storage=plan.storage)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert len(states) == plan.trials
    assert set(states) <= {"COMPLETE", "PRUNED"}, states

    runs = _trial_runs(uri, plan.name)
    seen = [
        (r.data.tags.get(schema.TAG_RAY_ID), r.data.tags.get(schema.TAG_ATTEMPT), r.info.status)
        for r in runs
    ]
    optuna_ids = [t.user_attrs.get("ray_trial_id") for t in study.get_trials(deepcopy=False)]
    assert len(runs) == plan.trials, (seen, optuna_ids)
    assert len({r.data.tags[schema.TAG_RAY_ID] for r in runs}) == plan.trials
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs), [
        (r.info.status, r.data.tags.get(schema.TAG_STATE)) for r in runs
    ]
    assert {r.data.tags[schema.TAG_STATE] for r in runs} <= {"completed", "pruned"}

    client = MlflowClient(tracking_uri=uri)
    assert outcome.best_run_id in {r.info.run_id for r in runs}
    parent = client.get_run(runs[0].data.tags[schema.PARENT_TAG])
    assert parent.data.tags["dala.best_run_id"] == outcome.best_run_id
    assert parent.info.status == "FINISHED"
    assert client.get_model_version_by_alias(schema.model_name("40X"), "best").run_id == (
        outcome.best_run_id
    )
    return runs


@pytest.mark.slow
def test_search_on_two_nodes_survives_a_killed_worker_node(
    two_nodes: Any, mlflow_server: str, tiny_space: Path, demo_root: Path, tmp_path: Path
) -> None:
    """Issue 3: trials of one search run on both nodes and all log to one tracking server.
    Issue 5: the worker node dies (every process of it SIGKILLed) while a trial trains on
    it; that trial is restarted on the surviving head and the search finishes every trial.

    One search proves both, to keep the suite's time: a separate plain two-node search
    would repeat all but the kill.
    """
    from dala_search.search.tuner import plan_search, run_search

    (worker,) = two_nodes.worker_nodes
    name = "two-nodes"
    plan = plan_search(
        space=str(tiny_space),
        name=name,
        data_dir=demo_root,
        address=two_nodes.address,  # not "auto": plan_search then demands an http store
        tracking_uri=mlflow_server,
        runs_dir=tmp_path / "runs",
        epochs=3,  # long enough that the kill lands mid-trial
        max_concurrent=2,  # one CPU per node, one CPU per trial: a trial on each node
        max_retries=2,
    )
    killed: dict[str, Any] = {}

    def kill_worker_once_it_trains() -> None:
        """Wait for a trial on the worker node to log an epoch, then kill the node."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "run" not in killed:
            for r in _trial_runs(mlflow_server, name):
                on_worker = r.data.tags.get(schema.TAG_NODE) == worker.node_id
                if on_worker and r.info.status == "RUNNING" and r.data.metrics:
                    killed["run"] = r.info.run_id
                    break
            else:
                time.sleep(0.5)
        if "run" in killed:
            two_nodes.remove_node(worker, allow_graceful=False)
            killed["done"] = True

    killer = threading.Thread(target=kill_worker_once_it_trains, daemon=True)
    killer.start()
    outcomes = run_search(plan)
    killer.join(timeout=60)

    assert killed.get("done"), "no trial was seen training on the worker node"
    assert not worker.any_processes_alive()
    runs = _check_record(plan, outcomes, mlflow_server)
    # Both nodes ran trials (a run's node tag is its first attempt's node).
    head = two_nodes.head_node.node_id
    assert {r.data.tags[schema.TAG_NODE] for r in runs} == {head, worker.node_id}
    # The killed trial kept its one run, finished by a second attempt (on the head: the
    # worker was gone); every other trial ran once.
    attempts = {r.info.run_id: int(r.data.tags[schema.TAG_ATTEMPT]) for r in runs}
    last = attempts[killed["run"]]
    restarted = next(r for r in runs if r.info.run_id == killed["run"])
    assert restarted.data.tags[f"{schema.TAG_NODE}.{last}"] == head  # where it finished
    assert attempts.pop(killed["run"]) >= 2
    assert set(attempts.values()) == {1}


@pytest.mark.slow
def test_a_local_tracking_store_is_refused_on_a_multi_node_cluster(
    two_nodes: Any, tiny_space: Path, demo_root: Path, tmp_path: Path
) -> None:
    """``--address auto`` can join a cluster plan_search cannot see: run_search refuses a
    sqlite store once it sees several nodes, before any folder or record exists."""
    import dataclasses

    from dala_search.errors import ConfigError
    from dala_search.search.tuner import plan_search, run_search

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan = plan_search(
        space=str(tiny_space), data_dir=demo_root, tracking_uri=uri, runs_dir=tmp_path / "runs"
    )
    plan = dataclasses.replace(plan, address=two_nodes.address)  # what "auto" would join
    with pytest.raises(ConfigError, match="2 nodes.*--tracking-uri http"):
        run_search(plan)
    assert not (tmp_path / "runs").exists()
