"""Write a Triton Inference Server model repository for the deployed model (`gendd export --triton DIR`).

    DIR/<model>/config.pbtxt        platform, max batch size, inputs / outputs, dynamic batching
    DIR/<model>/<N>/model.onnx      platform onnxruntime_onnx, or
    DIR/<model>/<N>/model.plan      platform tensorrt_plan, when an engine artifact is given
    DIR/<model>/versions.json       N -> the artifact (ref, fingerprint, sha256) it was copied from
    DIR/<model>/labels.txt          class names, one per line (the logits output's label_filename,
                                    so Triton's classification answers carry labels)

With a preprocessing recipe in the model's description (every export has one), two more models
take encoded images, so the same `image_bytes` request works against `gendd serve` and Triton:

    DIR/<model>_preprocess/config.pbtxt   Python backend: image_bytes BYTES [-1, 1] -> images
    DIR/<model>_preprocess/<N>/model.py   (gendd_deploy/triton_image_model.py), gendd_imaging.py
                                          (gendd_deploy/imaging.py, the code gendd serve runs),
                                          preprocess.json (the manifest's recipe, the pixel limits)
    DIR/<model>_image/config.pbtxt        ensemble: <model>_preprocess -> <model>, output logits
    DIR/<model>_image/<N>/                (empty: an ensemble's version folder)

Each export of a new artifact to the same DIR adds version N+1 and points config.pbtxt at the
newest model (Triton serves the latest version only); exporting the newest version again adds
nothing (it only refreshes config.pbtxt from the recipe). Queue and instance settings come from
[serve]: max_delay_ms, queue_size, instances. Inputs and outputs come from the model's description (spec.py); dims exclude
the batch dim. A noise input, when the sampler needs one, is documented in the config for clients.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from gendd_deploy import __version__, imaging
from gendd_deploy.artifacts import Artifact, sha256_file, verify_artifact
from gendd_deploy.errors import ArtifactError, UsageError
from gendd_deploy.runtime import registry
from gendd_deploy.spec import DeployedSpec, check_stamp

VERSIONS_FILE = "versions.json"
# The encoded-image model, as both gendd serve and the repository name it: '<name>_image', whose
# one input is image_bytes; Triton's preprocessing step is '<name>_preprocess'
PREPROCESS_SUFFIX, ENSEMBLE_SUFFIX = "_preprocess", "_image"
IMAGE_INPUT = "image_bytes"
PYTHON_MODEL = Path(__file__).with_name("triton_image_model.py")
LABELS_FILE = "labels.txt"  # one class name per line: Triton's classification labels
TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _dims(shape: list) -> list[int]:
    """Dims after the batch dim; a symbolic dim is -1 (variable) for Triton."""
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape[1:]]


def triton_tensor(name: str, data_type: str, dims: list[int], label_file: str | None = None) -> dict:
    """One ModelConfig input / output (JSON form): data_type is Triton's (TYPE_FP32, ...)."""
    return {"name": name, "data_type": data_type, "dims": [int(d) for d in dims], **({"label_filename": label_file} if label_file else {})}


def graph_tensor(t: dict, label_file: str | None = None) -> dict:
    """A graph tensor {name, dtype, shape} (spec.py) as a ModelConfig tensor."""
    dtype = TRITON_TYPES.get(t["dtype"])
    if dtype is None:
        raise UsageError(f"tensor '{t['name']}' has dtype {t['dtype']}, which has no Triton type")
    return triton_tensor(t["name"], dtype, _dims(t["shape"]), label_file)


def model_config(
    name: str,
    platform: str,
    inputs: list[dict],
    outputs: list[dict],
    *,
    max_batch: int,
    max_delay_us: int,
    preferred: list[int] | None = None,
    queue_size: int | None = None,
    version_policy: dict | None = None,
    instances: int | None = None,
    gpu: bool = False,
) -> dict:
    """Triton's ModelConfig in its JSON form: the one description of a served model's config,
    which `render_config` writes as config.pbtxt and `gendd serve` answers at /config."""
    batching: dict = {}
    if preferred:
        batching["preferred_batch_size"] = list(preferred)
    batching["max_queue_delay_microseconds"] = int(max_delay_us)
    if queue_size:
        batching["default_queue_policy"] = {"max_queue_size": int(queue_size)}
    cfg: dict = {"name": name, "platform": platform, "max_batch_size": int(max_batch), "input": inputs, "output": outputs, "dynamic_batching": batching}
    cfg["version_policy"] = version_policy or {"latest": {"num_versions": 1}}
    if instances is not None:
        cfg["instance_group"] = [{**({"kind": "KIND_GPU"} if gpu else {}), "count": int(instances)}]
    return cfg


