"""From an encoded image (PNG, JPEG... bytes sent to the server) to the model's input tensor.

The training data and the server share the functions below, so an image saved losslessly from a
stored test image comes back as exactly the tensor the model was evaluated on. The recipe is the
`DataBundle.preprocess` dict:

    {"in_chans": 1 | 3, "color": "L" | "RGB", "image_size": S, "mean": [...], "std": [...],
     "resize": "shorter_side_bilinear_center_crop", "resize_backend": "torch" | "pil"}

`resize_backend` names the code that resized the training images: "torch" (in-memory sources,
resized once at load with antialiased bilinear interpolation, then rounded back to uint8) or "pil"
(imagefolder, decoded and resized by PIL's bilinear filter image by image).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gendd_deploy.data.augment import to_model_input
from gendd_deploy.errors import UsageError

RESIZE_POLICY = "shorter_side_bilinear_center_crop"
BACKENDS = ("torch", "pil")
# The encoded-image formats a served model opens; never EPS / PS (Pillow hands those to Ghostscript)
# or any other format Pillow happens to know.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
# Longest / shortest side an image may have. The model sees the centre square; resizing a thin strip
# to the shorter side first would build a tensor MAX_ASPECT times the input's side long, so the
# limit bounds that tensor (and no real photograph, panorama included, is thinner than 8:1).
MAX_ASPECT = 8


def make_spec(in_chans: int, image_size: int, mean, std, backend: str) -> dict:
    """The JSON-able preprocessing recipe stored as `DataBundle.preprocess`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown resize backend {backend!r}")
    return {
        "in_chans": in_chans,
        "color": "L" if in_chans == 1 else "RGB",
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "resize": RESIZE_POLICY,
        "resize_backend": backend,
    }


def check_image_size(width: int, height: int, max_pixels: int) -> None:
    """Refuse, from the header alone, an image whose decoding or resizing would cost more than the
    model needs: over `max_pixels`, or thinner than MAX_ASPECT : 1."""
    if width < 1 or height < 1:
        raise UsageError(f"{width}x{height} image has no pixels")
    if width * height > max_pixels:
        raise UsageError(f"{width}x{height} image is larger than {max_pixels} pixels")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise UsageError(f"{width}x{height} image is thinner than {MAX_ASPECT}:1; the model sees a centred square, crop the image first")


def open_image(data: bytes) -> Image.Image:
    """Open image bytes lazily (the header only) in one of IMAGE_FORMATS."""
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.UnidentifiedImageError:
        raise UsageError(f"undecodable image: not an image in a served format ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise UsageError(f"undecodable image: {e}") from None


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes fully (not lazily), so a truncated file fails here and not later; with
    `max_pixels`, size and aspect are checked from the header first (check_image_size)."""
    img = open_image(data)
    if max_pixels is not None:
        check_image_size(*img.size, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise UsageError(f"undecodable image: {e}") from None
    return img


def _shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side = size, as torchvision's Resize(int) computes it."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _center_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of a centred size x size crop, rounded like torchvision's CenterCrop."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Torch backend: uint8 (n, C, H, W) -> uint8 (n, C, size, size).

    Shorter side to `size` (bilinear, antialias), centre crop, round back to uint8. Chunked so the
    float copy stays small (a resized CIFAR train set at 224 px is ~9 GB even in uint8).
    """
    n, chans, height, width = images.shape
    if (height, width) == (size, size):
        return images
    new_h, new_w = _shorter_side_size(height, width, size)
    top, left = _center_offsets(new_h, new_w, size)
    out = torch.empty((n, chans, size, size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        x = images[start : start + chunk].to(torch.float32)
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        x = x[:, :, top : top + size, left : left + size]
        out[start : start + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


def pil_resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """PIL backend: shorter side to `size` (PIL bilinear, which antialiases when shrinking), centre crop."""
    width, height = img.size
    if (height, width) == (size, size):
        return img
    new_h, new_w = _shorter_side_size(height, width, size)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = _center_offsets(new_h, new_w, size)
    return img.crop((left, top, left + size, top + size))


def image_to_uint8(img: Image.Image, in_chans: int, image_size: int, backend: str) -> torch.Tensor:
    """PIL image -> uint8 (C, S, S): colour conversion, then resize + centre crop if needed.

    Torch backend: an image whose shorter side is 2S or more is first reduced by an integer factor
    (Pillow's box filter, in uint8) to a shorter side in [S, 2S), so the float tensor the bilinear
    resize works on is at most C x 2S x 2S*MAX_ASPECT whatever the upload. The torch backend serves
    in-memory sources, whose images are S x S (resized at load), so a larger upload is never one of
    them. The PIL backend resizes in uint8 and is left exact (imagefolder files come back as trained)."""
    img = img.convert("L" if in_chans == 1 else "RGB")
    if backend == "torch" and min(img.size) >= 2 * image_size:
        img = img.reduce(min(img.size) // image_size)
    if backend == "pil":
        img = pil_resize_center_crop(img, image_size)
    arr = np.asarray(img)  # (H, W) for L, (H, W, 3) for RGB
    x = torch.from_numpy(arr.copy())
    x = x[None] if in_chans == 1 else x.permute(2, 0, 1).contiguous()  # (C, H, W)
    if backend == "torch":
        x = resize_uint8(x[None], image_size)[0]
    return x


def preprocess_image(img: Image.Image, spec: dict) -> torch.Tensor:
    """A decoded image -> normalized float32 (C, S, S), following `DataBundle.preprocess`."""
    x = image_to_uint8(img, spec["in_chans"], spec["image_size"], spec.get("resize_backend", "pil"))
    return to_model_input(x[None], spec["mean"], spec["std"])[0]
