"""`gendd export --triton DIR`: the model repository parses with Triton's own ModelConfig protobuf
and matches the ONNX graph; versions increase with each export and map back to artifacts; the
encoded-image models (Python backend + ensemble) chain correctly, and the Python backend's
`execute` gives the tensor model exactly what `gendd serve`'s image model gives it."""

import importlib.util
import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from gendd_deploy.imaging import make_spec
from gendd_deploy.spec import DeployedSpec, onnx_io
from gendd_deploy.artifacts import Store
from gendd_deploy.config import BuildConfig, ServeConfig
from gendd_deploy.errors import UsageError
from gendd_deploy.triton import write_triton_repo
from conftest import ONNX_IR

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="Triton's model-config protobuf: pip install 'tritonclient[grpc]'"
)
from google.protobuf import text_format  # noqa: E402  (after the skip: protobuf comes with tritonclient[grpc])

REPO = Path(__file__).resolve().parents[1]
NOISE_TAIL = [3, 2, 1, 16]
SPEC = make_spec(1, 8, [0.5], [0.25], "torch")


def tiny_graph(noise: bool) -> onnx.ModelProto:
    """images (batch, 1, 8, 8) [+ noise (batch, 3, 2, 1, 16)] -> logits (batch, 10)."""
    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits" if not noise else "pre"]),
    ]
    inits = [
        helper.make_tensor("w", TensorProto.FLOAT, [64, 10], [0.01] * 640),
        helper.make_tensor("b", TensorProto.FLOAT, [10], [0.0] * 10),
    ]
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 8, 8])]
    if noise:
        inputs.append(helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["batch"] + NOISE_TAIL))
        nodes += [
            helper.make_node("ReduceMean", ["noise", "axes"], ["eps"], keepdims=0),  # (batch,)
            helper.make_node("Unsqueeze", ["eps", "one"], ["eps2"]),  # (batch, 1)
            helper.make_node("Add", ["pre", "eps2"], ["logits"]),
        ]
        inits += [helper.make_tensor("axes", TensorProto.INT64, [4], [1, 2, 3, 4]), helper.make_tensor("one", TensorProto.INT64, [1], [1])]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    model = helper.make_model(helper.make_graph(nodes, "tiny", inputs, [out], inits), opset_imports=[helper.make_opsetid("", 18)], ir_version=ONNX_IR)
    onnx.checker.check_model(model, full_check=True)
    return model


def publish(store: Store, stage: str, files: dict, info: dict, fp: str):
    with store.draft("tiny", stage, fp, {}, []) as d:
        for name, data in files.items():
            d.path(name).write_bytes(data)
        d.info = info
        return d.publish()


@pytest.fixture
def arts(tmp_path):
    store = Store(tmp_path / "artifacts")

    def onnx_art(noise: bool, fp: str = "a" * 64, class_names=None, preprocess=SPEC):
        graph = tiny_graph(noise)
        spec = DeployedSpec.from_io(onnx_io(None, graph), class_names=tuple(class_names) if class_names else None, preprocess=preprocess)
        assert spec.noise_tail == (tuple(NOISE_TAIL) if noise else None)
        return publish(store, "onnx", {"model.onnx": graph.SerializeToString()}, {"deployed": spec.to_manifest()}, fp)

    def engine_art(onnx_a, min_batch=1, max_batch=64):
        io = {"inputs": [{"name": "images", "dtype": "float32", "shape": ["batch", 1, 8, 8]}],
              "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]}
        info = {
            "tensorrt": "10.9.0.34", "cuda": "12.8", "gpu": "NVIDIA H100 80GB HBM3", "gpu_capability": "9.0", "precision": "fp16",
            "profile": {"images": {"min": [min_batch, 1, 8, 8], "opt": [16, 1, 8, 8], "max": [max_batch, 1, 8, 8]}},
            "io": io, "onnx": {"ref": onnx_a.ref, "fingerprint": onnx_a.fingerprint},
        }
        return publish(store, "engine", {"model.plan": b"not a real plan"}, info, "e" * 64)

    return onnx_art, engine_art


def parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def assert_matches_graph(cfg, onnx_path: Path):
    """config.pbtxt inputs / outputs == the ONNX graph's, dims without the batch dim, TYPE_FP32."""
    g = onnx.load(onnx_path).graph

    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim][1:]

    fp32 = model_config_pb2.DataType.Value("TYPE_FP32")
    assert [(t.name, list(t.dims), t.data_type) for t in cfg.input] == [(v.name, dims(v), fp32) for v in g.input]
    assert [(t.name, list(t.dims), t.data_type) for t in cfg.output] == [(v.name, dims(v), fp32) for v in g.output]


