import json

import pytest
from mlflow.tracking import MlflowClient

from asrflow.tracking import StepRun, flatten, resolve_tracking_uri

from .servers import mlflow_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def test_step_run_records_params_metrics_artifacts_and_dataset(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ASRFLOW_INVOCATION", "inv-123")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "duration": 1.0}) + "\n")
    config = {"seed": 7, "prep": {"max_duration": 15.0, "splits": ["train", "dev"]}}
    with StepRun("truncate", config, "exp-unit", server) as run:
        run.metrics({"kept": 3, "dropped": 1})
        run.artifact(manifest, "reports")
        digest = run.dataset(manifest, "truncated", "prep")
        run_id = run.run.info.run_id
    client = MlflowClient(server)
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["config.seed"] == "7"
    assert r.data.params["config.prep.splits"] == '["train", "dev"]'
    assert r.data.params["version.torch"].startswith("2.11")
    assert "code.commit" in r.data.params
    assert r.data.metrics["kept"] == 3 and r.data.metrics["dropped"] == 1
    assert r.data.tags["asrflow.invocation"] == "inv-123" and r.data.tags["asrflow.step"] == "truncate"
    assert [f.path for f in client.list_artifacts(run_id, "reports")] == ["reports/m.jsonl"]
    inputs = r.inputs.dataset_inputs
    assert inputs[0].dataset.name == "truncated" and inputs[0].dataset.digest == digest[:36]


def test_failed_step_is_marked_failed(server):
    with pytest.raises(RuntimeError):
        with StepRun("boom", {}, "exp-unit", server) as run:
            run_id = run.run.info.run_id
            raise RuntimeError("worker died")
    assert MlflowClient(server).get_run(run_id).info.status == "FAILED"


def test_default_store_is_sqlite_under_results(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(None, tmp_path / "results")
    assert uri == f"sqlite:///{tmp_path / 'results' / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri("sqlite:///x.db") == "http://127.0.0.1:1"


def test_parallel_sqlite_writers_do_not_collide(tmp_path):
    import multiprocessing as mp

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mp.get_context("spawn").Pool(2) as pool:
        ids = pool.starmap(_one_run, [(uri, i) for i in range(4)])
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("exp-par").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(ids)


def _one_run(uri, i):
    with StepRun(f"s{i}", {"i": i}, "exp-par", uri) as run:
        run.metrics({"i": i})
        return run.run.info.run_id


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}}) == {"a.b": "1", "a.c": "[1, 2]"}
