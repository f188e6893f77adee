"""Snakemake job: a word n-gram LM (ARPA, modified Kneser-Ney) from in-domain text, dev/test sentences excluded.

Embedded corpus: all the sentence source text (WordNet examples, fortunes; optionally WordNet
definitions). Real corpora: the training transcripts plus ``evaluation.lm_text`` if given.
"""
import time

from asrflow.evaluate.lm_text import lm_text
from asrflow.evaluate.ngram_lm import build_lm
from asrflow.manifest import write_json
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
p = smk.params
with step_run(smk, "language_model") as run:
    t0 = time.time()
    text = lm_text(smk.input.manifest, corpus_source=p.corpus_source, user_text=p.lm_text or None,
                   definitions=bool(p.definitions))
    t1 = time.time()
    stats = build_lm(text.sentences, smk.output.arpa, order=p.order)
    t2 = time.time()
    info = {**stats.to_dict(), "text": text.info(), "text_seconds": round(t1 - t0, 2),
            "build_seconds": round(t2 - t1, 2)}
    write_json(smk.output.stats, info)
    run.metrics({"vocab_size": stats.vocab_size, "sentences": stats.sentences, "tokens": stats.tokens,
                 "excluded_heldout_sentences": text.excluded, "build_seconds": info["build_seconds"]})
    run.artifact(smk.output.arpa, "lm")