@pytest.mark.parametrize("noise", [False, True], ids=["plain", "noise"])
def test_onnx_repository_parses_and_matches_the_graph(arts, tmp_path, noise):
    onnx_art, _ = arts
    art = onnx_art(noise)
    build, serve = BuildConfig(opt_batch=16, max_batch=128), ServeConfig(max_delay_ms=2.5)
    vdir = write_triton_repo(art, None, tmp_path / "repo", "tiny", serve_cfg=serve, build_cfg=build)
    assert vdir == tmp_path / "repo" / "tiny" / "1"
    assert (vdir / "model.onnx").read_bytes() == art.file("model.onnx").read_bytes()

    cfg = parse(tmp_path / "repo" / "tiny" / "config.pbtxt")
    assert cfg.name == "tiny" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 128  # the profile's max batch
    assert list(cfg.dynamic_batching.preferred_batch_size) == [16, 128]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2500
    assert cfg.version_policy.latest.num_versions == 1
    assert_matches_graph(cfg, vdir / "model.onnx")
    text = (tmp_path / "repo" / "tiny" / "config.pbtxt").read_text()
    if noise:
        assert [t.name for t in cfg.input] == ["images", "noise"] and list(cfg.input[1].dims) == NOISE_TAIL
        assert "standard normal float32 of shape [3, 2, 1, 16] per image" in text
    else:
        assert "noise" not in text


