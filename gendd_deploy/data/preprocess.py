"""Image preprocessing on the training side: the batched torch resize that in-memory sources go
through once at load, and the per-image path of imagefolder sources.

Every per-image step (decode, resize, crop, normalize) lives in gendd_deploy/imaging.py, in NumPy and
Pillow, where the server and Triton's image model use the very same code; this module only wraps
it for torch. The recipe is the manifest's `preprocess` dict (`imaging.make_spec`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from gendd_deploy import imaging


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """"torch" backend: uint8 (n, C, H, W) -> uint8 (n, C, size, size).

    Shorter side to `size` (bilinear, antialias), centre crop, round back to uint8. Chunked so the
    float copy stays small (a resized CIFAR train set at 224 px is ~9 GB even in uint8). The server's
    copy of this step is `imaging.resize_uint8`.
    """
    n, chans, height, width = images.shape
    if (height, width) == (size, size):
        return images
    new_h, new_w = imaging.shorter_side_size(height, width, size)
    top, left = imaging.center_offsets(new_h, new_w, size)
    out = torch.empty((n, chans, size, size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        x = images[start : start + chunk].to(torch.float32)
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        x = x[:, :, top : top + size, left : left + size]
        out[start : start + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


def image_to_uint8(img: Image.Image, in_chans: int, image_size: int, backend: str) -> torch.Tensor:
    """PIL image -> uint8 (C, S, S) tensor (`imaging.image_to_uint8`)."""
    return torch.from_numpy(imaging.image_to_uint8(img, in_chans, image_size, backend))

