"""Runners, the runtime registry and the parity gate (gendd_deploy.runtime)."""

import time

import numpy as np
import pytest
import torch
from torch import nn

from gendd_deploy.errors import GateError, MissingDependency, UsageError
from gendd_deploy.models.deployed import DeployedModel, SamplerSetting
from gendd_deploy.runtime import RUNTIMES, RuntimeEntry, available_runtimes, make_runner, register, runtime_status, unregister
from gendd_deploy.runtime.base import Runner, make_noise
from gendd_deploy.runtime.parity import compare, gate, parity
from conftest import ONNX_IR

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def linear_onnx(path, with_noise=False, k=3):
    """A hand-built graph images (B, 1, 2, 2) [, noise (B, 4)] -> logits (B, k): no exporter needed."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(4 * k, dtype=np.float32).reshape(4, k) / 10
    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["logits"] if not with_noise else ["pre"]),
    ]
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 2, 2])]
    if with_noise:
        nodes += [helper.make_node("MatMul", ["noise", "w"], ["nz"]), helper.make_node("Add", ["pre", "nz"], ["logits"])]
        inputs.append(helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["batch", 4]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=ONNX_IR)
    onnx.save(model, str(path))
    return w


class FakeRunner(Runner):
    """logits = flattened images @ w (+ noise @ w): records the noise it was given."""

    name = "fake"

    def __init__(self, w, tail=None, shift=0.0):
        super().__init__(tail)
        self.w, self.shift, self.seen = w, shift, []

    def run(self, images, noise=None):
        self.seen.append(None if noise is None else noise.copy())
        out = images.reshape(len(images), -1) @ self.w + self.shift
        return out + (noise.reshape(len(images), -1) @ self.w if noise is not None else 0)


# ---- registry ---------------------------------------------------------------------------------


def test_registry_lists_the_built_in_runtimes():
    assert {"torch", "onnxruntime", "aoti", "tensorrt"} <= set(RUNTIMES)
    status = runtime_status()
    assert status["torch"] is None and status["onnxruntime"] is None
    assert {"torch", "onnxruntime"} <= set(available_runtimes())
    assert all(isinstance(why, str) for name, why in status.items() if name not in available_runtimes())


def test_tensorrt_is_registered_and_says_why_it_is_absent():
    why = runtime_status()["tensorrt"]
    try:
        import tensorrt  # noqa: F401

        present = torch.cuda.is_available()
    except ImportError:
        present = False
    if present:
        assert why is None
    else:
        assert "TensorRT" in why and "pip install" in why
        with pytest.raises(MissingDependency, match="runtime 'tensorrt' is not available here"):
            make_runner("tensorrt", path="model.plan")


def test_make_runner_refuses_unknown_and_unavailable_runtimes():
    with pytest.raises(UsageError, match="unknown runtime 'nope'.*torch"):
        make_runner("nope")
    register(RuntimeEntry("absent", "onnx", "model.onnx", "absent_onnx", "export", lambda **kw: None, lambda: "needs hardware we do not have"))
    try:
        assert "absent" not in available_runtimes()
        with pytest.raises(MissingDependency, match="needs hardware we do not have"):
            make_runner("absent", path="model.onnx")
    finally:
        unregister("absent")


def test_make_runner_needs_its_model_file():
    with pytest.raises(ValueError, match="path=.*model.onnx"):
        make_runner("onnxruntime")
    with pytest.raises(ValueError, match="model"):
        make_runner("torch")


# ---- torch and onnxruntime runners ------------------------------------------------------------


def test_torch_runner_takes_noise_only_when_the_model_needs_it():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    r = make_runner("torch", model=DeployedModel(teacher))
    assert not r.needs_noise and r.noise(2, 0) is None
    x = np.random.default_rng(0).standard_normal((5, 1, 2, 2)).astype(np.float32)
    with torch.no_grad():
        want = teacher(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(r.run(x), want, rtol=0, atol=1e-6)
    assert r.describe() == {"runtime": "torch", "providers": ["CPU"], "needs_noise": False}


def test_ort_runner_reports_the_session_providers(tmp_path):
    from gendd_deploy.runtime.ort import OrtRunner, requested_providers

    linear_onnx(tmp_path / "m.onnx")
    r = OrtRunner(tmp_path / "m.onnx")
    assert r.providers() == r.session.get_providers()
    assert "CPUExecutionProvider" in r.providers()
    # the default request keeps only providers this build has, best first
    have = ort.get_available_providers()
    assert requested_providers() == [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def test_ort_sessions_use_the_usable_cpus_and_do_not_spin(tmp_path):
    """Spinning intra-op workers of idle sessions stole the running session's cores (ONNX Runtime
    ran 1.8x slower than eager PyTorch with four sessions timed in turn; 0.6x without spinning)."""
    from gendd_deploy.runtime.ort import OrtRunner, usable_cpus

    linear_onnx(tmp_path / "m.onnx")
    r = OrtRunner(tmp_path / "m.onnx")
    opts = r.session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == usable_cpus() and r.describe()["threads"]["spinning"] is False
    spinning = OrtRunner(tmp_path / "m.onnx", intra_op_threads=1, inter_op_threads=1, spinning=True)
    assert spinning.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert spinning.describe()["threads"] == {"intra_op": 1, "inter_op": 1, "spinning": True}


def test_usable_cpus_follows_the_affinity_mask():
    import subprocess
    import sys

    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from gendd_deploy.runtime.ort import usable_cpus; print(usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_ort_runner_filters_out_a_provider_it_does_not_have(tmp_path):
    from gendd_deploy.runtime.ort import OrtRunner

    linear_onnx(tmp_path / "m.onnx")
    r = OrtRunner(tmp_path / "m.onnx", providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])
    assert "NoSuchExecutionProvider" not in r.requested and "NoSuchExecutionProvider" not in r.providers()
    assert r.providers() == r.session.get_providers()
    alone = OrtRunner(tmp_path / "m.onnx", providers=["NoSuchExecutionProvider"])  # nothing left: CPU
    assert alone.providers() == ["CPUExecutionProvider"]


def test_ort_runner_reads_the_noise_input_from_the_graph(tmp_path):
    w = linear_onnx(tmp_path / "n.onnx", with_noise=True)
    r = make_runner("onnxruntime", path=tmp_path / "n.onnx")
    assert r.noise_name == "noise" and r.noise_shape_tail == (4,)
    x = np.ones((2, 1, 2, 2), np.float32)
    nz = r.noise(2, seed=3)
    np.testing.assert_array_equal(nz, make_noise((2, 4), 3))
    np.testing.assert_allclose(r.run(x, nz), x.reshape(2, -1) @ w + nz @ w, rtol=1e-6)
    with pytest.raises(ValueError, match="noise"):
        r.run(x)
    linear_onnx(tmp_path / "m.onnx")
    assert not make_runner("onnxruntime", path=tmp_path / "m.onnx").needs_noise


# ---- parity and the gate ----------------------------------------------------------------------


def test_parity_feeds_the_same_noise_to_both_runners():
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    ref, cand = FakeRunner(w, tail=(4,)), FakeRunner(w, tail=(4,), shift=1e-3)
    images = np.random.default_rng(0).standard_normal((10, 1, 2, 2)).astype(np.float32)
    res = parity(ref, cand, images, batch=4, seed=7)
    assert res["n"] == 10 and res["top1_agreement"] == 1.0
    assert res["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3) and res["mean_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert len(ref.seen) == 3 and [len(n) for n in ref.seen] == [4, 4, 2]
    for i, (a, b) in enumerate(zip(ref.seen, cand.seen)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, make_noise((len(a), 4), 7 + i))
    gate(res, atol=1e-2, min_agreement=1.0, what="fake")


def test_gate_fails_with_the_numbers():
    res = {"max_abs_diff": 0.25, "mean_abs_diff": 0.1, "top1_agreement": 0.9, "n": 40}
    with pytest.raises(GateError, match=r"candidate vs ref: parity gate failed on 40 images: max abs logit diff 0.25 is over atol 0.0001; top-1 agreement 0.9000 < 1"):
        gate(res, atol=1e-4, min_agreement=1.0, what="candidate vs ref")
    with pytest.raises(GateError, match="nan is over atol"):
        gate({**res, "max_abs_diff": float("nan")}, atol=1.0, min_agreement=0.0, what="x")
    gate(res, atol=0.3, min_agreement=0.9, what="x")


def _float32_logits(features: np.ndarray, w: np.ndarray, order: np.ndarray) -> np.ndarray:
    """features @ w summed in float32 in the given order of the inner dimension."""
    out = np.zeros((features.shape[0], w.shape[1]), np.float32)
    for k in order:
        out += features[:, k : k + 1] * w[k : k + 1]
    return out


def test_the_gate_passes_float32_reordering_of_large_logits():
    """Two float32 programs that sum in different orders differ in proportion to the logits: with
    logits near 100 that is over a fixed atol of 1e-4, and well within rtol 1e-4 of the scale."""
    rng = np.random.default_rng(0)
    feats, w = rng.random((64, 512), dtype=np.float32) * 4, rng.standard_normal((512, 10)).astype(np.float32)
    a, b = _float32_logits(feats, w, np.arange(512)), _float32_logits(feats, w, rng.permutation(512))
    res = compare(a, b)
    assert res["logit_scale"] > 50 and res["max_abs_diff"] > 1e-4 and res["max_rel_diff"] < 1e-5
    with pytest.raises(GateError, match="is over atol 0.0001"):
        gate(res, atol=1e-4, min_agreement=1.0, what="fixed atol")
    gate(res, atol=1e-4, rtol=1e-4, min_agreement=1.0, what="scaled")


def test_the_gate_catches_an_op_exported_differently():
    """A BatchNorm whose epsilon changed on the way (1e-5 -> 1e-3): top-1 still agrees, but the
    logits move by far more than rounding and the scaled gate refuses."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    with torch.no_grad():
        net[1].running_var.uniform_(1e-3, 1e-2)  # small variances, where epsilon matters
        x = torch.randn(64, 1, 8, 8)
        ref = net(x).numpy()
        net[1].eps = 1e-3
        got = net(x).numpy()
    res = compare(ref, got)
    with pytest.raises(GateError, match="logit scale"):
        gate(res, atol=1e-4, rtol=1e-4, min_agreement=0.0, what="wrong eps")


