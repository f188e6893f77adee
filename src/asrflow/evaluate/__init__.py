"""Evaluation: error-rate scoring, CTC decoding (greedy and LM beam search), n-gram LM estimation.

Names are imported lazily so that, e.g., a scoring-only script does not pay for importing torch,
torchaudio and flashlight.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ErrorCounts": "scoring",
    "ErrorStats": "scoring",
    "score_corpus": "scoring",
    "score_utterance": "scoring",
    "score_by_group": "scoring",
    "greedy_decode": "decoding",
    "BeamSearchDecoder": "decoding",
    "TuningResult": "decoding",
    "tune_lm_weights": "decoding",
    "weight_grid": "decoding",
    "LMStats": "ngram_lm",
    "build_lm": "ngram_lm",
    "estimate_kneser_ney": "ngram_lm",
    "read_training_texts": "ngram_lm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
