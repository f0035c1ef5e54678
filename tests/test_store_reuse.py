"""What a stage reuses, and what is copied out of the store, is checked first; a version folder
without a manifest is reported; large files' hashes are remembered across runs, never wrongly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gendd_deploy.errors import ArtifactError
from gendd_deploy.hashing import PERSIST_MIN_BYTES, HashCache, _hash_file, file_sha256
from gendd_deploy.stages.teacher import TeacherStage

pytestmark = pytest.mark.usefixtures("one_thread")


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_reused_artifact_is_verified_and_rebuilt_on_request(tiny_context):
    ctx = tiny_context()
    first = TeacherStage().run(ctx)
    _flip(first.file("model.pt"))
    with pytest.raises(ArtifactError, match=r"model.pt sha256 .*--rebuild-corrupt"):
        TeacherStage().run(tiny_context())  # was: "reused ..., nothing to do" over the corrupted weights
    again = tiny_context()
    again.rebuild_corrupt = True
    rebuilt = TeacherStage().run(again)
    assert rebuilt.version != first.version and rebuilt.fingerprint == first.fingerprint
    assert TeacherStage().run(tiny_context()).path == rebuilt.path  # the intact new version is what is reused now


def test_verify_reports_a_version_folder_without_manifest(tiny_context):
    ctx = tiny_context()
    art = TeacherStage().run(ctx)
    (art.path / "manifest.json").unlink()
    r = subprocess.run([sys.executable, "-m", "gendd_deploy", "artifacts", "verify", "--artifacts", str(ctx.store.root)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "without manifest.json" in r.stderr and "Traceback" not in r.stderr


def test_hash_cache_is_reused_and_sees_a_tampered_file(tmp_path):
    big = tmp_path / "features.npy"
    big.write_bytes(os.urandom(PERSIST_MIN_BYTES + 10))
    cache = HashCache(tmp_path / "cache.jsonl")
    key = HashCache.key(str(big.resolve()), big.stat())
    cache.put(key, _hash_file(str(big)))
    assert HashCache(tmp_path / "cache.jsonl").get(key) == _hash_file(str(big))  # kept across runs
    st = big.stat()
    _flip(big)
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the ctime tells
    assert HashCache.key(str(big.resolve()), big.stat()) != key


def test_file_sha256_through_the_persistent_cache(tmp_path, monkeypatch):
    import gendd_deploy.hashing as hashing

    monkeypatch.setenv("GENDD_HASH_CACHE", str(tmp_path / "c.jsonl"))
    monkeypatch.setattr(hashing, "_CACHE", None)
    big = tmp_path / "f.bin"
    big.write_bytes(os.urandom(PERSIST_MIN_BYTES + 1))
    assert file_sha256(big) == _hash_file(str(big))
    assert (tmp_path / "c.jsonl").read_text().count("\n") == 1
    _flip(big)
    assert file_sha256(big) == _hash_file(str(big))  # re-hashed, not the remembered digest


@pytest.mark.parametrize("payload", ["pickle", "object-array"])
def test_a_resigned_pickled_payload_is_an_artifact_error_not_a_traceback(tiny_context, payload):
    """Someone who can write the root replaces model.pt with a pickle (or features.npy with an
    object array) and fixes its sha256: loading refuses it with exit 3, nothing is executed."""
    import json
    import pickle

    import numpy as np

    from gendd_deploy.artifacts import manifest_digest
    from gendd_deploy.hashing import file_sha256
    from gendd_deploy.loaders import load_array, load_teacher
    from gendd_deploy.stages import run_chain
    from gendd_deploy.stages.cache import CacheStage

    ctx = tiny_context()
    art = run_chain(CacheStage(), ctx) if payload == "object-array" else TeacherStage().run(ctx)
    name = "features.npy" if payload == "object-array" else "model.pt"
    if payload == "pickle":
        (art.path / name).write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    else:
        np.save(art.path / name, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    m = json.loads((art.path / "manifest.json").read_text())
    for f in m["files"]:
        if f["path"] == name:
            f["bytes"], f["sha256"] = (art.path / name).stat().st_size, file_sha256(art.path / name)
    m["digest"] = manifest_digest(m)
    (art.path / "manifest.json").write_text(json.dumps(m))
    art = ctx.store.find(ctx.pipeline, art.stage, art.fingerprint)
    with pytest.raises(ArtifactError, match=name):
        load_array(art, name) if payload == "object-array" else load_teacher(art)
