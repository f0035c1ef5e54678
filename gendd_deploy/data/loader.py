"""Decode training batches ahead of the training loop, in worker processes, in order.

Augmentation parameters are drawn in the training process (or replayed from the feature cache)
and applied there, so the workers only decode files: batch k is always `images.get_batch(idx_k)`
whatever the number of workers, and the augmentation replay stays exact. In-memory sources
(digits, Fashion-MNIST, CIFAR) need no workers and are served directly.
"""

from __future__ import annotations

from typing import Iterator

import torch

from gendd_deploy.data.sources import ImageSet, TensorImageSet


class _Batches(torch.utils.data.Dataset):
    def __init__(self, images: ImageSet, index_batches: list[torch.Tensor]):
        self.images, self.index_batches = images, index_batches

    def __len__(self) -> int:
        return len(self.index_batches)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.images.get_batch(self.index_batches[k])


def batch_stream(images: ImageSet, index_batches: list[torch.Tensor], workers: int = 0) -> Iterator[torch.Tensor]:
    """uint8 (n, C, H, W) for each index batch, in the given order; `workers` processes decode ahead."""
    if workers <= 0 or isinstance(images, TensorImageSet) or len(index_batches) < 2:
        for idx in index_batches:
            yield images.get_batch(idx)
        return
    # a generator of its own: otherwise the DataLoader seeds its workers from the global RNG and
    # shifts every later draw of the training process (diffusion timesteps, noise)
    loader = torch.utils.data.DataLoader(
        _Batches(images, index_batches), batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=4,
        generator=torch.Generator().manual_seed(0),
    )
    yield from loader
