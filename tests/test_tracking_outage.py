"""Issue 14: a tracking server that is down, or dies, never costs a run. Real `mlflow server`s on 127.0.0.1.

- a dead URI stops the workflow in seconds, with the fix in the message;
- a run whose server is down at its start fails fast, or (on_unreachable: local) goes to the local store;
- ``asrflow-mlflow-sync`` replays local runs into a server, field for field, and a second sync adds nothing;
- a server killed (SIGKILL) in the middle of a 2-rank Horovod training and restarted on the same store:
  the training finishes, every metric step is on the server, the run is FINISHED;
- a server that does not come back before the run ends: the run goes to the local store, and a sync
  once the server is back completes the server's copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from asrflow.tracking import DESTINATION_TAG, REMOTE_RUN_TAG, SYNC_TAG, StepRun, TrackingUnreachable
from asrflow.tracking_sync import SYNCED_RUN_TAG, SYNCED_TO_TAG, sync

from .servers import MlflowServer, TcpProxy, free_port
from .train import trainer_fixtures as F

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SYNC_CLI = Path(sys.executable).with_name("asrflow-mlflow-sync")


def dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-outage")).start()
    yield srv
    srv.stop()


@pytest.fixture
def local_store(tmp_path, monkeypatch):
    """Where offline runs go in this test (never the checkout's results/)."""
    db = tmp_path / "local" / "mlflow.db"
    monkeypatch.setenv("ASRFLOW_MLFLOW_LOCAL_STORE", str(db))
    monkeypatch.setenv("ASRFLOW_INVOCATION", "outage-test")
    return f"sqlite:///{db}"


# -- what a store holds for a run, comparable across stores ----------------------------------------
def _v(x: float):
    return "nan" if x != x else x  # NaN != NaN would make equal records differ


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(root))
        if p.name == "MLmodel":  # ids, locations and creation time are per store
            m = yaml.safe_load(p.read_text())
            for key in ("model_id", "model_uuid", "run_id", "artifact_path", "utc_time_created"):
                m.pop(key, None)
            out[rel] = json.dumps(m, sort_keys=True)
        else:
            out[rel] = _sha(p)
    return out


def run_record(uri: str, run_id: str, tmp: Path) -> dict:
    """Everything the store at ``uri`` holds for one run: info, params, tags, every metric point,
    datasets, artifacts (by content) and logged models (with their artifacts)."""
    import mlflow.artifacts

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    dl = tmp / f"dl-{hashlib.md5((uri + run_id).encode()).hexdigest()[:8]}"
    arts = {}
    if client.list_artifacts(run_id):
        arts = _tree(Path(client.download_artifacts(run_id, "", str(dl / "run"))))
    models = []
    outputs = {o.model_id: o.step for o in (run.outputs.model_outputs if run.outputs else [])}
    for lm in client.search_logged_models([run.info.experiment_id]):
        if lm.source_run_id != run_id:
            continue
        local = mlflow.artifacts.download_artifacts(artifact_uri=lm.artifact_location, tracking_uri=uri,
                                                    dst_path=str(dl / lm.model_id))
        # a server answers "" for an unset model_type, SQLite None
        models.append({"name": lm.name, "model_type": lm.model_type or None, "status": str(lm.status),
                       "step": outputs.get(lm.model_id), "params": lm.params,
                       "tags": {k: v for k, v in lm.tags.items() if not k.startswith(SYNC_TAG)},
                       "metrics": sorted((m.key, m.step, m.timestamp, _v(m.value)) for m in lm.metrics or []),
                       "artifacts": _tree(Path(local))})
    inputs = sorted((d.dataset.name, d.dataset.digest, d.dataset.source_type, d.dataset.source, d.dataset.schema,
                     d.dataset.profile, tuple(sorted((t.key, t.value) for t in d.tags)))
                    for d in (run.inputs.dataset_inputs if run.inputs else []))
    return {"run_name": run.info.run_name, "status": run.info.status, "start_time": run.info.start_time,
            "end_time": run.info.end_time, "experiment": client.get_experiment(run.info.experiment_id).name,
            "params": run.data.params,
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith(SYNC_TAG)},
            "metrics": {k: sorted((m.step, m.timestamp, _v(m.value)) for m in client.get_metric_history(run_id, k))
                        for k in run.data.metrics},
            "inputs": inputs, "artifacts": arts, "models": sorted(models, key=lambda m: m["name"])}


