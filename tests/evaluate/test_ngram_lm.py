"""The pure-Python Kneser-Ney LM, validated by loading it with KenLM and flashlight."""
from __future__ import annotations

import math
import random

import pytest

from asrflow.evaluate.ngram_lm import (
    BOS,
    EOS,
    UNK,
    build_lm,
    estimate_discounts,
    estimate_kneser_ney,
)
from asrflow.manifest import write_manifest

kenlm = pytest.importorskip("kenlm")

CORPUS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat ate the rat",
    "the cat is black",
    "my dog is brown",
    "the rat ran",
    "a dog and a cat",
    "the mat is red",
    "the log is old",
    "my cat sat",
    "a rat sat on a log",
    "the dog ate",
]


def read_arpa(path):
    """{order: {ngram string: fields}} plus the header counts, parsed independently of the writer."""
    header, sections, order = {}, {}, None
    for line in open(path, encoding="utf-8").read().splitlines():
        if line.startswith("ngram "):
            n, count = line[len("ngram "):].split("=")
            header[int(n)] = int(count)
        elif line.endswith("-grams:"):
            order = int(line[1:].split("-")[0])
            sections[order] = {}
        elif line == "\\end\\":
            order = None
        elif order is not None and line:
            fields = line.split("\t")
            sections[order][fields[1]] = fields
    return header, sections


def predictable_vocab(sections):
    return [w for w in sections[1] if w != BOS]


def log10_prob(model, context: str, word: str) -> float:
    """log10 P(word | <s> context) from KenLM's full_scores."""
    if word == EOS:
        return list(model.full_scores(context, bos=True, eos=True))[-1][0]
    return list(model.full_scores(f"{context} {word}".strip(), bos=True, eos=False))[-1][0]


