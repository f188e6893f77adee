"""``init_from`` onto voices the parent never heard, against training from scratch: a CER-per-step curve.

    python -m asrflow.benchmark.init_from_curve --parent results/train/full/model.pt \\
        --parent-corpus results/corpus/manifest.jsonl --work /tmp/init_curve --md docs/init_from_curve.md

1. An adaptation corpus in one voice family the parent never trained on (festival's ``ked_diphone``:
   the embedded corpus speaks it in its held-out test subset only), spoken by speakers drawn from that
   family's settings grid and dealt to train/dev/test so that no speaker is in two splits. Its
   sentences are new too: every sentence of the parent's corpus, in any split, is left out.
2. The real workflow on it (``corpus.source: manifest``), two variants of one recipe that differ in one
   thing only: ``init`` starts from the parent (``training.base.init_from``), ``scratch`` from random
   weights. Same seed, same steps, same data order.
3. Each variant's dev CER after every epoch (train_summary.json's history), the parent's own dev CER
   before any adaptation step (step 0), and the final greedy test CER of each, as one table.

Everything is deterministic (fixed seeds, step-count stop), so the numbers do not depend on the load.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import yaml

from asrflow.corpus.sentences import load_sentences
from asrflow.corpus.synth import draw_voice_speakers, synthesize
from asrflow.manifest import SPLITS, read_records
from asrflow.text import normalize_text

log = logging.getLogger("asrflow.benchmark.init_from_curve")
REPO = Path(__file__).resolve().parents[3]
VARIANTS = ("init", "scratch")


def make_voice_corpus(out_dir: Path, voice: str, utterances: dict[str, int], speakers: dict[str, int],
                      exclude: set[str], seed: int) -> Path:
    """Synthesize ``utterances[split]`` sentences per split in ``voice`` ("engine:voice"); returns the
    manifest (one JSON line per utterance: id, audio, text, split, speaker, dialect)."""
    rng = np.random.default_rng(seed)
    dealt = draw_voice_speakers(rng, voice, speakers, held_out=True)
    pool = [s for s in load_sentences(3, 16) if s not in exclude]
    order = rng.permutation(len(pool))
    need = sum(utterances.values())
    if need > len(pool):
        raise ValueError(f"{need} sentences asked for, {len(pool)} left after excluding the parent's corpus")
    sentences = iter(pool[i] for i in order[:need])
    wav_dir = out_dir / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for split in SPLITS:
            split_speakers = dealt[split]
            texts = [next(sentences) for _ in range(utterances[split])]
            # round-robin over the split's speakers, one engine call per speaker
            for k, speaker in enumerate(split_speakers):
                mine = texts[k::len(split_speakers)]
                waves, rate = synthesize(speaker, mine, Path(tmp))
                for j, (text, wave) in enumerate(zip(mine, waves)):
                    uid = f"{split}-{speaker.id}-{j:04d}"
                    path = wav_dir / f"{uid}.wav"
                    sf.write(path, wave, rate, subtype="PCM_16")
                    lines.append({"id": uid, "audio": str(path), "text": text, "split": split,
                                  "speaker": speaker.id, "dialect": speaker.dialect})
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    log.info("%s: %d utterances, speakers %s", manifest, len(lines), {s: len(v) for s, v in dealt.items()})
    return manifest


def workflow_override(manifest: Path, parent: Path, steps: int) -> dict[str, Any]:
    """The one difference between the two variants is ``init_from``; everything else is the default."""
    return {
        "experiment": "asrflow-init-from-curve",
        "corpus": {"source": "manifest", "path": str(manifest), "defects": False},
        "training": {"run_variants": list(VARIANTS),
                     "base": {"max_steps": steps},
                     "variants": {"init": {"init_from": str(parent.resolve())}, "scratch": {}}},
    }


def run_workflow(work: Path, override: dict[str, Any], cores: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "override.yaml").write_text(yaml.safe_dump(override, sort_keys=False))
    targets = [f"results/eval/{v}/metrics.json" for v in VARIANTS]
    cmd = [str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"), "-d", str(work),
           "--cores", str(cores), *targets,  # targets before --configfile, which takes every path after it
           "--configfile", str(REPO / "config" / "config.yaml"), str(work / "override.yaml")]
    log.info("%s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def parent_dev_cer(manifest: Path, parent: Path) -> float:
    """The parent's greedy CER on the adaptation dev set before any step: the curve's step 0. It reads
    the recordings as a user's would be (``asrflow-transcribe``'s path: resampling, mono, prep's
    loudness normalization)."""
    from asrflow.evaluate.scoring import score_corpus
    from asrflow.transcribe import load_model, transcribe

    dev = [r for r in read_records(manifest) if r["split"] == "dev"]
    hyps = transcribe(load_model(parent), [r["audio"] for r in dev])
    return score_corpus([normalize_text(r["text"]) for r in dev], hyps).cer


def curve_table(work: Path, step0: float) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows: dict[int, dict[str, Any]] = {0: {"step": 0, "init": step0, "scratch": None}}
    test = {}
    for variant in VARIANTS:
        summary = json.loads((work / "results" / "train" / variant / "train_summary.json").read_text())
        for h in summary["history"]:
            rows.setdefault(h["step"], {"step": h["step"]})[variant] = h["dev_cer"]
        metrics = json.loads((work / "results" / "eval" / variant / "metrics.json").read_text())
        test[variant] = metrics["headline"]["greedy_cer_clean"]
    return [rows[s] for s in sorted(rows)], test


def markdown(rows, test, corpus_info: dict[str, Any], command: str) -> str:
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    out = [f"Adaptation corpus: {corpus_info}. Command: `{command}`", "",
           "| step | dev CER, init_from the default model | dev CER, from scratch |", "|---|---|---|"]
    out += [f"| {r['step']} | {pct(r.get('init'))} | {pct(r.get('scratch'))} |" for r in rows]
    out += ["", f"Greedy test CER (clean) after the last step: init_from {pct(test['init'])}, "
                f"from scratch {pct(test['scratch'])}."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", type=Path, default=Path("results/train/full/model.pt"))
    ap.add_argument("--parent-corpus", type=Path, default=Path("results/corpus/manifest.jsonl"),
                    help="its sentences (every split) are left out of the adaptation corpus")
    ap.add_argument("--voice", default="festival:ked_diphone")
    ap.add_argument("--utterances", default="360,60,80", help="train,dev,test")
    ap.add_argument("--speakers", default="8,2,3", help="train,dev,test (distinct)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    utt = dict(zip(SPLITS, map(int, args.utterances.split(","))))
    spk = dict(zip(SPLITS, map(int, args.speakers.split(","))))
    exclude = set()
    for r in read_records(args.parent_corpus):  # whole transcripts, and each sentence of a joined one
        exclude.add(normalize_text(r["text"]))
        exclude.update(normalize_text(seg[2]) for seg in r.get("segments") or [])
    manifest = args.work / "corpus" / "manifest.jsonl"
    if not manifest.exists():
        make_voice_corpus(manifest.parent, args.voice, utt, spk, exclude, args.seed)
    run_workflow(args.work / "wf", workflow_override(manifest, args.parent, args.steps), args.cores)
    step0 = parent_dev_cer(manifest, args.parent)
    rows, test = curve_table(args.work / "wf", step0)
    info = {"voice": args.voice, "utterances": utt, "speakers": spk, "steps": args.steps}
    text = markdown(rows, test, info, "python -m asrflow.benchmark.init_from_curve " + " ".join(argv or sys.argv[1:]))
    print(text)
    (args.work / "curve.json").write_text(json.dumps({"rows": rows, "test_cer": test, **info}, indent=1))
    if args.md:
        args.md.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
