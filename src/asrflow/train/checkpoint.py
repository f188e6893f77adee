"""Atomic checkpoints (write then rename), keeping the last K and the best by dev loss.

A checkpoint carries a fingerprint of everything that defines the model and its training data; resuming
from one whose fingerprint differs is refused, so a changed config never silently continues an old run.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

CKPT_RE = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointMismatch(RuntimeError):
    pass


def fingerprint(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if CKPT_RE.match(p.name))


def save_checkpoint(ckpt_dir: Path, state: dict[str, Any], global_step: int, keep_last: int,
                    is_best: bool = False) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt-{global_step:08d}.pt"
    _atomic_save(state, path)
    if is_best:
        tmp = ckpt_dir / ".best.pt.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, ckpt_dir / "best.pt")
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, expected_spec: dict[str, Any] | None) -> dict[str, Any]:
    """Load a checkpoint; with ``expected_spec``, refuse one written for another configuration."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if expected_spec is not None and state.get("fingerprint") != fingerprint(expected_spec):
        differs = diff_keys(state.get("spec", {}), expected_spec)
        raise CheckpointMismatch(
            f"{path} was written by a different configuration (differs in: {', '.join(differs) or 'unknown'}). "
            "Delete its checkpoint folder to start over, or restore the configuration it was trained with.")
    return state


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys
