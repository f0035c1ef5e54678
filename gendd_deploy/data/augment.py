"""Replayable training augmentation on uint8 image batches.

Augmentation is split in two so it can be replayed: `sample_params` draws one box and flip per
image from an explicit `torch.Generator`, and `apply` turns images plus those parameters into
float views. A later stage stores the parameters next to cached teacher features and calls `apply`
again to rebuild the very same input image, bit for bit.

Parameters are an int32 tensor (n, 5) with columns (top, left, height, width, flip):
- `none`:      (0, 0, S, S, 0), the whole image.
- `crop`:      an S x S box inside the image zero-padded by `padding` on every side, so top and
               left are in padded coordinates, in [0, 2 * padding]; flip 0.
- `crop_flip`: as `crop`, plus flip = 1 with probability 0.5.
- `rrc_flip`:  a RandomResizedCrop box (torchvision's recipe: scale (0.08, 1), ratio (3/4, 4/3),
               10 tries, then the centre fallback) in unpadded coordinates, plus flip p = 0.5;
               `apply` resizes the box to `out_size`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

MODES = ("none", "crop", "crop_flip", "rrc_flip")
CROP_MODES = ("crop", "crop_flip")
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_TRIES = 10


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown augment mode {mode!r}; expected one of {MODES}")


def sample_params(n: int, image_size: int, mode: str, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Draw (top, left, height, width, flip) for n square images of side `image_size`.

    Only `generator` is used (never the global RNG), so the same generator state gives the same
    parameters. Returns int32 (n, 5) on the CPU.
    """
    _check_mode(mode)
    size = image_size
    params = torch.zeros((n, 5), dtype=torch.int32)
    params[:, 2] = size
    params[:, 3] = size
    if mode in CROP_MODES:
        # top and left of an S x S box in the (S + 2p) x (S + 2p) padded image: (n, 2)
        params[:, :2] = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, dtype=torch.int32)
        if mode == "crop_flip":
            params[:, 4] = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int32)
    elif mode == "rrc_flip":
        params[:, :4] = _rrc_boxes(n, size, generator)
        params[:, 4] = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int32)
    return params


def _rrc_boxes(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """torchvision RandomResizedCrop boxes, all tries drawn at once: int32 (n, 4) (top, left, h, w).

    Float64 throughout so the rounding of box sides does not depend on float32 quirks.
    """
    area = float(size * size)
    f64 = dict(dtype=torch.float64)
    scale = torch.empty((n, RRC_TRIES), **f64).uniform_(*RRC_SCALE, generator=generator)  # (n, tries)
    log_ratio = torch.empty((n, RRC_TRIES), **f64).uniform_(
        math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]), generator=generator
    )
    ratio = torch.exp(log_ratio)
    # torch.round rounds half to even, like Python's round() in torchvision
    w = torch.round(torch.sqrt(area * scale * ratio)).long()  # (n, tries)
    h = torch.round(torch.sqrt(area * scale / ratio)).long()
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # index of the first valid try, (n, 1)
    found = ok.any(dim=1)
    # Fallback: the image is square, so its aspect ratio 1 is inside RRC_RATIO and the centre
    # crop of torchvision's fallback is the whole image.
    h = torch.where(found, h.gather(1, first).squeeze(1), torch.full_like(found, size, dtype=torch.long))
    w = torch.where(found, w.gather(1, first).squeeze(1), torch.full_like(found, size, dtype=torch.long))
    u = torch.rand((n, 2), generator=generator, **f64)  # uniform position of the box, in [0, 1)
    top = torch.floor(u[:, 0] * (size - h + 1)).long()
    left = torch.floor(u[:, 1] * (size - w + 1)).long()
    return torch.stack([top, left, h, w], dim=1).to(torch.int32)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]. The one place the /255 happens, so every path gives the same bits."""
    return images.to(torch.float32) / 255.0


def apply(images: torch.Tensor, params: torch.Tensor, mode: str, padding: int, out_size: int) -> torch.Tensor:
    """Crop, resize (rrc only) and flip: uint8 (n, C, H, W) -> float32 (n, C, out, out) in [0, 1].

    Deterministic: the same images and params give bit-identical output. Works on the device of
    `images`.
    """
    _check_mode(mode)
    n, chans, height, width = images.shape
    if params.shape != (n, 5):
        raise ValueError(f"params must be ({n}, 5), got {tuple(params.shape)}")
    if mode == "rrc_flip":
        return _apply_rrc(images, params, out_size)
    if out_size != height or height != width:
        raise ValueError(f"mode {mode!r} keeps the size: out_size {out_size} must equal the square image side {height}")
    pad = padding if mode in CROP_MODES else 0
    x = F.pad(images, (pad, pad, pad, pad)) if pad else images  # (n, C, S + 2p, S + 2p), zeros around
    p = params.to(device=images.device, dtype=torch.long)
    top, left, flip = p[:, 0], p[:, 1], p[:, 4].bool()
    ar = torch.arange(out_size, device=images.device)  # (S,)
    rows = top[:, None] + ar  # (n, S): padded row of each output row
    # (n, S): padded column of each output column, read right to left where flipped
    cols = left[:, None] + torch.where(flip[:, None], out_size - 1 - ar, ar)
    wp = x.shape[3]
    x = x.gather(2, rows[:, None, :, None].expand(n, chans, out_size, wp))  # (n, C, S, S + 2p)
    x = x.gather(3, cols[:, None, None, :].expand(n, chans, out_size, out_size))  # (n, C, S, S)
    return to_unit(x)


def _apply_rrc(images: torch.Tensor, params: torch.Tensor, out_size: int) -> torch.Tensor:
    # Boxes differ in size, so one image at a time; fine at these image sizes.
    n, chans = images.shape[:2]
    out = torch.empty((n, chans, out_size, out_size), dtype=torch.float32, device=images.device)
    for k, (top, left, h, w, flip) in enumerate(params.cpu().tolist()):
        crop = to_unit(images[k : k + 1, :, top : top + h, left : left + w])  # (1, C, h, w)
        view = F.interpolate(crop, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=False)
        out[k] = view[0].flip(-1) if flip else view[0]
    return out


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel; x is float (n, C, H, W) in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def to_model_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Evaluation input, no augmentation: uint8 (n, C, H, W) -> normalized float32 (n, C, H, W)."""
    return normalize(to_unit(images), mean, std)
