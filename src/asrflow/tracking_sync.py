"""``asrflow-mlflow-sync``: send the runs that the local store holds for a tracking server to it.

A run is in the local store for a server when the server did not answer at its start and
``mlflow.on_unreachable`` is ``local``, or when the server stopped answering during the run and had not
come back at its end (then the server may hold part of it). Such runs carry the tag
``asrflow.sync.destination``. For each, this replays into the server (``--to``, else that tag):
the run (name, start and end time, status), its params, every metric point with its step and
timestamp, its tags, artifacts, dataset inputs and logged models (with their params, tags, metrics and
artifacts).

Idempotent: a record the server already holds is not written again (metric points are compared by
step, timestamp and value; params by key; artifacts by path and size; datasets by name, digest and
context; models by the tag ``asrflow.sync.source_model_id``), and a synced run is tagged in the local
store with the server's run id and URI (``asrflow.sync.synced_run_id``, ``asrflow.sync.synced_to``), so
a second sync to the same server skips it. The server's copy carries ``asrflow.sync.source_run_id``.

    asrflow-mlflow-sync                       # results/mlflow/mlflow.db -> each run's destination
    asrflow-mlflow-sync --to http://mlflow:5000 --experiment asrflow-default --dry-run
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator

from asrflow.tracking import (DESTINATION_TAG, LOCAL_STORE_ENV, REMOTE_RUN_TAG, SYNC_TAG, probe, store_lock,
                              unreachable_message, upload_model)

log = logging.getLogger("asrflow.sync")

SOURCE_RUN_TAG = SYNC_TAG + "source_run_id"       # on the server's run: the local run it came from
SOURCE_MODEL_TAG = SYNC_TAG + "source_model_id"   # on the server's logged model: the local model
REMOTE_MODEL_TAG = SYNC_TAG + "remote_model_id"   # on a local model: the server's (incomplete) copy
SYNCED_RUN_TAG = SYNC_TAG + "synced_run_id"       # on the local run, after a sync
SYNCED_TO_TAG = SYNC_TAG + "synced_to"
TERMINAL = ("FINISHED", "FAILED", "KILLED")


def default_source() -> str:
    configured = os.environ.get(LOCAL_STORE_ENV)
    if configured:
        return configured if "://" in configured else f"sqlite:///{Path(configured).resolve()}"
    return f"sqlite:///{Path('results/mlflow/mlflow.db').resolve()}"


def _all_runs(client, experiment_ids: list[str]) -> Iterator:
    token = None
    while True:
        page = client.search_runs(experiment_ids, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _all_models(client, experiment_ids: list[str]) -> Iterator:
    token = None
    while True:
        page = client.search_logged_models(experiment_ids, max_results=100, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _files(client, run_id: str, path: str | None = None) -> Iterator:
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            yield from _files(client, run_id, f.path)
        else:
            yield f


def _point(m) -> tuple:
    value = "nan" if math.isnan(m.value) else repr(float(m.value))
    return m.step, m.timestamp, value


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def pending_runs(src, target: str | None = None, experiments: list[str] | None = None,
                 include_running: bool = False) -> tuple[list, list]:
    """(runs to sync, runs already synced to their target) among the local runs tagged with a destination."""
    exps = [e for e in src.search_experiments() if not experiments or e.name in experiments]
    todo, done = [], []
    if not exps:
        return todo, done
    for run in _all_runs(src, [e.experiment_id for e in exps]):
        tags = run.data.tags
        if DESTINATION_TAG not in tags:
            continue
        dest = target or tags[DESTINATION_TAG]
        if tags.get(SYNCED_TO_TAG) == dest and tags.get(SYNCED_RUN_TAG):
            done.append(run)
        elif run.info.status in TERMINAL or include_running:
            todo.append(run)
        else:
            log.warning("run %s (%s) is still RUNNING in the local store: skipped (--include-running to send it)",
                        run.info.run_id, run.info.run_name)
    todo.sort(key=lambda r: r.info.start_time or 0)
    return todo, done


def _target_run(src, run, dst, dst_uri: str, exp_id: str):
    """The server's run for this local run, if it has one: the run that lost it mid-run, or an earlier sync's."""
    remote_id = run.data.tags.get(REMOTE_RUN_TAG)
    if remote_id and run.data.tags.get(DESTINATION_TAG) == dst_uri:
        try:
            return dst.get_run(remote_id)
        except Exception:  # noqa: BLE001 - not there (another server, or deleted): make one
            pass
    found = dst.search_runs([exp_id], f"tags.`{SOURCE_RUN_TAG}` = '{run.info.run_id}'", max_results=1)
    return found[0] if found else None


def sync_run(src, source_uri: str, run, dst, dst_uri: str, dry_run: bool = False) -> tuple[str | None, Counter]:
    """Replay one local run into ``dst``; returns (the server's run id, what was added)."""
    from mlflow.entities import DatasetInput, Metric, Param, RunTag

    added: Counter = Counter()
    rid = run.info.run_id
    exp_name = src.get_experiment(run.info.experiment_id).name
    exp = dst.get_experiment_by_name(exp_name)
    if exp is None:
        added["experiments"] += 1
        if dry_run:
            exp_id = None
        else:
            try:
                exp_id = dst.create_experiment(exp_name)
            except Exception:  # noqa: BLE001 - created meanwhile
                exp_id = dst.get_experiment_by_name(exp_name).experiment_id
    else:
        exp_id = exp.experiment_id
    target = _target_run(src, run, dst, dst_uri, exp_id) if exp_id else None
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith(SYNC_TAG)}
    if target is None:
        added["runs"] += 1
        if dry_run:
            added["params"] += len(run.data.params)
            return None, added
        target = dst.create_run(exp_id, start_time=run.info.start_time, run_name=run.info.run_name,
                                tags={**tags, SOURCE_RUN_TAG: rid})
    tid = target.info.run_id
    have_params = dict(target.data.params)

    params = [Param(k, v) for k, v in run.data.params.items() if k not in have_params]
    for k, v in run.data.params.items():
        if k in have_params and have_params[k] != v:
            log.warning("run %s: param %s is %r on the server and %r locally; the server's is kept", tid, k,
                        have_params[k], v)
    new_tags = [RunTag(k, v) for k, v in {**tags, SOURCE_RUN_TAG: rid}.items() if target.data.tags.get(k) != v]
    added["params"] += len(params)
    added["tags"] += len([t for t in new_tags if t.key != SOURCE_RUN_TAG])
    metrics = []
    for key in run.data.metrics:
        have = {_point(m) for m in dst.get_metric_history(tid, key)} if key in target.data.metrics else set()
        metrics += [Metric(m.key, m.value, m.timestamp, m.step) for m in src.get_metric_history(rid, key)
                    if _point(m) not in have]
    added["metric_points"] += len(metrics)

    def input_key(d):
        return d.dataset.name, d.dataset.digest, tuple(sorted((t.key, t.value) for t in d.tags))
    have_inputs = {input_key(d) for d in (target.inputs.dataset_inputs if target.inputs else [])}
    inputs = [DatasetInput(d.dataset, d.tags) for d in (run.inputs.dataset_inputs if run.inputs else [])
              if input_key(d) not in have_inputs]
    added["datasets"] += len(inputs)

    have_files = {f.path: f.file_size for f in _files(dst, tid)}
    files = [f.path for f in _files(src, rid) if have_files.get(f.path) != f.file_size]
    added["artifacts"] += len(files)

    if not dry_run:
        for chunk in _chunks(params, 100):
            dst.log_batch(tid, params=chunk)
        for chunk in _chunks(new_tags, 100):
            dst.log_batch(tid, tags=chunk)
        for chunk in _chunks(metrics, 1000):
            dst.log_batch(tid, metrics=chunk)
        if inputs:
            dst.log_inputs(tid, datasets=inputs)
        with tempfile.TemporaryDirectory(prefix="asrflow-sync-") as tmp:
            for path in files:
                local = src.download_artifacts(rid, path, tmp)
                dst.log_artifact(tid, local, os.path.dirname(path) or None)
    _sync_models(src, source_uri, run, dst, exp_id, target, added, dry_run)
    if not dry_run and run.info.status in TERMINAL and (
            target.info.status != run.info.status or target.info.end_time != run.info.end_time):
        dst.set_terminated(tid, run.info.status, run.info.end_time)
    return tid, added


