"""Snakemake job: espeak-ng's phones of the training and dev words (asrflow.phones), for a phone CTC head."""
from asrflow.manifest import iter_manifest
from asrflow.phones import PhoneLexicon
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
with step_run(smk, "phone_lexicon") as run:
    # dev words too: the dev loss of a phone-CTC run is not computed, but a word that reaches the
    # reader must be in the lexicon. Test transcripts stay unread.
    texts = [u.text for u in iter_manifest(smk.input.manifest) if u.split in ("train", "dev")]
    lexicon = PhoneLexicon.build(texts)
    lexicon.save(smk.output.phones)
    run.metrics({"phones": len(lexicon) - 1, "words": len(lexicon.words)})
    run.artifact(smk.output.phones)
