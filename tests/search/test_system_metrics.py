"""What a trial used (search/system_metrics.py): MLflow's system metrics on trial runs."""

from __future__ import annotations

from mlflow import MlflowClient

from dala_search.runs import schema


def test_every_trial_run_has_cpu_and_memory_figures(finished_search: dict) -> None:
    client = MlflowClient(finished_search["tracking_uri"])
    exp = client.get_experiment_by_name(schema.experiment_name(finished_search["name"]))
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{schema.TAG_ROLE}` = 'trial'"
    )
    finished = [r for r in runs if r.data.tags[schema.TAG_STATE] in ("completed", "failed")]
    assert finished, [r.data.tags[schema.TAG_STATE] for r in runs]
    for run in finished:  # published at the trial's end even when it was shorter than a sample
        metrics = run.data.metrics
        assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100 * 1024, metrics
        assert metrics["system/system_memory_usage_megabytes"] > 0
        # no GPU on a CPU-only trial: no other GPU's figures in its run
        if run.data.tags[schema.TAG_GPUS] == "none":
            assert not [k for k in metrics if k.startswith("system/gpu_")]