def _sync_models(src, source_uri: str, run, dst, exp_id: str | None, target, added: Counter, dry_run: bool) -> None:
    import mlflow.artifacts
    from mlflow.entities import Metric

    rid, tid = run.info.run_id, target.info.run_id
    linked = {o.model_id for o in (target.outputs.model_outputs if target.outputs else [])}
    steps = {o.model_id: o.step for o in (run.outputs.model_outputs if run.outputs else [])}
    for lm in _all_models(src, [run.info.experiment_id]):
        if lm.source_run_id == rid:
            steps.setdefault(lm.model_id, 0)
    if not steps:
        return
    copied = {}
    if exp_id is not None:
        copied = {m.tags.get(SOURCE_MODEL_TAG): m for m in _all_models(dst, [exp_id]) if m.source_run_id == tid}
    for model_id, step in steps.items():
        lm = src.get_logged_model(model_id)
        done = copied.get(model_id)
        if done is not None and "READY" in str(done.status):
            continue
        if "READY" not in str(lm.status):
            log.warning("model %s of run %s is %s locally: not sent", model_id, rid, lm.status)
            continue
        added["models"] += 1
        if dry_run:
            continue
        state = {}
        remote = done or _remote_model(dst, lm.tags.get(REMOTE_MODEL_TAG))
        if remote is not None:  # a model the server began to receive: finish that one
            state = {"model_id": remote.model_id, "location": remote.artifact_location,
                     "linked": remote.model_id in linked}
            dst.set_logged_model_tags(remote.model_id, {SOURCE_MODEL_TAG: model_id})
        tags = {**{k: v for k, v in lm.tags.items() if not k.startswith(SYNC_TAG)}, SOURCE_MODEL_TAG: model_id}
        with tempfile.TemporaryDirectory(prefix="asrflow-sync-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=lm.artifact_location, dst_path=tmp,
                                                        tracking_uri=source_uri)
            new_id = upload_model(dst, exp_id, tid, local, lm.name, step, lm.params, tags, lm.model_type, state)
        if lm.metrics:  # as Model.log links them: the run's points, tied to the model
            dst.log_batch(tid, metrics=[Metric(m.key, m.value, m.timestamp, m.step, dataset_name=m.dataset_name,
                                               dataset_digest=m.dataset_digest, run_id=tid, model_id=new_id)
                                        for m in lm.metrics])