def without_times(rec: dict, volatile_metrics=("wall_seconds",)) -> dict:
    """A record with what differs between two executions of the same steps taken out: clocks, measured
    durations, and the checkout's state (others commit here while the tests run)."""
    rec = json.loads(json.dumps(rec))
    rec.pop("start_time"), rec.pop("end_time")
    rec["experiment"] = None
    for params in [rec["params"]] + [m["params"] for m in rec["models"]]:
        for key in ("code.commit", "code.dirty"):
            params.pop(key, None)
    rec["metrics"] = {k: [(s, None if k in volatile_metrics else v) for s, _, v in pts]
                      for k, pts in rec["metrics"].items()}
    for m in rec["models"]:
        m["metrics"] = [(k, s, v) for k, s, _, v in m["metrics"]]
    return rec


def server_counts(uri: str) -> dict:
    """How much the server holds: runs, metric points, params, tags, artifacts, datasets, models."""
    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    counts = {"runs": 0, "points": 0, "params": 0, "tags": 0, "artifacts": 0, "datasets": 0, "models": 0}
    for run in client.search_runs(exps, max_results=1000):
        rid = run.info.run_id
        counts["runs"] += 1
        counts["points"] += sum(len(client.get_metric_history(rid, k)) for k in run.data.metrics)
        counts["params"] += len(run.data.params)
        counts["tags"] += len(run.data.tags)
        counts["datasets"] += len(run.inputs.dataset_inputs) if run.inputs else 0
        stack = [None]
        while stack:
            for f in client.list_artifacts(rid, stack.pop()):
                if f.is_dir:
                    stack.append(f.path)
                else:
                    counts["artifacts"] += 1
    counts["models"] = len(client.search_logged_models(exps))
    return counts


def scripted_session(run: StepRun, tmp: Path) -> None:
    """A step's records of every kind, as the rules and the training write them."""
    import torch

    manifest = tmp / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"u{i}", "duration": 1.0 + i}) + "\n" for i in range(3)))
    plan = tmp / "plan.json"
    plan.write_text('{"buckets": [1, 2]}')
    reports = tmp / "reports"
    (reports / "sub").mkdir(parents=True, exist_ok=True)
    (reports / "a.txt").write_text("a")
    (reports / "sub" / "b.json").write_text("{}")
    run.params({"units": "char", "n": 3})
    run.tags({"asrflow.variant": "tiny"})
    for step in range(1, 31):
        run.metrics({"train_loss": 10.0 / step, "lr": 1e-3 * step}, step=step)
    run.metrics({"dev_cer": 0.5, "nan_metric": float("nan")}, step=30)
    run.dataset(manifest, "train_manifest", "training")
    run.file_input(plan, "bucket_plan", "training")
    run.artifact(reports, "reports")
    run.artifact(plan)
    torch.manual_seed(0)
    run.pytorch_model(torch.nn.Linear(3, 2), name="model", serialization_format="pickle",
                      pip_requirements=["torch"])


# -- 1. a dead URI stops the workflow in seconds -----------------------------------------------------
def test_a_dead_uri_stops_the_workflow_in_seconds_with_the_fix(tmp_path):
    uri = dead_uri()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    t0 = time.time()
    proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--cores", "2",
                           "--configfile", str(REPO / "config" / "small.yaml")],
                          capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.time() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert elapsed < 15, f"took {elapsed:.1f}s"
    assert f"MLflow tracking server {uri} is unreachable" in out, out[-3000:]
    for fix in ("mlflow.tracking_uri", "MLFLOW_TRACKING_URI", "mlflow.on_unreachable: local"):
        assert fix in out
    assert not (tmp_path / "results" / "corpus").exists(), "no job may start"


