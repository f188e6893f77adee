#!/usr/bin/env python3
"""Is the unheard voice a vocal tract length away from the trained ones? Test-time frequency warping
(VTLN, Lee & Rose 1996) of a trained model's log-mel, with the warp of ``training.<variant>.vtlp``
(``asrflow.train.augment.warp_log_mel``): greedy CER per speaker group on one split, for each fixed
factor, for the factor chosen per utterance and per speaker by the model's own confidence (mean of the
frame-wise best log-prob; no reference used), and for the oracle factor per utterance (chosen with the
reference: the most any per-utterance warp could buy).

    .venv/bin/python scripts/vtln_probe.py results/train/whisper_tiny/model.pt \
        --decoding results/eval/whisper_tiny/decoding.json [--manifest results/prep/truncated.jsonl] [--split dev]
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from asrflow.evaluate.decoding import greedy_decode
from asrflow.evaluate.run import load_waves, speaker_group
from asrflow.evaluate.scoring import score_corpus
from asrflow.manifest import read_manifest
from asrflow.train.augment import warp_log_mel
from asrflow.transcribe import Recognizer, load_model


@torch.no_grad()
def warped_emissions(model: Recognizer, waves: dict[str, torch.Tensor], alpha: float, boundary_hz: float,
                     batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per-utterance (T, V) log-probs with every utterance's log-mel warped by ``alpha``."""
    ids = sorted(waves, key=lambda i: (len(waves[i]), i))
    out = {}
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        lens = torch.tensor([len(waves[i]) for i in chunk])
        batch = torch.zeros(len(chunk), int(lens.max()))
        for row, uid in enumerate(chunk):
            batch[row, : len(waves[uid])] = waves[uid]
        feats, feat_lens = model.logmel(batch, lens)
        if alpha != 1.0:
            fe = model.logmel
            feats = warp_log_mel(feats, torch.full((len(chunk),), alpha, dtype=torch.float64), fe.band_centres_hz(),
                                 fe.sample_rate / 2, boundary_hz)
        log_probs, out_lens = model.acoustic(feats, feat_lens)
        for row, uid in enumerate(chunk):
            out[uid] = log_probs[row, : int(out_lens[row])].float().clone()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--manifest", default="results/prep/truncated.jsonl")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--decoding", help="the evaluation's decoding.json: greedy's blank penalty (else 0)")
    ap.add_argument("--factors", type=float, nargs="+", default=[0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15])
    ap.add_argument("--boundary-hz", type=float, default=4800.0)
    args = ap.parse_args()
    penalty = json.loads(Path(args.decoding).read_text())["blank_penalty"] if args.decoding else 0.0
    model = load_model(args.model)
    utts = sorted((u for u in read_manifest(args.manifest) if u.split == args.split), key=lambda u: u.id)
    waves = load_waves(utts, model.frontend)
    refs, group = {u.id: u.text for u in utts}, {u.id: speaker_group(u) for u in utts}
    hyps, confidence = {}, {}
    for alpha in args.factors:
        em = warped_emissions(model, waves, alpha, args.boundary_hz)
        hyps[alpha] = {u: greedy_decode(lp, None, model.vocab, penalty)[0] for u, lp in em.items()}
        confidence[alpha] = {u: float(lp.max(-1).values.mean()) for u, lp in em.items()}

    def choose(ids: list[str], score) -> float:  # highest score; on a tie the factor nearest 1
        return max(args.factors, key=lambda a: (score(a, ids), -abs(a - 1.0)))

    by_speaker = defaultdict(list)
    for u in utts:
        by_speaker[u.speaker].append(u.id)
    mean_conf = lambda a, ids: sum(confidence[a][u] for u in ids) / len(ids)  # noqa: E731
    per_utt = {u: choose([u], mean_conf) for u in refs}
    per_speaker = {u: choose(ids, mean_conf) for ids in by_speaker.values() for u in ids}
    oracle = {u: choose([u], lambda a, ids: -score_corpus([refs[ids[0]]], [hyps[a][ids[0]]]).cer) for u in refs}
    rows = [(f"factor {a}", {u: a for u in refs}) for a in args.factors]
    rows += [("per utterance, by confidence", per_utt), ("per speaker, by confidence", per_speaker),
             ("per utterance, oracle (uses the reference)", oracle)]
    groups = sorted(set(group.values()))
    print(f"greedy CER on {args.split} ({len(utts)} utterances), blank penalty {penalty}, {args.model}\n")
    print("| warp | all | " + " | ".join(groups) + " |")
    print("|---" * (len(groups) + 2) + "|")
    for name, factor_of in rows:
        cells = []
        for ids in [sorted(refs)] + [sorted(u for u in refs if group[u] == g) for g in groups]:
            cells.append(f"{100 * score_corpus([refs[u] for u in ids], [hyps[factor_of[u]][u] for u in ids]).cer:.2f}%")
        print(f"| {name} | " + " | ".join(cells) + " |")
    held = [u for u in refs if "held-out" in group[u]]
    if held:
        counts = {a: sum(per_utt[u] == a for u in held) for a in args.factors}
        print(f"\nfactors chosen per utterance by confidence on the held-out voice: {counts}")


if __name__ == "__main__":
    main()
