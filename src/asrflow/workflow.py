"""Glue between Snakemake's ``script:`` jobs and the package: logging to the rule's log, MLflow run."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from asrflow.tracking import StepRun, resolve_tracking_uri


def setup_logging(log_path: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)


def step_run(smk: Any, step: str, run_name: str | None = None, **tags: str) -> StepRun:
    """An MLflow run for the current Snakemake job, recording the resolved config as params."""
    setup_logging(smk.log[0] if len(smk.log) else None)
    cfg = dict(smk.config)
    uri = resolve_tracking_uri(cfg.get("mlflow", {}).get("tracking_uri"))
    wildcards = {k: str(v) for k, v in dict(smk.wildcards).items()}
    name = run_name or (step + "".join(f"[{v}]" for v in wildcards.values()))
    return StepRun(step=step, config=cfg, experiment=cfg["experiment"], tracking_uri=uri, run_name=name,
                   extra_tags={**{f"wildcard.{k}": v for k, v in wildcards.items()}, **tags},
                   system_metrics=bool(cfg.get("mlflow", {}).get("system_metrics", False)) and step == "train",
                   on_unreachable=cfg.get("mlflow", {}).get("on_unreachable"))
