"""Horovod, behind a small interface the trainer uses: rank-0-only I/O, averaged tensors, broadcasts.

``init_distributed()`` uses Horovod (launched by horovodrun, or a single process without it). Where
Horovod is not installed (a notebook, a quick local check) it falls back to a one-process world and
says so; multi-process runs always need Horovod.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)


class World:
    """One process: the identity of every collective."""

    backend = "single"

    def __init__(self) -> None:
        self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average(self, tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
        return tensor

    def sum(self, tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj: Any, name: str | None = None) -> Any:
        return obj

    def broadcast_model_and_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
        return optimizer

    def synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def skip_synchronize(self, optimizer: torch.optim.Optimizer):
        import contextlib
        return contextlib.nullcontext()

    def sync_batchnorm(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def hostname(self) -> str:
        import socket
        return socket.gethostname()

    def shutdown(self) -> None:
        pass


class HorovodWorld(World):
    backend = "horovod"

    def __init__(self) -> None:
        import horovod.torch as hvd

        hvd.init()
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()

    def average(self, tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
        return self.hvd.allreduce(tensor, op=self.hvd.Average, name=name)

    def sum(self, tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name=name)

    def broadcast_object(self, obj: Any, name: str | None = None) -> Any:
        return self.hvd.broadcast_object(obj, root_rank=0, name=name)

    def broadcast_model_and_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
        # Ring-allreduce of gradients (Gloo on CPU, NCCL on GPU builds), averaged over ranks.
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), op=self.hvd.Average)

    def synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.synchronize()

    def skip_synchronize(self, optimizer: torch.optim.Optimizer):
        return optimizer.skip_synchronize()

    def sync_batchnorm(self, model: torch.nn.Module) -> torch.nn.Module:
        """Replace BatchNorm layers by hvd.SyncBatchNorm (statistics over the global batch)."""
        for name, child in model.named_children():
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                sync = self.hvd.SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                              child.track_running_stats)
                sync.load_state_dict(child.state_dict())
                setattr(model, name, sync)
            else:
                self.sync_batchnorm(child)
        return model

    def shutdown(self) -> None:
        self.hvd.shutdown()


def init_distributed(require_horovod: bool = False) -> World:
    """Horovod's world under horovodrun; one plain process when Horovod is absent, or when
    ``ASRFLOW_NO_HOROVOD=1`` asks for one (a single-GPU machine without a Horovod build)."""
    if os.environ.get("ASRFLOW_NO_HOROVOD") == "1" and not require_horovod:
        return World()
    try:
        import horovod.torch  # noqa: F401
    except ImportError as exc:
        if require_horovod or "HOROVOD_RANK" in os.environ:
            raise RuntimeError(f"Horovod is needed here but does not import: {exc}. Run scripts/install.sh.") from exc
        log.warning("horovod is not installed: training as a single process")
        return World()
    return HorovodWorld()


def average_batchnorm_statistics(model: torch.nn.Module, world: World) -> int:
    """Average BatchNorm running mean/var over ranks (each rank saw different batches). Returns the count."""
    from torch.nn.modules.batchnorm import _BatchNorm

    n = 0
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats and module.running_mean is not None:
            module.running_mean.copy_(world.average(module.running_mean, name=f"bn_mean.{name}"))
            module.running_var.copy_(world.average(module.running_var, name=f"bn_var.{name}"))
            n += 1
    return n
