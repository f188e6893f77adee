"""MLflow records for every workflow step: one experiment per workflow, one run per rule invocation.

Runs of one ``snakemake`` invocation share the tag ``asrflow.invocation`` (set by the Snakefile in the
environment, so it never becomes a rule parameter that would trigger reruns). With the default SQLite
store, writes from parallel jobs are serialized by a file lock: SQLite allows one writer, and two
processes creating the schema at once corrupt the first migration.

A tracking server that is down never costs a run (README, "MLflow"):

- a run that starts while an http(s) server does not answer fails in seconds with a message naming the
  URI and the fixes, or, with ``mlflow.on_unreachable: local``, is recorded in the local SQLite store,
  tagged with its destination, for ``asrflow-mlflow-sync`` (``asrflow.tracking_sync``) to replay;
- every record of a started run (metrics, params, tags, artifacts, datasets, models) is written by a
  background thread from an in-memory journal, so a step never waits on the server; during an outage
  the records wait, and are sent when the server answers again;
- a run whose server has not come back when it ends is copied whole from the journal into the local
  store, for a later sync, and the log says so;
- MLflow's own HTTP retries are short (``HTTP_DEFAULTS``): the journal does the waiting.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

INVOCATION_ENV = "ASRFLOW_INVOCATION"
ON_UNREACHABLE_ENV = "ASRFLOW_MLFLOW_ON_UNREACHABLE"   # fail | local; the Snakefile sets it from mlflow.on_unreachable
FLUSH_TIMEOUT_ENV = "ASRFLOW_MLFLOW_FLUSH_TIMEOUT"     # seconds a run's end waits for an unreachable server
LOCAL_STORE_ENV = "ASRFLOW_MLFLOW_LOCAL_STORE"         # the local fallback store (default results/mlflow/mlflow.db)
ON_UNREACHABLE_CHOICES = ("fail", "local")
DEFAULT_FLUSH_TIMEOUT = 60.0
SYNC_TAG = "asrflow.sync."                 # prefix of the bookkeeping tags of offline runs and their sync
DESTINATION_TAG = SYNC_TAG + "destination"  # the server an offline run was meant for
REMOTE_RUN_TAG = SYNC_TAG + "remote_run_id" # the server's copy, when the run started there and lost it mid-run

# MLflow's defaults (7 retries, backoff factor 2, 120-s timeout) make every call to a server that is
# down wait ~4 minutes before it fails. Here a call to a server that refuses connections fails within
# ~3 s (3 attempts, sleeps 0 s then 2 s + jitter): the StepRun journal retries for as long as the run
# lasts, so MLflow's own retries only ride out a dropped connection or one 503. The timeout bounds each
# socket wait (not a whole upload) and stays at 30 s: a loaded server (the tests' one on 2 busy cores)
# was seen taking over 10 s to answer, and a server that answers nothing at all is caught at a run's
# start by the 3-s probe, and mid-run by the journal, off the training's path. Exported values win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
PROBE_TIMEOUT = 3.0  # seconds for the reachability check (one GET of /health)
TRACKED_PACKAGES = ("asrflow", "torch", "torchaudio", "mlflow", "snakemake", "horovod", "numpy", "soundfile",
                    "jiwer", "flashlight-text", "kenlm")


def resolve_tracking_uri(configured: str | None, results_dir: str | os.PathLike = "results") -> str:
    """MLFLOW_TRACKING_URI wins, then the config, then SQLite under results/."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    db = Path(results_dir).resolve() / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def apply_http_defaults() -> None:
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


apply_http_defaults()


def is_remote(uri: str | None) -> bool:
    return bool(uri) and uri.split(":", 1)[0].lower() in ("http", "https")


