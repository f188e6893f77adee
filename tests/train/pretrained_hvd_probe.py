"""Run under ``horovodrun -np 2 --gloo``: a pretrained whisper_encoder, frozen then unfrozen, trained
data-parallel with Horovod's DistributedOptimizer; each rank dumps what it holds.

    horovodrun -np 2 -H localhost:2 --gloo python tests/train/pretrained_hvd_probe.py CT2_FOLDER OUT_DIR

Two models in one launch: one with ``register_unfrozen_parameters`` after the unfreeze, one without
(the control: its unfrozen parameters are not allreduced, so the ranks drift apart).
"""
from __future__ import annotations

import sys
from pathlib import Path

import horovod.torch as hvd
import torch

from asrflow.train.models import build_model
from asrflow.train.pretrained import apply_freeze_schedule, param_groups, register_unfrozen_parameters

STEPS, UNFREEZE_AT, LR = 8, 3, 3e-3


def train(folder: str, register: bool) -> dict:
    torch.manual_seed(0)
    model = build_model({"name": "whisper_encoder", "checkpoint": folder, "freeze": 1,
                         "unfreeze_after_steps": UNFREEZE_AT, "dropout": 0.0}, 6, 80)
    opt = torch.optim.AdamW([{"params": g["params"], "lr_scale": g["lr_scale"]} for g in param_groups(model)], lr=LR)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), op=hvd.Average)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    g = torch.Generator().manual_seed(100 + hvd.rank())  # each rank its own data
    waves, lens = torch.randn(2, 8000, generator=g) * 0.1, torch.tensor([8000, 6000])
    targets, target_lens = torch.randint(1, 6, (2, 8), generator=g), torch.tensor([8, 6])
    ctc = torch.nn.CTCLoss(zero_infinity=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    at_unfreeze, losses, registered = None, [], 0
    model.train()
    for step in range(STEPS):
        if apply_freeze_schedule(model, step) and register:
            registered += register_unfrozen_parameters(opt)
        if step == UNFREEZE_AT:
            at_unfreeze = {k: v.clone() for k, v in model.state_dict().items()}
        for group in opt.param_groups:
            group["lr"] = LR * group["lr_scale"]
        log_probs, out_lens = model(*model.wave_frontend(waves, lens))
        loss = ctc(log_probs.transpose(0, 1), targets, out_lens, target_lens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(hvd.allreduce(loss.detach(), op=hvd.Average, name=f"loss{register}{step}").item())
    return {"before": before, "at_unfreeze": at_unfreeze, "after": model.state_dict(), "losses": losses,
            "registered": registered}


def main() -> int:
    hvd.init()
    torch.set_num_threads(1)
    folder, out = sys.argv[1], Path(sys.argv[2])
    result = {"rank": hvd.rank(), "registered": train(folder, True), "control": train(folder, False)}
    torch.save(result, out / f"rank{hvd.rank()}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
