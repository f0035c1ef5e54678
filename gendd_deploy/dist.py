"""torchrun support: process group set-up and the few collectives the stages use.

Under `torchrun --nproc-per-node N -m gendd_deploy <command>` every process runs the same stage.
Rank 0 alone writes artifacts and checkpoints; the other ranks wait at a barrier and then read
them. NCCL on GPUs, gloo on CPU. Without torchrun (WORLD_SIZE unset) every function here is a
cheap no-op, so single-process code needs no branches.

torch is imported only under torchrun or by code that already uses it: a process that has not
loaded torch has no process group, so `rank()` and friends answer without importing it (serving an
exported model never does).
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _group():
    """torch.distributed when this process has joined a process group, else None."""
    if "torch" not in sys.modules:  # no torch loaded: no group can exist
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    dist = _group()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    dist = _group()
    return dist.get_rank() if dist else 0


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _terminate_as_exception(signum, frame):
    # torchrun stops the surviving ranks with SIGTERM when one fails: turn it into an exception so
    # that `with` blocks unwind and no temporary artifact folder outlives the job.
    raise SystemExit(f"stopped by signal {signum} (another rank failed)")


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; False when not under torchrun.

    With a GPU the group is "cpu:gloo,cuda:nccl": DDP and CUDA tensors go over NCCL, the small
    CPU-side reductions (images, seconds, objects) over gloo. A one-process torchrun joins a
    group too, so that the same code path runs with any number of processes.
    """
    if _group() is not None:
        return True
    under_torchrun = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not under_torchrun:
        return False
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available()
    if use_cuda and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())
    timeout = datetime.timedelta(minutes=int(os.environ.get("GENDD_DIST_TIMEOUT_MIN", "30")))
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo", timeout=timeout)
    signal.signal(signal.SIGTERM, _terminate_as_exception)
    return True


def barrier() -> None:
    dist = _group()
    if dist:
        dist.barrier()


def _all_reduce_scalar(value: float, op: str) -> float:
    dist = _group()
    if not dist:
        return value
    import torch

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return float(t.item())


def all_reduce_sum(value: float) -> float:
    return _all_reduce_scalar(value, "SUM")


def all_reduce_max(value: float) -> float:
    return _all_reduce_scalar(value, "MAX")


def all_reduce_tensor(t: "torch.Tensor", op: str = "sum") -> "torch.Tensor":
    """Element-wise sum / min / max over ranks (a copy; the input is left alone)."""
    out = t.clone()
    dist = _group()
    if dist:
        dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return out


def broadcast_object(obj):
    """Rank 0's object on every rank."""
    dist = _group()
    if not dist:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(order: "torch.Tensor") -> "torch.Tensor":
    """This rank's share of an epoch order, as DistributedSampler does (padded to equal length)."""
    w, r = world_size(), rank()
    if w == 1:
        return order
    import torch

    per = -(-len(order) // w)
    padded = torch.cat([order, order[: per * w - len(order)]])
    return padded[r::w]


def maybe_inject_failure(where: str, epoch: int, step: int = 0) -> None:
    """Fault injection for the failure tests: GENDD_FAIL_RANK=R GENDD_FAIL_AT=stage makes rank R fail there.

    GENDD_FAIL_AT=stage@E:S fails at step S of epoch E only (a kill in the middle of an epoch).
    """
    want = os.environ.get("GENDD_FAIL_AT")
    if not want or os.environ.get("GENDD_FAIL_RANK", "0") != str(rank()):
        return
    name, _, at = want.partition("@")
    if name != where or (at and at != f"{epoch}:{step}"):
        return
    raise RuntimeError(f"injected failure on rank {rank()} in {where}, epoch {epoch} step {step} (GENDD_FAIL_AT)")


def finish() -> None:
    dist = _group()
    if dist:
        dist.destroy_process_group()
