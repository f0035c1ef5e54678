"""Memory per request is bounded by construction: each hostile-but-small request is parsed in a
fresh process and the growth of its peak RSS is held under a budget (issue: a 15.6 KB PNG cost
6.9 GB, sixteen 15 MB JSON bodies +2.2 GB)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from gendd_deploy.imaging import MAX_ASPECT

# the child: parse one request for an 8x8 grayscale model (the quickstart's input), report the
# growth of peak RSS (KiB -> MB) and the outcome
CHILD = textwrap.dedent(
    """
    import resource, sys, json
    from gendd_deploy.imaging import make_spec
    from gendd_deploy.serve.protocol import ProtocolError, ServedModel, parse_infer_request
    body = sys.stdin.buffer.read()
    header = int(sys.argv[1]) if len(sys.argv) > 1 else None
    image = len(sys.argv) > 2
    spec = make_spec(1, int(sys.argv[3]) if len(sys.argv) > 3 else 8, [0.5], [0.25], sys.argv[2] if image else "torch")
    model = ServedModel(name="m" + ("_image" if image else ""), input_shape=(1, spec["image_size"], spec["image_size"]), preprocess=spec, encoded=image, input_name="image_bytes" if image else "images")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        req = parse_infer_request(model, body, header)
        outcome = "ok"
    except ProtocolError as e:
        outcome = f"{e.status} {e.message}"
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mb": (after - before) / 1024, "outcome": outcome}))
    """
)


def _measure(body: bytes, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], input=body, capture_output=True, timeout=120, check=True)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, "PNG")
    return buf.getvalue()


def _image_request(blobs: list[bytes]) -> tuple[bytes, str]:
    head = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [len(blobs)], "parameters": {"binary_data_size": sum(4 + len(b) for b in blobs)}}]}).encode()
    raw = b"".join(len(b).to_bytes(4, "little") + b for b in blobs)
    return head + raw, str(len(head))


@pytest.mark.parametrize(
    "blobs, backend",
    [([_png((16_000_000, 1))], "torch"), ([_png((4_000_000, 3))] * 3, "torch"), ([_png((16_000_000, 1))], "pil")],
    ids=["one-16Mx1", "three-4Mx3", "16Mx1-pil"],
)
def test_thin_images_are_refused_from_the_header(blobs, backend):
    body, header = _image_request(blobs)
    assert len(body) < 64_000  # a few KB on the wire
    r = _measure(body, header, backend)
    assert r["outcome"].startswith("400") and f"thinner than {MAX_ASPECT}:1" in r["outcome"]
    assert r["growth_mb"] < 64, r  # was 6.9 GB


def test_a_large_image_is_reduced_before_any_float_tensor():
    """4000 x 4000 is within the pixel budget: decoded in uint8 (16 MB), reduced by an integer
    factor before the float resize, so the float tensor is at most 2S x 16S, not 4000 x 4000."""
    body, header = _image_request([_png((4000, 4000))])
    r = _measure(body, header, "torch")
    assert r["outcome"] == "ok" and r["growth_mb"] < 48, r  # measured ~31 MB (the uint8 decode); the full-size float copy alone was 64 MB


def test_many_empty_arrays_are_refused_before_they_are_built():
    body = b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [' + b",".join([b"[]"] * 1_000_000) + b"]}]}"
    r = _measure(body)
    assert r["outcome"].startswith("400") and "arrays / objects" in r["outcome"]
    assert r["growth_mb"] < 16, r


def test_an_oversized_json_part_is_413_and_names_the_binary_extension():
    body = b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": [' + b"1," * 2_500_000 + b"1]}]}"
    r = _measure(body)
    assert r["outcome"].startswith("413") and "binary" in r["outcome"]
    assert r["growth_mb"] < 16, r


def test_a_5000_digit_integer_is_a_malformed_body_not_a_header_error():
    body = b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [' + b"9" * 5000 + b"]}]}"
    r = _measure(body)
    assert r["outcome"].startswith("400 malformed JSON") and "digits" in r["outcome"]


@pytest.mark.parametrize("fmt", ["EPS", "PDF", "ICNS"])
def test_only_the_documented_formats_are_opened(fmt, tmp_path):
    from gendd_deploy.imaging import IMAGE_FORMATS

    buf = io.BytesIO()
    try:
        Image.new("RGB", (8, 8)).save(buf, fmt)
    except (OSError, KeyError, ValueError) as e:
        pytest.skip(f"Pillow here cannot write {fmt}: {e}")
    body, header = _image_request([buf.getvalue()])
    r = _measure(body, header, "pil")
    assert fmt not in IMAGE_FORMATS and r["outcome"].startswith("400") and "served format" in r["outcome"]
