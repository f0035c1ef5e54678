"""Pipeline recipes: one pydantic model per stage section, loaded from TOML.

A recipe is a TOML file in `pipelines/`; every section is optional and falls back to the defaults
below. Unknown keys and bad values are refused with the key, the file and the fix. A CLI flag with
the same name as a field overrides it (`--num-steps 4` <-> `num_steps = 4`), and `--set
section.key=value` reaches any field of any section.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gendd_deploy.errors import UsageError

DEFAULT_PIPELINE = Path("pipelines/quickstart.toml")
# the recipes ship inside the package (the checkout's pipelines/ links here), so `gendd run` works in any folder
PACKAGED_PIPELINES = Path(__file__).resolve().parent / "pipelines"


def packaged_recipes() -> list[str]:
    return sorted(p.stem for p in PACKAGED_PIPELINES.glob("*.toml"))


def resolve_recipe(path: str | Path) -> Path:
    """The recipe file `path` names: the file itself when it exists, else a recipe shipped with the
    package, named as `pipelines/<name>.toml`, `<name>.toml` or `<name>`."""
    p = Path(path)
    if p.is_file():
        return p
    packaged = PACKAGED_PIPELINES / (p.name if p.suffix == ".toml" else f"{p.name}.toml")
    if (p.parent in (Path("."), Path("pipelines"))) and packaged.is_file():
        return packaged
    hint = "" if p.suffix in (".toml", "") else " (recipes are .toml files)"
    raise UsageError(
        f"recipe {p} not found{hint}; pass an existing file with -p/--pipeline, or a shipped recipe by name: "
        + ", ".join(packaged_recipes())
    )
MAX_OPSET = 23  # the newest opset torch's ONNX exporters write


# names that become folder names or URL segments: letters, digits, '_', '.', '-', not starting
# with '.' (so never '.' or '..'), at most 100 characters
SAFE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$"


class Section(BaseModel):
    # every float finite: lr = inf would train to garbage and publish it
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class PipelineConfig(Section):
    name: str = Field("quickstart", pattern=SAFE_NAME, description="folder name under the artifact root (letters, digits, '_', '.', '-'; not starting with '.')")
    seed: int = Field(0, description="seed for model init, shuffling and augmentation")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when present")


class DataConfig(Section):
    source: Literal["digits", "fashion_mnist", "cifar100", "imagefolder"] = "digits"
    root: str | None = Field(None, description="data folder; each source has a default")
    image_size: int | None = Field(None, gt=0, description="resize to this side; imagefolder needs it")
    calib_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="share of train held out for calibration")
    split_seed: int = Field(0, description="seed of the train / calibration split")
    augment: Literal["none", "crop", "crop_flip", "rrc_flip"] = Field(
        "none", description="training augmentation: pad+crop, pad+crop+flip, random-resized-crop+flip"
    )
    crop_padding: int = Field(2, ge=0, description="padding (pixels) for crop augmentation")
    train_limit: int | None = Field(None, gt=0, description="use only the first N training images")
    test_limit: int | None = Field(None, gt=0, description="use only the first N test images")
    imbalance_factor: float | None = Field(
        None, ge=1, description="long-tailed training data: class c keeps n_max * factor^(-c/(C-1)) images (test unchanged)"
    )
    eval_batch_size: int = Field(256, gt=0)
    loader_workers: int = Field(0, ge=0, description="processes decoding imagefolder files ahead of training (same batches, same results)")


class TeacherConfig(Section):
    mode: Literal["train", "load"] = Field("train", description="train on the data, or load a checkpoint")
    model: str = Field("resnet18", description="timm model name")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")
    small_input: bool = Field(False, description="3x3 stride-1 stem, no max-pool: for 8x8 to 32x32 inputs")
    checkpoint: str | None = Field(None, description="state_dict file for mode = 'load'")
    pretrained: bool = Field(False, description="timm pretrained weights (must already be in the local cache)")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    zero_init_last: bool = Field(False, description="timm's zero init of each residual branch's last BN (off: trains better from scratch)")


class CacheConfig(Section):
    enabled: bool = Field(True, description="distill reads the cache when true, else runs the teacher online")
    views: int = Field(1, ge=1, description="augmented views per training image (1 when augment = 'none')")
    batch_size: int = Field(256, gt=0)
    dtype: Literal["float16", "float32"] = "float16"


class DistillConfig(Section):
    method: Literal["gendd", "kd", "ce"] = "gendd"
    labels: bool = Field(True, description="false = unlabelled distillation (gendd with smooth = 0, kd with KL only)")
    student: str = Field("resnet18", description="timm model name")
    student_kwargs: dict[str, Any] = Field(default_factory=dict)
    small_input: bool = False
    zero_init_last: bool = Field(False, description="timm's zero init of each residual branch's last BN (off: trains better from scratch)")
    seed: int | None = Field(None, description="student seed (init, order, augmentation); default: [pipeline] seed")
    train_limit: int | None = Field(None, gt=0, description="distil on the first N training images only (the teacher and cache keep all)")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of the training steps spent on the linear LR warm-up (the authors: 10 of 100 ImageNet epochs)"
    )
    beta1: float = 0.9
    beta2_start: float = Field(0.95, gt=0, lt=1, description="AdamW beta2 rises on a cosine to beta2_end")
    beta2_end: float = Field(0.999, gt=0, lt=1)
    stage1_epochs: int = Field(0, ge=0, description="warm-up through the frozen teacher fc before GenDD")
    # GenDD head and loss
    head_width: int = Field(1024, gt=0)
    head_depth: int = Field(3, ge=1)
    token_dim: int = Field(64, gt=0)
    smooth: float = Field(0.9, ge=0, le=1, description="distribution contraction lam")
    mixup_beta: float = Field(1.0, ge=0, description="feature mixup Beta(beta, beta); 0 = off")
    cfg_drop: float = Field(0.2, ge=0, lt=1, description="share of rows trained unconditionally")
    diffusion_batch_mul: int = Field(10, ge=1, description="K: each row repeated with fresh t and noise")
    train_timesteps: int = Field(1000, ge=10)
    probe_ce: bool = Field(True, description="detached linear-probe CE on the student's fc")
    # KD
    kd_temperature: float = Field(4.0, gt=0)
    kd_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    # evaluation with the published sampler
    eval_sampler: Literal["ddpm", "ddim"] = "ddpm"
    eval_steps: int = Field(64, ge=1)
    eval_draws: int = Field(5, ge=1)
    eval_guidance: float = Field(2.0, ge=0)
    eval_temperature: float = Field(1.0, ge=0)
    eval_limit: int | None = Field(None, gt=0, description="test images for the (costly) published sampler")
    eval_published: bool = Field(
        True, description="score the published sampler (as the authors run it, and with an alpha_bar floor) on the test images; costly"
    )
    # runtime
    use_cache: bool = Field(True, description="read teacher features from the cache artifact")
    amp: bool = Field(True, description="bf16 autocast on CUDA")
    channels_last: bool = True
    compile: bool = Field(False, description="torch.compile the student on CUDA")

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if self.beta2_end < self.beta2_start:
            raise ValueError("beta2_end must be >= beta2_start")
        return self


PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class CalibrateConfig(Section):
    samplers: list[Literal["ddpm", "ddim"]] = Field(default_factory=lambda: ["ddpm", "ddim"], min_length=1)
    steps: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64], min_length=1, description="sampler steps (each <= [distill] train_timesteps)")
    draws: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 5], min_length=1)
    guidance: list[NonNegativeFloat] = Field(default_factory=lambda: [1.0, 2.0], min_length=1)
    temperatures: list[NonNegativeFloat] = Field(default_factory=lambda: [0.0, 1.0], min_length=1)
    noise_modes: list[Literal["fresh", "fixed", "zero"]] = Field(default_factory=lambda: ["fresh", "fixed", "zero"], min_length=1)
    t_starts: list[NonNegativeInt] = Field(
        default_factory=lambda: [999, 600, 300], min_length=1, description="first timestep of few-step samplers (each < [distill] train_timesteps)"
    )
    tolerance: float = Field(
        0.5, ge=0,
        description="a cheaper setting is kept only when it is shown, with `confidence`, at most this many top-1 points worse than the best "
        "(the lower end of its paired bootstrap interval)",
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="two-sided level of the paired bootstrap interval")
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples of the calibration images")
    readouts: bool = Field(True, description="fitted linear read-outs of the student are candidates too")
    runtime: str = Field("onnxruntime", description="where candidate read-outs are timed: torch, or a runtime that runs the exported ONNX graph")
    latency_batch: int = Field(32, gt=0)
    limit: int | None = Field(None, gt=0, description="calibration images to use")
    max_settings: int = Field(200, gt=0, description="cap on the grid size (cheapest first)")


    @field_validator("runtime")
    @classmethod
    def _timed_runtime(cls, v: str) -> str:
        from gendd_deploy.runtime import registry

        entry = registry.get_or_none(v)
        if entry is None or entry.stage not in (None, "onnx"):
            ok = [e.name for e in registry.RUNTIMES.values() if e.stage in (None, "onnx")]
            raise ValueError(f"calibrate times the exported graph on torch or a runtime that runs ONNX files ({', '.join(ok)}), not '{v}'")
        return v


class ExportConfig(Section):
    opset: int = Field(18, ge=13, le=MAX_OPSET, description=f"ONNX opset, 13 to {MAX_OPSET}")
    exporter: Literal["dynamo", "torchscript"] = Field("dynamo", description="dynamo (TorchScript as fallback) or TorchScript alone (faster)")
    atol: float = Field(1e-4, gt=0, description="logit difference allowed vs PyTorch: atol + rtol x the image's largest |logit|")
    rtol: float = Field(1e-4, ge=0, description="the share of an image's logit scale a logit may differ by, on top of atol (float32 reordering is ~1e-5)")
    min_agreement: float = Field(1.0, ge=0, le=1, description="top-1 agreement required vs PyTorch")
    parity_limit: int | None = Field(512, gt=0, description="calibration images for the parity gate")
    parity_batch: int = Field(64, gt=0)
    precision: Literal["fp32", "int8", "auto"] = Field(
        "fp32", description="fp32; int8 (QDQ, refused past max_top1_drop); auto: the faster on this machine of those that pass the gate"
    )
    max_top1_drop: float = Field(0.5, ge=0, description="top-1 points int8 may lose against fp32 on held-out calibration images")
    int8_calibration_images: int = Field(256, gt=0, description="calibration-split images that set int8 activation ranges")
    int8_gate_images: int = Field(2000, gt=0, description="further calibration-split images the int8 accuracy gate runs on")


class BuildConfig(Section):
    precision: Literal["fp32", "fp16", "bf16", "int8"] = Field("fp16", description="int8 builds the QDQ graph of an [export] precision = 'int8' export")
    min_batch: int = Field(1, gt=0)
    opt_batch: int = Field(32, gt=0)
    max_batch: int = Field(256, gt=0)
    workspace_mb: int = Field(4096, gt=0)
    atol: float = Field(5e-2, gt=0, description="max abs logit difference vs ONNX Runtime fp32")
    min_agreement: float = Field(0.99, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> "BuildConfig":
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("need min_batch <= opt_batch <= max_batch")
        return self


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, lt=65536, description="HTTP port (also --http-port, as Triton names it)")
    grpc_port: int = Field(8001, ge=-1, lt=65536, description="gRPC port (KServe v2 GRPCInferenceService); -1 = no gRPC")
    runtime: str = Field("onnxruntime", description="a registered runtime: onnxruntime, aoti, torch, tensorrt, ...")
    model_name: str | None = Field(None, pattern=SAFE_NAME, description="name in URLs (letters, digits, '_', '.', '-'); default: the pipeline name")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads per model; 0 = the CPUs this process may use (affinity, cgroup quota)")
    inter_op_threads: int = Field(0, ge=0, description="ONNX Runtime inter-op threads; 0 = its default")
    spinning: bool = Field(False, description="let ONNX Runtime's idle threads spin-wait (lower latency at batch 1, CPU burnt while idle)")
    max_batch: int = Field(32, gt=0)
    max_delay_ms: float = Field(5.0, ge=0)
    queue_size: int = Field(256, gt=0, description="requests waiting at most (also Triton's max_queue_size)")
    instances: int = Field(1, gt=0, description="model instances in an exported Triton repository (instance_group count)")
    max_body_mb: float = Field(16.0, gt=0, description="largest request body (binary tensors and images included)")
    max_json_mb: float = Field(4.0, gt=0, description="largest JSON part of a request; larger tensors go as binary data")
    max_connections: int = Field(512, gt=0, description="open connections served at once; more are answered 503 and closed")
    idle_timeout_s: float = Field(15.0, gt=0, description="an idle keep-alive connection is closed after this long")
    header_timeout_s: float = Field(10.0, gt=0, description="a request's line and headers must all arrive within this long of its first byte")
    body_timeout_s: float = Field(30.0, gt=0, description="a request's body must all arrive within this long of its headers")

    @field_validator("runtime")
    @classmethod
    def _registered_runtime(cls, v: str) -> str:
        from gendd_deploy.runtime import registry

        if registry.get_or_none(v) is None:
            raise ValueError(f"unknown runtime '{v}'; choose one of: {', '.join(registry.RUNTIMES)}")
        return v


class Recipe(Section):
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    build: BuildConfig = Field(default_factory=BuildConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    source: str | None = Field(None, exclude=True, description="file the recipe came from")

    @model_validator(mode="after")
    def _cross_section(self) -> "Recipe":
        T = self.distill.train_timesteps
        if self.distill.eval_steps > T:
            raise ValueError(f"distill.eval_steps ({self.distill.eval_steps}) must be <= distill.train_timesteps ({T})")
        bad = [s for s in self.calibrate.steps if s > T]
        if bad:
            raise ValueError(f"calibrate.steps {bad} exceed distill.train_timesteps ({T})")
        bad = [t for t in self.calibrate.t_starts if t >= T]
        if bad:
            raise ValueError(f"calibrate.t_starts {bad} must be < distill.train_timesteps ({T})")
        return self


SECTIONS = [name for name in Recipe.model_fields if name != "source"]


def _describe_error(err: dict, path: str) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        section = str(err["loc"][0]) if len(err["loc"]) > 1 else None
        known = ", ".join(Recipe.model_fields[section].annotation.model_fields) if section in SECTIONS else ", ".join(SECTIONS)
        return f"{path}: unknown key '{loc}'; remove it or use one of: {known}"
    if not err["loc"]:  # a rule across sections
        return f"{path}: {err['msg'].removeprefix('Value error, ')}; fix it in the file or with --set section.key=..."
    value = err.get("input")
    return f"{path}: bad value for '{loc}' ({value!r}): {err['msg']}; fix it in the file or with --set {loc}=..."


def build_recipe(raw: dict, path: str = "<recipe>") -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise UsageError(_describe_error(e.errors()[0], path)) from None
    recipe.source = path
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe and apply `section.key=value` overrides (values parsed as TOML)."""
    p = resolve_recipe(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{p}: not UTF-8 text; save the recipe as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{p}: not valid TOML ({e}); fix the file") from None
    for item in overrides or []:
        apply_override(raw, item)
    return build_recipe(raw, str(p))


def parse_value(text: str) -> Any:
    """A flag value as TOML (`3`, `1e-3`, `true`, `[1, 2]`), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict, item: str) -> None:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise UsageError(f"--set expects section.key=value, got '{item}'")
    key, value = item.split("=", 1)
    section, field = key.split(".", 1)
    if section not in SECTIONS:
        raise UsageError(f"--set {item}: unknown section '{section}'; use one of: {', '.join(SECTIONS)}")
    raw.setdefault(section, {})[field] = parse_value(value)


def flags_to_overrides(section: str, args: list[str]) -> list[str]:
    """Turn `--num-steps 4 --amp/--no-amp` style extra CLI args into `section.num_steps=4` overrides."""
    model = Recipe.model_fields[section].annotation
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument '{arg}'; stage options are --field-name VALUE")
        name, value = arg[2:], None
        if "=" in name:
            name, value = name.split("=", 1)
        field = name.replace("-", "_")
        negated = field.startswith("no_") and field[3:] in model.model_fields
        if negated:
            field, value = field[3:], "false"
        if field not in model.model_fields:
            known = ", ".join("--" + f.replace("_", "-") for f in model.model_fields)
            raise UsageError(f"unknown option '{arg}' for [{section}]; known: {known}")
        if value is None:
            is_bool = model.model_fields[field].annotation is bool
            if is_bool and (i + 1 >= len(args) or args[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise UsageError(f"option '{arg}' needs a value")
        out.append(f"{section}.{field}={value}")
        i += 1
    return out


def section_help(section: str) -> str:
    """One line per field of a section, for the CLI's help text."""
    model = Recipe.model_fields[section].annotation
    lines = []
    for name, f in model.model_fields.items():
        default = f.default_factory() if f.default_factory else f.default
        desc = f" - {f.description}" if f.description else ""
        lines.append(f"--{name.replace('_', '-')} {_type_name(f.annotation)} (default {default!r}){desc}")
    return "\n\n".join(lines)


def _type_name(annotation) -> str:
    """How a field's type reads in --help: <int>, <float>, <str>, <bool>, one of a|b|c, <list>."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "<" + "|".join(map(str, args)) + ">"
    if origin in (typing.Union, types.UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        return named[0] if len(named) == 1 else "<" + "|".join(n.strip("<>") for n in named) + ">"
    if origin is not None:
        return f"<{getattr(origin, '__name__', 'value')}>"
    return f"<{getattr(annotation, '__name__', 'value')}>"
