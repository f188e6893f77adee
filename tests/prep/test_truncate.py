import numpy as np
import soundfile as sf

from asrflow.audio import read_audio
from asrflow.manifest import Utterance
from asrflow.prep.truncate import TruncateSettings, pack_segments, summarize, truncate


def make(tmp_path, uid, seconds, text, segments=None, split="train"):
    sr = 16000
    x = (np.random.default_rng(0).standard_normal(int(seconds * sr)) * 0.05).astype(np.float32)
    path = tmp_path / f"{uid}.wav"
    sf.write(path, x, sr)
    extra = {"segments": segments} if segments is not None else {}
    return Utterance(id=uid, audio=str(path), text=text, duration=seconds, sample_rate=sr, speaker="s",
                     dialect="en-gb", split=split, extra=extra)


def test_short_utterances_are_kept_untouched(tmp_path):
    u = make(tmp_path, "short", 3.0, "A B")
    kept, report = truncate([u], TruncateSettings(max_duration=15), tmp_path / "out")
    assert kept == [u] and report[0]["action"] == "kept"


def test_long_utterance_without_alignment_is_dropped_and_reported(tmp_path):
    u = make(tmp_path, "long", 20.0, "SOME WORDS")
    kept, report = truncate([u], TruncateSettings(max_duration=15), tmp_path / "out")
    assert kept == []
    assert report[0]["action"] == "dropped" and "no sentence segments" in report[0]["reason"]
    assert summarize(report)["dropped"] == 1


def test_long_utterance_is_split_at_sentence_boundaries_with_its_words(tmp_path):
    segs = [[0.0, 6.0, "ONE TWO"], [6.5, 12.0, "THREE"], [12.4, 19.0, "FOUR FIVE"], [19.2, 24.0, "SIX"]]
    u = make(tmp_path, "long", 24.0, "ONE TWO THREE FOUR FIVE SIX", segs)
    kept, report = truncate([u], TruncateSettings(max_duration=15), tmp_path / "out")
    assert [k.text for k in kept] == ["ONE TWO THREE", "FOUR FIVE SIX"]
    assert all(k.duration <= 15 for k in kept)
    assert " ".join(k.text for k in kept) == u.text, "no word lost or duplicated"
    src, sr = read_audio(u.audio)
    piece, _ = read_audio(kept[1].audio)
    assert abs(len(piece) / sr - (24.0 - 12.4)) < 1e-3
    np.testing.assert_allclose(piece[:100], src[int(12.4 * sr):int(12.4 * sr) + 100], atol=1e-4)
    assert report[0]["action"] == "split" and report[0]["parts"] == ["long__part0", "long__part1"]


def test_segments_that_disagree_with_the_transcript_are_not_trusted(tmp_path):
    segs = [[0.0, 8.0, "ONE"], [8.0, 16.0, "TWO"]]
    u = make(tmp_path, "liar", 16.0, "ONE TWO THREE", segs)
    kept, report = truncate([u], TruncateSettings(max_duration=15), tmp_path / "out")
    assert kept == [] and report[0]["action"] == "dropped"


def test_single_sentence_over_the_cap_cannot_be_split():
    assert pack_segments([(0.0, 16.0, "A")], 15.0) is None
    assert pack_segments([(0, 5, "A"), (5, 10, "B"), (10, 14, "C")], 15.0) == [[(0, 5, "A"), (5, 10, "B"), (10, 14, "C")]]


def test_splits_outside_the_configured_ones_are_left_alone(tmp_path):
    u = make(tmp_path, "long_test", 20.0, "X", split="test")
    kept, report = truncate([u], TruncateSettings(max_duration=15, splits=("train",)), tmp_path / "out")
    assert kept == [u] and report[0]["action"] == "kept"