def local_store_uri(results_dir: str | os.PathLike = "results") -> str:
    """The local SQLite store that offline runs go to ($ASRFLOW_MLFLOW_LOCAL_STORE, else under results/)."""
    configured = os.environ.get(LOCAL_STORE_ENV)
    if configured:
        if "://" not in configured:
            configured = f"sqlite:///{Path(configured).resolve()}"
        if configured.startswith("sqlite:///"):
            Path(configured[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return configured
    db = Path(results_dir).resolve() / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def on_unreachable_setting(value: str | None = None) -> str:
    value = (value or os.environ.get(ON_UNREACHABLE_ENV) or "fail").strip().lower()
    if value not in ON_UNREACHABLE_CHOICES:
        raise ValueError(f"mlflow.on_unreachable must be one of {ON_UNREACHABLE_CHOICES}, not {value!r}")
    return value


def probe(uri: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when the tracking server at ``uri`` answers (any HTTP status), else why not. Non-HTTP URIs
    (SQLite, files) are not probed."""
    if not is_remote(uri):
        return None
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: an auth proxy or a server without /health is still a server
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):
            return None  # it answered; trusting its certificate is MLflow's business (MLFLOW_TRACKING_*)
        return str(e.reason)
    except (OSError, ValueError) as e:
        return str(e) or type(e).__name__


class TrackingUnreachable(RuntimeError):
    """The tracking server does not answer and ``mlflow.on_unreachable`` is ``fail``."""


def unreachable_message(uri: str, reason: str) -> str:
    return (f"MLflow tracking server {uri} is unreachable ({reason}). Fix the URI (`mlflow.tracking_uri` in "
            f"the config, or the MLFLOW_TRACKING_URI environment variable, which wins over it), start the "
            f"server, or set `mlflow.on_unreachable: local` to record the runs in the local store "
            f"(results/mlflow/mlflow.db) and send them later with `asrflow-mlflow-sync`.")


def check_at_start(configured: str | None, on_unreachable: str | None = None,
                   timeout: float = PROBE_TIMEOUT) -> str | None:
    """The workflow's start-up check: raises TrackingUnreachable when the resolved URI is http(s), does
    not answer within ``timeout`` and on_unreachable is ``fail``; with ``local``, returns a warning."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if not is_remote(uri):
        return None
    reason = probe(uri, timeout)
    if reason is None:
        return None
    if on_unreachable_setting(on_unreachable) == "fail":
        raise TrackingUnreachable(unreachable_message(uri, reason))
    return (f"MLflow tracking server {uri} is unreachable ({reason}); mlflow.on_unreachable is local: "
            f"runs are recorded in results/mlflow/mlflow.db, tagged for `asrflow-mlflow-sync`.")


def artifact_root_for(uri: str) -> str | None:
    """A local artifact folder next to a SQLite store (MLflow would otherwise use ./mlruns of the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri[len("sqlite:///"):]).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[f"version.{name}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[f"version.{name}"] = "not installed"
    try:
        sox = subprocess.run(["sox", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        versions["version.sox"] = sox.split("v")[-1] if sox else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        versions["version.sox"] = "not installed"
    return versions


def code_version(repo_dir: str | os.PathLike | None = None) -> dict[str, str]:
    repo_dir = repo_dir or Path(__file__).resolve().parents[2]
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"code.commit": commit, "code.dirty": str(dirty)}


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks (DEMAND zips are ~100 MB)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# -- the journal ---------------------------------------------------------------------------------
METRICS_PER_BATCH = 1000  # the server's limits for one log_batch call
PARAMS_PER_BATCH = 100


class _Op:
    """One record of a run, kept for the whole run: sent once to the run's store, and replayed whole
    into the local store if that store is lost. ``state`` remembers per store what a multi-call record
    (a model) has done, so a retry does not repeat it."""
    __slots__ = ("kind", "data", "state")

    def __init__(self, kind: str, data: Any):
        self.kind, self.data, self.state = kind, data, {}


def retryable(exc: BaseException) -> bool:
    """Connection problems, timeouts, 5xx/429 answers, a busy SQLite file: worth another try. An answer
    that rejects the record (4xx) and a missing local file are not."""
    try:
        import requests

        if isinstance(exc, requests.HTTPError):
            status = exc.response.status_code if exc.response is not None else 500
            return status >= 500 or status == 429
        if isinstance(exc, requests.RequestException):
            return True
    except ImportError:  # pragma: no cover - requests comes with mlflow
        pass
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    return isinstance(exc, OSError) or type(exc).__name__ in ("OperationalError", "TimeoutError")


def upload_model(client, experiment_id: str, run_id: str | None, local_dir: str | os.PathLike, name: str,
                 step: int = 0, params: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None,
                 model_type: str | None = None, state: dict | None = None) -> str:
    """A saved MLflow model folder as a logged model of ``run_id`` (what ``Model.log`` does after saving):
    create the LoggedModel, write its id into MLmodel, upload, mark it READY, link it as the run's output.
    ``state`` records the steps done, so a call retried after an outage resumes instead of duplicating."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    state = {} if state is None else state
    if "model_id" not in state:
        lm = client.create_logged_model(experiment_id, name=name, source_run_id=run_id,
                                        tags={k: str(v) for k, v in (tags or {}).items()} or None,
                                        params={k: str(v) for k, v in (params or {}).items()} or None,
                                        model_type=model_type)
        state["model_id"], state["location"] = lm.model_id, lm.artifact_location
    model_id = state["model_id"]
    if not state.get("uploaded"):
        with tempfile.TemporaryDirectory(prefix="asrflow-model-") as tmp:
            staged = Path(tmp) / "model"
            shutil.copytree(local_dir, staged)
            mlmodel = staged / "MLmodel"
            if mlmodel.exists():
                m = Model.load(str(mlmodel))
                m.model_id = m.model_uuid = model_id
                m.run_id, m.artifact_path = run_id, state["location"]
                m.save(str(mlmodel))
            client.log_model_artifacts(model_id, str(staged))
        state["uploaded"] = True
    if not state.get("finalized"):
        client.finalize_logged_model(model_id, LoggedModelStatus.READY)
        state["finalized"] = True
    if run_id and not state.get("linked"):
        client.log_outputs(run_id, [LoggedModelOutput(model_id, int(step))])
        state["linked"] = True
    return model_id


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def apply_ops(client, run_id: str, experiment_id: str, ops: list[_Op], journal: list[_Op], sink: str) -> None:
    """Write ``ops`` (metric records first, batched; then the others in order) to ``run_id``."""
    from mlflow.entities import Param, RunTag

    metrics = [m for op in ops if op.kind == "metrics" for m in op.data]
    for chunk in _chunks(metrics, METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)
    for op in ops:
        kind, data = op.kind, op.data
        if kind == "params":
            for chunk in _chunks([Param(k, v) for k, v in data.items()], PARAMS_PER_BATCH):
                client.log_batch(run_id, params=chunk)
        elif kind == "tags":
            for chunk in _chunks([RunTag(k, v) for k, v in data.items()], PARAMS_PER_BATCH):
                client.log_batch(run_id, tags=chunk)
        elif kind == "artifact":
            path, artifact_path = data
            if Path(path).is_dir():
                client.log_artifacts(run_id, path, artifact_path)
            else:
                client.log_artifact(run_id, path, artifact_path)
        elif kind == "inputs":
            client.log_inputs(run_id, datasets=data)
        elif kind == "model":
            run_params: dict[str, str] = {}  # as Model.log does: the model carries its run's params
            for earlier in journal:
                if earlier is op:
                    break
                if earlier.kind == "params":
                    run_params.update(earlier.data)
            tags = dict(data["tags"])
            begun = op.state.get("store", {}).get("model_id")
            if sink != "store" and begun:  # the server holds an unfinished copy: the sync completes that one
                tags[SYNC_TAG + "remote_model_id"] = begun
            upload_model(client, experiment_id, run_id, data["dir"], data["name"], data["step"],
                         {**run_params, **data["params"]}, tags, data["model_type"], op.state.setdefault(sink, {}))
        elif kind == "end":
            client.set_terminated(run_id, data["status"], data["end_time"])


class _MetricsAdapter:
    """Stands in for the system-metrics monitor's logger: its samples go through the run's journal."""
    data: list = []

    def __init__(self, run: "StepRun"):
        self.run = run

    def record_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.metrics(metrics, step)

    def flush(self) -> None:
        pass


class StepRun:
    """One MLflow run for one workflow step. Use as a context manager.

    Records are kept in a journal and written by a background thread (under the store lock for SQLite),
    so no call waits on the store; ``__exit__`` waits until they are written (a store busy with other
    writers is waited for), but once the store has failed, at most ``flush_timeout`` seconds
    ($ASRFLOW_MLFLOW_FLUSH_TIMEOUT, default 60; counted from the run's end at the earliest): then the
    whole run goes to the local store for ``asrflow-mlflow-sync``.

    ``uri`` is the store the run is written to: ``tracking_uri``, or the local store when the server was
    unreachable at the start and ``on_unreachable`` is ``local`` (then ``offline`` is true and
    ``destination`` keeps ``tracking_uri``). ``run`` is MLflow's active run, so ``mlflow.*`` calls made
    inside the block go to the same run.
    """

    def __init__(self, step: str, config: Mapping[str, Any], experiment: str, tracking_uri: str,
                 run_name: str | None = None, extra_tags: Mapping[str, str] | None = None,
                 system_metrics: bool = False, on_unreachable: str | None = None,
                 flush_timeout: float | None = None):
        self.step, self.config, self.experiment, self.uri = step, config, experiment, tracking_uri
        self.destination = tracking_uri
        self.run_name = run_name or step
        self.extra_tags = dict(extra_tags or {})
        self.system_metrics = system_metrics
        self.on_unreachable = on_unreachable_setting(on_unreachable)
        self.flush_timeout = float(flush_timeout if flush_timeout is not None
                                   else os.environ.get(FLUSH_TIMEOUT_ENV) or DEFAULT_FLUSH_TIMEOUT)
        self.offline = False
        self.local_copy: str | None = None  # the local run holding this run, after an outage outlived it
        self.run = None
        self._journal: list[_Op] = []
        self._pending: collections.deque[_Op] = collections.deque()
        self._cv = threading.Condition()
        self._wake = threading.Event()
        self._open = self._closing = self._abandoned = self._single = False
        self._worker: threading.Thread | None = None
        self._monitor = None
        self._outage_since: float | None = None
        self._outage_error = ""
        self._rejected = 0
        self._tmpdirs: list[Path] = []

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> "StepRun":
        reason = probe(self.destination)
        if reason is not None:
            if self.on_unreachable == "fail":
                raise TrackingUnreachable(unreachable_message(self.destination, reason))
            self._go_offline(reason)
        try:
            self._start()
        except Exception as exc:
            if not is_remote(self.uri) or not retryable(exc):
                raise
            if self.on_unreachable == "fail":
                raise TrackingUnreachable(unreachable_message(self.uri, str(exc))) from exc
            self._go_offline(str(exc))
            self._start()
        self._open = True
        self.params({**flatten(self.config, "config."), **code_version(), **package_versions()})
        self._t0 = time.time()
        self._worker = threading.Thread(target=self._drain, name=f"asrflow-tracking[{self.run_name}]", daemon=True)
        self._worker.start()
        if self.system_metrics:
            self._start_system_metrics()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FAILED" if exc_type else "FINISHED"
        try:
            self._stop_system_metrics()
            self.metrics({"wall_seconds": time.time() - self._t0})
            self._record("end", {"status": status, "end_time": int(time.time() * 1000)})
            with self._cv:
                self._closing = True
                self._cv.notify_all()
            self._wake.set()
            # waiting for the SQLite lock is not an outage: only a store that fails starts the clock
            if not self._wait_written(self.flush_timeout):
                with self._cv:
                    self._abandoned = True
                    self._cv.notify_all()
                self._wake.set()
                self._worker.join(timeout=5)
                self._copy_to_local()
            else:
                self._worker.join(timeout=5)
            if self._rejected:
                log.error("MLflow rejected %d record(s) of run %s (see the errors above)", self._rejected,
                          self.run.info.run_id)
        finally:
            self._open = False
            self._release_fluent_run(status)
            for d in self._tmpdirs:
                shutil.rmtree(d, ignore_errors=True)

    def _go_offline(self, reason: str) -> None:
        self.offline, self.uri = True, local_store_uri()
        log.warning("MLflow tracking server %s is unreachable (%s); mlflow.on_unreachable is local: this run "
                    "is recorded in %s, tagged %s, for `asrflow-mlflow-sync` to send later",
                    self.destination, reason, self.uri, DESTINATION_TAG)

    def _start(self) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.uri)
        with store_lock(self.uri):
            self._exp_id = self._experiment_id()
            tags = {"asrflow.step": self.step, "asrflow.invocation": os.environ.get(INVOCATION_ENV, "standalone"),
                    **self.extra_tags}
            if self.offline:
                tags[DESTINATION_TAG] = self.destination
            self.run = mlflow.start_run(experiment_id=self._exp_id, run_name=self.run_name, tags=tags,
                                        log_system_metrics=False)  # ours go through the journal
        self._client = MlflowClient(self.uri)

    def _experiment_id(self) -> str:
        import mlflow

        exp = mlflow.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return mlflow.create_experiment(self.experiment, artifact_location=artifact_root_for(self.uri))
        except Exception:  # another process created it between our two calls
            exp = mlflow.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _release_fluent_run(self, status: str) -> None:
        """Take the run off MLflow's active-run stack without another call to the server: the journal's
        last record already set its status (mlflow.end_run would call the server again)."""
        import mlflow

        active = mlflow.active_run()
        if self.run is None or active is None or active.info.run_id != self.run.info.run_id:
            return
        try:
            from mlflow.environment_variables import MLFLOW_RUN_ID
            from mlflow.tracking import fluent

            fluent._active_run_stack.get().pop()
            MLFLOW_RUN_ID.unset()
            fluent._last_active_run_id.set(self.run.info.run_id)
        except Exception:  # MLflow's internals moved: end it the public way
            with contextlib.suppress(Exception):
                mlflow.end_run(status)

    # -- the writer thread -----------------------------------------------------------------------
    def _record(self, kind: str, data: Any) -> None:
        if not self._open:
            raise RuntimeError(f"StepRun {self.run_name}: records are taken between __enter__ and __exit__")
        op = _Op(kind, data)
        with self._cv:
            self._journal.append(op)
            self._pending.append(op)
            self._cv.notify_all()

    def _next_batch(self) -> list[_Op]:
        first = self._pending[0]
        if first.kind != "metrics" or self._single:
            return [first]
        batch, n = [], 0
        for op in self._pending:
            if op.kind != "metrics" or (batch and n + len(op.data) > METRICS_PER_BATCH):
                break
            batch.append(op)
            n += len(op.data)
        return batch

    def _drain(self) -> None:
        delay = 1.0
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                if self._abandoned or not self._pending:
                    return
                batch = self._next_batch()
            try:
                with store_lock(self.uri):
                    apply_ops(self._client, self.run.info.run_id, self._exp_id, batch, self._journal, "store")
            except Exception as exc:  # noqa: BLE001 - nothing a store does may end the run
                if self._abandoned:
                    return
                if retryable(exc):
                    self._note_outage(exc)
                    self._wake.wait(min(delay, 5.0) if self._closing else delay)
                    self._wake.clear()
                    delay = min(delay * 2, 15.0)
                    continue
                if len(batch) > 1:  # find the one record it rejects; send the others
                    self._single = True
                    continue
                self._rejected += 1
                log.error("MLflow at %s rejected a %s record of run %s (not retried): %s", self.uri, batch[0].kind,
                          self.run.info.run_id, exc)
            else:
                delay, self._single = 1.0, False
                if self._outage_since is not None:
                    log.warning("MLflow tracking at %s answers again after %.0f s; the buffered records of run %s "
                                "are being sent", self.uri, time.time() - self._outage_since, self.run.info.run_id)
                    self._outage_since = None
            with self._cv:
                for _ in batch:
                    self._pending.popleft()
                self._cv.notify_all()

    def _note_outage(self, exc: BaseException) -> None:
        if self._outage_since is None:
            self._outage_since, self._outage_error = time.time(), str(exc)
            log.warning("MLflow tracking at %s is not answering (%s); the step goes on, and run %s's records "
                        "wait in memory until it answers (retried every <= 15 s)", self.uri,
                        str(exc)[:300], self.run.info.run_id)

    def _wait_written(self, timeout: float | None) -> bool:
        """Until the journal is written; gives up when the store has not answered for ``timeout`` s
        (counted from now at the earliest: an outage that began long ago still gets its chance)."""
        start = time.time()
        with self._cv:
            while self._pending:
                since = self._outage_since
                if timeout is not None and since is not None and time.time() - max(start, since) > timeout:
                    return False
                self._cv.wait(1.0)
            return True

    def _copy_to_local(self) -> None:
        """The store has not come back: the whole run, from the journal, into the local store."""
        from mlflow.tracking import MlflowClient

        local = local_store_uri()
        remote_id = self.run.info.run_id
        if local == self.uri:
            log.error("MLflow: the local store %s kept failing (%s); %d records of run %s are lost", local,
                      self._outage_error[:300], len(self._pending), remote_id)
            return
        try:
            client = MlflowClient(local)
            with store_lock(local):
                exp = client.get_experiment_by_name(self.experiment)
                exp_id = exp.experiment_id if exp else client.create_experiment(
                    self.experiment, artifact_location=artifact_root_for(local))
                tags = {**self.run.data.tags, DESTINATION_TAG: self.destination, REMOTE_RUN_TAG: remote_id}
                copy = client.create_run(exp_id, start_time=self.run.info.start_time, tags=tags,
                                         run_name=self.run_name)
                apply_ops(client, copy.info.run_id, exp_id, self._journal, self._journal, "local")
            self.local_copy = copy.info.run_id
            log.warning("MLflow tracking server %s did not answer again within %.0f s of run %s's end: the run "
                        "(%d records) is saved in the local store %s as run %s; send it to the server with "
                        "`asrflow-mlflow-sync` once it is back", self.destination, self.flush_timeout, remote_id,
                        len(self._journal), local, copy.info.run_id)
        except Exception:
            log.exception("MLflow: could not save run %s in the local store %s either; its records are lost",
                          remote_id, local)

    # -- system metrics --------------------------------------------------------------------------
    def _start_system_metrics(self) -> None:
        """MLflow's system-metrics sampler, its samples sent through the journal (so they survive an
        outage and go to the local store with the rest)."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            class Monitor(SystemMetricsMonitor):
                def monitor(self) -> None:  # the stock loop stops for good when the server does not answer
                    try:
                        while not self._shutdown_event.is_set():
                            for _ in range(self.samples_before_logging):
                                self.collect_metrics()
                                if self._shutdown_event.wait(self.sampling_interval):
                                    return
                            self.publish_metrics(self.aggregate_metrics())
                    except Exception as e:  # noqa: BLE001
                        log.warning("system metrics stopped: %s", e)

                def finish(self) -> None:
                    self._shutdown_event.set()
                    if self._process is not None:
                        self._process.join(timeout=30)
                        self._process = None

            self._monitor = Monitor(self.run.info.run_id, tracking_uri=self.uri)
            self._monitor.mlflow_logger = _MetricsAdapter(self)
            self._monitor.start()
        except Exception as e:  # noqa: BLE001
            log.warning("system metrics are off: %s", e)
            self._monitor = None

    def _stop_system_metrics(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    # -- records ---------------------------------------------------------------------------------
    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        """Never waits on the store: the values (timestamped now) join the journal."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        records = [Metric(k, float(v), ts, int(step or 0)) for k, v in values.items() if v is not None]
        if records:
            self._record("metrics", records)

    def params(self, values: Mapping[str, Any]) -> None:
        self._record("params", {k: str(v)[:6000] for k, v in values.items()})

    def tags(self, values: Mapping[str, str]) -> None:
        self._record("tags", {k: str(v) for k, v in values.items()})

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file or a folder; read when it is written (keep it in place until the run ends)."""
        self._record("artifact", (str(Path(path).resolve()), artifact_path))

    def _input(self, ds, context: str) -> None:
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        self._record("inputs", [DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def dataset(self, manifest_path: str | os.PathLike, name: str, context: str) -> str:
        """Log a JSONL manifest as an MLflow dataset input, digest = sha256 of the file (truncated)."""
        import pandas as pd
        from mlflow.data.pandas_dataset import from_pandas

        df = pd.read_json(manifest_path, lines=True) if Path(manifest_path).stat().st_size else pd.DataFrame()
        digest = file_digest(manifest_path)
        ds = from_pandas(df, source=str(Path(manifest_path).resolve()), name=name, digest=digest[:36])
        self._input(ds, context)
        self.tags({f"dataset.{name}.sha256": digest})
        return digest

    def file_input(self, path: str | os.PathLike, name: str, context: str) -> str:
        """Log any input file (a JSON plan, a vocabulary, CMVN statistics) as an MLflow dataset input:
        metadata only, its source the file's path, digest = sha256 of its bytes (truncated)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        digest = file_digest(path)
        ds = MetaDataset(resolve_dataset_source(str(Path(path).resolve())), name=name, digest=digest[:36])
        self._input(ds, context)
        self.tags({f"dataset.{name}.sha256": digest})
        return digest

    def pytorch_model(self, model, name: str = "model", step: int = 0, params: Mapping[str, Any] | None = None,
                      tags: Mapping[str, str] | None = None, model_type: str | None = None, **save_kwargs) -> None:
        """``mlflow.pytorch.log_model(model, name=name, **save_kwargs)`` that never waits on the server:
        the model is saved locally now (``mlflow.pytorch.save_model``) and logged with the run's other
        records, so it survives an outage like they do."""
        import mlflow.pytorch
        from mlflow.tracking.context.registry import resolve_tags

        tmp = Path(tempfile.mkdtemp(prefix="asrflow-model-"))
        self._tmpdirs.append(tmp)
        mlflow.pytorch.save_model(model, str(tmp / "model"), **save_kwargs)
        self._record("model", {"dir": str(tmp / "model"), "name": name, "step": int(step),
                               "params": {k: str(v) for k, v in (params or {}).items()},
                               "tags": resolve_tags(dict(tags or {})), "model_type": model_type})