def test_a_step_on_a_dead_uri_fails_fast_or_goes_to_the_local_store(tmp_path, local_store):
    uri = dead_uri()
    t0 = time.time()
    with pytest.raises(TrackingUnreachable, match="mlflow.on_unreachable: local"):
        with StepRun("vocab", {}, "exp-dead", uri, on_unreachable="fail"):
            pass
    assert time.time() - t0 < 10
    with StepRun("vocab", {"seed": 1}, "exp-dead", uri, on_unreachable="local") as run:
        run.metrics({"vocab_size": 30})
        run_id = run.run.info.run_id
    assert run.offline and run.uri == local_store and run.destination == uri
    r = MlflowClient(local_store).get_run(run_id)
    assert r.info.status == "FINISHED" and r.data.metrics["vocab_size"] == 30
    assert r.data.tags[DESTINATION_TAG] == uri and r.data.params["config.seed"] == "1"


# -- 2. offline, then synced: the same records as online ---------------------------------------------
def test_an_offline_run_synced_later_matches_an_online_run_field_by_field(server, tmp_path, local_store):
    with StepRun("train", {"seed": 7}, "exp-sync", server.uri, run_name="train[tiny]") as online:
        scripted_session(online, tmp_path)
    dead = dead_uri()
    with StepRun("train", {"seed": 7}, "exp-sync", dead, run_name="train[tiny]", on_unreachable="local") as offline:
        scripted_session(offline, tmp_path)
    assert offline.offline
    local_rec = run_record(local_store, offline.run.info.run_id, tmp_path)
    assert local_rec["tags"] and local_rec["models"], "the local store holds the whole run"

    result = sync(local_store, server.uri)
    assert [s["source"] for s in result["synced"]] == [offline.run.info.run_id] and not result["failed"]
    synced_id = result["synced"][0]["target"]
    synced = run_record(server.uri, synced_id, tmp_path)
    # the server's copy is the local run, every field, clocks included
    assert synced == local_rec
    # and the same as the run that was online all along, but for the clocks
    assert without_times(synced) == without_times(run_record(server.uri, online.run.info.run_id, tmp_path))
    assert len(synced["metrics"]["train_loss"]) == 30 and synced["models"][0]["status"].endswith("READY")
    # the synced model loads, with its weights
    import mlflow.artifacts
    import mlflow.pytorch
    import torch

    (lm,) = [m for m in MlflowClient(server.uri).search_logged_models([MlflowClient(server.uri).get_run(
        synced_id).info.experiment_id]) if m.source_run_id == synced_id]
    loaded = mlflow.pytorch.load_model(mlflow.artifacts.download_artifacts(
        artifact_uri=lm.artifact_location, tracking_uri=server.uri, dst_path=str(tmp_path / "load")))
    torch.manual_seed(0)
    assert torch.equal(loaded.weight, torch.nn.Linear(3, 2).weight)
    src_tags = MlflowClient(local_store).get_run(offline.run.info.run_id).data.tags
    assert src_tags[SYNCED_RUN_TAG] == synced_id and src_tags[SYNCED_TO_TAG] == server.uri

    before = server_counts(server.uri)
    proc = subprocess.run([str(SYNC_CLI), "--from", local_store, "--to", server.uri],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "synced 0 run(s), 1 already synced" in proc.stderr
    assert server_counts(server.uri) == before
    # even without the bookkeeping tag, a replay finds the server's copy and adds nothing
    MlflowClient(local_store).delete_tag(offline.run.info.run_id, SYNCED_TO_TAG)
    again = sync(local_store, server.uri)
    assert again["synced"][0]["target"] == synced_id and not any(again["synced"][0]["added"].values())
    assert server_counts(server.uri) == before


# -- 3. a server that does not come back before the run ends ------------------------------------------
def test_a_run_outliving_its_server_goes_to_the_local_store_and_a_sync_completes_it(server, tmp_path, local_store,
                                                                                   caplog):
    import torch

    caplog.set_level("WARNING", logger="asrflow.tracking")
    with StepRun("train", {"seed": 3}, "exp-lost", server.uri, flush_timeout=3) as run:
        run.metrics({"train_loss": 1.0}, step=1)
        deadline = time.time() + 30
        while time.time() < deadline and not MlflowClient(server.uri).get_metric_history(run.run.info.run_id, "train_loss"):
            time.sleep(0.2)
        server.kill()
        t0 = time.time()
        for step in range(2, 21):
            run.metrics({"train_loss": 1.0 / step}, step=step)
        run.artifact(REPO / "config" / "small.yaml", "config")
        assert time.time() - t0 < 1, "recording never waits on the server"
        run.pytorch_model(torch.nn.Linear(2, 2), serialization_format="pickle", pip_requirements=["torch"])
        remote_id = run.run.info.run_id
    assert run.local_copy is not None
    outage_logs = [r.getMessage() for r in caplog.records if "is not answering" in r.getMessage()]
    assert len(outage_logs) == 1, "the outage is logged once"
    assert any("asrflow-mlflow-sync" in r.getMessage() and run.local_copy in r.getMessage() for r in caplog.records)
    local = MlflowClient(local_store).get_run(run.local_copy)
    assert local.data.tags[REMOTE_RUN_TAG] == remote_id and local.info.status == "FINISHED"
    assert len(MlflowClient(local_store).get_metric_history(run.local_copy, "train_loss")) == 20

    server.start()
    result = sync(local_store)  # to the run's own destination
    assert result["synced"][0]["target"] == remote_id, "completes the server's own copy of the run"
    remote = MlflowClient(server.uri).get_run(remote_id)
    assert remote.info.status == "FINISHED"
    history = MlflowClient(server.uri).get_metric_history(remote_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 21)), "every step once"
    rec = run_record(server.uri, remote_id, tmp_path)
    assert rec["artifacts"] and rec["models"] and rec["models"][0]["status"].endswith("READY")
    before = server_counts(server.uri)
    assert sync(local_store)["synced"] == []
    assert server_counts(server.uri) == before


