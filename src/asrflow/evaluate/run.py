"""The evaluation step: test-set WER/CER clean and at fixed SNRs of held-out noise, greedy and LM beam
search, overall, per dialect and per speaker group; tables, plots and per-utterance hypotheses.

LM weights are tuned on dev only (a subset, to bound decoding time), never on test.

Audio reaches the model through the same front end as ``asrflow-transcribe`` (``load_for_model``:
mono, the model's rate, loudness normalization); a noisy condition is the clean recording mixed with
noise and then put through that normalization, as a noisy recording given to ``transcribe`` would be.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from asrflow.loudness import Frontend
from asrflow.manifest import Utterance, read_manifest, write_json, write_manifest
from asrflow.evaluate.decoding import (BeamSearchDecoder, LexiconBeamSearchDecoder, arpa_vocabulary, greedy_decode,
                                       lexicon_words, oov_rate, spell, tune_lm_weights, weight_grid)
from asrflow.evaluate.adaptation import AdaptSettings, adapted_emissions
from asrflow.evaluate.scoring import score_by_group, score_corpus
from asrflow.train.augment import noise_recordings
from asrflow.transcribe import Recognizer, emissions, load_for_model, load_model

log = logging.getLogger(__name__)
CLEAN = "clean"


@dataclass
class EvalSettings:
    snr_levels: Sequence[float] = (20.0, 10.0, 5.0, 0.0)
    beam_size: int = 16
    beam_size_token: int = 10
    lm_weights: Sequence[float] = (0.5, 1.0, 1.5)
    word_scores: Sequence[float] = (0.0, 1.0)
    dev_tune_utterances: int = 60
    lm_conditions: Sequence[str] = ("clean", "5")  # conditions also decoded with the LM (greedy: all)
    batch_size: int = 16
    seed: int = 1234
    threads: int = 2
    # Front end for models whose model.pt lacks a ``frontend`` entry: the prep settings of the corpus.
    frontend: Frontend | None = None
    # LM beam search: lexicon-free ("none") or over a lexicon of the LM's words ("lm_vocab"), plus the
    # CMU dictionary's ("cmudict"); beam_sizes: also tune the beam on dev (None: beam_size only).
    lexicon: str = "none"
    cmudict_path: str | None = None
    beam_sizes: Sequence[int] | None = None
    # greedy decoding's blank penalty, chosen by CER on the whole dev set (greedy costs nothing to repeat)
    blank_penalties: Sequence[float] = (0.0,)
    # test-time adaptation settings (asrflow.evaluate.adaptation) dev chooses from, with the blank penalty;
    # the first is no adaptation
    adaptation: Sequence[AdaptSettings] = (AdaptSettings(0),)


def speaker_group(u: Utterance) -> str:
    """Voice family of the speaker: the engine, and whether the whole family was held out of training."""
    engine = u.extra.get("engine", "unknown")
    return f"{engine} (held-out voice)" if u.extra.get("held_out_family") else engine


def condition_seed(seed: int, utt_id: str, snr: float) -> int:
    return int(hashlib.sha256(f"{seed}:{utt_id}:{snr}".encode()).hexdigest()[:15], 16)


def load_waves(utts: Sequence[Utterance], frontend: Frontend | None = None) -> dict[str, torch.Tensor]:
    """Each utterance's audio as ``asrflow-transcribe`` reads it (``load_for_model``, the model's front end)."""
    return {u.id: load_for_model(u.audio, frontend) for u in utts}


def normalize_waves(waves: dict[str, torch.Tensor], frontend: Frontend | None = None) -> dict[str, torch.Tensor]:
    """The front end's loudness normalization of each (already mono, resampled) waveform."""
    fe = frontend or Frontend()
    return {uid: torch.from_numpy(fe.normalize(w.numpy())) for uid, w in waves.items()}


