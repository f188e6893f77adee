"""Run under horovodrun on several hosts: where each rank runs, and whether gradients are averaged.

    horovodrun -np 2 -H nodeA:1,nodeB:1 --gloo python tests/cluster/multihost_probe.py OUT_DIR

Each rank writes OUT_DIR/rank<r>.json with its host name, network namespace (``/proc/self/ns/net``),
IPv4 addresses, Horovod's view (rank, size, local rank), and one step of ``hvd.DistributedOptimizer`` on
a rank-dependent loss: the local gradient, the gradient after the allreduce and the updated weight.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import psutil
import torch


def addresses() -> dict[str, list[str]]:
    return {nic: [a.address for a in addrs if a.family == socket.AF_INET]
            for nic, addrs in psutil.net_if_addrs().items()}


def main(out_dir: Path) -> int:
    import horovod.torch as hvd

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    torch.manual_seed(1234 + rank)  # different initial weights on purpose: the broadcast must fix them
    model = torch.nn.Linear(3, 1, bias=False)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0),
                                         named_parameters=model.named_parameters(), op=hvd.Average)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    initial = model.weight.detach().clone()
    # loss = w . x_r with x_r = (r + 1) * [1, 2, 3]: d loss / d w = x_r, different on every rank
    x = torch.tensor([[1.0, 2.0, 3.0]]) * (rank + 1)
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.synchronize()          # the allreduce of the gradients
    averaged = model.weight.grad.detach().clone()
    with optimizer.skip_synchronize():
        optimizer.step()
    rank_sum = int(hvd.allreduce(torch.tensor([rank]), op=hvd.Sum, name="rank_sum").item())
    record = {"rank": rank, "size": size, "local_rank": hvd.local_rank(), "local_size": hvd.local_size(),
              "hostname": socket.gethostname(), "horovod_hostname": os.environ.get("HOROVOD_HOSTNAME"),
              "netns": os.readlink("/proc/self/ns/net"), "pid": os.getpid(), "addresses": addresses(),
              "initial_weight": initial.tolist(), "local_grad": x.tolist(), "averaged_grad": averaged.tolist(),
              "weight_after_step": model.weight.detach().tolist(), "rank_sum": rank_sum}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
