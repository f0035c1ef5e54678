"""Serving an exported model needs neither torch nor timm.

`gendd serve` runs in a child process in which importing torch, torchvision, timm, scikit-learn,
matplotlib or onnxscript fails (as on a `pip install 'gendd-deploy[serve]'` machine, where they
are absent); it serves an onnx artifact from the store over REST and gRPC, images and tensors,
and after a clean SIGTERM reports every such import it was asked for (none) and every module it
had loaded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_serve import CLASSES, SPEC, TIMEOUT, call, child_server, export_tiny_onnx, image_request, logits_of, ort_runner, sample_images, tensor_request

from gendd_deploy.artifacts import Store
from gendd_deploy.imaging import decode_image, preprocess_image
from gendd_deploy.spec import SPEC_KEY, DeployedSpec, onnx_io, stamp_onnx

REPO = Path(__file__).resolve().parents[1]
TRAINING_ONLY = ("torch", "torchvision", "timm", "sklearn", "matplotlib", "onnxscript")

CHILD = """
import importlib.abc, json, sys, atexit
BLOCKED, REPORT = {blocked!r}, {report!r}
asked = []

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            asked.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Absent())
atexit.register(lambda: open(REPORT, "w").write(json.dumps({{"asked": asked, "loaded": sorted({{m.split(".")[0] for m in sys.modules}})}})))
from gendd_deploy.cli import main
sys.argv = ["gendd", *{args!r}]
main()
"""


def publish_onnx(root: Path, pipeline: str, noise: bool = False) -> Path:
    """An onnx artifact as export writes it (spec in the manifest, stamped file), of the tiny model;
    with `noise`, a graph with a sampler's noise input, which the server draws for every request."""
    store = Store(root)
    with store.draft(pipeline, "onnx", "c" * 64, {"tiny": True}, []) as d:
        if noise:
            from test_triton import tiny_graph

            path = d.path("model.onnx")
            path.write_bytes(tiny_graph(True).SerializeToString())
        else:
            path = export_tiny_onnx(d.path("model.onnx"))
        spec = DeployedSpec.from_io(onnx_io(path), preprocess=SPEC, class_names=tuple(CLASSES), method="ce", readout="head")
        stamp_onnx(path, spec, [])
        d.info[SPEC_KEY] = spec.to_manifest()
        art = d.publish()
    return art.file("model.onnx")


def without_training(tmp_path: Path, args: list[str]) -> list[str]:
    """The command line of `gendd *args` in a process where the training packages are absent."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(blocked=TRAINING_ONLY, report=str(tmp_path / "imports.json"), args=args))
    return [sys.executable, str(script)]


ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("noise", [False, True], ids=["plain", "sampler-noise"])
def test_serving_an_onnx_artifact_imports_no_training_code(tmp_path, tiny_recipe, noise):
    onnx_file = publish_onnx(tmp_path / "art", "tiny", noise)
    report = tmp_path / "imports.json"
    args = ["serve", "-p", str(tiny_recipe), "--artifacts", str(tmp_path / "art"), "--http-port", "0", "--set", "serve.grpc_port=0", "--set", "serve.host=127.0.0.1"]
    with child_server(without_training(tmp_path, args), ENV, r"HTTP on http://127\.0\.0\.1:(\d+)") as (proc, port, seen):
        grpc_port = int(re.search(r"gRPC on 127\.0\.0\.1:(\d+)", seen[-1]).group(1))
        runner = ort_runner(onnx_file)
        blobs = sample_images()
        status, _, body = call(port, "POST", "/v2/models/tiny_image/infer", image_request(blobs, parameters={"seed": 3}))
        assert status == 200, body
        want = runner.run(np.stack([preprocess_image(decode_image(b), SPEC) for b in blobs]), runner.noise(len(blobs), 3))
        np.testing.assert_allclose(logits_of(body), want, atol=1e-6)
        x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
        status, _, body = call(port, "POST", "/v2/models/tiny/infer", tensor_request(x))  # seed 0 by default
        assert status == 200, body
        np.testing.assert_allclose(logits_of(body), runner.run(x, runner.noise(len(x), 0)), atol=1e-6)
        grpcclient = pytest.importorskip("tritonclient.grpc")
        client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
        inp = grpcclient.InferInput("image_bytes", [len(blobs)], "BYTES")
        inp.set_data_from_numpy(np.array(blobs, dtype=np.object_))
        result = client.infer("tiny_image", [inp], parameters={"seed": 3}, client_timeout=TIMEOUT)
        np.testing.assert_allclose(result.as_numpy("logits"), want, atol=1e-6)
        client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(TIMEOUT)
    assert proc.returncode == 0, "".join(seen)
    imports = json.loads(report.read_text())
    assert imports["asked"] == [], f"serving asked for training-only modules: {imports['asked']}"
    assert not set(TRAINING_ONLY) & set(imports["loaded"])
    assert {"onnxruntime", "uvicorn", "grpc", "PIL", "numpy"} <= set(imports["loaded"])  # it did serve, with these


def test_without_training_packages_reading_works_and_training_says_what_to_install(tmp_path, tiny_recipe):
    publish_onnx(tmp_path / "art", "tiny")
    r = subprocess.run(without_training(tmp_path, ["artifacts", "ls", "--artifacts", str(tmp_path / "art")]), capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0 and "tiny" in r.stdout and "onnx" in r.stdout, r.stderr
    r = subprocess.run(without_training(tmp_path, ["teacher", "-p", str(tiny_recipe), "--artifacts", str(tmp_path / "art")]), capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 5, r.stderr
    assert "pip install 'gendd-deploy[train]'" in r.stderr and "Traceback" not in r.stderr
