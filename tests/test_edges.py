"""Names and numbers validated at the edge: recipe values, CLI flags, protocol versions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gendd_deploy.config import load_recipe
from gendd_deploy.errors import UsageError
from gendd_deploy.serve.protocol import ServedModel


@pytest.mark.parametrize(
    "override, field",
    [("teacher.lr=inf", "teacher.lr"), ("distill.lr=nan", "distill.lr"), ("calibrate.tolerance=inf", "calibrate.tolerance"),
     ("pipeline.name='..'", "pipeline.name"), ("pipeline.name='.hidden'", "pipeline.name"), ("pipeline.name='a/b'", "pipeline.name"),
     ("serve.model_name='a/b'", "serve.model_name"), ("serve.model_name='x\\ny'", "serve.model_name")],
)
def test_non_finite_numbers_and_unsafe_names_are_refused(override, field):
    with pytest.raises(UsageError, match=f"bad value for '{field}'"):
        load_recipe("pipelines/quickstart.toml", [override])


@pytest.mark.parametrize("args", [["--batch", "0"], ["--reps", "-1"], ["--runtime", "nope"], ["--models", "nope"], ["--budget-s", "0"]])
def test_bench_flags_are_validated_before_any_work(args, tmp_path):
    r = subprocess.run([sys.executable, "-m", "gendd_deploy", "bench", *args, "--artifacts", str(tmp_path / "a")], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert r.returncode == 2 and "Traceback" not in r.stderr and (args[0] in r.stderr or "unknown runtime or model ['nope']" in r.stderr)
    assert not (tmp_path / "a").exists()  # nothing built


def test_a_5000_digit_version_is_no_version():
    m = ServedModel(name="m", input_shape=(1, 8, 8), version="3")
    assert m.has_version("3") and m.has_version("v003") and not m.has_version("9" * 5000) and not m.has_version("0" * 30 + "3")