def _remote_model(dst, model_id: str | None):
    if not model_id:
        return None
    try:
        return dst.get_logged_model(model_id)
    except Exception:  # noqa: BLE001
        return None


def sync(source_uri: str, target_uri: str | None = None, experiments: list[str] | None = None,
         dry_run: bool = False, include_running: bool = False) -> dict:
    """Sync every pending run of ``source_uri``; returns {"synced": [...], "already": n, "failed": [...]}."""
    from mlflow.tracking import MlflowClient

    src = MlflowClient(source_uri)
    todo, done = pending_runs(src, target_uri, experiments, include_running)
    result = {"synced": [], "already": len(done), "failed": []}
    clients: dict[str, object] = {}
    unreachable: dict[str, str] = {}
    for run in todo:
        dest = target_uri or run.data.tags[DESTINATION_TAG]
        if dest not in clients and dest not in unreachable:
            reason = probe(dest)
            if reason is None:
                clients[dest] = MlflowClient(dest)
            else:
                unreachable[dest] = reason
                log.error("%s", unreachable_message(dest, reason))
        if dest in unreachable:
            result["failed"].append((run.info.run_id, f"unreachable: {unreachable[dest]}"))
            continue
        try:
            tid, added = sync_run(src, source_uri, run, clients[dest], dest, dry_run)
        except Exception as exc:  # noqa: BLE001 - report it, go on with the other runs
            log.exception("run %s (%s): sync to %s failed", run.info.run_id, run.info.run_name, dest)
            result["failed"].append((run.info.run_id, str(exc)))
            continue
        what = ", ".join(f"{n} {k}" for k, n in added.items() if n) or "nothing new"
        log.info("%srun %s (%s) -> %s run %s: %s", "[dry run] " if dry_run else "", run.info.run_id,
                 run.info.run_name, dest, tid, what)
        result["synced"].append({"source": run.info.run_id, "target": tid, "destination": dest, "added": dict(added)})
        if not dry_run:
            with store_lock(source_uri):
                src.set_tag(run.info.run_id, SYNCED_RUN_TAG, tid)
                src.set_tag(run.info.run_id, SYNCED_TO_TAG, dest)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="asrflow-mlflow-sync", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", default=None,
                    help="the local store (default: $ASRFLOW_MLFLOW_LOCAL_STORE, else sqlite:///results/mlflow/mlflow.db)")
    ap.add_argument("--to", dest="target", default=None,
                    help="tracking server to send to (default: each run's asrflow.sync.destination)")
    ap.add_argument("--experiment", action="append", default=None, help="only this experiment (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="say what would be sent, send nothing")
    ap.add_argument("--include-running", action="store_true", help="also runs still RUNNING in the local store")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    source = args.source or default_source()
    if source.startswith("sqlite:///") and not Path(source[len("sqlite:///"):]).exists():
        log.error("no local MLflow store at %s (--from)", source)
        return 2
    result = sync(source, args.target, args.experiment, args.dry_run, args.include_running)
    log.info("%s %d run(s), %d already synced, %d failed", "would sync" if args.dry_run else "synced",
             len(result["synced"]), result["already"], len(result["failed"]))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
