"""The artifact store: fingerprints, atomic publish, reuse, verify, lineage, gc."""

import json

import pytest

from gendd_deploy.artifacts import Store, fingerprint, verify_artifact
from gendd_deploy.errors import ArtifactError, UsageError


def publish(store, stage="teacher", fp="a" * 64, payload=b"weights", inputs=(), pipeline="p"):
    with store.draft(pipeline, stage, fp, {"k": 1}, list(inputs)) as d:
        d.path("model.pt").write_bytes(payload)
        d.metrics["acc"] = 1.0
        return d.publish()


def test_fingerprint_is_stable_and_sensitive():
    base = fingerprint("teacher", {"lr": 1e-3, "epochs": 2}, {"data": "d1"})
    assert base == fingerprint("teacher", {"epochs": 2, "lr": 1e-3}, {"data": "d1"})  # key order is irrelevant
    assert base != fingerprint("teacher", {"lr": 2e-3, "epochs": 2}, {"data": "d1"})  # config change
    assert base != fingerprint("teacher", {"lr": 1e-3, "epochs": 2}, {"data": "d2"})  # input change
    assert base != fingerprint("cache", {"lr": 1e-3, "epochs": 2}, {"data": "d1"})  # stage change


def test_publish_writes_manifest_and_is_found(tmp_path):
    store = Store(tmp_path)
    art = publish(store)
    m = json.loads((art.path / "manifest.json").read_text())
    for key in ("schema", "stage", "version", "fingerprint", "created", "config", "inputs", "files", "metrics", "environment"):
        assert key in m
    assert m["files"][0]["path"] == "model.pt" and m["files"][0]["bytes"] == 7
    assert store.find("p", "teacher", "a" * 64).path == art.path
    assert store.find("p", "teacher", "b" * 64) is None
    assert art.version == "v001" and publish(store, fp="b" * 64).version == "v002"


def test_failure_inside_a_stage_leaves_no_version(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError):
        with store.draft("p", "teacher", "c" * 64, {}, []) as d:
            d.path("model.pt").write_bytes(b"half")
            raise RuntimeError("stage crashed")
    assert store.list() == []
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "p" / "teacher").iterdir())


def test_unpublished_draft_is_never_listed(tmp_path):
    store = Store(tmp_path)
    d = store.draft("p", "teacher", "c" * 64, {}, [])
    d.path("model.pt").write_bytes(b"x")
    assert store.list() == []  # a crash here would leave only a .tmp folder
    assert store.leftovers() == []  # its owner (this process) is alive: not gc's to take
    d.owner.write_text('{"pid": 999999999, "host": "%s", "started": 0}' % __import__("socket").gethostname())
    assert store.leftovers() == [d.dir]  # the owner is gone


def test_verify_detects_one_changed_byte(tmp_path):
    store = Store(tmp_path)
    art = publish(store)
    assert verify_artifact(art) == []
    data = bytearray((art.path / "model.pt").read_bytes())
    data[0] ^= 0xFF
    (art.path / "model.pt").write_bytes(bytes(data))
    problems = verify_artifact(art)
    assert len(problems) == 1 and "model.pt" in problems[0]
    with pytest.raises(ArtifactError, match="model.pt"):
        store.check_input(art, "rebuild it")


def test_verify_detects_missing_and_extra_files(tmp_path):
    store = Store(tmp_path)
    art = publish(store)
    (art.path / "stray.bin").write_bytes(b"?")
    (art.path / "model.pt").unlink()
    problems = verify_artifact(art)
    assert any("missing file model.pt" in p for p in problems)
    assert any("stray.bin" in p for p in problems)


def test_lineage_and_resolve(tmp_path):
    store = Store(tmp_path)
    t = publish(store, "teacher", "1" * 64)
    c = publish(store, "teacher_features", "2" * 64, inputs=[t])
    s = publish(store, "student", "3" * 64, inputs=[c])
    assert [a.stage for a in store.lineage(s)] == ["student", "teacher_features", "teacher"]
    assert store.resolve("p/student/v001").path == s.path
    assert store.resolve("student/v001").path == s.path
    assert store.resolve("333333").path == s.path
    with pytest.raises(UsageError, match="matches 3"):
        store.resolve("v001")
    with pytest.raises(UsageError, match="no artifact"):
        store.resolve("p/student/v009")


def test_gc_unreachable_keeps_latest_lineage(tmp_path):
    store = Store(tmp_path)
    old_t = publish(store, "teacher", "1" * 64)
    new_t = publish(store, "teacher", "4" * 64)
    s = publish(store, "student", "3" * 64, inputs=[new_t])
    doomed = {a.path for a in store.unreachable()}
    assert doomed == {old_t.path}
    assert s.path not in doomed
