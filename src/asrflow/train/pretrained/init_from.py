"""``training.base.init_from``: start a fresh run from an earlier asrflow ``model.pt``.

``init_from_asrflow(model, path, vocab) -> InitReport`` copies every tensor of the parent's state dict
into ``model`` except the output layer (``head.*``), which is copied only when the parent's vocabulary
is the same as ``vocab`` (same symbols in the same order, same BPE model); otherwise the freshly
initialised output layer stays, and the log says so. An auxiliary phone CTC head (``phone_head.*``) is
never copied: the child's starts fresh, and a parent's is left out. The parent's CMVN statistics (``cmvn.*``) replace
the new run's with ``load_cmvn=True`` (the default: the encoder was trained on features normalized by
them). Any other tensor that the model lacks or has in another shape is an error naming the path: the
parent must have the same architecture.

The trainer calls it on a fresh start only (never on resume, where the run's own checkpoint wins).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asrflow.train.adversary import MODULE_NAME as ADVERSARY_MODULE
from asrflow.train.pretrained.checkpoints import CheckpointError, require_path

log = logging.getLogger(__name__)

HEAD_PREFIXES = ("head.", "inter_head.", "condition.")  # the layers whose shape follows the vocabulary
# a training-only head on another unit inventory (asrflow.phones): never carried over, since the
# parent's phone inventory is not this run's; the child's own starts fresh
FRESH_PREFIXES = ("phone_head.",)
# training-only modules no model.pt has, so the child's own are kept: a whisper_encoder's auxiliary decoder
# (Whisper's weights) and a voice adversary (asrflow.train.adversary; fresh)
AUXILIARY_PREFIXES = ("decoder.", f"{ADVERSARY_MODULE}.")


@dataclass
class InitReport:
    path: str
    sha256: str                         # digest of the parent model.pt file
    parent_model_config: dict[str, Any]
    loaded: int                         # tensors copied
    head_loaded: bool
    head_reason: str                    # why the output layer was (not) loaded
    cmvn_loaded: bool
    parent_run_id: str | None = None    # the parent's MLflow run id, when its model.pt records one
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _identity(vocab: Any) -> list[str]:
    if hasattr(vocab, "identity"):
        return list(vocab.identity())
    from asrflow.text import vocab_from_dict

    return list(vocab_from_dict(vocab).identity())


def init_from_asrflow(model: nn.Module, path: str | Path, vocab: Any, load_cmvn: bool = True) -> InitReport:
    """Load an earlier asrflow model.pt into ``model`` (see the module docstring). ``vocab``: the new run's
    vocabulary (a CharVocab/BPE vocab, or its ``to_dict()``)."""
    p = require_path(path, "an asrflow model.pt (training.base.init_from)")
    if p.is_dir():
        p = require_path(p / "model.pt", "an asrflow model.pt (training.base.init_from)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{p}: cannot read as an asrflow model.pt: {e}") from None
    if not isinstance(ckpt, dict) or not {"model", "vocab", "model_config"} <= set(ckpt):
        raise CheckpointError(f"{p}: not an asrflow model.pt (expected the keys model, vocab, model_config)")
    parent_state: dict[str, torch.Tensor] = ckpt["model"]
    own = model.state_dict()
    same_vocab = _identity(ckpt["vocab"]) == _identity(vocab)
    head_keys = [k for k in parent_state if k.startswith(HEAD_PREFIXES)]
    head_fits = all(k in own and own[k].shape == parent_state[k].shape for k in head_keys)
    if not same_vocab:
        head_reason = (f"vocabulary differs ({len(_identity(ckpt['vocab']))} parent symbols, "
                       f"{len(_identity(vocab))} new): fresh output layer")
    elif not head_fits:
        head_reason = "output layer shape differs: fresh output layer"
    else:
        head_reason = "same vocabulary: output layer loaded"
    load_head = same_vocab and head_fits

    to_load: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    problems: list[str] = []
    for k, v in parent_state.items():
        if k.startswith(FRESH_PREFIXES) or (k.startswith(HEAD_PREFIXES) and not load_head):
            skipped.append(k)
            continue
        if k.startswith("cmvn."):
            if load_cmvn and k in own and own[k].shape == v.shape:
                to_load[k] = v
            else:
                skipped.append(k)
            continue
        if k not in own:
            problems.append(f"{k} (not in the new model)")
        elif own[k].shape != v.shape:
            problems.append(f"{k}: {tuple(v.shape)} in the parent, {tuple(own[k].shape)} in the new model")
        else:
            to_load[k] = v
    missing = sorted(k for k in own if k not in parent_state
                     and not k.startswith(HEAD_PREFIXES + FRESH_PREFIXES + AUXILIARY_PREFIXES + ("cmvn.",)))
    problems += [f"{k} (missing in the parent)" for k in missing]
    if problems:
        raise CheckpointError(f"{p}: its architecture ({ckpt['model_config']}) does not match the new model's: "
                              + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
    with torch.no_grad():
        for k, v in to_load.items():
            own[k].copy_(v)  # state_dict tensors share storage with the parameters and buffers
    cmvn_loaded = any(k.startswith("cmvn.") for k in to_load)
    report = InitReport(path=str(p), sha256=file_sha256(p), parent_model_config=dict(ckpt["model_config"]),
                        loaded=len(to_load), head_loaded=load_head, head_reason=head_reason,
                        cmvn_loaded=cmvn_loaded, parent_run_id=ckpt.get("mlflow_run_id") or ckpt.get("run_id"),
                        skipped=skipped)
    log.info("init_from %s: %d tensors loaded; %s; CMVN %s", p, len(to_load), head_reason,
             "from the parent" if cmvn_loaded else "of this run")
    return report