def _tensor_block(t: dict, comment: str | None = None) -> str:
    dims = ", ".join(str(d) for d in t["dims"])
    head = "".join(f"  # {line}\n" for line in (comment or "").splitlines())
    labels = f'\n    label_filename: "{t["label_filename"]}"' if t.get("label_filename") else ""
    return f'{head}  {{\n    name: "{t["name"]}"\n    data_type: {t["data_type"]}\n    dims: [ {dims} ]{labels}\n  }}'


def _noise_comment(noise: dict, tail: list[int]) -> str:
    shape = ", ".join(str(d) for d in tail)
    return (
        f"{noise['name']}: the sampler's noise, standard normal float32 of shape [{shape}] per image\n"
        f"(request shape [batch, {shape}]). Draw it fresh for every request, e.g.\n"
        f"numpy.random.default_rng().standard_normal((batch, {shape}), dtype=numpy.float32);\n"
        "gendd's runners draw it from a seed with NumPy's Philox generator (gendd_deploy.runtime.base.make_noise)."
    )


def render_config(
    model_name: str,
    platform: str,
    io: dict,
    *,
    max_batch: int,
    preferred: list[int],
    max_delay_us: int,
    queue_size: int | None = None,
    instances: int = 1,
    label_file: str | None = None,
    noise_tail: list[int] | None = None,
    header: str = "",
) -> str:
    """config.pbtxt text (protobuf text format of Triton's ModelConfig, as `model_config` builds
    it) with explanatory comments. `label_file` names the class-names file of the first output
    (Triton's classification labels)."""
    gpu = platform == registry.get("tensorrt").triton_platform
    cfg = model_config(
        model_name, platform,
        [graph_tensor(t) for t in io["inputs"]],
        [graph_tensor(t, label_file if k == 0 else None) for k, t in enumerate(io["outputs"])],
        max_batch=max_batch, max_delay_us=max_delay_us, preferred=preferred, queue_size=queue_size, instances=instances, gpu=gpu,
    )
    blocks = [_tensor_block(t, _noise_comment(io["inputs"][k], noise_tail) if noise_tail is not None and k == 1 else None) for k, t in enumerate(cfg["input"])]
    batching = cfg["dynamic_batching"]
    lines = [header.rstrip("\n")] if header else []
    lines += [
        f'name: "{cfg["name"]}"',
        f'platform: "{cfg["platform"]}"',
        f"max_batch_size: {cfg['max_batch_size']}",
        "# serve only the newest version; older ones stay on disk for rollback (versions.json maps them)",
        f"version_policy: {{ latest: {{ num_versions: {cfg['version_policy']['latest']['num_versions']} }} }}",
        "input [\n" + ",\n".join(blocks) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(t) for t in cfg["output"]) + "\n]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(str(b) for b in batching.get('preferred_batch_size', []))} ]",
        f"  max_queue_delay_microseconds: {batching['max_queue_delay_microseconds']}",
        *([f"  default_queue_policy {{ max_queue_size: {batching['default_queue_policy']['max_queue_size']} }}"] if "default_queue_policy" in batching else []),
        "}",
    ]
    group = cfg["instance_group"][0]
    if gpu:
        lines += ["# a TensorRT plan runs on the GPU model it was built for", f"instance_group [ {{ kind: {group['kind']}, count: {group['count']} }} ]"]
    else:
        lines += [f"instance_group [ {{ count: {group['count']} }} ]"]
    return "\n".join(lines) + "\n"


def _next_version(model_dir: Path, versions: dict) -> int:
    nums = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    nums += [int(k) for k in versions]
    return max(nums, default=0) + 1


def _unchanged_latest(model_dir: Path, versions: dict, fingerprint: str, filename: str) -> int | None:
    """The newest version's number when it already holds this artifact, intact; else None."""
    if not versions:
        return None
    n = max(int(k) for k in versions)
    entry, path = versions[str(n)], model_dir / str(n) / filename
    if entry.get("fingerprint") == fingerprint and entry.get("file") == filename and path.is_file() and sha256_file(path) == entry.get("sha256"):
        return n
    return None


