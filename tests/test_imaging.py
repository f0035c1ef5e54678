"""The server's NumPy / Pillow preprocessing (gendd_deploy/imaging.py) against the training side's
torch code: the same uint8 images, bit for bit, on every resize the server makes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gendd_deploy import imaging
from gendd_deploy.data import preprocess as torch_side
from gendd_deploy.data.augment import to_model_input


def torch_reference(img: Image.Image, in_chans: int, size: int) -> np.ndarray:
    """The "torch" backend as training resizes: the same box reduce, then torch's own resize."""
    img = img.convert("L" if in_chans == 1 else "RGB")
    if min(img.size) >= 2 * size:
        img = img.reduce(min(img.size) // size)
    arr = torch.from_numpy(np.asarray(img).copy())
    x = arr[None] if in_chans == 1 else arr.permute(2, 0, 1).contiguous()
    return torch_side.resize_uint8(x[None], size)[0].numpy()


def _random_image(rng, h, w, mode):
    arr = rng.integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
    if rng.random() < 0.5:  # smooth gradients too: rounding ties show there
        yy, xx = np.mgrid[0:h, 0:w]
        grad = ((yy * 7 + xx * 3) % 256).astype(np.uint8)
        arr = grad if mode == "L" else np.stack([grad, grad[::-1], 255 - grad], axis=-1)
    return Image.fromarray(arr, mode)


def test_torch_backend_resize_matches_torch_bit_for_bit():
    """Random sizes from 3 px to 4x the model's side, grey and colour, up- and down-sampling."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(150):
        size = int(rng.choice([8, 16, 28, 32, 37, 64]))
        h, w = (int(v) for v in rng.integers(3, 4 * size + 1, 2))
        if max(h, w) > imaging.MAX_ASPECT * min(h, w):
            continue
        mode = "L" if rng.random() < 0.5 else "RGB"
        img = _random_image(rng, h, w, mode)
        chans = 1 if mode == "L" else 3
        want = torch_reference(img, chans, size)
        got = imaging.image_to_uint8(img, chans, size, "torch")
        assert got.dtype == np.uint8 and got.shape == (chans, size, size)
        np.testing.assert_array_equal(got, want, err_msg=f"{mode} {w}x{h} -> {size}")
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("shape", [(28, 28, 16, 16), (9, 13, 32, 46), (100, 37, 64, 23), (224, 300, 160, 213)])
def test_float_resize_matches_torch_for_factors_below_two(shape):
    h, w, nh, nw = shape
    x = np.random.default_rng(1).random((3, h, w), dtype=np.float32) * 255
    want = F.interpolate(torch.from_numpy(x)[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0].numpy()
    np.testing.assert_array_equal(imaging.resize_bilinear_aa(x, nh, nw), want)


def test_normalize_matches_training():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    want = to_model_input(torch.from_numpy(x)[None], mean, std)[0].numpy()
    np.testing.assert_array_equal(imaging.to_model_input(x, mean, std), want)


def test_pil_backend_and_identity():
    img = _random_image(np.random.default_rng(3), 40, 30, "RGB")
    got = imaging.image_to_uint8(img, 3, 16, "pil")
    want = np.asarray(imaging.pil_resize_center_crop(img, 16)).transpose(2, 0, 1)
    np.testing.assert_array_equal(got, want)
    same = _random_image(np.random.default_rng(4), 16, 16, "L")  # already the model's size: untouched
    np.testing.assert_array_equal(imaging.image_to_uint8(same, 1, 16, "torch")[0], np.asarray(same))


def test_unconvertible_mode_is_refused():
    img = Image.new("LAB", (8, 8))  # Pillow has no LAB -> L conversion
    with pytest.raises(imaging.ImageRejected, match="cannot convert a LAB image"):
        imaging.image_to_uint8(img, 1, 8, "pil")
