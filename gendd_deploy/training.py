"""Training helpers shared by the teacher and distill stages: schedules, checkpoints, batches and
the epoch loop (top-1 is evaluation.py)."""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gendd_deploy import dist, seeds
from gendd_deploy.data.augment import to_model_input
from gendd_deploy.data.loader import batch_stream
from gendd_deploy.errors import ArtifactError, UsageError


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to zero."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def cosine_ramp(step: int, total: int, start: float, end: float) -> float:
    """Rises from start to end on a half cosine (GenDD's beta2 schedule)."""
    progress = min(1.0, step / max(1, total))
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled index order of one epoch; a function of (seed, epoch) so resume replays it."""
    return torch.randperm(n, generator=seeds.epoch_order(seed, epoch))


def batches(order: torch.Tensor, batch_size: int, drop_last: bool = True) -> list[torch.Tensor]:
    n = len(order)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def rng_state() -> dict:
    """The global RNG state (CPU, and CUDA when present), as checkpoint entries of plain tensors."""
    out = {"rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng_cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict) -> None:
    """Undo rng_state(): a resumed run draws the numbers an uninterrupted one would have."""
    if "rng_cpu" in state:
        torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])


class Checkpointer:
    """One checkpoint file in a stage's work folder, replaced atomically after each epoch."""

    def __init__(self, work_dir: Path, name: str = "checkpoint.pt"):
        self.path = Path(work_dir) / name

    def save(self, state: dict) -> None:
        if not dist.is_main():  # one writer; every rank reads it back on resume
            return
        tmp = self.path.with_suffix(".part")
        try:
            torch.save(state, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)  # a disk that filled up mid-save leaves no partial file

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            # weights_only: the work folder sits under a root that may be shared; never unpickle it
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a checkpoint cut short by a kill during save cannot exist (atomic replace), but a corrupt disk can
            raise ArtifactError(f"checkpoint {self.path} is unreadable ({e}); delete it to start this stage over") from None


@contextmanager
def progress_bar(console: Console, quiet: bool = False) -> Iterator[Progress]:
    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, console=console, disable=quiet or not dist.is_main(), transient=False) as p:
        yield p


@torch.no_grad()
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (1-d parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel under torchrun, the module itself otherwise."""
    if dist.world_size() == 1:
        return module
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


def model_input(data, images_u8: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 images (n, C, H, W) of a DataBundle `data` -> the normalised float32 model input on `device`."""
    return to_model_input(images_u8, data.mean, data.std).to(device)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def steps_per_epoch(n: int, batch_size: int, *, section: str, limit_field: str) -> int:
    """Optimizer steps per epoch on this process, refusing data too small to train on."""
    steps = len(batches(dist.shard(torch.arange(n)), batch_size))
    if steps == 0:
        raise UsageError(f"[{section}] batch_size {batch_size} is larger than the {n} training images; lower it")
    if min(n, batch_size) < 2:  # batch norm cannot train on one image per batch
        raise UsageError(f"[{section}] needs at least 2 images per batch ({n} training images, batch_size {batch_size}); raise {limit_field} or batch_size")
    return steps


@torch.enable_grad()  # callers may hold no_grad
def train_epochs(
    *,
    train_images,
    loader_workers: int,
    console: Console,
    quiet: bool,
    log: Callable[[str], None],
    label: str,
    failure_point: str,
    epochs: int,
    n: int,
    batch_size: int,
    seed: int,
    opt: torch.optim.Optimizer,
    lr: float,
    warmup_steps: int,
    modules: dict[str, torch.nn.Module],
    ckpt: Checkpointer,
    step: Callable[[int, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict]],
    device: torch.device,
    betas: Callable[[int, int], tuple[float, float]] | None = None,
) -> dict:
    """The epoch loop the teacher and distill share: per-step LR (warm-up + cosine, `betas` too when
    given), one checkpoint per epoch holding weights, optimizer and RNG state, and resume from it.

    Each epoch visits the first `n` of `train_images` (a DataBundle's train split) in the order
    seeds.epoch_order gives (sharded over processes), decoded ahead by `loader_workers` threads;
    `step(epoch, idx, images_u8, gen)` returns (loss, parts to show), with `gen` the epoch's
    augmentation stream. Progress goes to `console` (none when `quiet`), messages to `log`.
    A resumed run replays exactly what an uninterrupted one draws, so both end bit-identical.
    """
    per_epoch = len(batches(dist.shard(torch.arange(n)), batch_size))
    total = per_epoch * epochs
    start, train_s, images = 0, 0.0, 0
    state = ckpt.load()
    if state is not None:
        for k, m in modules.items():
            m.load_state_dict(state[k])
        opt.load_state_dict(state["opt"])
        start, train_s, images = state["epoch"] + 1, state["train_s"], state.get("images", 0)
        restore_rng(state)
        log(f"{label}: resuming from the checkpoint after epoch {start}/{epochs}")
    with progress_bar(console, quiet) as bar:
        task = bar.add_task(label, total=total, completed=start * per_epoch, info="")
        for epoch in range(start, epochs):
            timer = Timer()
            for m in modules.values():
                m.train()
            gen = seeds.augmentation(seed, epoch, dist.rank())
            order = batches(dist.shard(epoch_order(n, seed, epoch)), batch_size)
            for i, (idx, images_u8) in enumerate(zip(order, batch_stream(train_images, order, loader_workers))):
                s = epoch * per_epoch + i
                for g in opt.param_groups:
                    g["lr"] = lr_at(s, total, warmup_steps, lr)
                    if betas is not None:
                        g["betas"] = betas(s, total)
                dist.maybe_inject_failure(failure_point, epoch, i)
                loss, parts = step(epoch, idx, images_u8, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                images += len(idx)
                bar.update(task, advance=1, info=f"epoch {epoch + 1}/{epochs} " + " ".join(f"{k} {v.item():.3f}" for k, v in parts.items()))
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_s += timer()
            ckpt.save({**{k: m.state_dict() for k, m in modules.items()}, "opt": opt.state_dict(), "epoch": epoch, "train_s": train_s, "images": images, **rng_state()})
    images, train_s = dist.all_reduce_sum(images), dist.all_reduce_max(train_s)
    return {"train_s": round(train_s, 2), "images_per_s": round(images / max(train_s, 1e-9), 1), "epochs": epochs, "world_size": dist.world_size()}
