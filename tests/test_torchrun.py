"""cache and distill under torchrun with 2 CPU processes (gloo); pinned to the CPU so that they
test the same thing on a GPU machine (test_gpu.py covers torchrun on CUDA)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gendd_deploy.artifacts import Store, verify_artifact

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this python")


def gendd(args, root, recipe, nproc=1, env=None, device="cpu"):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    launcher = [str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", "-m"] if nproc > 1 else [sys.executable, "-m"]
    cmd = launcher + ["gendd_deploy", *args, "-p", str(recipe), "--artifacts", str(root), "--set", f"pipeline.device='{device}'"]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=600)


def test_two_process_cache_equals_one_process_and_distill_publishes(tiny_recipe, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert gendd(["teacher"], one, tiny_recipe).returncode == 0
    r = gendd(["cache"], one, tiny_recipe)
    assert r.returncode == 0, r.stderr
    shutil.copytree(one / "tiny" / "teacher", two / "tiny" / "teacher")  # same teacher for both runs

    r = gendd(["cache"], two, tiny_recipe, nproc=2)
    assert r.returncode == 0, r.stderr
    c1, c2 = Store(one).latest("tiny", "teacher_features"), Store(two).latest("tiny", "teacher_features")
    assert c1.fingerprint == c2.fingerprint  # the number of processes does not change the cache
    assert c2.metrics["world_size"] == 2 and verify_artifact(c2) == []
    for name in ("features.npy", "params.npy", "labels.npy"):
        assert np.array_equal(np.load(c1.path / name), np.load(c2.path / name)), name

    r = gendd(["distill", "--epochs", "1", "--eval-limit", "32"], two, tiny_recipe, nproc=2)
    assert r.returncode == 0, r.stderr
    students = Store(two).list(stage="student")
    assert len(students) == 1 and verify_artifact(students[0]) == []
    s = students[0]
    assert s.manifest["info"]["world_size"] == 2 and s.manifest["info"]["global_batch"] == 2 * 64
    assert s.metrics["test_top1"] >= 0 and s.metrics["images_per_s"] > 0


def test_failure_in_one_rank_ends_job_without_partial_artifact(tiny_recipe, tmp_path):
    root = tmp_path / "art"
    assert gendd(["teacher"], root, tiny_recipe).returncode == 0
    assert gendd(["cache"], root, tiny_recipe).returncode == 0
    r = gendd(["distill", "--epochs", "2"], root, tiny_recipe, nproc=2, env={"GENDD_FAIL_AT": "distill", "GENDD_FAIL_RANK": "1"})
    assert r.returncode != 0
    assert "injected failure on rank 1" in r.stderr
    assert Store(root).list(stage="student") == []
    assert not list((root / "tiny" / "student").glob(".tmp-*"))
