"""Weight averaging of asrflow models: ``training.variants.<name>.average_of: [a, b, ...]``.

``average_models(paths)`` returns one ``model.pt`` whose every floating-point tensor is the mean of the
parents' (computed in float64, stored in the parents' dtype). It is stochastic weight averaging over the
ends of training stages (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better
Generalization"): a stage warm-restarted from an earlier one (``init_from``) ends in the same basin at
another point, and the mean of such points lies nearer the basin's centre, which generalizes better
than either end. icefall averages checkpoints the same way (``--avg``); here the parents are whole
models, so the result is evaluated, transcribed and reported like any trained variant.

With ``pretrained_share`` the mean is then mixed, in weight space, with the pretrained encoder it was
fine-tuned from (WiSE-FT, Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): each tensor of
the pretrained part becomes ``(1 - share) * fine-tuned + share * pretrained``; the CTC head, which has no
pretrained counterpart, stays the fine-tuned one. Fine-tuning on a few voices moves the encoder away
from what it learnt on 680k hours of speech; a part of the way back keeps more of that breadth, for a
little accuracy on the voices it was tuned on. ``choose_pretrained_share`` picks the share on dev: it can
only choose it for voices training lacks if dev has some (``corpus.held_out_dev``).

With ``pretrained_share_blocks: [k, ...]`` only the encoder's stem and its lowest k blocks are mixed back
(the depth ``freeze: k`` uses); the blocks above keep their fine-tuned weights, and k equal to the
encoder's block count mixes every pretrained tensor, as without the key. Dev then chooses the share and k
together. Why: on the embedded corpus, what an unheard voice gains from the mix comes from the lowest
blocks (the acoustic ones), while mixing the top blocks back costs the trained voices and buys the
unheard one nothing (docs/results.md, "Session 16").

The parents must be the same model: the same architecture in ``model_config`` (keys that only steer
training aside), the same vocabulary, the same tensor names and
shapes. Anything else is a :class:`CheckpointError` naming the path and the difference, since averaging
unrelated weights gives a model that runs and transcribes nothing. Non-float tensors (counters,
integer buffers) must be equal in every parent.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from asrflow.train.pretrained.checkpoints import CheckpointError, require_path
from asrflow.train.pretrained.init_from import file_sha256

REQUIRED_KEYS = {"model", "vocab", "model_config"}
# model_config keys that only steer training (what is frozen when, learning rates, regularization):
# stages of one model differ in them, and the averaged model computes the same function either way
TRAINING_ONLY_KEYS = frozenset({"freeze", "unfreeze_after_steps", "unfreeze_warmup_steps", "frozen_after_unfreeze",
                                "pretrained_lr_scale", "pretrained_lr_decay", "gradient_checkpointing", "dropout", "encoder_dropout",
                                "attention_dropout", "freeze_feature_encoder", "mask_time_prob", "mask_time_length",
                                "mask_feature_prob", "mask_feature_length", "decoder"})


def load_parent(path: str | Path) -> tuple[Path, dict[str, Any]]:
    p = require_path(path, "an asrflow model.pt to average (training.variants.<name>.average_of)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{p}: cannot read as an asrflow model.pt: {e}") from None
    if not isinstance(ckpt, dict) or not REQUIRED_KEYS <= set(ckpt):
        raise CheckpointError(f"{p}: not an asrflow model.pt (expected the keys model, vocab, model_config)")
    return p, ckpt


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def architecture(model_config: dict[str, Any]) -> dict[str, Any]:
    """What of a model_config defines the function the weights compute."""
    return {k: v for k, v in model_config.items() if k not in TRAINING_ONLY_KEYS}


def check_same_model(first: tuple[Path, dict], other: tuple[Path, dict]) -> None:
    """A CheckpointError naming both paths unless ``other`` is the same model as ``first``."""
    (p0, c0), (p, c) = first, other
    a0, a = architecture(c0["model_config"]), architecture(c["model_config"])
    if _canonical(a) != _canonical(a0):
        diff = {k: (a.get(k), a0.get(k)) for k in sorted(set(a) | set(a0)) if a.get(k) != a0.get(k)}
        raise CheckpointError(f"{p}: its model_config differs from {p0}'s; only one model's weights can be "
                              f"averaged (key: (this, that): {diff})")
    if _canonical(c["vocab"]) != _canonical(c0["vocab"]):
        raise CheckpointError(f"{p}: its vocabulary differs from {p0}'s; the output layers do not correspond")
    s0, s = c0["model"], c["model"]
    if set(s) != set(s0):
        diff = sorted(set(s) ^ set(s0))
        raise CheckpointError(f"{p}: its tensors differ from {p0}'s: {', '.join(diff[:8])}"
                              + (" ..." if len(diff) > 8 else ""))
    for k, v in s.items():
        if v.shape != s0[k].shape or v.dtype != s0[k].dtype:
            raise CheckpointError(f"{p}: {k} is {tuple(v.shape)} {v.dtype} there, {tuple(s0[k].shape)} "
                                  f"{s0[k].dtype} in {p0}")
        if not v.is_floating_point() and not torch.equal(v, s0[k]):
            raise CheckpointError(f"{p}: the integer tensor {k} differs from {p0}'s and cannot be averaged")


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of same-shaped state dicts (float tensors; others taken from the first)."""
    out = {}
    for k, v0 in states[0].items():
        if v0.is_floating_point():
            total = torch.zeros(v0.shape, dtype=torch.float64)
            for s in states:
                total += s[k].to(torch.float64)
            out[k] = (total / len(states)).to(v0.dtype)
        else:
            out[k] = v0.clone()
    return out


