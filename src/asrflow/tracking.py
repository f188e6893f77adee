"""MLflow records for every workflow step: one experiment per workflow, one run per rule invocation.

Runs of one ``snakemake`` invocation share the tag ``asrflow.invocation`` (set by the Snakefile in the
environment, so it never becomes a rule parameter that would trigger reruns). With the default SQLite
store, writes from parallel jobs are serialized by a file lock: SQLite allows one writer, and two
processes creating the schema at once corrupt the first migration.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

INVOCATION_ENV = "ASRFLOW_INVOCATION"
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


class StepRun:
    """One MLflow run for one workflow step. Use as a context manager; every write takes the store lock."""

    def __init__(self, step: str, config: Mapping[str, Any], experiment: str, tracking_uri: str,
                 run_name: str | None = None, extra_tags: Mapping[str, str] | None = None,
                 system_metrics: bool = False):
        self.step, self.config, self.experiment, self.uri = step, config, experiment, tracking_uri
        self.run_name = run_name or step
        self.extra_tags = dict(extra_tags or {})
        self.system_metrics = system_metrics
        self.run = None

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> "StepRun":
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        with store_lock(self.uri):
            exp_id = self._experiment_id()
            tags = {"asrflow.step": self.step, "asrflow.invocation": os.environ.get(INVOCATION_ENV, "standalone"),
                    **self.extra_tags}
            self.run = mlflow.start_run(experiment_id=exp_id, run_name=self.run_name, tags=tags,
                                        log_system_metrics=self.system_metrics)
            params = {**flatten(self.config, "config."), **code_version(), **package_versions()}
            mlflow.log_params({k: v[:6000] for k, v in params.items()})
        self._t0 = time.time()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import mlflow

        with store_lock(self.uri):
            mlflow.log_metric("wall_seconds", time.time() - self._t0)
            mlflow.end_run(status="FAILED" if exc_type else "FINISHED")

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

    # -- records ---------------------------------------------------------------------------------
    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        clean = {k: float(v) for k, v in values.items() if v is not None}
        with store_lock(self.uri):
            mlflow.log_metrics(clean, step=step)

    def params(self, values: Mapping[str, Any]) -> None:
        import mlflow

        with store_lock(self.uri):
            mlflow.log_params({k: str(v)[:6000] for k, v in values.items()})

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        import mlflow

        with store_lock(self.uri):
            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path=artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def dataset(self, manifest_path: str | os.PathLike, name: str, context: str) -> str:
        """Log a JSONL manifest as an MLflow dataset input, digest = sha256 of the file (truncated)."""
        import mlflow
        import pandas as pd
        from mlflow.data.pandas_dataset import from_pandas

        df = pd.read_json(manifest_path, lines=True) if Path(manifest_path).stat().st_size else pd.DataFrame()
        digest = file_digest(manifest_path)
        ds = from_pandas(df, source=str(Path(manifest_path).resolve()), name=name, digest=digest[:36])
        with store_lock(self.uri):
            mlflow.log_input(ds, context=context)
            mlflow.set_tag(f"dataset.{name}.sha256", digest)
        return digest

    def tags(self, values: Mapping[str, str]) -> None:
        import mlflow

        with store_lock(self.uri):
            mlflow.set_tags(dict(values))

    def file_input(self, path: str | os.PathLike, name: str, context: str) -> str:
        """Log any input file (a JSON plan, a vocabulary, CMVN statistics) as an MLflow dataset input:
        metadata only, its source the file's path, digest = sha256 of its bytes (truncated)."""
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        digest = file_digest(path)
        ds = MetaDataset(resolve_dataset_source(str(Path(path).resolve())), name=name, digest=digest[:36])
        with store_lock(self.uri):
            mlflow.log_input(ds, context=context)
            mlflow.set_tag(f"dataset.{name}.sha256", digest)
        return digest