def test_parity_counts_disagreements_and_non_finite_logits():
    w = np.eye(4, 3, dtype=np.float32)
    images = np.zeros((4, 1, 2, 2), np.float32)
    images[:, 0, 0, 0] = 1.0  # class 0 for every image
    flip = FakeRunner(w)
    flip.run = lambda x, noise=None: np.tile(np.array([[0, 5, 0]], np.float32), (len(x), 1))
    res = parity(FakeRunner(w), flip, images, batch=3, seed=0)
    assert res["top1_agreement"] == 0.0 and res["max_abs_diff"] == 5.0
    bad = FakeRunner(w)
    bad.run = lambda x, noise=None: np.full((len(x), 3), np.nan, np.float32)
    assert parity(FakeRunner(w), bad, images, batch=4, seed=0)["max_abs_diff"] == float("inf")


# ---- every registered runtime against torch ---------------------------------------------------


def _build_torch(model, tmp_path):
    return {"model": model}


def _build_onnxruntime(model, tmp_path):
    from gendd_deploy.runtime.onnx_export import export_onnx

    export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 1, 8, 8))
    return {"path": tmp_path / "m.onnx"}


def _build_aoti(model, tmp_path):
    from gendd_deploy.runtime.aoti import export_aoti

    info = export_aoti(model, tmp_path / "m.pt2", torch.randn(2, 1, 8, 8))
    assert [i["name"] for i in info["inputs"]] == ["images", "noise"] and info["outputs"][0]["shape"] == ["batch", 10]
    return {"path": tmp_path / "m.pt2"}  # no spec: the package carries its io