def test_engine_repository_uses_the_plan_and_its_profile(arts, tmp_path):
    onnx_art, engine_art = arts
    o = onnx_art(False)
    e = engine_art(o, max_batch=64)
    vdir = write_triton_repo(o, e, tmp_path / "repo", "tiny", serve_cfg=ServeConfig(), build_cfg=BuildConfig())
    assert (vdir / "model.plan").read_bytes() == b"not a real plan" and not (vdir / "model.onnx").exists()
    cfg = parse(vdir.parent / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 64  # from the engine's profile, not the recipe
    assert list(cfg.dynamic_batching.preferred_batch_size) == [16, 64]
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_GPU")
    assert_matches_graph(cfg, o.file("model.onnx"))
    text = (vdir.parent / "config.pbtxt").read_text()
    assert "TensorRT 10.9.0.34" in text and "NVIDIA H100 80GB HBM3" in text


def test_versions_increase_and_map_to_artifacts(arts, tmp_path):
    onnx_art, engine_art = arts
    first = onnx_art(False, fp="1" * 64, preprocess=make_spec(1, 8, [0.25], [0.5], "torch"))
    second = onnx_art(True, fp="2" * 64)
    repo = tmp_path / "repo"
    v1 = write_triton_repo(first, None, repo, "tiny")
    v2 = write_triton_repo(second, None, repo, "tiny")
    v3 = write_triton_repo(first, engine_art(first), repo, "tiny")
    assert [v.name for v in (v1, v2, v3)] == ["1", "2", "3"]
    doc = json.loads((repo / "tiny" / "versions.json").read_text())
    assert doc["latest"] == 3 and list(doc["versions"]) == ["1", "2", "3"]
    assert doc["versions"]["1"]["artifact"] == first.ref and doc["versions"]["1"]["fingerprint"] == first.fingerprint
    assert doc["versions"]["1"]["preprocess"]["mean"] == [0.25]  # what clients must apply before 'images'
    assert doc["versions"]["2"]["fingerprint"] == second.fingerprint and doc["versions"]["2"]["needs_noise"]
    assert doc["versions"]["3"]["platform"] == "tensorrt_plan" and doc["versions"]["3"]["engine"]["tensorrt"] == "10.9.0.34"
    assert parse(repo / "tiny" / "config.pbtxt").platform == "tensorrt_plan"  # config follows the newest version
    assert not list((repo / "tiny").glob(".tmp-*"))


def test_refuses_what_triton_cannot_serve(arts, tmp_path):
    onnx_art, engine_art = arts
    o = onnx_art(False)
    with pytest.raises(UsageError, match="min batch 4"):
        write_triton_repo(o, engine_art(o, min_batch=4), tmp_path / "repo", "tiny")
    with pytest.raises(UsageError, match="model name"):
        write_triton_repo(o, None, tmp_path / "repo", "bad name/")


def test_reexport_is_idempotent_and_carries_labels_queue_and_instances(arts, tmp_path):
    onnx_art, _ = arts
    names = [f"class {i}" for i in range(10)]
    art = onnx_art(False, class_names=names)
    repo = tmp_path / "repo"
    v1 = write_triton_repo(art, None, repo, "tiny", serve_cfg=ServeConfig(queue_size=64, instances=2, max_delay_ms=1.0))
    created = json.loads((repo / "tiny" / "versions.json").read_text())["versions"]["1"]["created"]
    cfg = parse(repo / "tiny" / "config.pbtxt")
    assert (repo / "tiny" / "labels.txt").read_text().splitlines() == names
    assert cfg.output[0].label_filename == "labels.txt"  # Triton's classification answers carry labels
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 64 and cfg.instance_group[0].count == 2
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 1000

    # the same artifact again: no new version; the config follows the recipe's new settings
    again = write_triton_repo(art, None, repo, "tiny", serve_cfg=ServeConfig(queue_size=32))
    doc = json.loads((repo / "tiny" / "versions.json").read_text())
    assert again == v1 and list(doc["versions"]) == ["1"] and doc["versions"]["1"]["created"] == created
    assert parse(repo / "tiny" / "config.pbtxt").dynamic_batching.default_queue_policy.max_queue_size == 32
    assert sorted(p.name for p in (repo / "tiny").iterdir() if p.is_dir()) == ["1"]

    # a damaged copy is not "unchanged": the export writes a fresh version
    (v1 / "model.onnx").write_bytes(b"damaged")
    assert write_triton_repo(art, None, repo, "tiny").name == "2"


def test_a_corrupted_onnx_artifact_is_not_copied_out(arts, tmp_path):
    from gendd_deploy.errors import ArtifactError

    onnx_art, _ = arts
    art = onnx_art(False)
    path = art.file("model.onnx")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    path.write_bytes(bytes(data))
    repo = tmp_path / "repo"
    with pytest.raises(ArtifactError, match="model.onnx sha256"):
        write_triton_repo(art, None, repo, "tiny")
    assert not (repo / "tiny").exists()  # nothing written


@pytest.mark.parametrize("text", ["{bad", "[1,2]", '{"versions":{"x":{}}}', '{"versions": [1]}'])
def test_a_damaged_versions_file_is_refused_with_its_name(arts, tmp_path, text):
    onnx_art, _ = arts
    repo = tmp_path / "repo"
    (repo / "tiny").mkdir(parents=True)
    (repo / "tiny" / "versions.json").write_text(text)
    with pytest.raises(UsageError, match="versions.json"):
        write_triton_repo(onnx_art(False), None, repo, "tiny")


# ---- the encoded-image models: Python backend + ensemble ------------------------------------------


def _maps(m) -> dict:
    return dict(m)


@pytest.mark.parametrize("noise", [False, True], ids=["plain", "noise"])
def test_image_models_parse_and_chain_into_the_tensor_model(arts, tmp_path, noise):
    onnx_art, _ = arts
    names = [f"class {i}" for i in range(10)]
    write_triton_repo(onnx_art(noise, class_names=names), None, tmp_path / "repo", "tiny", serve_cfg=ServeConfig(instances=2), build_cfg=BuildConfig(max_batch=64))
    repo = tmp_path / "repo"
    tensor, pre, ens = parse(repo / "tiny" / "config.pbtxt"), parse(repo / "tiny_preprocess" / "config.pbtxt"), parse(repo / "tiny_image" / "config.pbtxt")
    string = model_config_pb2.DataType.Value("TYPE_STRING")
    assert pre.backend == "python" and pre.max_batch_size == 64 and pre.instance_group[0].count == 2
    assert [(t.name, t.data_type, list(t.dims)) for t in pre.input] == [("image_bytes", string, [1])]
    assert [(t.name, list(t.dims)) for t in pre.output] == [(t.name, list(t.dims)) for t in tensor.input]  # what the tensor model takes
    assert sorted(p.name for p in (repo / "tiny_preprocess" / "1").iterdir()) == ["gendd_imaging.py", "model.py", "preprocess.json"]
    recipe = json.loads((repo / "tiny_preprocess" / "1" / "preprocess.json").read_text())
    assert recipe["preprocess"] == SPEC and (recipe["noise"] or {}).get("tail") == (NOISE_TAIL if noise else None)

    assert ens.platform == "ensemble" and ens.max_batch_size == 64 and (repo / "tiny_image" / "1").is_dir()
    assert [(t.name, t.data_type, list(t.dims)) for t in ens.input] == [("image_bytes", string, [1])]
    from gendd_deploy.serve.protocol import ServedModel

    served = ServedModel.from_meta({"name": "tiny", "preprocess": SPEC}).encoded_variant()  # gendd serve's tiny_image
    assert served.name == ens.name and served.inputs == [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1, *ens.input[0].dims]}]
    assert [(t.name, list(t.dims), t.label_filename) for t in ens.output] == [("logits", [10], "labels.txt")]
    assert (repo / "tiny_image" / "labels.txt").read_text().splitlines() == names
    steps = list(ens.ensemble_scheduling.step)
    assert [(s.model_name, s.model_version) for s in steps] == [("tiny_preprocess", -1), ("tiny", -1)]
    # every step's input is the ensemble's input or an earlier step's output; every model input is fed
    available = {t.name for t in ens.input}
    configs = {"tiny_preprocess": pre, "tiny": tensor}
    for step in steps:
        cfg = configs[step.model_name]
        assert set(_maps(step.input_map)) == {t.name for t in cfg.input}
        assert set(_maps(step.input_map).values()) <= available
        assert set(_maps(step.output_map)) <= {t.name for t in cfg.output}
        available |= set(_maps(step.output_map).values())
    assert {t.name for t in ens.output} <= available
    doc = json.loads((repo / "tiny" / "versions.json").read_text())
    assert doc["versions"]["1"]["image_models"] == {"ensemble": "tiny_image", "preprocess": "tiny_preprocess"}


