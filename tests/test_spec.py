"""DeployedSpec: the one description of a deployed model (gendd_deploy/spec.py)."""

import json

import pytest

from gendd_deploy.errors import ArtifactError
from gendd_deploy.spec import SPEC_KEY, DeployedSpec

IO_NOISE = {
    "inputs": [{"name": "images", "dtype": "float32", "shape": ["batch", 1, 8, 8]}, {"name": "noise", "dtype": "float32", "shape": ["batch", 3, 2, 1, 16]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
}
PRE = {"size": 8, "channels": 1, "mean": [0.5], "std": [0.25]}


def test_round_trip_through_a_manifest_keeps_every_fact():
    spec = DeployedSpec.from_io(IO_NOISE, preprocess=PRE, class_names=tuple("0123456789"), method="gendd", readout="ddpm-2 x1", setting={"sampler": "ddpm"}, max_batch=64)
    doc = json.loads(json.dumps({SPEC_KEY: spec.to_manifest()}))  # what a manifest stores
    back = DeployedSpec.from_manifest(doc)
    assert back == spec
    assert back.images.name == "images" and back.logits.name == "logits" and back.noise.name == "noise"
    assert back.needs_noise and back.noise_tail == (3, 2, 1, 16) and back.num_classes == 10
    assert doc[SPEC_KEY]["noise"]["tail"] == [3, 2, 1, 16]


def test_one_input_means_no_noise():
    spec = DeployedSpec.from_io({"inputs": IO_NOISE["inputs"][:1], "outputs": IO_NOISE["outputs"]})
    assert not spec.needs_noise and spec.noise is None and spec.noise_tail is None


def test_manifests_from_before_the_spec_still_read():
    """onnx / aoti artifacts exported before info.deployed carried io and loose keys."""
    legacy = {"io": IO_NOISE, "needs_noise": True, "noise_shape_tail": [3, 2, 1, 16], "preprocess": PRE, "class_names": ["a", "b"], "setting_label": "ddpm-2 x1"}
    spec = DeployedSpec.from_manifest(legacy)
    assert spec.noise_tail == (3, 2, 1, 16) and spec.preprocess == PRE and spec.class_names == ("a", "b") and spec.readout == "ddpm-2 x1"
    assert DeployedSpec.from_manifest({**legacy, "needs_noise": False}).noise is None


@pytest.mark.parametrize(
    "info",
    [
        {},
        {SPEC_KEY: "not an object"},
        {SPEC_KEY: {"inputs": [], "outputs": []}},
        {SPEC_KEY: {**IO_NOISE, "inputs": [{"shape": [1]}]}},  # no name
        {SPEC_KEY: {**IO_NOISE, "inputs": [IO_NOISE["inputs"][0], {"name": "noise", "shape": ["batch", "steps", 2]}]}},  # a noise shape that is not fixed
        {SPEC_KEY: {**IO_NOISE, "noise": {"name": "noise", "tail": [9, 9]}}},  # disagrees with its own inputs
    ],
)
def test_a_malformed_description_is_an_artifact_error_naming_the_fix(info):
    with pytest.raises(ArtifactError, match="re-export it with 'gendd export'|unreadable"):
        DeployedSpec.from_manifest(info, "tiny/onnx/v001")


def test_the_onnx_file_carries_its_description_and_lineage(tmp_path):
    """metadata_props round-trip; a file whose stamp differs from its manifest is refused."""
    from test_runtime import linear_onnx

    from gendd_deploy.spec import check_stamp, onnx_metadata, stamp_onnx

    path = tmp_path / "m.onnx"
    linear_onnx(path)
    assert onnx_metadata(path) == (None, None)
    spec = DeployedSpec.from_io(
        {"inputs": [{"name": "images", "dtype": "float32", "shape": ["batch", 1, 2, 2]}], "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}]},
        preprocess={"size": [2, 2], "channels": 1, "mean": [0.5], "std": [0.25]}, class_names=("a", "b", "c"), method="gendd", readout="linear fit_ce",
    )
    check_stamp(path, spec, "p/onnx/v001")  # unstamped (an older export): accepted
    lineage = [{"stage": "student", "version": "v003", "fingerprint": "ab" * 32, "pipeline": "p"}]
    stamp_onnx(path, spec, lineage)
    stamp_onnx(path, spec, lineage)  # stamping twice keeps one entry per key
    import onnx

    assert sorted(p.key for p in onnx.load(str(path)).metadata_props) == ["gendd.deployed", "gendd.lineage"]
    read, got_lineage = onnx_metadata(path)
    assert read == spec and got_lineage == lineage
    check_stamp(path, spec, "p/onnx/v001")
    other = DeployedSpec.from_manifest({SPEC_KEY: {**spec.to_manifest(), "class_names": ["x", "y", "z"]}})
    with pytest.raises(ArtifactError, match="describes another model than its manifest \\(differs in class_names\\)"):
        check_stamp(path, other, "p/onnx/v001")
    from gendd_deploy.runtime.ort import OrtRunner  # serving reads the stamp from the session, with no second parse

    props = dict(OrtRunner(path, intra_op_threads=1).session.get_modelmeta().custom_metadata_map)
    check_stamp(path, spec, "p/onnx/v001", props=props)
    with pytest.raises(ArtifactError, match="differs in class_names"):
        check_stamp(path, other, "p/onnx/v001", props=props)
