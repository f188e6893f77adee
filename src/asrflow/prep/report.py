"""The data-prep report: what went in, what came out, and what happened to everything else."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from asrflow.manifest import read_manifest, read_records


def split_dialect_table(manifest: Path) -> dict:
    hours: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, Counter] = defaultdict(Counter)
    for u in read_manifest(manifest):
        hours[u.split][u.dialect] += u.duration / 3600
        counts[u.split][u.dialect] += 1
    return {split: {d: {"utterances": counts[split][d], "hours": round(h, 4)} for d, h in sorted(dialects.items())}
            for split, dialects in sorted(hours.items())}


def build_data_report(corpus_summary: Path, quarantine: Path, truncation_summary: Path, bucketing: Path,
                      manifest: Path, noise_manifest: Path) -> dict:
    bad = read_records(quarantine)
    noise = read_records(noise_manifest)
    return {
        "corpus": json.loads(Path(corpus_summary).read_text()),
        "quarantine": {"count": len(bad),
                       "by_kind": dict(Counter(r.get("kind", "other") for r in bad)),
                       "reasons": {r["id"]: r["reason"] for r in bad},
                       "ids": [r["id"] for r in bad]},
        "truncation": json.loads(Path(truncation_summary).read_text()),
        "bucketing": json.loads(Path(bucketing).read_text()),
        "prepared": split_dialect_table(manifest),
        "noise": {"recordings": len(noise),
                  "environments": {s: sorted({r["env"] for r in noise if r["split"] == s}) for s in ("train", "heldout")},
                  "minutes": round(sum(r["duration"] for r in noise) / 60, 2)},
    }
