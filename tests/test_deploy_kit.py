"""The deployment kit under export/: each client example against a real `gendd serve` on
loopback, the container recipe's command line, the KServe manifest."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from gendd_deploy.config import ServeConfig
from gendd_deploy.imaging import decode_image, preprocess_image
from gendd_deploy.serve import InferenceServer
from test_serve import CLASSES, META, SPEC, TIMEOUT, onnx_path, runner, sample_images  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "export"


@pytest.fixture(scope="module")
def served(runner):
    cfg = ServeConfig(host="127.0.0.1", port=0, grpc_port=0, max_batch=8, max_delay_ms=2.0)
    srv = InferenceServer(runner, META, cfg, request_timeout_s=TIMEOUT, log=lambda m: None).start()
    try:
        yield srv
    finally:
        srv.stop(drain_timeout_s=TIMEOUT)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_example_classifies_image_files(served, runner, tmp_path, protocol):
    blobs = sample_images()
    files = []
    for i, b in enumerate(blobs):
        files.append(tmp_path / f"img{i}.png")
        files[-1].write_bytes(b)
    port = served.port if protocol == "http" else served.grpc_port
    script = KIT / "clients" / f"{protocol}_client.py"
    r = subprocess.run(
        [sys.executable, str(script), "--url", f"127.0.0.1:{port}", "--model", "tiny", "--top", "2", *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    x = np.stack([preprocess_image(decode_image(b), SPEC) for b in blobs])
    best = runner.run(x).argmax(1)
    assert len(lines) == len(files)
    for line, f, k in zip(lines, files, best):
        name, first, second = line.split(" ")
        logit, index, label = first.split(":")
        assert name == f.name and int(index) == k and label == CLASSES[k] and float(logit) >= float(second.split(":")[0])


def _docker_command() -> list[str]:
    """ENTRYPOINT + CMD of the container recipe (exec form, JSON arrays)."""
    text = (KIT / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    return entry + cmd


def test_container_command_is_a_valid_gendd_serve_invocation(tmp_path):
    """Every flag the image passes is one `gendd serve` takes: with an empty store it gets as far
    as looking for the model (exit 3, naming the pipeline), not a usage error (exit 2)."""
    args = _docker_command()
    assert args[:2] == ["gendd", "serve"]
    args[args.index("--artifacts") + 1] = str(tmp_path)
    r = subprocess.run([sys.executable, "-m", "gendd_deploy", *args[1:]], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "no onnx artifact for pipeline 'quickstart'" in r.stderr and "Traceback" not in r.stderr
    text = (KIT / "Dockerfile").read_text()
    assert "/v2/health/ready" in text and 'pip install --no-cache-dir ".[serve]"' in text


def test_docker_context_holds_only_what_the_image_copies():
    """.dockerignore: `docker build .` must not send .venv/, artifacts/ or .git (gigabytes) as context."""
    import fnmatch

    rules = [ln.strip() for ln in (KIT.parent / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]

    def sent(path: str) -> bool:  # Docker's rule: the last matching line wins; "!" re-includes
        keep = True
        for rule in rules:
            neg, pat = rule.startswith("!"), rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat + "/*") or path.startswith(pat + "/") and "*" not in pat:
                keep = neg
        return keep

    copied = re.findall(r"^COPY (.+) \S+$", (KIT / "Dockerfile").read_text(), re.M)
    for sources in copied:
        for src in sources.split():
            assert sent(src) and sent(f"{src}/cli.py" if src == "gendd_deploy" else src), src
    for heavy in (".venv/bin/python", "artifacts/quickstart/onnx/v001/model.onnx", ".git/HEAD", "build/lib/x.py", "tests/test_cli.py"):
        assert not sent(heavy), heavy


def test_kserve_manifest_serves_the_triton_repository_over_v2():
    doc = yaml.safe_load((KIT / "kserve" / "inferenceservice.yaml").read_text())
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    model = doc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
    assert model["storageUri"] and model["runtimeVersion"]
