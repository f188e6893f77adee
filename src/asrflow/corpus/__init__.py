"""The embedded default corpus (synthesized English speech) and DEMAND-like noise, made offline.

``python -m asrflow.corpus.synth OUT --preset small`` and ``python -m asrflow.corpus.noise OUT`` are the
command-line forms. Names are imported lazily so ``python -m`` doesn't find its module pre-imported.
"""
from importlib import import_module

_EXPORTS = {
    "PRESETS": "synth", "generate_corpus": "synth", "load_sentences": "sentences",
    "make_demand_zip": "noise", "synthesize_demand_like": "noise",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"asrflow.corpus.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'asrflow.corpus' has no attribute {name!r}")
