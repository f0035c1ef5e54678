"""`DeployedSpec`: the one description of a deployed model that every consumer reads.

Export writes it once, into the onnx / aoti manifest under `info.deployed`; the build copies it
unchanged into the engine's manifest; runners, the server, the Triton writer and bench read it
from there (`DeployedSpec.from_manifest`) or, for a bare file with no manifest, from the file's own
inputs and outputs (`DeployedSpec.from_io`). Nothing else works out names, shapes or the noise input.

    spec = DeployedSpec.from_manifest(art.manifest["info"])
    spec.images.name, spec.logits.name     # "images", "logits"
    spec.noise_tail                        # (steps+1, draws, n, d) of one image's noise, or None
    spec.preprocess, spec.class_names      # what a client needs to send images and read classes

The rule that says which input is the noise lives here and nowhere else: a graph's first input is
the images, its second (when present) the sampler's noise, its first output the logits.

Export also stamps the spec and the lineage (the student / sampler artifacts it came from) into
the ONNX file's metadata_props (`stamp_onnx`), so a copied file still says what it is
(`onnx_metadata`); serving and the Triton writer check the stamp against the manifest (`check_stamp`).

This module imports neither torch nor onnx at import time, so a light serving path can read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gendd_deploy.errors import ArtifactError

SPEC_KEY = "deployed"  # where the spec lives in a manifest's info
SPEC_VERSION = 1
NOISE_DOC = "standard normal float32 from torch.Generator().manual_seed(seed), shape (batch, *noise tail); any fresh standard normal draw serves"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, dtype and shape (dim 0 is the batch, named "batch")."""

    name: str
    dtype: str = "float32"
    shape: tuple = ()

    @property
    def tail(self) -> tuple:
        """The shape past the batch dim (a symbolic dim stays a string or None)."""
        return tuple(self.shape[1:])

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Any) -> "TensorSpec":
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise ValueError(f"a tensor entry needs a name, got {d!r}")
        shape = d.get("shape") or []
        if not isinstance(shape, (list, tuple)):
            raise ValueError(f"tensor '{d['name']}' has a shape that is not a list: {shape!r}")
        return cls(d["name"], str(d.get("dtype") or "float32"), tuple(shape))


@dataclass(frozen=True)
class DeployedSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocess: dict | None = None  # data.preprocess: size, channels, mean, std (None: tensors only)
    class_names: tuple[str, ...] | None = None
    method: str | None = None  # gendd, kd or ce
    readout: str | None = None  # what calibrate chose, as a label ("fit_ce", "ddim-8 x1 ...", "probe")
    setting: dict | None = None  # the chosen SamplerSetting as a dict
    fixed_noise_seed: int | None = None
    max_batch: int | None = None

    def __post_init__(self):
        if not self.inputs or not self.outputs:
            raise ValueError("a deployed model has at least one input (images) and one output (logits)")
        if self.noise is not None and not all(isinstance(d, int) and d > 0 for d in self.noise.tail):
            raise ValueError(f"the noise input '{self.noise.name}' needs a fixed shape past the batch dim, got {list(self.noise.shape)}")

    # ---- the facts every consumer asks for

    @property
    def images(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def noise(self) -> TensorSpec | None:
        """The sampler's noise input (the second input), None for a noise-free model."""
        return self.inputs[1] if len(self.inputs) > 1 else None

    @property
    def logits(self) -> TensorSpec:
        return self.outputs[0]

    @property
    def needs_noise(self) -> bool:
        return self.noise is not None

    @property
    def noise_tail(self) -> tuple[int, ...] | None:
        """One image's noise shape (steps+1, draws, n, d), None when the model takes no noise."""
        return tuple(self.noise.tail) if self.noise is not None else None

    @property
    def num_classes(self) -> int | None:
        tail = self.logits.tail
        return tail[0] if tail and isinstance(tail[0], int) and tail[0] > 0 else None

    def io(self) -> dict:
        """{"inputs": [...], "outputs": [...]} as onnx_io writes it (for TensorRT profiles, Triton)."""
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    # ---- construction

    @classmethod
    def from_io(cls, io: dict, **fields) -> "DeployedSpec":
        """From an io description {"inputs": [...], "outputs": [...]} of entries {name, dtype, shape}
        (spec.onnx_io, an AOTInductor package's metadata, a TensorRT engine's tensors)."""
        try:
            inputs = tuple(TensorSpec.from_dict(t) for t in io.get("inputs") or [])
            outputs = tuple(TensorSpec.from_dict(t) for t in io.get("outputs") or [])
        except (AttributeError, ValueError) as e:
            raise ArtifactError(f"unreadable input / output description: {e}") from None
        return cls(inputs, outputs, **fields)

    def to_manifest(self) -> dict:
        return {
            "version": SPEC_VERSION,
            **self.io(),
            "noise": {"name": self.noise.name, "tail": list(self.noise_tail), "distribution": NOISE_DOC} if self.noise else None,
            "preprocess": self.preprocess,
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "method": self.method,
            "readout": self.readout,
            "setting": self.setting,
            "fixed_noise_seed": self.fixed_noise_seed,
            "max_batch": self.max_batch,
        }

    @classmethod
    def from_manifest(cls, info: dict, ref: str = "the artifact") -> "DeployedSpec":
        """From a manifest's info: `info.deployed` as export writes it, or (artifacts exported
        before the spec existed) the io / preprocess / class_names / setting_label keys they carry."""
        doc = info.get(SPEC_KEY) if isinstance(info, dict) else None
        fix = f"re-export it with 'gendd export' (delete {ref} first)"
        if doc is None:
            doc = _legacy(info)
            if doc is None:
                raise ArtifactError(f"{ref} does not describe its deployed model (no info.{SPEC_KEY}); {fix}")
        if not isinstance(doc, dict):
            raise ArtifactError(f"{ref}: info.{SPEC_KEY} is not an object; {fix}")
        try:
            names = doc.get("class_names")
            spec = cls.from_io(
                doc,
                preprocess=doc.get("preprocess"),
                class_names=tuple(str(c) for c in names) if names is not None else None,
                method=doc.get("method"),
                readout=doc.get("readout"),
                setting=doc.get("setting"),
                fixed_noise_seed=doc.get("fixed_noise_seed"),
                max_batch=doc.get("max_batch"),
            )
        except (ValueError, TypeError) as e:
            raise ArtifactError(f"{ref}: info.{SPEC_KEY} is malformed ({e}); {fix}") from None
        noise = doc.get("noise")
        if noise is not None and (not isinstance(noise, dict) or list(spec.noise_tail or ()) != list(noise.get("tail") or ())):
            raise ArtifactError(f"{ref}: info.{SPEC_KEY} names a noise input {noise!r} its inputs do not have; {fix}")
        return spec


def _legacy(info: dict) -> dict | None:
    """The spec of a manifest written before info.deployed existed (its io and loose keys)."""
    io = info.get("io") if isinstance(info, dict) else None
    if not isinstance(io, dict) or not io.get("inputs"):
        return None
    inputs = list(io["inputs"])
    if not info.get("needs_noise", len(inputs) > 1):
        inputs = inputs[:1]
    elif len(inputs) > 1 and info.get("noise_shape_tail"):
        inputs[1] = {**inputs[1], "shape": ["batch", *info["noise_shape_tail"]]}
    return {
        "inputs": inputs,
        "outputs": io.get("outputs") or [],
        "preprocess": info.get("preprocess"),
        "class_names": info.get("class_names"),
        "method": info.get("method"),
        "readout": info.get("setting_label"),
        "setting": info.get("setting"),
        "fixed_noise_seed": info.get("fixed_noise_seed"),
        "max_batch": info.get("max_batch"),
    }


# ---- reading io from files ----------------------------------------------------------------------

_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 6: "int32", 7: "int64", 9: "bool", 2: "uint8", 3: "int8"}


