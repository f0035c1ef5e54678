"""The store on a shared root, tried as an attacker and as a careless user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gendd_deploy.artifacts import Store, manifest_digest, verify_artifact
from gendd_deploy.errors import ArtifactError
from gendd_deploy.training import Checkpointer


def publish(store, stage="teacher", fp="a" * 64, pipeline="p"):
    with store.draft(pipeline, stage, fp, {"k": 1}, []) as d:
        d.path("model.pt").write_bytes(b"weights")
        d.info["feature_dim"] = 32
        return d.publish()


def gendd(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gendd_deploy", *args], capture_output=True, text=True, env=dict(os.environ, **(env or {})), timeout=300)


def _rewrite(art, change):
    m = json.loads((art.path / "manifest.json").read_text())
    change(m)
    (art.path / "manifest.json").write_text(json.dumps(m))


# ---- manifests -------------------------------------------------------------------------------


def test_an_edited_manifest_is_caught_and_not_used(tmp_path):
    store = Store(tmp_path)
    art = publish(store)
    _rewrite(art, lambda m: m["info"].update(feature_dim=64))  # plausible, and wrong
    assert store.find("p", "teacher", "a" * 64) is None  # never handed to a stage
    r = gendd("artifacts", "verify", "--artifacts", str(tmp_path))
    assert r.returncode == 3 and "digest" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("raw", [b"\xff\xfe not utf-8", b"{not json", b"[]", b'{"schema": 1}'])
def test_unreadable_manifests_fail_verify_without_traceback(tmp_path, raw):
    store = Store(tmp_path)
    art = publish(store)
    (art.path / "manifest.json").write_bytes(raw)
    r = gendd("artifacts", "verify", "--artifacts", str(tmp_path))
    assert r.returncode == 3 and "Traceback" not in r.stderr and str(art.path) in r.stderr


def test_file_paths_cannot_leave_the_artifact_folder(tmp_path):
    store = Store(tmp_path)
    art = publish(store)

    def escape(m):
        m["files"].append({"path": "../../../../etc/passwd", "bytes": 1, "sha256": "0" * 64})
        m["digest"] = manifest_digest(m)  # even with a matching digest

    _rewrite(art, escape)
    assert store.find("p", "teacher", "a" * 64) is None
    with pytest.raises(ArtifactError, match="inside the artifact folder"):
        from gendd_deploy.artifacts import read_manifest

        read_manifest(art.path)


def test_a_payload_symlinked_out_of_the_folder_is_refused(tmp_path):
    store = Store(tmp_path / "root")
    art = publish(store)
    outside = tmp_path / "secret"
    outside.write_bytes(b"weights")
    (art.path / "model.pt").unlink()
    (art.path / "model.pt").symlink_to(outside)
    assert any("leaves the artifact folder" in p for p in verify_artifact(art))


# ---- gc --------------------------------------------------------------------------------------


def test_gc_touches_only_its_own_dead_drafts(tmp_path):
    root = tmp_path / "root"
    store = Store(root)
    art = publish(store)
    outside = tmp_path / "outside"
    (outside / "x" / ".tmp-0123456789ab").mkdir(parents=True)
    (root / "link").symlink_to(outside)  # a symlinked folder in the root
    (root / "src" / "vendor" / "v001").mkdir(parents=True)  # not an artifact, no manifest
    (root / "src" / "vendor" / ".tmp-notours").mkdir()
    live = store.draft("p", "student", "b" * 64, {}, [])  # a stage writing right now
    dead = store.draft("p", "student", "c" * 64, {}, [])
    dead.owner.write_text(json.dumps({"pid": 999999999, "host": socket.gethostname(), "started": 0}))
    r = gendd("artifacts", "gc", "--artifacts", str(root))
    assert r.returncode == 0, r.stderr
    assert not dead.dir.exists() and not dead.owner.exists()
    assert live.dir.is_dir() and (outside / "x" / ".tmp-0123456789ab").is_dir()
    assert (root / "src" / "vendor" / "v001").is_dir() and (root / "src" / "vendor" / ".tmp-notours").is_dir()
    assert verify_artifact(art) == [] and art.path.is_dir()


def test_gc_unreachable_lists_first_and_keeps_what_a_recipe_reuses(tmp_path, tiny_recipe):
    root = tmp_path / "art"
    r = gendd("teacher", "-p", str(tiny_recipe), "--artifacts", str(root), "--epochs", "1")
    assert r.returncode == 0, r.stderr
    reused = Store(root).list(stage="teacher")[0]
    # a newer teacher of another recipe (epochs 2) becomes "latest"; the first is still reused by tiny_recipe
    r = gendd("teacher", "-p", str(tiny_recipe), "--artifacts", str(root), "--epochs", "2")
    assert r.returncode == 0, r.stderr
    other = tmp_path / "other.toml"
    other.write_text(tiny_recipe.read_text().replace("epochs = 2\nbatch_size = 64\nlr = 3e-3", "epochs = 1\nbatch_size = 64\nlr = 3e-3"))
    r = gendd("artifacts", "gc", "--unreachable", "--keep", str(other), "--artifacts", str(root))
    assert r.returncode == 0 and "nothing to remove" in r.stdout, r.stdout + r.stderr
    assert reused.path.is_dir()
    r = gendd("artifacts", "gc", "--unreachable", "--keep", str(tiny_recipe), "--artifacts", str(root))
    assert "would remove" in r.stdout and "--yes" in r.stdout and reused.path.is_dir()  # a dry run first
    r = gendd("artifacts", "gc", "--unreachable", "--keep", str(tiny_recipe), "--artifacts", str(root), "--yes")
    assert r.returncode == 0 and not reused.path.exists()


def test_gc_unreachable_keeps_the_pipelines_of_recipes_whose_data_is_absent(tmp_path, tiny_recipe):
    """A shipped recipe's data (CIFAR-100, say) is not on this machine: gc says so and keeps its pipeline."""
    root = tmp_path / "art"
    r = gendd("teacher", "-p", str(tiny_recipe), "--artifacts", str(root), "--epochs", "1")
    assert r.returncode == 0, r.stderr
    absent = tmp_path / "absent.toml"
    absent.write_text(tiny_recipe.read_text().replace('source = "digits"', f'source = "cifar100"\nroot = "{tmp_path / "no-cifar"}"'))
    assert 'source = "cifar100"' in absent.read_text()
    r = gendd("artifacts", "gc", "--unreachable", "--keep", str(absent), "--artifacts", str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "its data is absent here, so every version of pipeline 'tiny' is kept" in r.stdout and "CIFAR-100 not found" in r.stdout
    assert "nothing to remove" in r.stdout and Store(root).list(stage="teacher")


def test_only_commands_that_write_need_a_writable_root(tmp_path, tiny_recipe, monkeypatch):
    """`gendd serve` reads: a read-only root (a container's :ro mount) is fine; a writer is refused."""
    from gendd_deploy.cli import make_context
    from gendd_deploy.errors import UsageError

    root = tmp_path / "ro"
    root.mkdir()
    real_touch = Path.touch

    def read_only(self, *a, **k):  # what a read-only mount answers to the write probe
        if self.is_relative_to(root):
            raise OSError(30, "Read-only file system")
        return real_touch(self, *a, **k)

    monkeypatch.setattr(Path, "touch", read_only)
    with pytest.raises(UsageError, match="cannot be created or written \\(Read-only file system\\)"):
        make_context(str(tiny_recipe), str(root), [])
    assert make_context(str(tiny_recipe), str(root), [], writes=False).store.root == root
    with pytest.raises(UsageError, match="no artifact root at"):
        make_context(str(tiny_recipe), str(tmp_path / "missing"), [], writes=False)
    r = gendd("serve", "-p", str(tiny_recipe), "--artifacts", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no artifact root at" in r.stderr and "Traceback" not in r.stderr


# ---- concurrency -----------------------------------------------------------------------------


def test_two_runs_on_one_root_both_succeed_and_publish_once(tmp_path, tiny_recipe):
    """Two processes start the same stages at once (teacher, then the cache with its chunk files):
    both succeed, one builds, the other waits and reuses; one version per fingerprint."""
    root = tmp_path / "art"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for stage in ("teacher", "cache"):
        cmd = [sys.executable, "-m", "gendd_deploy", stage, "-p", str(tiny_recipe), "--artifacts", str(root), "--set", "teacher.epochs=1"]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
    store = Store(root)
    for stage in ("teacher", "teacher_features"):
        fps = [a.fingerprint for a in store.list(stage=stage)]
        assert len(fps) == len(set(fps)) == 1, (stage, fps)
        assert verify_artifact(store.list(stage=stage)[0]) == []


# ---- disk full -------------------------------------------------------------------------------


def test_checkpoint_cut_short_by_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    def full(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    ck = Checkpointer(tmp_path)
    with pytest.raises(RuntimeError):
        ck.save({"epoch": 0})
    assert list(tmp_path.iterdir()) == []


def test_unwritable_root_is_one_line(tmp_path, tiny_recipe):
    r = gendd("teacher", "-p", str(tiny_recipe), "--artifacts", "/proc/gendd-x")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "artifact root" in r.stderr


# ---- no unpickling from the root -------------------------------------------------------------


def test_a_pickle_planted_as_the_work_checkpoint_does_not_run(tmp_path, tiny_recipe):
    """The checkpoint path is predictable from the recipe; whatever is placed there is loaded with
    weights_only=True, so a pickle's payload never runs: the stage stops with exit 3."""
    import pickle

    from gendd_deploy.config import load_recipe
    from gendd_deploy.stages import Context
    from gendd_deploy.stages.teacher import TeacherStage

    root = tmp_path / "art"
    ctx = Context(recipe=load_recipe(tiny_recipe), store=Store(root), recipe_path=str(tiny_recipe), quiet=True)
    work = TeacherStage().work_dir(ctx)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (work / "checkpoint.pt").write_bytes(pickle.dumps({"epoch": Payload()}))
    r = gendd("teacher", "-p", str(tiny_recipe), "--artifacts", str(root))
    assert r.returncode == 3 and "unreadable" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_disk_full_during_a_stage_is_exit_3_and_one_line(tmp_path, tiny_recipe):
    """ENOSPC while saving: exit 3, the message names the fix, no partial file blocks the rerun."""
    script = (
        "import errno, sys, torch\n"
        "real = torch.save\n"
        "def full(obj, f, *a, **k):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', str(f))\n"
        "torch.save = full\n"
        "from gendd_deploy.cli import main\n"
        f"sys.argv = ['gendd', 'teacher', '-p', '{tiny_recipe}', '--artifacts', '{tmp_path / 'art'}', '--epochs', '1']\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 3 and "no space left on device" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list((tmp_path / "art").rglob("*.part"))
    r = gendd("teacher", "-p", str(tiny_recipe), "--artifacts", str(tmp_path / "art"), "--epochs", "1")
    assert r.returncode == 0, r.stderr  # the rerun is not blocked
