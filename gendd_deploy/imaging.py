"""From an encoded image (PNG, JPEG... bytes) to the model's input tensor, in NumPy and Pillow only.

This is the serving side's copy of the training data's preprocessing. It imports nothing but the
standard library, NumPy and Pillow, so that:
- `gendd serve` of an exported model needs neither torch nor timm;
- `gendd export --triton DIR` copies this very file into the Triton Python-backend model that
  decodes images (`<name>_image`), where no gendd package is installed.

The recipe is the manifest's `preprocess` dict (written by `make_spec`):

    {"in_chans": 1 | 3, "color": "L" | "RGB", "image_size": S, "mean": [...], "std": [...],
     "resize": "shorter_side_bilinear_center_crop", "resize_backend": "torch" | "pil"}

`resize_backend` names the code that resized the training images:
- "torch": in-memory sources (digits, Fashion-MNIST, CIFAR), resized once at load by
  `torch.nn.functional.interpolate(bilinear, antialias=True)` in float32, then rounded back to uint8.
  `resize_bilinear_aa` below repeats that computation in float32, in torch's order (weights, then
  the width pass, then the height pass), so it gives the same bits (tests/test_imaging.py checks).
- "pil": imagefolder, decoded and resized by Pillow's bilinear filter image by image.

An image stored at the model's size skips the resize, so a test image saved losslessly comes back
as exactly the tensor the model was evaluated on.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

RESIZE_POLICY = "shorter_side_bilinear_center_crop"
BACKENDS = ("torch", "pil")
# The encoded-image formats a served model opens; never EPS / PS (Pillow hands those to Ghostscript)
# or any other format Pillow happens to know.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
# Longest / shortest side an image may have. The model sees the centre square; resizing a thin strip
# to the shorter side first would build an array MAX_ASPECT times the input's side long, so the
# limit bounds that array (and no real photograph, panorama included, is thinner than 8:1).
MAX_ASPECT = 8
# Pixels one image may have (checked from the header, before decoding) and all the images of one
# request together: what a few KB of compressed upload may cost in decoding, memory and CPU.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_REQUEST_PIXELS = 4 * MAX_IMAGE_PIXELS


class ImageRejected(ValueError):
    """An image that cannot be served: undecodable, too large, too thin, or an unconvertible mode.
    The server answers it with 400 and this message."""


def make_spec(in_chans: int, image_size: int, mean, std, backend: str) -> dict:
    """The JSON-able preprocessing recipe stored in the manifest."""
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
        raise ImageRejected(f"{width}x{height} image has no pixels")
    if width * height > max_pixels:
        raise ImageRejected(f"{width}x{height} image is larger than {max_pixels} pixels")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageRejected(f"{width}x{height} image is thinner than {MAX_ASPECT}:1; the model sees a centred square, crop the image first")


def open_image(data: bytes) -> Image.Image:
    """Open image bytes lazily (the header only) in one of IMAGE_FORMATS."""
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.UnidentifiedImageError:
        raise ImageRejected(f"undecodable image: not an image in a served format ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ImageRejected(f"undecodable image: {e}") from None


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes fully (not lazily), so a truncated file fails here and not later; with
    `max_pixels`, size and aspect are checked from the header first (check_image_size)."""
    img = open_image(data)
    if max_pixels is not None:
        check_image_size(*img.size, max_pixels)
    return _load(img)


def _load(img: Image.Image) -> Image.Image:
    """Decode an opened image's pixels; a truncated or corrupt file is refused here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ImageRejected(f"undecodable image: {e}") from None
    return img


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side = size, as torchvision's Resize(int) computes it."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of a centred size x size crop, rounded like torchvision's CenterCrop."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _aa_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Antialiased bilinear taps along one axis, as ATen computes them for float32 (UpSampleKernel.cpp,
    `_compute_indices_min_size_weights_aa`): (first input index per output (out,), float32 weights
    (out, taps), zero past each output's own taps). Mixed float / double steps are kept as ATen has
    them, since the weights' last bit decides the result's."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)  # area_pixel_compute_scale<float>
    support = scale if scale >= 1.0 else f32(1.0)  # (interp_size * 0.5) * scale, interp_size = 2
    invscale = f32(1.0 / float(scale)) if scale >= 1.0 else f32(1.0)
    taps = int(np.ceil(float(support))) * 2 + 1
    first = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, taps), dtype=np.float32)
    for i in range(out_size):
        center = f32(float(scale) * (i + 0.5))
        xmin = max(int(float(f32(center - support)) + 0.5), 0)
        xsize = min(int(float(f32(center + support)) + 0.5), in_size) - xmin
        xsize = min(max(xsize, 0), taps)
        total = f32(0.0)
        for j in range(xsize):
            x = abs(f32((float(f32(f32(j + xmin) - center)) + 0.5) * float(invscale)))
            w = f32(1.0 - float(x)) if x < 1.0 else f32(0.0)
            weights[i, j] = w
            total = f32(total + w)
        if total != 0.0:
            weights[i, :xsize] = weights[i, :xsize] / total
        first[i] = xmin
    return first, weights


def _resample_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """One separable pass along `axis` of a float32 array, as ATen's `interpolate_aa_single_dim`
    runs in torch's x86-64 build: out = src[0] * w[0] rounded to float32, then out = fma(src[j], w[j],
    out) for each further tap, in tap order. A float32 product is exact in float64, so the fused
    step is out + src * w in float64, rounded once to float32. Taps past an output's own add
    src * 0, which leaves the sum's bits unchanged.

    Bit for bit the same as torch while an output takes at most 4 taps, that is for every factor
    below 2, which is every resize `image_to_uint8` does (it box-reduces first). From 5 taps on,
    torch's compiled loop rounds some taps separately and the last float bit can differ."""
    in_size = x.shape[axis]
    first, weights = _aa_weights(in_size, out_size)
    x = np.moveaxis(x, axis, -1)
    out = x[..., first] * weights[:, 0]
    for j in range(1, weights.shape[1]):
        idx = np.minimum(first + j, in_size - 1)
        out = (out + x[..., idx].astype(np.float64) * weights[:, j].astype(np.float64)).astype(np.float32)
    return np.moveaxis(out, -1, axis)


