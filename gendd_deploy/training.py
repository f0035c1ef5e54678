"""Training helpers shared by the teacher and distill stages: schedules, checkpoints, batches, eval."""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gendd_deploy import seeds
from gendd_deploy.errors import ArtifactError


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
        from gendd_deploy import dist

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
    from gendd_deploy import dist

    with Progress(*cols, console=console, disable=quiet or not dist.is_main(), transient=False) as p:
        yield p


@torch.no_grad()
def count_correct(logits_fn: Callable, batches: Iterable) -> tuple[int, int]:
    """(correct, seen) of argmax(logits_fn(x, batch_index)) over (batch_index, x, labels) batches:
    the one loop behind every top-1 the package reports (teacher, distill's read-outs, the
    runtime benchmark). Logits and labels may be torch tensors or numpy arrays."""
    correct = seen = 0
    for b, x, labels in batches:
        logits = logits_fn(x, b)
        pred = logits.argmax(1).cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits).argmax(1)
        labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        correct += int((pred == labels).sum())
        seen += len(labels)
    return correct, seen


def top1(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (pred == labels).float().mean().item() if len(labels) else float("nan")


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
