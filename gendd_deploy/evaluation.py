"""Top-1 accuracy: the one loop behind every top-1 the package reports.

    acc = test_top1(lambda x, b: model(x), data, n=len(data.test), batch_size=256, device=device)
    acc = top1_over(lambda x, b: runner.run(x, runner.noise(len(x), seed + b)), array_batches(images, labels, 64))

`test_top1` scores the first `n` test images of a DataBundle, preprocessed as at deployment; under
torchrun each process scores its share of the batches (batch b goes to rank b % world_size) and
the counts are summed, so every rank returns the same figure. Batch b is passed to the logits
function with its index, which seeds the noise of sampled read-outs (the same noise whatever the
number of processes). Used by the teacher, distill, the quality bench and the runtime bench;
calibrate scores cached predictions with `top1`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from gendd_deploy import dist
from gendd_deploy.data.augment import to_model_input


def top1(pred, labels) -> float:
    """Top-1 (%) of predicted classes against labels (tensors or arrays); nan for none."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    return 100.0 * float((pred == labels).mean()) if len(labels) else float("nan")


def count_correct(logits_fn: Callable, batches: Iterable) -> tuple[int, int]:
    """(correct, seen) of argmax(logits_fn(x, batch_index)) over (batch_index, x, labels) batches.
    Logits and labels may be torch tensors or numpy arrays."""
    correct = seen = 0
    for b, x, labels in batches:
        logits = logits_fn(x, b)
        pred = logits.argmax(1).cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits).argmax(1)
        labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        correct += int((pred == labels).sum())
        seen += len(labels)
    return correct, seen


def top1_over(logits_fn: Callable, batches: Iterable) -> float:
    """Top-1 (%) of logits_fn over (batch_index, x, labels) batches, in this process."""
    correct, seen = count_correct(logits_fn, batches)
    return 100.0 * correct / max(seen, 1)


def test_batches(data, n: int, batch_size: int, device: torch.device | str, *, numpy: bool = False, on_batch: Callable[[int], None] | None = None) -> Iterator:
    """This process's share of (batch_index, model input, labels) over the first n test images of
    DataBundle `data`: normalised float32 on `device` (numpy arrays with numpy=True).
    `on_batch(images)` is told of every batch done, by all processes together (progress bars)."""
    for b, idx in enumerate(torch.arange(n).split(batch_size)):
        if b % dist.world_size() != dist.rank():
            continue
        x = to_model_input(data.test.get_batch(idx), data.mean, data.std)
        yield b, (x.numpy() if numpy else x.to(device)), data.test.labels[idx]
        if on_batch is not None:
            on_batch(len(idx) * dist.world_size())


def test_top1(logits_fn: Callable, data, *, n: int, batch_size: int, device: torch.device | str, numpy: bool = False, on_batch: Callable[[int], None] | None = None) -> float:
    """Top-1 (%) of logits_fn(x, batch_index) over the first n test images of `data`, shared out
    over processes (see the module docstring)."""
    if n == 0:
        return float("nan")
    correct, _ = count_correct(logits_fn, test_batches(data, n, batch_size, device, numpy=numpy, on_batch=on_batch))
    return 100.0 * dist.all_reduce_sum(correct) / n


def array_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterator:
    """(batch_index, images, labels) over arrays already in memory (one process)."""
    for b, s in enumerate(range(0, len(images), batch_size)):
        yield b, np.ascontiguousarray(images[s : s + batch_size]), labels[s : s + batch_size]
