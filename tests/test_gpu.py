"""The CUDA paths: every stage on the GPU (bf16 autocast and channels_last in distill), CUDA results
agreeing with the CPU on the same weights and noise, and torchrun with the gloo + NCCL group.

Skipped where no CUDA GPU is visible (CI has none); run them on a GPU machine with
`python -m pytest tests/test_gpu.py`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gendd_deploy.artifacts import Store, verify_artifact
from gendd_deploy.models.deployed import DeployedModel, SamplerSetting
from gendd_deploy.runtime.base import make_noise
from gendd_deploy.runtime.torch_runner import TorchRunner
from gendd_deploy.stages import run_chain
from gendd_deploy.stages.cache import CacheStage
from gendd_deploy.loaders import load_student
from gendd_deploy.loaders import artifact_runner, deployed_from_export
from gendd_deploy.stages.export import ExportStage, calibration_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible here)")

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def cuda_chain(tmp_path_factory):
    """teacher -> cache -> distill -> calibrate -> export of the tiny recipe, all on cuda."""
    from rich.console import Console

    from conftest import TINY_RECIPE
    from gendd_deploy.config import load_recipe
    from gendd_deploy.stages import Context

    root = tmp_path_factory.mktemp("gpu")
    recipe_path = root / "tiny.toml"
    recipe_path.write_text(TINY_RECIPE)

    def make(*overrides, store="artifacts"):
        recipe = load_recipe(recipe_path, list(overrides))
        return Context(recipe=recipe, store=Store(root / store), console=Console(quiet=True), recipe_path=str(recipe_path), quiet=True)

    ctx = make("pipeline.device='cuda'")
    onnx_art = run_chain(ExportStage(), ctx)
    return {"ctx": ctx, "make": make, "onnx": onnx_art, "root": root, "recipe": recipe_path}


def test_every_stage_runs_on_cuda_and_publishes_verified_artifacts(cuda_chain):
    store = cuda_chain["ctx"].store
    teacher, cache, student = (store.latest("tiny", s) for s in ("teacher", "teacher_features", "student"))
    assert teacher.metrics["device"] == "cuda:0" and cache.metrics["device"] == "cuda:0"
    info = student.manifest["info"]
    assert info["device"] == "cuda:0" and info["bf16_autocast"] and info["channels_last"]
    assert student.metrics["images_per_s"] > 0 and 0 <= student.metrics["published_top1"] <= 100
    for art in (teacher, cache, student, store.latest("tiny", "sampler"), cuda_chain["onnx"]):
        assert verify_artifact(art) == [], art.ref
    # the export gate compared ONNX Runtime with PyTorch on the weights trained on the GPU
    par = cuda_chain["onnx"].metrics["parity"]  # the gate's bound: atol plus rtol of the logits' scale
    assert par["max_abs_diff"] <= par["atol"] + par["rtol"] * par["logit_scale"] and par["top1_agreement"] >= par["min_agreement"], par


def test_weights_trained_on_cuda_load_on_cpu_with_the_same_predictions(cuda_chain):
    store = cuda_chain["ctx"].store
    art = store.latest("tiny", "student")
    x = torch.from_numpy(calibration_images(cuda_chain["ctx"], 64))
    cpu, gpu = load_student(art, "cpu"), load_student(art, "cuda")
    with torch.no_grad():
        a = cpu.probe_logits(cpu.features(x))
        b = gpu.probe_logits(gpu.features(x.cuda())).cpu()
    torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "setting",
    [
        SamplerSetting(sampler="ddpm", steps=4, draws=2, guidance=2.0, temperature=1.0, noise="fresh"),
        SamplerSetting(sampler="ddim", steps=2, draws=1, guidance=1.0, temperature=0.0, noise="zero", t_start=800, min_alpha_bar=1e-3),
    ],
    ids=lambda s: s.label(),
)
def test_sampler_on_cuda_matches_cpu_for_the_same_noise(cuda_chain, setting):
    student = cuda_chain["ctx"].store.latest("tiny", "student")
    x = calibration_images(cuda_chain["ctx"], 64)
    cpu = TorchRunner(DeployedModel(load_student(student, "cpu"), setting), "cpu")
    gpu = TorchRunner(DeployedModel(load_student(student, "cpu"), setting), "cuda")
    assert gpu.providers() == ["CUDA"]
    noise = cpu.noise(len(x), seed=3)
    a, b = cpu.run(x, noise), gpu.run(x, noise)
    np.testing.assert_allclose(b, a, atol=2e-3, rtol=1e-3)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.98


def test_onnx_export_matches_the_cuda_model(cuda_chain):
    onnx_art = cuda_chain["onnx"]
    model = deployed_from_export(onnx_art, cuda_chain["ctx"].store, device="cuda")
    ort = artifact_runner(onnx_art, device="cpu")
    x = calibration_images(cuda_chain["ctx"], 64)
    noise = make_noise((len(x),) + ort.noise_shape_tail, 0) if ort.needs_noise else None
    a, b = ort.run(x, noise), TorchRunner(model, "cuda").run(x, noise)
    np.testing.assert_allclose(b, a, atol=2e-3, rtol=1e-3)


def test_cache_on_cuda_matches_cache_on_cpu(cuda_chain):
    """Same teacher, same recorded augmentations: the features agree to float16 storage precision."""
    gpu_cache = cuda_chain["ctx"].store.latest("tiny", "teacher_features")
    cpu_ctx = cuda_chain["make"]("pipeline.device='cpu'", store="cpu-artifacts")
    shutil.copytree(cuda_chain["root"] / "artifacts" / "tiny" / "teacher", cpu_ctx.store.root / "tiny" / "teacher")
    cpu_cache = run_chain(CacheStage(), cpu_ctx)
    assert cpu_cache.fingerprint == gpu_cache.fingerprint and cpu_cache.metrics["device"] == "cpu"
    assert np.array_equal(np.load(cpu_cache.path / "params.npy"), np.load(gpu_cache.path / "params.npy"))
    a = np.load(cpu_cache.path / "features.npy").astype(np.float32)
    b = np.load(gpu_cache.path / "features.npy").astype(np.float32)
    np.testing.assert_allclose(b, a, atol=3e-2, rtol=1e-2)


def _torchrun(args, root, recipe, nproc):
    cmd = [str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", "-m", "gendd_deploy", *args, "-p", str(recipe), "--artifacts", str(root)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=600)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this python")
def test_torchrun_on_one_gpu_joins_the_gloo_nccl_group(cuda_chain, tmp_path):
    """One process per GPU: CUDA tensors reduce over NCCL, the CPU-side counters over gloo."""
    root = tmp_path / "art"
    for stage in ("teacher", "teacher_features"):
        shutil.copytree(cuda_chain["root"] / "artifacts" / "tiny" / stage, root / "tiny" / stage)
    r = _torchrun(["distill", "--epochs", "1", "--eval-limit", "32"], root, cuda_chain["recipe"], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    student = Store(root).latest("tiny", "student")
    assert student.manifest["info"]["device"] == "cuda:0" and student.manifest["info"]["world_size"] == 1
    assert verify_artifact(student) == [] and student.metrics["images_per_s"] > 0


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this python")
def test_torchrun_with_more_processes_than_gpus_says_how_to_fix_it(cuda_chain, tmp_path):
    root = tmp_path / "art"
    shutil.copytree(cuda_chain["root"] / "artifacts" / "tiny" / "teacher", root / "tiny" / "teacher")
    n = torch.cuda.device_count()
    r = _torchrun(["cache"], root, cuda_chain["recipe"], nproc=n + 1)
    assert r.returncode != 0
    assert "has no GPU of its own" in r.stderr and f"--nproc-per-node={n}" in r.stderr
    assert Store(root).list(stage="teacher_features") == []