# -- 4. SIGKILL of the server in the middle of a 2-rank Horovod training ----------------------------
def _last_step(log: Path) -> int:
    steps = re.findall(r" step (\d+) loss ", log.read_text()) if log.exists() else []
    return int(steps[-1]) if steps else 0


def _wait_step(log: Path, proc: subprocess.Popen, at_least: int, timeout: float) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        step = _last_step(log)
        if step >= at_least:
            return step
        assert proc.poll() is None, f"training exited ({proc.returncode}) at step {step}"
        time.sleep(0.2)
    raise AssertionError(f"no step {at_least} within {timeout}s (at {_last_step(log)})")


@pytest.mark.slow  # horovodrun: 2.5 min on 2 busy cores
def test_server_killed_mid_horovod_training_then_restarted_loses_nothing(tmp_path):
    """The training's URI is a TCP forwarder's. The server behind it is SIGKILLed mid-training; while it
    is down the forwarder refuses connections; the restarted server (same store) was started beforehand
    on another port, so that the outage lasts as long as the test says, not as long as a cold start
    takes on a busy machine (30 s to over 90 s here); the forwarder then points at it."""
    store = tmp_path / "mlflow"
    first = MlflowServer(store).launch()
    second = MlflowServer(store)  # same store (SQLite file, artifacts), another process
    setup = F.build_setup(tmp_path / "data")
    # each epoch is 4 steps + a dev pass; long enough to go on after the restart
    params = setup.params_file("outage", epochs=60)
    out_dir, log_dir = tmp_path / "out", tmp_path / "logs"
    first.wait()
    second.launch()
    proxy = TcpProxy(first.port)
    setup.tracking_uri = proxy.uri
    env = {**F.clean_env(), "ASRFLOW_MLFLOW_LOCAL_STORE": str(tmp_path / "local" / "mlflow.db"),
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    cmd = F.horovodrun(2, F.train_command(setup, params, out_dir, log_dir, experiment="outage-train"))
    with open(tmp_path / "train.out", "w") as out:
        proc = subprocess.Popen(cmd, cwd=F.REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        rank0 = log_dir / "rank0.log"
        _wait_step(rank0, proc, 3, timeout=300)
        second.wait()
        first.kill()  # SIGKILL, mid-training
        proxy.down()
        killed_at, t_kill = _last_step(rank0), time.time()
        _wait_step(rank0, proc, killed_at + 10, timeout=120)  # training goes on while the server is down
        time.sleep(max(0.0, 8 - (time.time() - t_kill)))
        back_at = _last_step(rank0)
        assert proc.poll() is None, "training is still running when the server comes back"
        proxy.up(second.port)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.down()
        first.kill()
    try:
        log = (tmp_path / "train.out").read_text()
        assert proc.returncode == 0, log[-5000:]
        assert back_at >= killed_at + 10, f"training went on while the server was down ({killed_at} -> {back_at})"
        assert log.count("is not answering") == 1, "the outage is logged once"
        assert "answers again" in log
        summary = json.loads((out_dir / "train_summary.json").read_text())
        assert summary["global_step"] > back_at, "steps after the restart too"
        client = MlflowClient(second.uri)
        exp = client.get_experiment_by_name("outage-train")
        (run,) = client.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED"
        rid = run.info.run_id
        steps = [m.step for m in client.get_metric_history(rid, "train_loss")]
        assert sorted(steps) == list(range(1, summary["global_step"] + 1)), "every step, once"
        dev_steps = sorted(m.step for m in client.get_metric_history(rid, "dev_loss"))
        assert dev_steps == sorted(h["step"] for h in summary["history"])
        assert any(k.startswith("system/") for k in run.data.metrics)
        assert "checkpoint" in {f.path for f in client.list_artifacts(rid)}
        assert client.search_logged_models([exp.experiment_id])
        assert not (tmp_path / "local" / "mlflow.db").exists(), "nothing had to go to the local store"
    finally:
        second.stop()


# -- 5. a whole small DAG offline, then synced into a fresh server -----------------------------------
ONLINE_STEPS = {"make_embedded_corpus", "synthesize_noise", "fetch_demand", "resample", "merge_resampled", "truncate",
                "vocab", "bucketing", "noise_manifest", "data_report", "cmvn", "train"}


@pytest.mark.slow
def test_a_whole_dag_offline_then_synced_into_a_fresh_server(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "offline.yaml").write_text("mlflow: {on_unreachable: local}\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": dead_uri(), "ASRFLOW_INVOCATION": "offline-dag",
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    env.pop("ASRFLOW_MLFLOW_LOCAL_STORE", None)
    # --keep-going: what is under test is the tracking of every job that runs; whether each rule
    # succeeds is tests/test_workflow.py's business (a failed job's run is synced as FAILED)
    proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(work), "--cores", "2", "--keep-going",
                           "--configfile", str(REPO / "config" / "small.yaml"), str(work / "offline.yaml")],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert "on_unreachable is local" in proc.stderr, proc.stderr[-6000:]
    local = f"sqlite:///{work / 'results' / 'mlflow' / 'mlflow.db'}"
    src = MlflowClient(local)
    runs = src.search_runs([e.experiment_id for e in src.search_experiments()], max_results=1000)
    assert {r.data.tags["asrflow.step"] for r in runs} >= ONLINE_STEPS | {"evaluate"}, proc.stderr[-6000:]
    assert all(r.info.status in ("FINISHED", "FAILED") for r in runs)
    assert all(r.data.tags[DESTINATION_TAG] == env["MLFLOW_TRACKING_URI"] for r in runs)

    fresh = MlflowServer(tmp_path / "fresh").start()
    try:
        cli = subprocess.run([str(SYNC_CLI), "--from", local, "--to", fresh.uri], capture_output=True, text=True,
                             timeout=900, cwd=work)
        assert cli.returncode == 0, cli.stderr[-4000:]
        assert f"synced {len(runs)} run(s), 0 already synced, 0 failed" in cli.stderr
        dst = MlflowClient(fresh.uri)
        targets = {r.data.tags["asrflow.sync.source_run_id"]: r.info.run_id
                   for r in dst.search_runs([e.experiment_id for e in dst.search_experiments()], max_results=1000)}
        assert set(targets) == {r.info.run_id for r in runs}
        for r in runs:
            assert run_record(fresh.uri, targets[r.info.run_id], tmp_path) == run_record(local, r.info.run_id, tmp_path), \
                r.info.run_name
        train = next(r for r in runs if r.data.tags["asrflow.step"] == "train")
        assert run_record(fresh.uri, targets[train.info.run_id], tmp_path)["models"], "the model came along"
        before = server_counts(fresh.uri)
        again = subprocess.run([str(SYNC_CLI), "--from", local, "--to", fresh.uri], capture_output=True, text=True,
                               timeout=900, cwd=work)
        assert again.returncode == 0 and f"synced 0 run(s), {len(runs)} already synced" in again.stderr
        assert server_counts(fresh.uri) == before
    finally:
        fresh.stop()