def onnx_io(path: str | Path, model=None) -> dict:
    """{"inputs": [...], "outputs": [...]} of an ONNX graph (a file, or a loaded ModelProto as
    `model`), each entry {name, dtype, shape}: a dim is an int when fixed, else its symbol
    ("batch") or None. Initializers listed as graph inputs (old exporters) are not inputs."""
    if model is None:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}

    def entry(v) -> dict:
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        return {"name": v.name, "dtype": _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)), "shape": dims}

    return {"inputs": [entry(v) for v in model.graph.input if v.name not in inits], "outputs": [entry(v) for v in model.graph.output]}


# ---- the description inside the ONNX file ------------------------------------------------------

METADATA_KEY = "gendd.deployed"  # ONNX metadata_props key: the spec as the manifest holds it, as JSON
LINEAGE_KEY = "gendd.lineage"  # the artifacts (stage, version, fingerprint) the graph was exported from


def stamp_onnx(path: str | Path, spec: DeployedSpec, lineage: list[dict]) -> None:
    """Write the spec (class names, preprocessing, read-out, inputs / outputs) and the lineage into
    the ONNX file's metadata_props, so the file says what it is without its manifest."""
    import onnx

    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if p.key not in (METADATA_KEY, LINEAGE_KEY)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in ((METADATA_KEY, spec.to_manifest()), (LINEAGE_KEY, lineage)):
        model.metadata_props.add(key=key, value=json.dumps(value, sort_keys=True))
    onnx.save(model, str(path))


def onnx_metadata(path: str | Path) -> tuple[DeployedSpec | None, list[dict] | None]:
    """(spec, lineage) read back from an ONNX file's metadata_props; (None, None) when unstamped."""
    import onnx

    return stamp_from_props({p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}, str(path))


def stamp_from_props(props: dict[str, str], ref: str) -> tuple[DeployedSpec | None, list[dict] | None]:
    """(spec, lineage) from metadata_props as a dict (onnx's, or an ONNX Runtime session's
    custom_metadata_map, which needs no second parse of the file); (None, None) when unstamped."""
    if METADATA_KEY not in props:
        return None, None
    try:
        spec = DeployedSpec.from_manifest({SPEC_KEY: json.loads(props[METADATA_KEY])}, ref)
        lineage = json.loads(props.get(LINEAGE_KEY, "null"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{ref}: unreadable {METADATA_KEY} metadata ({e}); re-export it with 'gendd export'") from None
    return spec, lineage


def check_stamp(path: str | Path, spec: DeployedSpec, ref: str, *, props: dict[str, str] | None = None) -> None:
    """The ONNX file's own description must be the manifest's (a file swapped in from another
    model is refused); unstamped files (exported before stamping) pass. `props`: the file's
    metadata_props when already read (an ONNX Runtime session has them), else read from `path`."""
    stamped, _ = stamp_from_props(props, ref) if props is not None else onnx_metadata(path)
    if stamped is not None and stamped.to_manifest() != spec.to_manifest():
        diff = sorted(k for k, v in stamped.to_manifest().items() if spec.to_manifest().get(k) != v)
        raise ArtifactError(f"{ref}: the ONNX file describes another model than its manifest (differs in {', '.join(diff)}); re-export it with 'gendd export'")