def average_models(paths: Sequence[str | Path], min_parents: int = 2) -> dict[str, Any]:
    """The averaged model.pt (a dict like any asrflow model's). Its front end, vocabulary and config are
    the parents' (identical by the checks); ``averaged_from`` records each parent's path, digest and
    MLflow run, ``history`` the last parent's (the averaged model has no training curve of its own).
    ``min_parents=1`` (a mix with the pretrained encoder only) lets one model through unchanged."""
    if len(paths) < min_parents:
        raise CheckpointError(f"average_of needs at least {'two' if min_parents == 2 else min_parents} models "
                              f"(one is enough with pretrained_share), got {list(map(str, paths))}")
    parents = [load_parent(p) for p in paths]
    for other in parents[1:]:
        check_same_model(parents[0], other)
    last = parents[-1][1]
    averaged = dict(last)
    averaged["model"] = average_state_dicts([c["model"] for _, c in parents])
    averaged["averaged_from"] = [{"path": str(p), "sha256": file_sha256(p),
                                  "mlflow_run_id": c.get("mlflow_run_id")}
                                 for p, c in parents]
    averaged["mlflow_run_id"] = None  # set by the caller to the averaging step's own run
    return averaged


def averaged_summary(variant: str, parent_summaries: Sequence[str | Path]) -> dict[str, Any]:
    """train_summary.json of an averaged variant: the compute it took is every parent's training (for
    stages chained by init_from, their steps add up), and its curve is none of its own."""
    parts = [json.loads(Path(s).read_text()) for s in parent_summaries]
    return {"variant": variant, "averaged_from": [p.get("variant") for p in parts],
            "global_step": sum(int(p.get("global_step", 0)) for p in parts),
            "train_seconds": sum(float(p.get("train_seconds", 0.0)) for p in parts),
            "parameters": parts[-1].get("parameters"), "history": [],
            "stop_reason": "weights averaged over " + ", ".join(str(p.get("variant")) for p in parts)}


def _pretrained_model(ckpt: dict[str, Any]):
    """A fresh model of ``ckpt``'s config with the pretrained weights read again from its checkpoint."""
    from asrflow.text import vocab_from_dict
    from asrflow.train.pretrained import build_pretrained_model

    config = ckpt["model_config"]
    if config.get("name") not in ("whisper_encoder", "wav2vec2"):
        raise CheckpointError(f"pretrained_share needs a model fine-tuned from a pretrained encoder "
                              f"(whisper_encoder, wav2vec2), not {config.get('name')!r}: it has nothing to mix back")
    return build_pretrained_model(config, len(vocab_from_dict(ckpt["vocab"])))


