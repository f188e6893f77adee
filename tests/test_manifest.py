import json

import pytest

from asrflow.manifest import ManifestError, Utterance, read_manifest, write_manifest


def record(**over):
    r = {"id": "a", "audio": "wav/a.wav", "text": "HI", "duration": 1.5, "sample_rate": 16000,
         "speaker": "s", "dialect": "en-us", "split": "train"}
    r.update(over)
    return r


def test_round_trip_keeps_extra_fields_and_relative_paths(tmp_path):
    path = tmp_path / "m" / "manifest.jsonl"
    u = Utterance.from_dict(record(audio=str(tmp_path / "m" / "wav" / "a.wav"), engine="espeak"))
    write_manifest(path, [u])
    raw = json.loads(path.read_text())
    assert raw["audio"] == "wav/a.wav" and raw["engine"] == "espeak"
    back = read_manifest(path)[0]
    assert back.audio == str(tmp_path / "m" / "wav" / "a.wav") and back.extra == {"engine": "espeak"}


@pytest.mark.parametrize("bad,message", [
    ("{not json", "not valid JSON"),
    (json.dumps(record(duration="long")), "not numeric"),
    (json.dumps(record(duration=-1)), "negative"),
    (json.dumps({k: v for k, v in record().items() if k != "text"}), "missing field(s) text"),
    (json.dumps([1, 2]), "expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, bad, message):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(record()) + "\n" + bad + "\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(path)


def test_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(record()) + "\n" + json.dumps(record()) + "\n")
    with pytest.raises(ManifestError, match="duplicate utterance id 'a'"):
        read_manifest(path)
