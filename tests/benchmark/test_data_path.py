"""The streaming data path: lazy reads through loader workers, memory flat in the corpus size, the
same batches with or without workers, and the data-path benchmark's report."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from asrflow.benchmark import data_path
from asrflow.manifest import Utterance, read_manifest, write_json, write_manifest
from asrflow.prep.bucketing import build_plan
from asrflow.text import CharVocab
from asrflow.train.data import BatchLoader, BatchReader, UtteranceIndex
from asrflow.train.sampler import BucketBatchSampler, BucketPlan

from ..train import trainer_fixtures as F

SR = 16000


def long_corpus(root, n_train: int, seconds: float, seed: int = 0):
    """``n_train`` utterances of ``seconds`` each (+2 dev), on the tiny setup's vocabulary, CMVN and noise."""
    setup = F.build_setup(root / "tiny")
    rng = np.random.default_rng(seed)
    utts = []
    for k in range(n_train + 2):
        text = " ".join(F.WORDS[int(i)] for i in rng.integers(0, len(F.WORDS), size=6))
        path = root / "audio" / f"L{k:03d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, F.synth(text, rng, seconds), SR, subtype="PCM_16")
        utts.append(Utterance(id=f"L{k:03d}", audio=str(path), text=text, duration=seconds, sample_rate=SR,
                              speaker="s", dialect="d1", split="train" if k < n_train else "dev"))
    manifest = root / "manifest.jsonl"
    write_manifest(manifest, utts)
    train = [u for u in utts if u.split == "train"]
    plan = build_plan({u.id: u.duration for u in train}, {u.id: u.dialect for u in train}, num_buckets=1,
                      frame_budget=int(4 * seconds * 100) + 10, max_batch_size=4)
    plan_path = root / "buckets.json"
    write_json(plan_path, plan.to_dict())
    return setup, manifest, plan_path, plan


def test_reader_reads_exactly_the_files_and_pads_with_zeros(tmp_path):
    setup = F.build_setup(tmp_path)
    vocab = CharVocab.load(setup.vocab)
    train = [u for u in setup.utts if u.split == "train"][:3]
    batch = BatchReader(vocab, UtteranceIndex(train))[[u.id for u in train]]
    for row, u in enumerate(train):
        x, sr = sf.read(u.audio, dtype="float32")
        n = int(batch.wave_lens[row])
        assert sr == SR and n == len(x)
        assert torch.equal(batch.waves[row, :n], torch.from_numpy(x))
        assert not batch.waves[row, n:].any(), "padding is digital silence"
        assert vocab.decode(batch.targets[row, : int(batch.target_lens[row])].tolist()) == u.text
    assert batch.audio_seconds == pytest.approx(sum(u.duration for u in train))


def test_a_file_at_another_rate_is_refused_with_its_name(tmp_path):
    path = tmp_path / "x.wav"
    sf.write(path, np.zeros(8000, dtype=np.float32), 8000)
    u = Utterance(id="x", audio=str(path), text="AB", duration=1.0, sample_rate=8000, speaker="s", dialect="d",
                  split="train")
    with pytest.raises(Exception, match=r"x\.wav: 8000 Hz, the trainer needs 16000 Hz"):
        BatchReader(CharVocab.build(["AB"]), UtteranceIndex([u]))[["x"]]


def test_workers_deliver_the_same_batches_in_the_same_order_as_in_process(tmp_path):
    setup = F.build_setup(tmp_path)
    vocab = CharVocab.load(setup.vocab)
    plan = BucketPlan.from_dict(json.loads(setup.plan.read_text()))
    index = UtteranceIndex(u for u in setup.utts if u.id in plan.durations)
    batches = BucketBatchSampler(plan, 0, 1, seed=5).global_batches(1)
    direct = [BatchReader(vocab, index)[b] for b in batches]
    loader = BatchLoader(index, vocab, workers=2, prefetch_factor=2)
    for _ in range(2):  # persistent workers: a second epoch through the same processes
        got = list(loader.batches(batches))
        assert [b.ids for b in got] == [b.ids for b in direct]
        assert all(torch.equal(a.waves, b.waves) and torch.equal(a.targets, b.targets) for a, b in zip(got, direct))
    # a resumed epoch: only the remaining batches, in order
    assert [b.ids for b in loader.batches(batches[3:])] == [b.ids for b in direct[3:]]


def test_rank_memory_stays_flat_at_ten_times_the_corpus(tmp_path):
    """Peak RSS of a training rank plus its loader worker, over the same number of real training steps,
    on a corpus and on 10x its utterances (same files). The 1x corpus holds 64 s x 48 = 51 min of
    audio, 196 MB as float32: a rank that decoded its corpus into memory would add ~1.8 GB at 10x,
    far over the 1.2x bound, so this assertion can fail."""
    setup, manifest, plan_path, plan = long_corpus(tmp_path, n_train=48, seconds=64.0)
    params = setup.params_file("mem", specaugment={"enabled": False}, checkpoint_every_steps=0, log_every=1000,
                               dev_max_utterances=2, loader_workers=1)
    peaks = {}
    for factor in (1, 10):
        m, p = data_path.scaled_corpus(manifest, plan, factor, tmp_path / "scaled")
        assert len(BucketPlan.from_dict(json.loads(p.read_text())).durations) == 48 * factor
        args = setup.args(params, tmp_path / "out")
        args[args.index("--manifest") + 1], args[args.index("--plan") + 1] = str(m), str(p)
        (report,) = data_path.run_probe(args, 6, tmp_path / f"probe{factor}.json", env=F.clean_env())
        assert report["steps"] == 6 and report["utterances"] == 48 * factor + 2
        peaks[factor] = report["peak_rss_tree_mb"]
    assert peaks[10] <= 1.2 * peaks[1], peaks


def test_librispeech_like_durations_are_deterministic_and_shaped_like_librispeech():
    d = data_path.librispeech_like_durations(20000, seed=3)
    assert d == data_path.librispeech_like_durations(20000, seed=3)
    assert 11.5 < float(np.mean(d)) < 13.0 and min(d) >= 1.0 and max(d) <= 16.8


def test_lhotse_comparison_sees_the_same_utterances(tmp_path):
    rng = np.random.default_rng(0)
    durs = {f"u{i:04d}": float(rng.uniform(1, 15)) for i in range(600)}
    plan = build_plan(durs, {u: "d" for u in durs}, num_buckets=8, frame_budget=6000, max_batch_size=64)
    c = data_path.lhotse_comparison(plan, world_size=2)
    assert c["asrflow"]["utterances_per_epoch"] == 600
    assert c["asrflow"]["batches_per_rank"][0] == c["asrflow"]["batches_per_rank"][1]
    assert 0 < c["lhotse"]["utterances_per_epoch"] <= 600
    for who in ("asrflow", "lhotse"):
        assert 0.0 <= c[who]["padding_ratio"] < 0.5
    # ours never exceeds the frame budget unless one utterance alone does
    assert c["asrflow"]["max_padded_frames"] <= 6000