def pretrained_part(ckpt: dict[str, Any], blocks: int | None = None) -> dict[str, torch.Tensor]:
    """The pretrained encoder's own weights for the tensors of ``ckpt``'s pretrained part, read again from
    the checkpoint its ``model_config`` names (a whisper_encoder or wav2vec2 model; no download). With
    ``blocks`` k: only the tensors of the encoder's stem and its lowest k blocks (``unit_depths``, the
    depth ``freeze: k`` uses); k equal to the encoder's block count (or None) keeps every pretrained tensor."""
    from asrflow.train.pretrained.freezing import pretrained_parameters, unit_depths

    config = ckpt["model_config"]
    model = _pretrained_model(ckpt)
    ids = {id(p) for p in pretrained_parameters(model)}
    if blocks is not None:
        n = len(model.freeze_units()[1])
        if not 0 <= int(blocks) <= n:
            raise ValueError(f"pretrained_share_blocks: {blocks}, but the encoder has {n} blocks "
                             f"(0 mixes the stem only, {n} every pretrained tensor)")
        if int(blocks) < n:
            ids &= {i for i, depth in unit_depths(model).items() if depth <= int(blocks)}
    state = model.state_dict()
    part = {name: state[name] for name, p in model.named_parameters() if id(p) in ids}
    for name, v in part.items():
        mine = ckpt["model"].get(name)
        if mine is None or mine.shape != v.shape:
            raise CheckpointError(f"{config.get('checkpoint')}: its {name} does not match the fine-tuned model's "
                                  f"({tuple(v.shape)} against {None if mine is None else tuple(mine.shape)})")
    return part


def encoder_blocks(ckpt: dict[str, Any]) -> int:
    """How many blocks the pretrained encoder of ``ckpt`` has (what ``pretrained_share_blocks`` counts)."""
    return len(_pretrained_model(ckpt).freeze_units()[1])


def mix_with_pretrained(ckpt: dict[str, Any], pretrained: dict[str, torch.Tensor], share: float) -> dict[str, Any]:
    """``ckpt`` with each pretrained tensor at ``(1 - share) * its own + share * pretrained`` (float64 sums)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"pretrained_share must lie in [0, 1], got {share}")
    state = dict(ckpt["model"])
    for name, v in pretrained.items():
        mixed = (1.0 - share) * state[name].to(torch.float64) + share * v.to(torch.float64)
        state[name] = mixed.to(state[name].dtype)
    return {**ckpt, "model": state}


def choose_pretrained_share(ckpt: dict[str, Any], shares: Sequence[float],
                            score: Callable[[dict[str, Any]], dict[str, Any]],
                            blocks: Sequence[int] | None = None) -> tuple[dict[str, Any], list[dict]]:
    """The mix of ``ckpt`` with its pretrained encoder whose ``score`` (a dev tuning: ``{"cer": ..}``) is
    lowest, and every candidate's scores. ``blocks`` (``pretrained_share_blocks``): the depths to mix back
    (the stem and the lowest k blocks); None: the whole encoder. Each (share, k) is scored once, share 0
    (the fine-tuned model itself) once for all k; on a tie the smallest share, then the fewest blocks,
    wins (the least change). The choice is recorded in the model (``pretrained_share``)."""
    if not shares:
        raise ValueError("pretrained_share: an empty list of shares to choose from")
    n_blocks = encoder_blocks(ckpt)
    depths = sorted({int(k) for k in blocks}) if blocks else [n_blocks]
    parts = {k: pretrained_part(ckpt, k) for k in depths}
    grid, best = [], None
    for share in sorted({float(x) for x in shares}):
        for k in depths[:1] if share == 0.0 else depths:
            candidate = mix_with_pretrained(ckpt, parts[k], share)
            row = {"share": share, "blocks": k, **score(candidate)}
            if row.get("cer") is None:  # e.g. a corpus whose manifest has no dev split
                raise ValueError(f"pretrained_share: no dev CER to choose the share by (share {share}: {row}); "
                                 "the share is chosen on the dev split, which is empty")
            grid.append(row)
            if best is None or row["cer"] < best[0]["cer"]:
                best = (row, candidate)
    row, model = best
    return {**model, "pretrained_share": {"chosen": row["share"], "blocks": row["blocks"],
                                          "encoder_blocks": n_blocks, "grid": grid}}, grid