def _manifest_sha256(src: Path) -> str | None:
    """The sha256 the artifact's manifest records for `src` (None when it records none)."""
    try:
        files = json.loads((src.parent / "manifest.json").read_text()).get("files", [])
    except (OSError, ValueError):
        return None
    return next((f.get("sha256") for f in files if isinstance(f, dict) and f.get("path") == src.name), None)


def _add_version(model_dir: Path, versions: dict, src: Path, filename: str) -> int:
    """Copy `src` into the next version folder; staged beside it and renamed, so Triton never
    sees half a model. Returns the version number."""
    staging = model_dir / f".tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        shutil.copyfile(src, staging / filename)
        expected = _manifest_sha256(src)
        if expected is not None and sha256_file(staging / filename) != expected:  # changed while being copied
            raise ArtifactError(f"{src} changed while it was copied into {model_dir}; nothing was added, export again")
        for _ in range(100):
            n = _next_version(model_dir, versions)
            try:
                os.rename(staging, model_dir / str(n))
                return n
            except OSError:
                if (model_dir / str(n)).exists():  # another export took this number; take the next
                    continue
                raise
        raise UsageError(f"could not allocate a version folder in {model_dir}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_versions(vfile: Path) -> dict:
    """versions.json's {"N": {...}} map; a damaged file is refused with its name and the fix."""
    if not vfile.is_file():
        return {}
    fix = f"repair or delete {vfile} (it lists the versions this tool added; the version folders stay)"
    try:
        doc = json.loads(vfile.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{vfile} is not valid JSON ({e}); {fix}") from None
    versions = doc.get("versions", {}) if isinstance(doc, dict) else None
    if not isinstance(versions, dict) or not all(isinstance(k, str) and k.isdigit() and len(k) <= 9 and isinstance(v, dict) for k, v in versions.items()):
        raise UsageError(f"{vfile} does not hold a {{\"versions\": {{\"<number>\": {{...}}}}}} map; {fix}")
    return versions


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _replace_folder(folder: Path, files: dict[str, bytes]) -> None:
    """`folder` holding exactly `files`, written beside it and renamed into place, so Triton never
    loads half a model; left alone when it already holds them."""
    if folder.is_dir() and sorted(p.name for p in folder.iterdir()) == sorted(files) and all((folder / n).read_bytes() == b for n, b in files.items()):
        return
    staging = folder.with_name(f".tmp-{uuid.uuid4().hex[:12]}")
    old = folder.with_name(f".old-{uuid.uuid4().hex[:12]}")
    staging.mkdir(parents=True)
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if folder.exists():
            os.rename(folder, old)
        os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _config_text(header: str, lines: list[str]) -> str:
    return header + "\n".join(lines) + "\n"


def write_image_models(root: Path, model_name: str, n: int, spec: DeployedSpec, *, max_batch: int, instances: int = 1, label_file: str | None = None) -> None:
    """The encoded-image models beside the tensor model `model_name` (version `n`): the Python
    backend that preprocesses, and the ensemble `<model>_image` that a client calls."""
    pre, ens = model_name + PREPROCESS_SUFFIX, model_name + ENSEMBLE_SUFFIX
    c, h, w = (int(d) for d in spec.images.shape[1:])
    noise = spec.noise
    recipe = {
        "preprocess": spec.preprocess,
        "input": IMAGE_INPUT,
        "output": spec.images.name,
        "max_image_pixels": imaging.MAX_IMAGE_PIXELS,
        "max_request_pixels": imaging.MAX_REQUEST_PIXELS,
        "noise": {"name": noise.name, "tail": list(spec.noise_tail)} if noise is not None else None,
    }
    _replace_folder(root / pre / str(n), {
        "model.py": PYTHON_MODEL.read_bytes(),
        "gendd_imaging.py": Path(imaging.__file__).read_bytes(),
        "preprocess.json": json.dumps(recipe, indent=2).encode(),
    })
    image_in = f'  {{ name: "{IMAGE_INPUT}", data_type: TYPE_STRING, dims: [ 1 ] }}'
    outs = [f'  {{ name: "{spec.images.name}", data_type: TYPE_FP32, dims: [ {c}, {h}, {w} ] }}']
    if noise is not None:
        outs.append(f'  {{ name: "{noise.name}", data_type: TYPE_FP32, dims: [ {", ".join(str(d) for d in spec.noise_tail)} ] }}')
    latest = "version_policy: { latest: { num_versions: 1 } }"
    _write_atomic(root / pre / "config.pbtxt", _config_text(
        f"# Encoded images (PNG, JPEG, ...) -> the input of '{model_name}', preprocessed as in training; written by gendd {__version__}.\n"
        "# Its version folder holds model.py, gendd_imaging.py (NumPy + Pillow) and preprocess.json (the recipe).\n",
        [f'name: "{pre}"', 'backend: "python"', f"max_batch_size: {max_batch}", latest,
         "input [\n" + image_in + "\n]", "output [\n" + ",\n".join(outs) + "\n]",
         f"instance_group [ {{ kind: KIND_CPU, count: {instances} }} ]"],
    ))
    (root / ens / str(n)).mkdir(parents=True, exist_ok=True)  # an ensemble has no file, only a version folder
    k = spec.num_classes if spec.num_classes is not None else -1
    labels = f', label_filename: "{label_file}"' if label_file else ""
    if label_file:
        _write_atomic(root / ens / label_file, "".join(f"{name}\n" for name in spec.class_names))
    first = [f'      input_map {{ key: "{IMAGE_INPUT}", value: "{IMAGE_INPUT}" }}', f'      output_map {{ key: "{spec.images.name}", value: "{spec.images.name}" }}']
    second = [f'      input_map {{ key: "{spec.images.name}", value: "{spec.images.name}" }}']
    if noise is not None:
        first.append(f'      output_map {{ key: "{noise.name}", value: "{noise.name}" }}')
        second.append(f'      input_map {{ key: "{noise.name}", value: "{noise.name}" }}')
    second.append(f'      output_map {{ key: "{spec.logits.name}", value: "{spec.logits.name}" }}')

    def step(model: str, maps: list[str]) -> str:
        return "    {\n" + f'      model_name: "{model}"\n      model_version: -1\n' + "\n".join(maps) + "\n    }"

    _write_atomic(root / ens / "config.pbtxt", _config_text(
        f"# '{ens}': encoded images -> logits, as gendd serve's '{ens}' answers them: {pre} (preprocessing) then {model_name}.\n",
        [f'name: "{ens}"', 'platform: "ensemble"', f"max_batch_size: {max_batch}", latest,
         "input [\n" + image_in + "\n]",
         f'output [\n  {{ name: "{spec.logits.name}", data_type: TYPE_FP32, dims: [ {k} ]{labels} }}\n]',
         "ensemble_scheduling {\n  step [\n" + step(pre, first) + ",\n" + step(model_name, second) + "\n  ]\n}"],
    ))


def _field(cfg: Any, name: str, default):
    return getattr(cfg, name, default) if cfg is not None else default


def write_triton_repo(
    onnx_art: Artifact,
    engine_art: Artifact | None,
    out_dir: str | Path,
    model_name: str,
    *,
    serve_cfg: Any = None,
    build_cfg: Any = None,
    runtime: str | None = None,
) -> Path:
    """Add one version of the model to the Triton repository `out_dir`; return the version folder.

    The file copied and its Triton platform come from the runtime registry: the engine's runtime
    when `engine_art` is given, else the ONNX artifact's, or `runtime` (another registered runtime
    that runs the same kind of artifact). The preprocessing recorded for clients (versions.json) and
    run by the encoded-image models is the model description's, from the manifest.
    """
    if not _NAME_RE.match(model_name):
        raise UsageError(f"Triton model name '{model_name}' may use only letters, digits, '_', '.', '-'; set [serve] model_name")
    for art in (onnx_art, engine_art):  # nothing is copied out of the store unchecked
        problems = verify_artifact(art) if art is not None else []
        if problems:
            raise ArtifactError(f"{problems[0]}; nothing was written to {out_dir}. Rebuild it with 'gendd run --rebuild-corrupt' (or delete {art.path} and export again)")
    spec = DeployedSpec.from_manifest(onnx_art.manifest.get("info", {}), onnx_art.ref)
    check_stamp(onnx_art.file("model.onnx"), spec, onnx_art.ref)  # the graph Triton gets says what it is, as its manifest does
    io = spec.io()
    source = engine_art if engine_art is not None else onnx_art
    entry = registry.get(runtime) if runtime else registry.for_stage(source.stage)
    if entry is None or entry.stage != source.stage:
        raise UsageError(f"runtime {runtime or '(none)'} does not run {source.stage} artifacts such as {source.ref}; Triton serves what a runtime runs")
    platform, filename = entry.triton_platform, entry.file
    src = source.file(filename)
    if engine_art is not None:
        info = engine_art.manifest.get("info", {})
        if info.get("onnx", {}).get("fingerprint") not in (None, onnx_art.fingerprint):
            raise UsageError(f"engine {engine_art.ref} was built from another ONNX artifact than {onnx_art.ref}; rebuild it with 'gendd build'")
        prof = info["profile"][io["inputs"][0]["name"]]
        lo, opt, hi = prof["min"][0], prof["opt"][0], prof["max"][0]
        if lo > 1:
            raise UsageError(f"engine {engine_art.ref} has min batch {lo}; Triton sends batches from 1, so rebuild with --set build.min_batch=1")
    else:
        opt, hi = _field(build_cfg, "opt_batch", 32), _field(build_cfg, "max_batch", 256)
    max_delay_us = int(round(float(_field(serve_cfg, "max_delay_ms", 5.0)) * 1000))
    preferred = sorted({b for b in (opt, hi) if 1 <= b <= hi})

    tail = spec.noise_tail

    root = Path(out_dir)
    model_dir = root / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    vfile = model_dir / VERSIONS_FILE
    versions = _read_versions(vfile)

    same = _unchanged_latest(model_dir, versions, source.fingerprint, filename)
    if same is not None:  # re-exporting the newest version: nothing new to serve
        n = same
    else:
        n = _add_version(model_dir, versions, src, filename)

    class_names = spec.class_names
    label_file = LABELS_FILE if class_names else None
    if class_names:
        _write_atomic(model_dir / LABELS_FILE, "".join(f"{c}\n" for c in class_names))

    refs = f"{onnx_art.ref}" + (f" + {engine_art.ref}" if engine_art is not None else "")
    header = f"# Triton model configuration for '{model_name}', written by gendd {__version__} from {refs}.\n"
    if engine_art is not None:
        info = engine_art.manifest["info"]
        header += (
            f"# Engine built with TensorRT {info.get('tensorrt')} (CUDA {info.get('cuda')}) on {info.get('gpu')} "
            f"(compute capability {info.get('gpu_capability')}), precision {info.get('precision')}:\n"
            "# serve it with a tritonserver container that ships the same TensorRT version, on the same GPU model.\n"
        )
    preprocess = spec.preprocess
    see = f" (versions.json 'preprocess' has the recipe; '{model_name}{ENSEMBLE_SUFFIX}' takes encoded images)" if preprocess else ""
    header += f"# Inputs are float32 NCHW images normalized as in training{see}; output: logits.\n"
    text = render_config(
        model_name, platform, io, max_batch=hi, preferred=preferred, max_delay_us=max_delay_us,
        queue_size=_field(serve_cfg, "queue_size", None), instances=_field(serve_cfg, "instances", 1),
        label_file=label_file, noise_tail=list(tail) if tail else None, header=header,
    )
    _write_atomic(model_dir / "config.pbtxt", text)
    image_models = None
    if spec.preprocess:
        write_image_models(root, model_name, n, spec, max_batch=hi, instances=_field(serve_cfg, "instances", 1), label_file=label_file)
        image_models = {"ensemble": model_name + ENSEMBLE_SUFFIX, "preprocess": model_name + PREPROCESS_SUFFIX}

    created = versions.get(str(n), {}).get("created") if same is not None else None
    versions[str(n)] = {
        "platform": platform,
        "file": filename,
        "artifact": source.ref,
        "fingerprint": source.fingerprint,
        "sha256": sha256_file(model_dir / str(n) / filename),
        "onnx": {"ref": onnx_art.ref, "fingerprint": onnx_art.fingerprint},
        "engine": ({"ref": engine_art.ref, "fingerprint": engine_art.fingerprint,
                    **{k: engine_art.manifest["info"].get(k) for k in ("tensorrt", "tensorrt_cuda", "cuda", "gpu", "gpu_capability", "precision")}}
                   if engine_art is not None else None),
        "needs_noise": spec.needs_noise,
        "noise_shape_tail": list(tail) if tail else None,
        "preprocess": preprocess,
        "image_models": image_models,
        "created": created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    doc = {"model": model_name, "latest": n, "versions": dict(sorted(versions.items(), key=lambda kv: int(kv[0])))}
    _write_atomic(vfile, json.dumps(doc, indent=2))
    return model_dir / str(n)
