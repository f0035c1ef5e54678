"""Signed artifacts: native code (aoti, engine) loads only with a trusted signature; verify reports
a deleted manifest, a flipped byte and a re-signed native payload together, exit 3."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gendd_deploy import signing
from gendd_deploy.artifacts import Store, manifest_digest, verify_artifact
from gendd_deploy.errors import ArtifactError
from gendd_deploy.hashing import file_sha256


def publish(store, stage, name, data, fp):
    with store.draft("p", stage, fp, {}, []) as d:
        d.path(name).write_bytes(data)
        return d.publish()


def gendd(*args, env):
    import os

    return subprocess.run([sys.executable, "-m", "gendd_deploy", *args], capture_output=True, text=True, env=dict(os.environ, **env), timeout=120)


@pytest.fixture
def keys(tmp_path, monkeypatch):
    private, public = signing.keygen(tmp_path / "keys")
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    monkeypatch.setenv("GENDD_SIGNING_KEY", str(private))
    monkeypatch.setenv("GENDD_TRUSTED_KEYS", str(public))
    return {"GENDD_SIGNING_KEY": str(private), "GENDD_TRUSTED_KEYS": str(public)}


def _resign_payload(art, name: str, data: bytes) -> None:
    """What someone who can write the root does: swap the payload, fix its sha256 and the digest."""
    (art.path / name).write_bytes(data)
    m = json.loads((art.path / "manifest.json").read_text())
    for f in m["files"]:
        if f["path"] == name:
            f["bytes"], f["sha256"] = len(data), file_sha256(art.path / name)
    m["digest"] = manifest_digest(m)
    (art.path / "manifest.json").write_text(json.dumps(m))


def test_published_artifacts_are_signed_and_native_code_needs_a_trusted_signature(tmp_path, keys, monkeypatch):
    store = Store(tmp_path / "root")
    aoti = publish(store, "aoti", "model.pt2", b"a package", "a" * 64)
    assert (aoti.path / signing.SIGNATURE).is_file() and verify_artifact(aoti) == []
    signing.require_trusted(aoti)  # signed by the trusted key: loads
    _resign_payload(aoti, "model.pt2", b"a library with a constructor")
    swapped = store.find("p", "aoti", "a" * 64)
    assert verify_artifact(swapped) == []  # the file checks alone pass: this is why a signature is needed
    with pytest.raises(ArtifactError, match="signs another manifest"):
        signing.require_trusted(swapped)
    signing.require_trusted(swapped, trust_unsigned=True)  # the user's explicit choice
    monkeypatch.delenv("GENDD_SIGNING_KEY")
    unsigned = publish(store, "engine", "model.plan", b"a plan", "e" * 64)
    with pytest.raises(ArtifactError, match="unsigned.*--trust-unsigned"):
        signing.require_trusted(unsigned)
    signing.require_trusted(publish(store, "onnx", "model.onnx", b"graph", "o" * 64))  # not native code: no signature needed


def test_a_key_that_is_not_trusted_is_refused(tmp_path, keys, monkeypatch):
    store = Store(tmp_path / "root")
    other_private, other_public = signing.keygen(tmp_path / "other")
    monkeypatch.setenv("GENDD_SIGNING_KEY", str(other_private))
    art = publish(store, "aoti", "model.pt2", b"pkg", "a" * 64)
    with pytest.raises(ArtifactError, match="not in GENDD_TRUSTED_KEYS"):
        signing.require_trusted(art)


def test_verify_reports_a_deleted_manifest_a_flipped_byte_and_a_resigned_native_payload(tmp_path, keys):
    store = Store(tmp_path / "root")
    a = publish(store, "teacher", "model.pt", b"weights", "1" * 64)
    b = publish(store, "onnx", "model.onnx", b"graph bytes", "2" * 64)
    c = publish(store, "aoti", "model.pt2", b"package", "3" * 64)
    ok = gendd("artifacts", "verify", "--artifacts", str(store.root), env=keys)
    assert ok.returncode == 0 and "3 signed by a trusted key" in ok.stdout, ok.stderr
    (a.path / "manifest.json").unlink()
    raw = bytearray((b.path / "model.onnx").read_bytes())
    raw[0] ^= 1
    (b.path / "model.onnx").write_bytes(bytes(raw))
    _resign_payload(c, "model.pt2", b"evil package")
    r = gendd("artifacts", "verify", "--artifacts", str(store.root), env=keys)
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert "without manifest.json" in r.stderr and "model.onnx sha256" in r.stderr and "p/aoti/v001: manifest.sig signs another manifest" in r.stderr


def test_sign_and_keygen_commands(tmp_path, keys, monkeypatch):
    monkeypatch.delenv("GENDD_SIGNING_KEY")
    store = Store(tmp_path / "root")
    art = publish(store, "aoti", "model.pt2", b"pkg", "a" * 64)
    assert signing.status(art.path, art.manifest, signing.trusted_keys())[0] == "unsigned"
    r = gendd("artifacts", "sign", "p/aoti/v001", "--artifacts", str(store.root), env=keys)
    assert r.returncode == 0 and "signed p/aoti/v001" in r.stdout, r.stderr
    assert signing.status(art.path, art.manifest, signing.trusted_keys())[0] == "trusted"
    again = gendd("artifacts", "keygen", str(tmp_path / "keys"), env=keys)
    assert again.returncode == 2 and "exists already" in again.stderr
