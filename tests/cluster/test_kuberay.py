"""cluster/kuberay.yaml: the RayCluster validated offline against KubeRay's CRD schema
(``raycluster-v1-schema.json`` beside this file: the ``openAPIV3Schema`` of
ray-project/kuberay's ``ray-operator/config/crd/bases/ray.io_rayclusters.yaml``, its
repository, commit and path recorded in the file's ``source``), and its shape checked.

The API server prunes fields a CRD schema does not know; ``kubectl apply`` with strict field
validation (its default) refuses them instead. That is what the check does: every object in
the schema that lists its properties and does not keep unknown fields admits no others.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "cluster" / "kuberay.yaml"
SCHEMA = Path(__file__).parent / "raycluster-v1-schema.json"


def _strict(node: Any) -> Any:
    """The schema with unknown fields refused (kubectl's strict field validation)."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    keeps_unknown = out.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in out
    if "properties" in out and not keeps_unknown:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validator() -> Any:
    import jsonschema

    stored = json.loads(SCHEMA.read_text())
    source = stored["source"]
    assert source["repository"] == "https://github.com/ray-project/kuberay"
    assert len(source["commit"]) == 40
    assert source["path"] == "ray-operator/config/crd/bases/ray.io_rayclusters.yaml"
    schema = _strict(stored["schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def documents() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def _errors(validator: Any, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_raycluster_validates_against_the_crd_schema(validator: Any, documents: dict) -> None:
    cluster = documents["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert _errors(validator, cluster) == []


def test_crd_schema_check_refuses_bad_manifests(validator: Any, documents: dict) -> None:
    """The check can fail: a typo'd key, a wrong type, a value outside an enum."""
    typo = copy.deepcopy(documents["RayCluster"])
    typo["spec"]["headGroupSpec"]["rayStartParam"] = typo["spec"]["headGroupSpec"].pop(
        "rayStartParams"
    )
    assert any("rayStartParam'" in e for e in _errors(validator, typo))

    wrong_type = copy.deepcopy(documents["RayCluster"])
    wrong_type["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("workerGroupSpecs/0/replicas" in e for e in _errors(validator, wrong_type))

    bad_mode = copy.deepcopy(documents["RayCluster"])
    bad_mode["spec"]["authOptions"]["mode"] = "tokens"
    assert any("authOptions/mode" in e for e in _errors(validator, bad_mode))


def test_manifest_has_cpu_head_with_mlflow_gpu_workers_and_shared_data(documents: dict) -> None:
    import ray

    cluster = documents["RayCluster"]["spec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no trial on the head
    containers = {c["name"]: c for c in head["template"]["spec"]["containers"]}
    assert list(containers) == ["ray-head", "mlflow"]  # Ray's container first (KubeRay)
    mlflow = containers["mlflow"]
    assert mlflow["command"] == ["mlflow", "server"]
    assert "--serve-artifacts" in mlflow["args"] and "--port=5000" in mlflow["args"]
    assert any(a.startswith("--backend-store-uri=sqlite:////data/") for a in mlflow["args"])
    assert 5000 in [p["containerPort"] for p in containers["ray-head"]["ports"]]
    assert "nvidia.com/gpu" not in containers["ray-head"]["resources"]["limits"]

    (gpu,) = cluster["workerGroupSpecs"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1

    # One ReadWriteMany claim at /data in every pod; the image cache on it everywhere.
    pvc = documents["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in (head["template"]["spec"], gpu["template"]["spec"]):
        (volume,) = pod["volumes"]
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        for c in pod["containers"]:
            assert {"name": volume["name"], "mountPath": "/data"} in c["volumeMounts"]
    for c in (containers["ray-head"], worker):
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["DALA_CACHE_DIR"].startswith("/data/")

    # The image the manifest names is built by cluster/Dockerfile, on the same Ray.
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    images = {c["image"] for p in (head, gpu) for c in p["template"]["spec"]["containers"]}
    assert images == {"REGISTRY/dala-search:0.1.0"}
