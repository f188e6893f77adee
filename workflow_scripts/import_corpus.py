"""Snakemake job: import a real corpus (LibriSpeech, Common Voice, Kaldi data dir, own manifest)."""
from asrflow.data.importers import import_corpus, write_import_report
from asrflow.manifest import write_manifest
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
p = smk.params
if not p.path:
    raise ValueError(f"corpus.source is {p.kind!r}: set corpus.path to the corpus folder (or manifest file)")
with step_run(smk, "import_corpus") as run:
    # kaldi: the split of the data dir; manifest: the split of lines that name none
    kwargs = {"split": p.split} if p.kind in ("kaldi", "manifest") else {}
    result = import_corpus(p.kind, p.path, **kwargs)
    write_manifest(smk.output.manifest, result.utterances)
    write_manifest(smk.output.rejects, [r.to_dict() for r in result.rejects], relative_audio=False)
    write_import_report(smk.output.summary, result, kind=p.kind, root=str(p.path))
    run.metrics({"utterances": len(result.utterances), "rejects": len(result.rejects)})
    run.dataset(smk.output.manifest, "imported_corpus", "source")
    run.artifact(smk.output.rejects, "rejects")