@pytest.fixture(scope="module")
def lm3(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "lm3.arpa"
    stats = build_lm(CORPUS, path, order=3)
    return path, stats, kenlm.Model(str(path))


def test_arpa_structure_and_stats(lm3):
    path, stats, model = lm3
    header, sections = read_arpa(path)
    assert model.order == 3
    assert header == {n: len(sections[n]) for n in (1, 2, 3)} == stats.ngram_counts
    words = {w.upper() for s in CORPUS for w in s.split()}
    assert set(sections[1]) == words | {BOS, EOS, UNK}
    assert stats.vocab_size == len(words) + 3 and stats.word_types == len(words)
    assert stats.sentences == len(CORPUS)
    assert float(sections[1][BOS][0]) == -99.0
    assert len(sections[1][BOS]) == 3  # <s> is a context, so it carries a backoff weight
    assert len(sections[1][EOS]) == 2  # </s> never is
    assert all(len(f) == 2 for f in sections[3].values())  # top order: no backoff column
    # Every n-gram's prefix and suffix are listed too (KenLM relies on both).
    for n in (2, 3):
        for gram in sections[n]:
            toks = gram.split()
            assert " ".join(toks[:-1]) in sections[n - 1] and " ".join(toks[1:]) in sections[n - 1]


def test_output_is_deterministic(tmp_path):
    build_lm(CORPUS, tmp_path / "a.arpa")
    build_lm(list(reversed(CORPUS)), tmp_path / "b.arpa")
    assert (tmp_path / "a.arpa").read_bytes() == (tmp_path / "b.arpa").read_bytes()


@pytest.mark.parametrize("order", [2, 3, 4])
def test_each_context_sums_to_one(tmp_path, order):
    path = tmp_path / f"lm{order}.arpa"
    build_lm(CORPUS, path, order=order)
    model = kenlm.Model(str(path))
    vocab = predictable_vocab(read_arpa(path)[1])
    # Seen contexts, contexts that back off, and an out-of-vocabulary context.
    for context in ["", "THE", "THE CAT", "SAT ON", "A DOG", "CAT THE", "ZEBRA", "THE ZEBRA"]:
        total = sum(10 ** log10_prob(model, context, w) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-4), context


def test_modified_kneser_ney_on_larger_corpus_sums_to_one(tmp_path):
    rng = random.Random(0)
    words = [a + b for a in "ABCDEF" for b in "XYZQV"]  # 30 letter-only words (digits get spelled out)
    weights = [1 / (i + 1) for i in range(30)]
    sentences = [" ".join(rng.choices(words, weights, k=rng.randint(3, 8))) for _ in range(300)]
    path = tmp_path / "zipf.arpa"
    stats = build_lm(sentences, path, order=3)
    # With enough data the count-of-counts exist and the three-discount estimator is used.
    assert stats.modified_kn[2] and stats.modified_kn[3]
    assert len(set(stats.discounts[3])) == 3
    model = kenlm.Model(str(path))
    vocab = predictable_vocab(read_arpa(path)[1])
    for context in ["", "AX", "AX AY", "FV FQ"]:
        assert sum(10 ** log10_prob(model, context, w) for w in vocab) == pytest.approx(1.0, abs=1e-4)


def test_seen_ngrams_beat_unseen(lm3):
    _, _, model = lm3
    assert log10_prob(model, "SAT ON", "THE") > log10_prob(model, "SAT ON", "MY")
    assert log10_prob(model, "THE", "CAT") > log10_prob(model, "THE", "ATE")
    assert log10_prob(model, "", "THE") > log10_prob(model, "", "RAN")
    assert log10_prob(model, "THE", "CAT") > log10_prob(model, "THE", UNK)


def test_training_text_has_lower_perplexity_than_shuffled(lm3):
    _, _, model = lm3
    rng = random.Random(1)
    train = [s.upper() for s in CORPUS]
    shuffled = []
    for s in train:
        words = s.split()
        while " ".join(words) == s and len(set(words)) > 1:
            rng.shuffle(words)
        shuffled.append(" ".join(words))

    def corpus_perplexity(sentences):
        logprob = sum(model.score(s, bos=True, eos=True) for s in sentences)
        tokens = sum(len(s.split()) + 1 for s in sentences)
        return 10 ** (-logprob / tokens)

    assert corpus_perplexity(train) < corpus_perplexity(shuffled)


def test_flashlight_kenlm_loads_the_arpa(lm3):
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    path, _, model = lm3
    words = ["THE", "CAT", "SAT", "ZEBRA"]
    lm = KenLM(str(path), Dictionary(words))
    state = lm.start(False)
    expected = kenlm.State()
    model.BeginSentenceWrite(expected)
    for i, word in enumerate(words):
        state, score = lm.score(state, i)
        out = kenlm.State()
        assert score == pytest.approx(model.BaseScore(expected, word, out), abs=1e-5)
        expected = out


def test_build_from_manifest_uses_train_split_only(tmp_path):
    def utt(i, text, split):
        return {"id": f"u{i}", "audio": f"{i}.wav", "text": text, "duration": 1.0, "sample_rate": 16000,
                "speaker": "s", "dialect": "d", "split": split}

    manifest = tmp_path / "all.jsonl"
    records = [utt(i, s.upper(), "train") for i, s in enumerate(CORPUS)]
    records += [utt(100, "ZEBRA CROSSING", "test"), utt(101, "ZEBRA DEV", "dev")]
    write_manifest(manifest, records)
    stats = build_lm(manifest, tmp_path / "lm.arpa", order=3)
    assert stats.sentences == len(CORPUS)
    model = kenlm.Model(str(tmp_path / "lm.arpa"))
    assert "CAT" in model and "ZEBRA" not in model


def test_text_is_normalized_like_transcripts(tmp_path):
    stats = build_lm(["The cat's mat, 2 cats!"], tmp_path / "n.arpa", order=2)
    _, sections = read_arpa(tmp_path / "n.arpa")
    assert {"THE", "CAT'S", "MAT", "TWO", "CATS"} <= set(sections[1])
    assert stats.tokens == 5


def test_discount_estimates():
    # n1=4, n2=2, n3=1, n4=1: Y = 4/8; D1 = 1-2Y*2/4, D2 = 2-3Y*1/2, D3+ = 3-4Y*1/1
    discounts, modified = estimate_discounts([1, 1, 1, 1, 2, 2, 3, 4, 7])
    assert modified and discounts == pytest.approx([0.5, 1.25, 1.0])
    # No counts of 3 or 4: fall back to one absolute discount Y = n1/(n1+2 n2).
    discounts, modified = estimate_discounts([1, 1, 2, 5])
    assert not modified and discounts == pytest.approx([0.5, 0.5, 0.5])


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        estimate_kneser_ney([["A", "B"]], order=1)
    with pytest.raises(ValueError):
        estimate_kneser_ney([[], []], order=3)


def test_probabilities_match_hand_computed_kneser_ney():
    # Sentences <s> A B </s> (x2) and <s> C B </s>, bigram model.
    # Unigram continuation counts: A=1 ({<s>}), B=2 ({A, C}), C=1, </s>=1; total 5.
    #   count-of-counts n1=3, n2=1, no n3 -> single discount D = 3/(3+2) = 0.6
    #   gamma() = 0.6*4/5 = 0.48, uniform over {A, B, C, </s>, <unk>} = 0.2
    #   p(A) = 0.4/5 + 0.096 = 0.176, p(B) = 1.4/5 + 0.096 = 0.376, p(<unk>) = 0.096
    # Bigram raw counts <s>A:2 <s>C:1 AB:2 CB:1 B</s>:3 -> n1=2, n2=2, n3=1, no n4 -> D = 2/6 = 1/3
    #   p(A|<s>) = (2-1/3)/3 + gamma(<s>)=(2/3)/3 * 0.176;  p(B|A) = (2-1/3)/2 + (1/3)/2 * 0.376
    model, stats = estimate_kneser_ney([["A", "B"], ["A", "B"], ["C", "B"]], order=2)
    prob = {gram: 10 ** logp for n in (1, 2) for gram, (logp, _) in model.entries[n].items()}
    assert stats.discounts == {1: [0.6] * 3, 2: [pytest.approx(1 / 3, abs=1e-6)] * 3}
    assert prob[("A",)] == pytest.approx(0.176)
    assert prob[("B",)] == pytest.approx(0.376)
    assert prob[(UNK,)] == pytest.approx(0.096)
    assert prob[(BOS, "A")] == pytest.approx(5 / 9 + 2 / 9 * 0.176)
    assert prob[("A", "B")] == pytest.approx(5 / 6 + 1 / 6 * 0.376)
    assert model.entries[1][(BOS,)][1] == pytest.approx(math.log10(2 / 9))  # backoff = gamma(<s>)