def resize_bilinear_aa(x: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """float32 (..., H, W) -> float32 (..., new_h, new_w), as torch's interpolate(bilinear,
    align_corners=False, antialias=True): width first, then height, an axis left alone when its
    size does not change."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] != new_w:
        x = _resample_axis(x, x.ndim - 1, new_w)
    if x.shape[-2] != new_h:
        x = _resample_axis(x, x.ndim - 2, new_h)
    return x


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """"torch" backend on uint8 (..., C, H, W): shorter side to `size` (bilinear, antialias), centre
    crop, round half to even back to uint8."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    new_h, new_w = shorter_side_size(height, width, size)
    top, left = center_offsets(new_h, new_w, size)
    x = resize_bilinear_aa(images.astype(np.float32), new_h, new_w)[..., top : top + size, left : left + size]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def pil_resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """"pil" backend: shorter side to `size` (PIL bilinear, which antialiases when shrinking), centre crop."""
    width, height = img.size
    if (height, width) == (size, size):
        return img
    new_h, new_w = shorter_side_size(height, width, size)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = center_offsets(new_h, new_w, size)
    return img.crop((left, top, left + size, top + size))


def image_to_uint8(img: Image.Image, in_chans: int, image_size: int, backend: str) -> np.ndarray:
    """PIL image -> uint8 (C, S, S): colour conversion, then resize + centre crop if needed.

    "torch" backend: an image whose shorter side is 2S or more is first reduced by an integer factor
    (Pillow's box filter, in uint8) to a shorter side in [S, 2S), so the float array the bilinear
    resize works on is at most C x 2S x 2S*MAX_ASPECT whatever the upload. That backend serves
    in-memory sources, whose images are S x S (resized at load), so a larger upload is never one of
    them. The "pil" backend resizes in uint8 and is left exact (imagefolder files come back as trained).
    """
    try:
        img = img.convert("L" if in_chans == 1 else "RGB")
    except (ValueError, OSError) as e:  # e.g. a LAB or float TIFF that Pillow cannot convert
        raise ImageRejected(f"cannot convert a {img.mode} image ({e}); send RGB, RGBA, L, P or CMYK images") from None
    if backend == "torch" and min(img.size) >= 2 * image_size:
        img = img.reduce(min(img.size) // image_size)
    if backend == "pil":
        img = pil_resize_center_crop(img, image_size)
    arr = np.asarray(img)  # (H, W) for L, (H, W, 3) for RGB
    x = arr[None] if in_chans == 1 else arr.transpose(2, 0, 1)  # (C, H, W)
    x = np.ascontiguousarray(x)
    if backend == "torch":
        x = resize_uint8(x, image_size)
    return x


def to_model_input(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (..., C, H, W) -> normalized float32: x / 255, then (x - mean) / std per channel, each
    step in float32 as the training data's `augment.to_model_input` does it (same bits)."""
    x = images.astype(np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return (x - m) / s


def preprocess_image(img: Image.Image, spec: dict) -> np.ndarray:
    """A decoded image -> normalized float32 (C, S, S), following the manifest's `preprocess`."""
    x = image_to_uint8(img, spec["in_chans"], spec["image_size"], spec.get("resize_backend", "pil"))
    return to_model_input(x, spec["mean"], spec["std"])


def decode_batch(blobs, spec: dict, max_image_pixels: int = MAX_IMAGE_PIXELS, max_request_pixels: int = MAX_REQUEST_PIXELS) -> np.ndarray:
    """Encoded images -> float32 (n, C, S, S), each checked from its header (served format, size,
    aspect) and against the request's pixel budget before any is decoded in full. A refusal names
    the element: ImageRejected("element 2: ...")."""
    rows, budget = [], max_request_pixels
    for i, blob in enumerate(blobs):
        try:
            img = open_image(bytes(blob))  # the header only, until _load
            check_image_size(*img.size, max_image_pixels)
            budget -= img.size[0] * img.size[1]
            if budget < 0:
                raise ImageRejected(f"the images of one request may hold {max_request_pixels} pixels in all; send fewer or smaller images per request")
            rows.append(preprocess_image(_load(img), spec))
        except ImageRejected as e:
            raise ImageRejected(f"element {i}: {e}") from None
    if not rows:
        raise ImageRejected("no images")
    return np.stack(rows).astype(np.float32, copy=False)