def mix_condition(waves: dict[str, torch.Tensor], noises: list[torch.Tensor], snr: float, seed: int) -> dict[str, torch.Tensor]:
    """Each utterance mixed with a held-out noise segment at exactly ``snr`` dB, deterministically per id."""
    from asrflow.train.augment import NoiseInjector

    out = {}
    for uid, w in waves.items():
        mixer = NoiseInjector(noises, snr_db=(snr, snr), p=1.0, seed=condition_seed(seed, uid, snr))
        out[uid] = mixer(w[None, :], torch.tensor([len(w)])).waves[0]
    return out


def compute_emissions(model: Recognizer, waves: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    """Per-utterance (T, V) log-probs, batched by length so padding stays small."""
    ids = sorted(waves, key=lambda i: (len(waves[i]), i))
    out = {}
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        log_probs, lens = emissions(model, [waves[i] for i in chunk])
        for row, uid in enumerate(chunk):
            out[uid] = log_probs[row, : int(lens[row])].clone()
    return out


def greedy(model: Recognizer, em: dict[str, torch.Tensor], blank_penalty: float = 0.0) -> dict[str, str]:
    return {uid: greedy_decode(lp, None, model.vocab, blank_penalty)[0] for uid, lp in em.items()}


def tune_blank_penalty(model: Recognizer, em: dict[str, torch.Tensor], refs: dict[str, str],
                       penalties: Sequence[float], groups: dict[str, str] | None = None) -> dict[str, Any]:
    """The greedy blank penalty with the lowest CER on ``refs`` (dev), the smallest one on a tie; with
    ``groups`` (id -> speaker group), also the CER of each group at that penalty (``by_group``)."""
    if not refs:  # no dev set: nothing to choose on
        return {"blank_penalty": 0.0, "dev_utterances": 0, "grid": [], "cer": None, "by_group": {}}
    grid, hyps_of = [], {}
    for penalty in sorted({float(p) for p in penalties}, key=abs):
        hyps_of[penalty] = hyps = greedy(model, em, penalty)
        stats = score_corpus([refs[u] for u in sorted(refs)], [hyps[u] for u in sorted(refs)])
        grid.append({"blank_penalty": penalty, "cer": stats.cer, "wer": stats.wer})
    best = min(grid, key=lambda row: row["cer"])  # min keeps the first, smallest |penalty|, of equal CERs
    by_group = {}
    for group in sorted(set((groups or {}).values())):
        ids = sorted(u for u in refs if groups.get(u) == group)
        by_group[group] = score_corpus([refs[u] for u in ids], [hyps_of[best["blank_penalty"]][u] for u in ids]).cer
    return {"blank_penalty": best["blank_penalty"], "dev_utterances": len(refs), "grid": grid, "cer": best["cer"],
            "by_group": by_group}


def dev_greedy_tuning(model_path: Path, manifest: Path, penalties: Sequence[float], frontend: Frontend | None = None,
                      batch_size: int = 16) -> dict[str, Any]:
    """``tune_blank_penalty`` of the model at ``model_path`` on all of the manifest's dev split: the dev CER
    that evaluation reports first, with each speaker group's (e.g. a held-out voice's, corpus.held_out_dev)."""
    model = load_model(model_path, frontend_defaults=frontend)
    dev = sorted((u for u in read_manifest(manifest) if u.split == "dev"), key=lambda u: u.id)
    em = compute_emissions(model, load_waves(dev, model.frontend), batch_size) if dev else {}
    return tune_blank_penalty(model, em, {u.id: u.text for u in dev}, penalties, {u.id: speaker_group(u) for u in dev})


def lm_decoder(model: Recognizer, lm_path: Path, s: EvalSettings):
    """The untuned LM beam search of ``s.lexicon``: lexicon-free, or constrained to a word lexicon."""
    if s.lexicon == "none":
        return BeamSearchDecoder(model.vocab, lm_path=str(lm_path), beam_size=s.beam_size,
                                 beam_size_token=s.beam_size_token)
    words = lexicon_words(s.lexicon, lm_path, s.cmudict_path)
    return LexiconBeamSearchDecoder(model.vocab, lm_path, words, beam_size=s.beam_size,
                                    beam_size_token=s.beam_size_token)


def decoding_vocabulary(model: Recognizer, lm_path: Path, decoder) -> list[str]:
    """Words the LM decoder can output as known words: the spellable lexicon, or the LM's vocabulary."""
    if isinstance(decoder, LexiconBeamSearchDecoder):
        return [w for w in decoder.words if spell(w, model.vocab) is not None]
    return arpa_vocabulary(lm_path)


def spread_subset(utts: Sequence[Utterance], n: int) -> list[Utterance]:
    """``n`` utterances evenly spaced over the id-sorted set (all of them if it has no more). Not the first
    ``n``: ids start with the engine's name, so the first 60 of the embedded dev set are all espeak, its
    easiest voices, and LM weights tuned on them would not be tuned for flite and festival."""
    ordered = sorted(utts, key=lambda u: u.id)
    if n <= 0 or n >= len(ordered):
        return ordered
    return [ordered[i * len(ordered) // n] for i in range(n)]


def tune_on_dev(model: Recognizer, dev: Sequence[Utterance], base, s: EvalSettings,
                em: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """LM weight, word score (and beam, if ``s.beam_sizes``) chosen by WER on a dev subset, never test."""
    dev = spread_subset(dev, s.dev_tune_utterances)
    if em is None:
        em = compute_emissions(model, load_waves(dev, model.frontend), s.batch_size)
    t0 = time.time()
    result = tune_lm_weights(base.with_weights, [em[u.id] for u in dev], [u.text for u in dev],
                             weight_grid(s.lm_weights, s.word_scores, s.beam_sizes))
    greedy_stats = score_corpus([u.text for u in dev], [greedy_decode(em[u.id], None, model.vocab)[0] for u in dev])
    return {**result.to_dict(), "dev_utterances": len(dev), "dev_greedy_wer": greedy_stats.wer,
            "seconds": round(time.time() - t0, 1)}


def condition_name(snr: float | None) -> str:
    return CLEAN if snr is None else f"{snr:g}"


def evaluate(model_path: Path, manifest: Path, noise_manifest: Path, lm_path: Path | None,
             out_dir: Path, s: EvalSettings) -> dict[str, Any]:
    torch.set_num_threads(max(1, s.threads))
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(model_path, frontend_defaults=s.frontend)
    utts = read_manifest(manifest)
    test = sorted((u for u in utts if u.split == "test"), key=lambda u: u.id)
    dev = [u for u in utts if u.split == "dev"]
    by_id = {u.id: u for u in test}
    noises = noise_recordings(noise_manifest, "heldout")

    # everything the decoders choose is chosen on dev: test-time adaptation and the blank penalty on all of
    # it, the LM on a subset
    adapt, greedy_tuning, dev_em = tune_adaptation(model, dev, s)
    blank_penalty = greedy_tuning["blank_penalty"]
    base = lm_decoder(model, lm_path, s) if lm_path else None
    tuning = tune_on_dev(model, dev, base, s, dev_em or None) if base is not None else None
    decoder = None
    oov = None
    if tuning:
        decoder = base.with_weights(tuning["lm_weight"], tuning["word_score"], tuning.get("beam_size"))
        tuning["lexicon"] = s.lexicon
        oov = {"lexicon": s.lexicon if s.lexicon != "none" else "lm_vocab (lexicon-free search: OOVs can still be spelled)",
               **oov_rate([u.text for u in test], decoding_vocabulary(model, lm_path, base))}
    clean_waves = load_waves(test, model.frontend)
    records: list[dict[str, Any]] = []
    timings = {}
    for snr in [None, *s.snr_levels]:
        cond = condition_name(snr)
        t0 = time.time()
        waves = clean_waves if snr is None else normalize_waves(mix_condition(clean_waves, noises, snr, s.seed),
                                                                 model.frontend)
        em = model_emissions(model, waves, adapt, s.batch_size)
        hyps = {"greedy": greedy(model, em, blank_penalty)}
        if decoder is not None and cond in s.lm_conditions:
            hyps["lm"] = {uid: decoder.decode(lp)[0] for uid, lp in em.items()}
        timings[cond] = round(time.time() - t0, 1)
        for dec, h in hyps.items():
            for uid, hyp in h.items():
                u = by_id[uid]
                records.append({"id": uid, "condition": cond, "decoder": dec, "ref": u.text, "hyp": hyp,
                                "dialect": u.dialect, "speaker": u.speaker, "speaker_group": speaker_group(u)})
    metrics = summarize(records, tuning, timings)
    metrics["greedy_tuning"] = greedy_tuning
    if oov is not None:
        metrics["test_oov"] = oov
        metrics["headline"]["test_oov_rate"] = oov["oov_rate"]
    write_outputs(out_dir, records, metrics)
    write_json(out_dir / DECODING_FILE, decoding_settings(out_dir, blank_penalty, lm_path, tuning, s, adapt))
    return metrics


def model_emissions(model: Recognizer, waves: dict[str, torch.Tensor], adapt: AdaptSettings,
                    batch_size: int) -> dict[str, torch.Tensor]:
    """The model's log-probs of each utterance: batched, or each adapted to its own utterance first."""
    return adapted_emissions(model, waves, adapt) if adapt.enabled else compute_emissions(model, waves, batch_size)


def tune_adaptation(model: Recognizer, dev: Sequence[Utterance],
                    s: EvalSettings) -> tuple[AdaptSettings, dict[str, Any], dict[str, torch.Tensor]]:
    """(the adaptation setting, its greedy tuning, its dev log-probs) with the lowest dev CER, each setting
    with its own best blank penalty; a tie keeps the earlier setting (the first is no adaptation)."""
    dev = sorted(dev, key=lambda u: u.id)
    refs, groups = {u.id: u.text for u in dev}, {u.id: speaker_group(u) for u in dev}
    waves = load_waves(dev, model.frontend) if dev else {}
    best = None
    rows = []
    for st in s.adaptation:
        t0 = time.time()
        em = model_emissions(model, waves, st, s.batch_size) if dev else {}
        tuning = tune_blank_penalty(model, em, refs, s.blank_penalties, groups)
        rows.append({**st.to_dict(), "cer": tuning["cer"], "blank_penalty": tuning["blank_penalty"],
                     "by_group": tuning["by_group"], "seconds": round(time.time() - t0, 1)})
        log.info("dev CER %.4f (blank penalty %.1f) with test-time adaptation %s, %.0f s", tuning["cer"],
                 tuning["blank_penalty"], st.to_dict() if st.enabled else "off", rows[-1]["seconds"])
        if best is None or tuning["cer"] < best[1]["cer"]:
            best = (st, tuning, em)
    adapt, tuning, em = best
    if len(rows) > 1:
        tuning["adaptation"] = {"chosen": adapt.to_dict(), "grid": rows}
    return adapt, tuning, em


DECODING_FILE = "decoding.json"


def decoding_settings(out_dir: Path, blank_penalty: float, lm_path: Path | None, tuning: dict | None,
                      s: EvalSettings, adapt: AdaptSettings | None = None) -> dict[str, Any]:
    """What the evaluation decoded with, for ``asrflow-transcribe --decoding``: the same test-time adaptation,
    blank penalty and LM search, so a user's recordings are decoded as the reported figures were. The LM
    path is relative to this file's folder, so the results folder can move."""
    out: dict[str, Any] = {"blank_penalty": blank_penalty, "tuned_on": "dev"}
    if adapt is not None and adapt.enabled:
        out["adaptation"] = adapt.to_dict()
    if tuning is not None and lm_path is not None:
        out.update(lm=os.path.relpath(Path(lm_path).resolve(), Path(out_dir).resolve()), lexicon=s.lexicon,
                   cmudict=s.cmudict_path, lm_weight=tuning["lm_weight"], word_score=tuning["word_score"],
                   beam_size=tuning.get("beam_size") or s.beam_size, beam_size_token=s.beam_size_token)
    return out


def summarize(records: list[dict], tuning: dict | None, timings: dict) -> dict[str, Any]:
    def stats(rs: list[dict]) -> dict:
        return score_corpus([r["ref"] for r in rs], [r["hyp"] for r in rs]).to_dict()

    out: dict[str, Any] = {"by_condition": {}, "per_dialect": {}, "per_speaker_group": {}, "lm_tuning": tuning,
                           "decode_seconds": timings}
    for dec in sorted({r["decoder"] for r in records}):
        mine = [r for r in records if r["decoder"] == dec]
        out["by_condition"][dec] = {c: s.to_dict() for c, s in score_by_group(mine, "condition").items()}
        clean = [r for r in mine if r["condition"] == CLEAN]
        out["per_dialect"][dec] = {d: s.to_dict() for d, s in score_by_group(clean, "dialect").items()}
        out["per_speaker_group"][dec] = {g: s.to_dict() for g, s in score_by_group(clean, "speaker_group").items()}
        noisy5 = [r for r in mine if r["condition"] == "5"]
        if noisy5:
            out["per_dialect_5db"] = out.get("per_dialect_5db", {})
            out["per_dialect_5db"][dec] = {d: s.to_dict() for d, s in score_by_group(noisy5, "dialect").items()}
    g = out["per_dialect"]["greedy"]
    wers = [v["wer"] for v in g.values()]
    out["headline"] = {
        "greedy_cer_clean": out["by_condition"]["greedy"][CLEAN]["cer"],
        "greedy_wer_clean": out["by_condition"]["greedy"][CLEAN]["wer"],
        "dialect_wer_spread": (max(wers) - min(wers)) if wers else 0.0,
    }
    if "lm" in out["by_condition"]:
        out["headline"]["lm_wer_clean"] = out["by_condition"]["lm"][CLEAN]["wer"]
        out["headline"]["lm_cer_clean"] = out["by_condition"]["lm"][CLEAN]["cer"]
    if "5" in out["by_condition"]["greedy"]:
        out["headline"]["greedy_wer_5db"] = out["by_condition"]["greedy"]["5"]["wer"]
    return out


def write_outputs(out_dir: Path, records: list[dict], metrics: dict) -> None:
    write_manifest(out_dir / "hypotheses.jsonl", records, relative_audio=False)
    write_json(out_dir / "metrics.json", metrics)
    write_table(out_dir / "by_condition.csv", [
        {"decoder": dec, "condition": c, **v} for dec, conds in metrics["by_condition"].items() for c, v in conds.items()])
    write_table(out_dir / "per_dialect.csv", [
        {"decoder": dec, "dialect": d, **v} for dec, ds in metrics["per_dialect"].items() for d, v in ds.items()])
    write_table(out_dir / "per_speaker_group.csv", [
        {"decoder": dec, "speaker_group": g, **v} for dec, gs in metrics["per_speaker_group"].items() for g, v in gs.items()])
    plot_wer_vs_snr(metrics, out_dir / "wer_vs_snr.png")
    plot_per_dialect(metrics, out_dir / "per_dialect.png")


def write_table(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _snr_axis(conds: dict) -> list[tuple[float, str]]:
    pts = [(float(c), c) for c in conds if c != CLEAN]
    return sorted(pts, reverse=True)


def plot_wer_vs_snr(metrics: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for dec, conds in metrics["by_condition"].items():
        pts = _snr_axis(conds)
        xs = [x for x, _ in pts] + ([30.0] if CLEAN in conds else [])
        ys = [conds[c]["wer"] * 100 for _, c in pts] + ([conds[CLEAN]["wer"] * 100] if CLEAN in conds else [])
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", label=dec)
    ax.set_xlabel("SNR of held-out noise (dB); 30 = clean")
    ax.set_ylabel("WER (%)")
    ax.set_title("Test WER vs SNR")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_per_dialect(metrics: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decs = list(metrics["per_dialect"])
    dialects = sorted(metrics["per_dialect"]["greedy"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(decs))
    for k, dec in enumerate(decs):
        vals = [metrics["per_dialect"][dec].get(d, {}).get("wer", math.nan) * 100 for d in dialects]
        ax.bar([i + k * width for i in range(len(dialects))], vals, width, label=dec)
    ax.set_xticks([i + width * (len(decs) - 1) / 2 for i in range(len(dialects))], dialects, rotation=30, ha="right")
    ax.set_ylabel("WER (%) clean")
    ax.set_title("Test WER per dialect")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
