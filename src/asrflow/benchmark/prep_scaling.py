"""Data-prep throughput against the number of parallel workers (a proxy for ``snakemake --cores``).

A fixed subset of the corpus manifest is split into ``k`` disjoint parts of about equal audio
duration, and ``k`` processes each run ``asrflow.prep.resample.run_resample_shard`` — the function
behind the ``resample_shard`` rule — on one part, at the same time. The wall time from starting the
processes to the last one finishing (interpreter start-up included, as for a Snakemake job) gives
audio hours resampled per wall-clock hour.

``python -m asrflow.benchmark.prep_scaling PART_MANIFEST OUT_DIR SETTINGS_JSON`` is one such process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from asrflow.manifest import Utterance, read_manifest, write_manifest
from asrflow.prep.resample import ResampleSettings, run_resample_shard


def select_subset(utts: Sequence[Utterance], n: int) -> list[Utterance]:
    """The first ``n`` utterances by id: fixed across runs, whatever the manifest order."""
    return sorted(utts, key=lambda u: u.id)[:max(1, n)]


def split_balanced(utts: Sequence[Utterance], k: int) -> list[list[Utterance]]:
    """``k`` disjoint parts of about equal total duration (longest first, each to the lightest part)."""
    if k < 1:
        raise ValueError(f"need at least one worker, got {k}")
    parts: list[list[Utterance]] = [[] for _ in range(k)]
    load = [0.0] * k
    for u in sorted(utts, key=lambda u: (-u.duration, u.id)):
        i = min(range(k), key=lambda j: (load[j], j))
        parts[i].append(u)
        load[i] += u.duration
    return [p for p in parts if p]


def run_parallel(parts: Sequence[Sequence[Utterance]], work_dir: Path, settings: ResampleSettings,
                 env: dict[str, str] | None = None, timeout: float = 600) -> dict[str, Any]:
    """Resample every part in its own process, all at once; returns wall time and totals."""
    work_dir.mkdir(parents=True, exist_ok=True)
    cmds = []
    for i, part in enumerate(parts):
        part_dir = work_dir / f"part{i}"
        part_dir.mkdir(parents=True, exist_ok=True)
        manifest = part_dir / "input.jsonl"
        write_manifest(manifest, part, relative_audio=False)
        cmds.append([sys.executable, "-m", "asrflow.benchmark.prep_scaling", str(manifest), str(part_dir),
                     json.dumps(asdict(settings))])
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"prep worker failed ({p.returncode}): {err[-2000:]}")
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "utterances_in": sum(o["utterances_in"] for o in outputs),
            "utterances_out": sum(o["utterances_out"] for o in outputs),
            "quarantined": sum(o["quarantined"] for o in outputs),
            "audio_s": 3600.0 * sum(o["hours_out"] for o in outputs),
            "worker_s": [o["seconds"] for o in outputs]}


def scaling_rows(measured: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Add audio-hours per wall-hour, speed-up and efficiency against the 1-worker (or smallest) run."""
    rows = []
    base_k = min(measured)
    base = measured[base_k]["audio_s"] / measured[base_k]["wall_s"]
    for k in sorted(measured):
        m = measured[k]
        rate = m["audio_s"] / m["wall_s"]  # audio seconds per wall second = audio hours per wall hour
        speedup = rate / base if base else 0.0
        rows.append({"workers": k, **m, "audio_h_per_h": rate, "speedup": speedup,
                     "efficiency": speedup * base_k / k})
    return rows


def measure(corpus_manifest: Path, n_utterances: int, workers: Sequence[int], settings: ResampleSettings,
            work_dir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    utts = select_subset(read_manifest(corpus_manifest), n_utterances)
    measured = {}
    for k in sorted(set(int(w) for w in workers)):
        target = work_dir / f"workers{k}"
        measured[k] = run_parallel(split_balanced(utts, k), target, settings, env=env)
        shutil.rmtree(target, ignore_errors=True)
    return {"utterances": len(utts), "source_audio_s": sum(u.duration for u in utts),
            "rows": scaling_rows(measured)}


def main(argv: list[str] | None = None) -> int:
    manifest, out_dir, settings_json = (argv if argv is not None else sys.argv[1:])
    out = Path(out_dir)
    t0 = time.perf_counter()
    stats = run_resample_shard(Path(manifest), 0, 1, out / "resampled.jsonl", out / "quarantine.jsonl",
                               out / "wav", ResampleSettings(**json.loads(settings_json)))
    stats["seconds"] = time.perf_counter() - t0
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