class _Tensor:
    """The part of triton_python_backend_utils.Tensor a model uses."""

    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Request:
    def __init__(self, *tensors):
        self.tensors = {t.name(): t for t in tensors}


class _Response:
    def __init__(self, output_tensors, error=None):
        self._outputs, self._error = list(output_tensors), error

    def output_tensors(self):
        return self._outputs

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error


class _Error:
    def __init__(self, message):
        self._message = message

    def message(self):
        return self._message


@pytest.fixture
def python_model(monkeypatch):
    """Load a written model.py as Triton's Python backend stub does, with the calls it makes of
    triton_python_backend_utils (Triton's own module exists only inside its container)."""
    utils = types.ModuleType("triton_python_backend_utils")
    utils.Tensor, utils.InferenceResponse, utils.TritonError = _Tensor, _Response, _Error
    utils.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)

    def load(version_dir: Path, config_path: Path):
        spec = importlib.util.spec_from_file_location("triton_model_under_test", version_dir / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        model.initialize({"model_config": json.dumps({"name": config_path.parent.name}), "model_version": version_dir.name, "model_repository": str(config_path.parent)})
        return model

    return load


def _real_images() -> dict[str, bytes]:
    """PNG and JPEG files as a camera or an editor writes them: the model's size, larger and
    off-square (resized, cropped), colour (converted to grey)."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:40, 0:29]
    photo = np.stack([(xx * 8) % 256, (yy * 6) % 256, ((xx + yy) * 3) % 256], axis=-1).astype(np.uint8)
    out = {}
    for name, img, fmt in [
        ("digit.png", Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L"), "PNG"),
        ("digit.jpg", Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L"), "JPEG"),
        ("photo.png", Image.fromarray(photo, "RGB"), "PNG"),
        ("photo.jpg", Image.fromarray(photo, "RGB"), "JPEG"),
        ("big.png", Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), "RGB"), "PNG"),
    ]:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[name] = buf.getvalue()
    return out


def test_python_backend_gives_what_gendd_serve_gives_on_png_and_jpeg(arts, tmp_path, python_model):
    from test_serve import call, image_request, logits_of, running

    from gendd_deploy.runtime.ort import OrtRunner
    from gendd_deploy.serve.protocol import ServedModel, decode_images

    onnx_art, _ = arts
    art = onnx_art(False, class_names=[f"c{i}" for i in range(10)])
    vdir = write_triton_repo(art, None, tmp_path / "repo", "tiny")
    model = python_model(tmp_path / "repo" / "tiny_preprocess" / "1", tmp_path / "repo" / "tiny_preprocess" / "config.pbtxt")
    files = _real_images()
    blobs = np.array(list(files.values()), dtype=np.object_).reshape(-1, 1)  # [batch, 1], as Triton hands it over
    (response,) = model.execute([_Request(_Tensor("image_bytes", blobs))])
    assert not response.has_error()
    (images,) = response.output_tensors()
    assert images.name() == "images" and images.as_numpy().dtype == np.float32 and images.as_numpy().shape == (len(files), 1, 8, 8)

    served = ServedModel.from_meta({"name": "tiny", "version": "1", "preprocess": SPEC, "class_names": [f"c{i}" for i in range(10)]})
    np.testing.assert_array_equal(images.as_numpy(), decode_images(served, list(files.values())))  # the very same tensor
    runner = OrtRunner(vdir / "model.onnx", providers=["CPUExecutionProvider"], intra_op_threads=1)
    triton_logits = runner.run(images.as_numpy())  # the ensemble's second step: the tensor model
    with running(runner, {"name": "tiny", "version": "1", "preprocess": SPEC, "class_names": [f"c{i}" for i in range(10)]}) as server:
        status, _, body = call(server.port, "POST", "/v2/models/tiny_image/infer", image_request(list(files.values())))
    assert status == 200, body
    np.testing.assert_array_equal(triton_logits, logits_of(body))


def test_python_backend_answers_a_bad_image_with_an_error_and_the_rest_of_the_batch(arts, tmp_path, python_model):
    onnx_art, _ = arts
    write_triton_repo(onnx_art(True), None, tmp_path / "repo", "tiny")
    model = python_model(tmp_path / "repo" / "tiny_preprocess" / "1", tmp_path / "repo" / "tiny_preprocess" / "config.pbtxt")
    good = np.array([_real_images()["digit.png"]] * 2, dtype=np.object_).reshape(-1, 1)
    bad = np.array([_real_images()["digit.png"], b"not an image"], dtype=np.object_).reshape(-1, 1)
    ok, refused = model.execute([_Request(_Tensor("image_bytes", good)), _Request(_Tensor("image_bytes", bad))])
    assert not ok.has_error() and [t.name() for t in ok.output_tensors()] == ["images", "noise"]
    assert ok.output_tensors()[1].as_numpy().shape == (2, *NOISE_TAIL)  # a sampler's fresh noise, per image
    assert refused.has_error() and "element 1: undecodable image" in refused.error().message()