def _build_tensorrt(model, tmp_path):
    from gendd_deploy.trt.builder import fp32_engine

    return {"path": fp32_engine(_build_onnxruntime(model, tmp_path)["path"])}


# runtime -> how to make its model file from a DeployedModel; a new runtime adds its builder here
BUILDERS = {"torch": _build_torch, "onnxruntime": _build_onnxruntime, "aoti": _build_aoti, "tensorrt": _build_tensorrt}
SLOW = {"aoti"}  # compiles C++: ~20 s warm, minutes on a busy 2-core box


def _runtime_params():
    status = runtime_status()
    for name in RUNTIMES:
        marks = [pytest.mark.slow] if name in SLOW else []
        if status[name] is not None:
            marks.append(pytest.mark.skip(reason=f"{name}: {status[name]}"))
        elif name not in BUILDERS:
            marks.append(pytest.mark.skip(reason=f"{name}: no builder in tests/test_runtime.py BUILDERS"))
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("runtime", list(_runtime_params()))
def test_every_available_runtime_matches_torch(runtime, tmp_path):
    """The smallest sampler that still takes noise, at batch 1 and 7, on the same noise as torch."""
    from test_export import tiny_student

    setting = SamplerSetting(sampler="ddpm", steps=2, draws=1, guidance=2.0, noise="fresh", min_alpha_bar=1e-4)
    model = DeployedModel(tiny_student(), setting).eval()
    runner = make_runner(runtime, **BUILDERS[runtime](model, tmp_path))
    assert runner.name == runtime and runner.needs_noise and runner.noise_shape_tail == tuple(model.noise_shape(1)[1:])
    assert runner.describe()["providers"] == runner.providers() and runner.providers()
    images = np.random.default_rng(0).standard_normal((7, 1, 8, 8)).astype(np.float32)
    for batch in (1, 7):
        res = parity(make_runner("torch", model=model), runner, images, batch=batch, seed=0)
        assert res["max_abs_diff"] <= 1e-4 and res["top1_agreement"] == 1.0, (batch, res)


# ---- timing -----------------------------------------------------------------------------------


def test_time_in_turn_interleaves_and_stops_each_entry_on_its_own_budget():
    from gendd_deploy.runtime.timing import summary, time_in_turn

    order = []
    calls = {"fast": lambda: order.append("fast"), "slow": lambda: (order.append("slow"), time.sleep(0.02))}
    ms = time_in_turn(calls, max_runs=50, min_runs=3, min_s=0.05, warmup=1)
    assert order[:2] == ["fast", "slow"]  # one warm-up call each, untimed
    assert order[2:6] == ["fast", "slow", "fast", "slow"]  # then one call of each per round
    assert len(ms["fast"]) == 50  # never reaches min_s: capped by max_runs
    assert 3 <= len(ms["slow"]) <= 4 and min(ms["slow"]) >= 20.0  # leaves once it has spent min_s
    s = summary(ms["slow"])
    assert s["n"] == len(ms["slow"]) and s["p50_ms"] <= s["p90_ms"] <= s["p95_ms"] <= s["p99_ms"]
    with pytest.raises(ValueError, match="max_runs"):
        time_in_turn(calls, max_runs=0)
