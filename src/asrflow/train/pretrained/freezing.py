"""Freezing schedules and per-group learning rates for models with a pretrained part.

Works for every asrflow model: models without a pretrained part (``AcousticModel``) get one group with
``lr_scale`` 1 and never freeze anything.

* ``freeze`` (model config): ``"none"``; ``"all"``: every parameter the checkpoint provides (the whole
  encoder); an int ``k``: the encoder's stem (convolutions; for wav2vec2 also the feature projection and
  positional convolution) and its first ``k`` blocks. The head always trains.
* ``unfreeze_after_steps`` N > 0: from global step N on, nothing is frozen but ``always_frozen_modules``
  (wav2vec2's CNN feature encoder with ``freeze_feature_encoder``), and, with ``frozen_after_unfreeze``
  k, the stem and the first k blocks. A step then back-propagates through the top blocks only: with
  Whisper tiny's 4 blocks and k = 2 it costs ~0.65x a step with nothing frozen (one rank, one thread,
  4 x 5 s: 0.48 against 0.75 s, ``scripts/time_whisper_encoder.py --freeze-steps``). In training the
  saving is smaller (data, head and allreduce do not shrink), and the default does not use it: at equal
  time it was 1.9 points of dev CER worse (docs/results.md, "Session 10").
* ``pretrained_lr_scale``: the LR multiplier of the pretrained part; 1 for everything else.
* ``pretrained_lr_decay`` d: layer-wise LR decay of the pretrained part (:func:`param_groups`); 1: off.
* ``unfreeze_warmup_steps`` W > 0: after unfreezing, the pretrained part's LR ramps up linearly over W
  steps (:func:`pretrained_lr_factor`) instead of jumping to its full value. Adam's first updates are
  about one LR in size for every weight, whatever its gradient, so a jump shakes the pretrained
  weights all at once, just as the head starts to rely on them.

Frozen parameters get ``requires_grad = False``: no gradient is computed for them, so AdamW skips them
(weight decay included) and they stay bitwise unchanged.

Horovod: ``hvd.DistributedOptimizer`` hooks (and allreduces) only the parameters that required grad when
it was built. After ``apply_freeze_schedule`` unfroze some, call :func:`register_unfrozen_parameters` on
the wrapped optimizer, or each rank would update them with its own local gradient and the ranks drift apart.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

log = logging.getLogger(__name__)


def _config(model: nn.Module) -> dict[str, Any]:
    return getattr(model, "model_config", None) or {}


def frozen_parameters_at(model: nn.Module, step: int) -> set[int]:
    """ids of the parameters that must be frozen at global step ``step``."""
    cfg = _config(model)
    if not hasattr(model, "freeze_units"):
        return set()
    frozen: list[nn.Module] = list(model.always_frozen_modules())
    unfreeze_at = int(cfg.get("unfreeze_after_steps") or 0)
    if unfreeze_at > 0 and step >= unfreeze_at:
        keep = cfg.get("frozen_after_unfreeze")
        if keep is not None:
            stem, blocks = model.freeze_units()
            frozen += stem + blocks[:int(keep)]
    else:
        freeze = cfg.get("freeze", "none")
        if freeze == "all":
            frozen += list(model.pretrained_modules()) or [m for m in _encoder_modules(model)]
        elif freeze not in ("none", None, False):
            k = int(freeze)
            stem, blocks = model.freeze_units()
            if k > len(blocks):
                raise ValueError(f"freeze: {k} blocks, but the encoder has {len(blocks)}")
            frozen += stem + blocks[:k]
    return {id(p) for m in frozen for p in m.parameters()}


def _encoder_modules(model: nn.Module) -> list[nn.Module]:
    """What ``freeze: all`` means for a randomly initialised model: everything before the head."""
    stem, blocks = model.freeze_units()
    return stem + blocks


def apply_freeze_schedule(model: nn.Module, step: int) -> bool:
    """Set ``requires_grad`` for global step ``step``; True when anything changed (then, under Horovod,
    the DistributedOptimizer must be re-created: it only hooks parameters that required grad when it
    was built). Call it once before building the optimizer and at the start of every step (and after a
    resume, with the resumed step)."""
    frozen = frozen_parameters_at(model, step)
    changed = 0
    for p in model.parameters():
        want = id(p) not in frozen
        if p.requires_grad != want:
            p.requires_grad_(want)
            changed += 1
    if changed:
        n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        log.info("step %d: freeze schedule changed %d tensors; %d parameters frozen, %d trainable", step, changed,
                 n_frozen, sum(p.numel() for p in model.parameters() if p.requires_grad))
    return bool(changed)


def pretrained_lr_factor(model: nn.Module, step: int) -> float:
    """The factor on the pretrained group's LR at global step ``step``: ``(step - N + 1) / W`` for the W
    steps from ``unfreeze_after_steps`` N on (``unfreeze_warmup_steps`` W), else 1."""
    cfg = _config(model)
    unfreeze_at, warm = int(cfg.get("unfreeze_after_steps") or 0), int(cfg.get("unfreeze_warmup_steps") or 0)
    if unfreeze_at <= 0 or warm <= 0 or step < unfreeze_at:
        return 1.0
    return min(1.0, (step - unfreeze_at + 1) / warm)


def pretrained_parameters(model: nn.Module) -> list[nn.Parameter]:
    if hasattr(model, "pretrained_parameters"):
        return list(model.pretrained_parameters())
    if hasattr(model, "pretrained_modules"):
        return [p for m in model.pretrained_modules() for p in m.parameters()]
    return []


def unit_depths(model: nn.Module) -> dict[int, int]:
    """``id(parameter) -> depth`` for the encoder units of ``freeze_units``: 0 the stem, i + 1 block i. What
    ``freeze: k``, layer-wise LR decay and ``pretrained_share_blocks`` count; parameters outside the units
    (a final norm, the head) are absent."""
    stem, blocks = model.freeze_units()
    return {id(p): d for d, unit in enumerate([stem, *[[b] for b in blocks]]) for m in unit for p in m.parameters()}


def param_groups(model: nn.Module, lr_scale: float | None = None) -> list[dict[str, Any]]:
    """Optimizer groups: ``[{"name": "new", "params", "lr_scale": 1}, {"name": "pretrained", "params", "lr_scale"}]``.

    Every parameter is in a group, frozen ones too, so that unfreezing needs no new optimizer groups.
    ``lr_scale`` defaults to the model config's ``pretrained_lr_scale``. Groups without parameters are
    left out. The trainer sets ``group["lr"] = lr * group["lr_scale"]`` each step.

    With ``pretrained_lr_decay`` d < 1 (layer-wise LR decay, as ULMFiT's discriminative fine-tuning and
    BEiT's recipe): one "pretrained" group per unit of ``freeze_units``, the top block and whatever lies
    above it (a final norm) at ``lr_scale``, each unit below it d times lower, down to the stem at
    ``lr_scale * d ** blocks``. The lowest blocks, which a few training voices pull furthest from what
    pretraining learnt, move least.
    """
    scale = float(lr_scale if lr_scale is not None else _config(model).get("pretrained_lr_scale", 1.0))
    decay = float(_config(model).get("pretrained_lr_decay", 1.0) or 1.0)
    pre = pretrained_parameters(model)
    pre_ids = {id(p) for p in pre}
    new = [p for p in model.parameters() if id(p) not in pre_ids]
    groups = []  # "new" first: param_groups[0]["lr"] stays the schedule's LR (what the trainer logs)
    if new:
        groups.append({"name": "new", "params": new, "lr_scale": 1.0})
    if pre and decay < 1.0 and hasattr(model, "freeze_units"):
        depth = unit_depths(model)
        top = len(model.freeze_units()[1])  # the last block's depth; what lies above the blocks trains at its rate
        for d in range(top + 1):
            params = [p for p in pre if depth.get(id(p), top) == d]
            if params:
                groups.append({"name": "pretrained", "params": params, "lr_scale": scale * decay ** (top - d),
                               "depth": d})
    elif pre:
        groups.append({"name": "pretrained", "params": pre, "lr_scale": scale})
    return groups


def register_unfrozen_parameters(optimizer: Any) -> int:
    """Hook parameters that now require grad into a Horovod ``DistributedOptimizer`` built while they were
    frozen, as its constructor does for the others (Horovod 0.28's ``_register_hooks``, per parameter, so
    the already hooked ones are not hooked twice). Returns how many were added; 0 for a plain optimizer.
    Call it on every rank at the same step, right after ``apply_freeze_schedule`` returned True."""
    requires = getattr(optimizer, "_requires_update", None)
    if requires is None or not hasattr(optimizer, "_make_hook") or not hasattr(optimizer, "_grad_accs"):
        return 0  # not Horovod's DistributedOptimizer: nothing to register
    if getattr(optimizer, "_groups", None) is not None:
        raise NotImplementedError("unfreezing under Horovod's grouped allreduce (groups=...) is not supported")
    added = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and p not in requires:
                requires.add(p)
                optimizer._allreduce_delay.setdefault(p, optimizer.backward_passes_per_step)
                grad_acc = p.expand_as(p).grad_fn.next_functions[0][0]
                grad_acc.register_hook(optimizer._make_hook(p))
                optimizer._grad_accs.append(grad_acc)
                added += 1
    if added:
        log.info("registered %d unfrozen tensors with Horovod's DistributedOptimizer", added)
    return added
