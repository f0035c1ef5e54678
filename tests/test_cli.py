"""The command line: help for every command, exit codes and one-line errors without tracebacks."""

import json
import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gendd_deploy.cli import app

COMMANDS = [
    ["run"], ["teacher"], ["cache"], ["distill"], ["calibrate"], ["export"], ["build"], ["bench"], ["serve"],
    ["artifacts"], ["artifacts", "ls"], ["artifacts", "show"], ["artifacts", "verify"], ["artifacts", "gc"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_help_for_every_command(cmd):
    result = CliRunner().invoke(app, cmd + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output) > 200


def test_help_shows_defaults_and_env_vars():
    # rich markup must not swallow bracketed hints such as "[default: ...]" as unknown tags
    def flat(args):  # the help text without its box drawing, one space between words
        return " ".join(re.sub("[\u2500-\u257f]", " ", CliRunner().invoke(app, args).output).split())

    text = flat(["--help"])
    assert "[default: pipelines/quickstart.toml]" in text and "[env GENDD_ARTIFACTS, default ./artifacts]" in text
    bench = flat(["bench", "--help"])
    assert "[default: teacher, ce, kd, calibrated]" in bench


def gendd(*args, env=None, cwd=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "gendd_deploy", *args], capture_output=True, text=True, env=e, cwd=cwd, timeout=300)


def test_help_shows_no_fake_flag_values_and_types_every_recipe_field():
    r = gendd("export", "--help")
    flag_lines = [ln for ln in r.stdout.splitlines() if "--aoti" in ln or "--trt " in ln]
    assert r.returncode == 0 and len(flag_lines) == 2 and not any("<bool>" in ln for ln in flag_lines), flag_lines
    for args in (["--help"], ["serve", "--help"], ["artifacts", "ls", "--help"]):  # --help itself is a flag too
        help_line = next(ln for ln in gendd(*args).stdout.splitlines() if "--help" in ln)
        assert "<bool>" not in help_line, (args, help_line)
    text = " ".join(gendd("serve", "--help").stdout.split())
    assert "--set KEY=VALUE" in text and "--artifacts DIR" in text and "--artifact REF" in text
    for field in ("--host <str>", "--grpc-port <int>", "--runtime <str>", "--max-batch <int>", "--max-delay-ms <float>", "--spinning <bool>"):
        assert field in text, field
    assert "--precision <fp32|int8|auto>" in " ".join(gendd("export", "--help").stdout.split())


def test_malformed_recipe_exit_2_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[teacher]\nepochz = 1\n")
    r = gendd("teacher", "-p", str(bad), "--artifacts", str(tmp_path / "a"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "teacher.epochz" in r.stderr and str(bad) in r.stderr
    assert not (tmp_path / "a").exists()


def test_wrong_type_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[distill]\nepochs = 'ten'\n")
    r = gendd("distill", "-p", str(bad), "--artifacts", str(tmp_path / "a"))
    assert r.returncode == 2 and "distill.epochs" in r.stderr and "Traceback" not in r.stderr


def test_missing_data_folder_exit_2(tmp_path):
    p = tmp_path / "fm.toml"
    p.write_text(f"[data]\nsource = 'fashion_mnist'\nroot = '{tmp_path / 'nowhere'}'\n")
    r = gendd("teacher", "-p", str(p), "--artifacts", str(tmp_path / "a"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "nowhere" in r.stderr and "dataset-fashion-mnist" in r.stderr


def test_unknown_stage_flag_exit_2(tmp_path, tiny_recipe):
    r = gendd("teacher", "-p", str(tiny_recipe), "--artifacts", str(tmp_path / "a"), "--epochz", "3")
    assert r.returncode == 2 and "--epochz" in r.stderr and "--epochs" in r.stderr


def test_missing_recipe_file(tmp_path):
    r = gendd("teacher", "-p", str(tmp_path / "none.toml"))
    assert r.returncode == 2 and "not found" in r.stderr


def test_artifacts_ls_json_on_empty_store(tmp_path):
    r = gendd("artifacts", "ls", "--json", "--artifacts", str(tmp_path))
    assert r.returncode == 0 and json.loads(r.stdout) == []


def test_artifacts_root_from_env(tmp_path):
    (tmp_path / "envroot").mkdir()
    r = gendd("artifacts", "verify", env={"GENDD_ARTIFACTS": str(tmp_path / "envroot")})
    assert r.returncode == 0 and "0 artifacts verified" in r.stdout


@pytest.mark.parametrize("command", [["verify"], ["ls"], ["gc"]])
def test_store_commands_refuse_a_root_that_does_not_exist(tmp_path, command):
    r = gendd("artifacts", *command, "--artifacts", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_one_training_image_is_a_clear_error(tmp_path, tiny_recipe):
    r = gendd("teacher", "-p", str(tiny_recipe), "--artifacts", str(tmp_path / "a"), "--set", "data.train_limit=1")
    assert r.returncode == 2 and "at least 2 images" in r.stderr and "Traceback" not in r.stderr


# ---- the shipped recipes: `gendd` works in any folder ----------------------------------------


def test_shipped_recipes_run_from_an_empty_folder(tmp_path):
    """No pipelines/ here: the default recipe and recipes by name come from the package."""
    work = tmp_path / "empty"
    work.mkdir()
    tiny = ["--set", "data.train_limit=64", "--set", "data.test_limit=32", "--set", "teacher.epochs=1"]
    r = gendd("teacher", *tiny, cwd=work)  # the default recipe, pipelines/quickstart.toml
    assert r.returncode == 0, r.stderr
    assert list((work / "artifacts" / "quickstart" / "teacher").glob("v001/manifest.json"))
    r = gendd("teacher", "-p", "quickstart", *tiny, cwd=work)  # by name: the same recipe, reused
    assert r.returncode == 0 and "reused" in r.stderr
    r = gendd("teacher", "-p", "no_such_recipe", cwd=work)
    assert r.returncode == 2 and "fashion_mnist" in r.stderr and "quickstart" in r.stderr  # names what is shipped


def test_the_wheel_ships_every_recipe(tmp_path):
    """What `pip install .` installs carries the recipes the checkout's pipelines/ links to."""
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(repo)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("gendd_deploy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"gendd_deploy/pipelines/{p.name}" for p in (repo / "pipelines").glob("*.toml")}
    assert shipped and shipped <= names


def test_serve_takes_triton_port_names():
    text = re.sub(r"\s+", " ", CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output)
    assert "--http-port" in text and "--grpc-port" in text and "-1 = no gRPC" in text
    assert "repeat for several models or versions" in text


def test_run_summary_of_a_plain_student_has_no_reference_sampler_line(capsys):
    """`gendd run` with distill.method = kd / ce: calibrate records no reference sampler, and the
    closing summary must still print (it raised a TypeError on the missing ratio)."""
    from types import SimpleNamespace

    from gendd_deploy import cli
    from gendd_deploy.models.deployed import SamplerSetting

    def art(stage, metrics, info=None, config=None):
        return SimpleNamespace(ref=f"tiny/{stage}/v001", short="0123abcd", metrics=metrics, manifest={"info": info or {}}, config=config or {})

    calibrate = art("sampler", {"latency_ms": 2.0, "probe_latency_ms": 1.0, "calib_top1": 90.0, "runtime": "onnxruntime"},
                    {"setting": SamplerSetting.probe().to_dict()}, {"calibrate": {"latency_batch": 32}})
    export = art("onnx", {"parity": {"max_abs_diff": 1e-6, "top1_agreement": 1.0, "n": 32}})
    cli._summary({"calibrate": calibrate, "export": export})
    out = " ".join(capsys.readouterr().out.split())
    assert "2.00x the plain student (linear probe)" in out and "reference sampler" not in out
