"""The `gendd` command line. Library code raises; this module alone turns errors into exit codes.

Exit codes: 0 ok, 1 unexpected failure, 2 bad input (recipe, flag, missing file), 3 artifact
missing/corrupt/mismatched, 4 a quality gate failed, 5 a missing dependency or device,
130 interrupted (run the same command again to resume).

The stages, runtimes, server and benchmarks are imported inside the commands that use them: they
pull in torch, timm and onnx (seconds), which `gendd --help`, `gendd artifacts ls` and a bad flag
should not wait for. Every other module imports at module level.

This file is longer than most (~500 lines): it is the whole command surface, one short function
per command, and splitting it would scatter the option definitions they share.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gendd_deploy import __version__
from gendd_deploy.config import DEFAULT_PIPELINE, flags_to_overrides, load_recipe, packaged_recipes, section_help
from gendd_deploy.errors import DataNotFound, GenddError, MissingDependency, UsageError

console = Console(stderr=True, soft_wrap=True)  # an error stays one line, however narrow the terminal
out = Console()

class _FlagHelp:
    """--help is a flag: show it without the value type typer gives the option it makes ('<bool>')."""

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt


class Command(_FlagHelp, typer.core.TyperCommand):
    pass


class Group(_FlagHelp, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=Group,
    name="gendd",
    help="Distil a trained teacher into a compiled GenDD student: teacher -> cache -> distill -> calibrate -> export -> build -> serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
artifacts_app = typer.Typer(cls=Group, help="Inspect, verify and clean the artifact store.", no_args_is_help=True)
app.add_typer(artifacts_app, name="artifacts")

PipelineOpt = Annotated[
    Optional[str], typer.Option("--pipeline", "-p", help="TOML recipe: a file, or a shipped one by name (quickstart, fashion_mnist, ...) \\[default: pipelines/quickstart.toml]", show_default=False, metavar="RECIPE")
]
ArtifactsOpt = Annotated[
    Optional[str], typer.Option("--artifacts", help="artifact root \\[env GENDD_ARTIFACTS, default ./artifacts]", show_default=False, metavar="DIR")
]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="override any recipe field: --set distill.epochs=3 (repeatable)", show_default=False, metavar="KEY=VALUE")
]
StageCtx = {"allow_extra_args": True, "ignore_unknown_options": True}

_globals: dict[str, Optional[str]] = {"pipeline": None, "artifacts": None}


def _version_cb(value: bool) -> None:
    if value:
        out.print(f"gendd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    pipeline: PipelineOpt = None,
    artifacts: ArtifactsOpt = None,
    version: Annotated[bool, typer.Option("--version", callback=_version_cb, is_eager=True, help="print the version", metavar="")] = False,
) -> None:
    _globals.update(pipeline=pipeline, artifacts=artifacts)


def _artifact_root(artifacts: Optional[str]) -> str:
    return artifacts or _globals["artifacts"] or os.environ.get("GENDD_ARTIFACTS") or "artifacts"


def _recipe_path(pipeline: Optional[str]) -> str:
    return pipeline or _globals["pipeline"] or str(DEFAULT_PIPELINE)


# What `pip install 'gendd-deploy[train]'` adds to the serving core (pyproject.toml)
TRAINING_PACKAGES = ("torch", "torchvision", "timm", "onnxscript", "sklearn", "matplotlib")


def guarded(fn: Callable[[], object]) -> object:
    """Run fn; turn library errors into one red line and the error's exit code."""
    try:
        return fn()
    except GenddError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(e.exit_code) from None
    except ModuleNotFoundError as e:  # a serving-only install running a training command
        missing = (e.name or "").split(".")[0]
        if missing not in TRAINING_PACKAGES:
            raise
        console.print(
            f"[red]error:[/] this command needs {missing}, which the serving install leaves out; "
            + escape("install the training packages with: pip install 'gendd-deploy[train]'")
        )
        raise typer.Exit(MissingDependency.exit_code) from None
    except SystemExit as e:  # SIGTERM from torchrun after another rank failed
        if isinstance(e.code, str):
            console.print(f"[red]error:[/] {escape(e.code)}")
            raise typer.Exit(1) from None
        raise
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; nothing was published. Run the same command again to resume from the last checkpoint.")
        raise typer.Exit(130) from None
    except OSError as e:  # a full disk (exit 3, like other storage trouble), an unwritable path
        console.print(f"[red]error:[/] {escape(os_error_message(e))}")
        raise typer.Exit(3 if e.errno == errno.ENOSPC else 1) from None
    except RuntimeError as e:
        if "No space left on device" in str(e) or "file write failed" in str(e):  # torch.save's C++ writer
            console.print(f"[red]error:[/] {escape(os_error_message(OSError(errno.ENOSPC, 'No space left on device')))}")
            raise typer.Exit(3) from None
        raise


def os_error_message(e: OSError) -> str:
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return (
            f"no space left on device{where}; free some space and run the same command again: "
            "nothing half-written was published, finished stages are reused and training resumes from its last checkpoint"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {e.strerror}; choose a writable artifact root with --artifacts DIR (or GENDD_ARTIFACTS)"
    return f"{e.strerror or e}{where}; check the path"


def make_context(pipeline: Optional[str], artifacts: Optional[str], overrides: list[str], quiet: bool = False, writes: bool = True):
    """The recipe, the artifact root and the console for a command. A command that only reads
    (`serve`) passes writes=False: its root may be read-only (a container's `:ro` mount), and must exist."""
    from gendd_deploy import dist
    from gendd_deploy.artifacts import Store
    from gendd_deploy.stages import Context

    path = _recipe_path(pipeline)
    recipe = load_recipe(path, overrides)
    root = Path(_artifact_root(artifacts))
    if root.exists() and not root.is_dir():
        raise UsageError(f"artifact root {root} is a file; pass --artifacts DIR (or GENDD_ARTIFACTS) naming a folder")
    if not writes:
        if not root.is_dir():
            raise UsageError(f"no artifact root at {root}; pass --artifacts DIR (or GENDD_ARTIFACTS) naming the folder 'gendd run' wrote")
    else:  # writable? probed in the nearest folder that exists, so nothing is created before a stage runs
        existing = next(p for p in [root, *root.parents] if p.exists())
        try:
            probe = existing / f".gendd-write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise UsageError(
                f"artifact root {root} cannot be created or written ({e.strerror}); pass --artifacts DIR (or GENDD_ARTIFACTS) naming a writable folder"
            ) from None
    dist.init_from_env()  # under torchrun: join the process group (gloo on CPU, NCCL on GPUs)
    return Context(recipe=recipe, store=Store(_artifact_root(artifacts)), console=console, recipe_path=path, quiet=quiet)


def _stage_command(command: str, section: str, ctx: typer.Context, pipeline, artifacts, set_) -> None:
    from gendd_deploy import stages

    def go():
        overrides = list(set_ or []) + flags_to_overrides(section, ctx.args)
        c = make_context(pipeline, artifacts, overrides)
        art = stages.get(command).run(c)
        out.print(str(art.path))

    guarded(go)


def _epilog(section: str) -> str:
    return f"[bold]Recipe fields of \\[{section}], settable as flags:[/]\n\n" + escape(section_help(section))


@app.command(cls=Command, context_settings=StageCtx, epilog=_epilog("teacher"))
def teacher(ctx: typer.Context, pipeline: PipelineOpt = None, artifacts: ArtifactsOpt = None, set_: SetOpt = None) -> None:
    """Train the teacher on the recipe's data, or load it from a checkpoint. Writes: teacher."""
    _stage_command("teacher", "teacher", ctx, pipeline, artifacts, set_)


@app.command(cls=Command, context_settings=StageCtx, epilog=_epilog("cache"))
def cache(ctx: typer.Context, pipeline: PipelineOpt = None, artifacts: ArtifactsOpt = None, set_: SetOpt = None) -> None:
    """Run the frozen teacher once over the training split and store its features per augmented view. Reads: teacher. Writes: teacher_features."""
    _stage_command("cache", "cache", ctx, pipeline, artifacts, set_)


@app.command(cls=Command, context_settings=StageCtx, epilog=_epilog("distill"))
def distill(ctx: typer.Context, pipeline: PipelineOpt = None, artifacts: ArtifactsOpt = None, set_: SetOpt = None) -> None:
    """Train the student with GenDD (or KD / CE for comparison). Reads: teacher, teacher_features. Writes: student."""
    _stage_command("distill", "distill", ctx, pipeline, artifacts, set_)


@app.command(cls=Command, context_settings=StageCtx, epilog=_epilog("calibrate"))
def calibrate(ctx: typer.Context, pipeline: PipelineOpt = None, artifacts: ArtifactsOpt = None, set_: SetOpt = None) -> None:
    """Choose the cheapest sampler that keeps accuracy, on the calibration split. Reads: student. Writes: sampler."""
    _stage_command("calibrate", "calibrate", ctx, pipeline, artifacts, set_)


@app.command(cls=Command, context_settings=StageCtx, epilog=_epilog("export"))
def export(
    ctx: typer.Context,
    pipeline: PipelineOpt = None,
    artifacts: ArtifactsOpt = None,
    set_: SetOpt = None,
    aoti: Annotated[bool, typer.Option("--aoti", help="also write a torch.export + AOTInductor package", metavar="")] = False,
    trt: Annotated[bool, typer.Option("--trt", help="then build a TensorRT engine (needs TensorRT and an NVIDIA GPU)", metavar="")] = False,
    triton: Annotated[Optional[str], typer.Option("--triton", help="write a Triton model repository into DIR", metavar="DIR")] = None,
) -> None:
    """Export the deployed student to ONNX with parity gates vs PyTorch. Reads: student, sampler. Writes: onnx (and aoti, engine)."""
    from gendd_deploy import stages

    def go():
        c = make_context(pipeline, artifacts, list(set_ or []) + flags_to_overrides("export", ctx.args))
        if trt:
            from gendd_deploy.stages.build import export_and_build

            onnx_art, engine_art = export_and_build(c)  # refuses before anything is written without TensorRT / GPU
        else:
            onnx_art, engine_art = stages.get("export").run(c), None
        out.print(str(onnx_art.path))
        if engine_art is not None:
            out.print(str(engine_art.path))
        if aoti:
            from gendd_deploy.stages.export import export_aoti_artifact

            out.print(str(export_aoti_artifact(c).path))
        if triton:
            from gendd_deploy.triton import write_triton_repo

            repo = write_triton_repo(onnx_art, engine_art, triton, c.recipe.serve.model_name or c.pipeline, serve_cfg=c.recipe.serve, build_cfg=c.recipe.build)
            out.print(str(repo))

    guarded(go)


@app.command(cls=Command, context_settings=StageCtx, epilog=_epilog("build"))
def build(ctx: typer.Context, pipeline: PipelineOpt = None, artifacts: ArtifactsOpt = None, set_: SetOpt = None) -> None:
    """Build a TensorRT engine from the ONNX artifact (needs TensorRT and an NVIDIA GPU). Reads: onnx. Writes: engine."""
    _stage_command("build", "build", ctx, pipeline, artifacts, set_)


bench_app = typer.Typer(cls=Group, help="Benchmarks that print a table and write JSON.", invoke_without_command=True)
app.add_typer(bench_app, name="bench")


@bench_app.callback()
def bench(
    ctx: typer.Context,
    pipeline: PipelineOpt = None,
    artifacts: ArtifactsOpt = None,
    set_: SetOpt = None,
    models: Annotated[Optional[list[str]], typer.Option("--models", help="models to measure, repeatable: teacher, ce, kd, calibrated, reference, probe \\[default: teacher, ce, kd, calibrated]")] = None,
    runtime: Annotated[Optional[list[str]], typer.Option("--runtime", help="runtimes to measure \\[default: every registered runtime usable here but aoti, which compiles for minutes: name it]")] = None,
    batch: Annotated[list[int], typer.Option("--batch", help="batch sizes")] = [1, 32, 256],
    reps: Annotated[int, typer.Option(help="timed runs per point (after one warm-up)")] = 20,
    budget_s: Annotated[float, typer.Option(help="stop timing a model at a batch size after this many seconds of its runs (at least 2 runs)")] = 5.0,
    limit: Annotated[int, typer.Option(help="test images for each row's top-1 (0: all)")] = 1000,
    precision: Annotated[list[str], typer.Option("--precision", help="fp32, int8 (adds ONNX Runtime on each model's int8 QDQ graph), repeatable")] = ["fp32"],
    out_file: Annotated[Optional[str], typer.Option("--out", help="JSON output \\[default: benchmarks/results/bench_<pipeline>.json]")] = None,
) -> None:
    """Latency (p50/p95), images/s, parity and top-1 of the teacher, plain ce and kd students and the GenDD student (as calibrated, and with the published sampler) on every available runtime, models timed in turn; or a named benchmark below."""
    if ctx.invoked_subcommand is not None:
        return
    from gendd_deploy.bench.runtime import run_bench

    def go():
        from gendd_deploy.bench.runtime import MODEL_CHOICES
        from gendd_deploy.runtime.registry import RUNTIMES

        bad = [f"--batch {b}" for b in batch if b < 1] + ([f"--reps {reps}"] if reps < 1 else []) + ([f"--limit {limit}"] if limit < 0 else [])
        bad += [f"--budget-s {budget_s}"] if not (budget_s > 0 and budget_s < float("inf")) else []
        if bad:
            raise UsageError(f"{', '.join(bad)}: batch sizes and reps must be >= 1, --limit >= 0 (0: all test images), --budget-s a positive number of seconds")
        bad += [f"--precision {p}" for p in precision if p not in ("fp32", "int8")]
        if bad:
            raise UsageError(f"{', '.join(bad)}: --precision is fp32 or int8")
        unknown = [r for r in runtime or [] if r not in RUNTIMES] + [m for m in models or [] if m not in MODEL_CHOICES]
        if unknown:
            raise UsageError(f"unknown runtime or model {unknown}; runtimes: {', '.join(RUNTIMES)}; models: {', '.join(MODEL_CHOICES)}")
        base = make_context(pipeline, artifacts, list(set_ or []))
        mk = lambda ov: base if not ov else make_context(pipeline, artifacts, list(set_ or []) + ov)  # noqa: E731
        run_bench(mk, models=models, runtimes=runtime, batches=list(batch), reps=reps, limit=limit, budget_s=budget_s, out=_bench_out(out_file, "bench", base.pipeline), console=out, precisions=list(precision))

    guarded(go)


def _bench_out(out: Optional[str], name: str, pipeline_name: str) -> Path:
    return Path(out) if out else Path("benchmarks/results") / f"{name}_{pipeline_name}.json"


@bench_app.command("quality", cls=Command)
def bench_quality(
    pipeline: PipelineOpt = None,
    artifacts: ArtifactsOpt = None,
    set_: SetOpt = None,
    seeds: Annotated[list[int], typer.Option("--seeds", help="student seeds (repeat the option)")] = [0, 1, 2],
    settings: Annotated[Optional[list[str]], typer.Option("--settings", help="labelled, unlabelled, long_tail (repeatable) \\[default: all three]")] = None,
    total_epochs: Annotated[Optional[int], typer.Option("--total-epochs", help="epochs every student trains (GenDD: its stage 1 + the rest) \\[default: the recipe's stage1_epochs + epochs]")] = None,
    published_seeds: Annotated[str, typer.Option("--published-seeds", help="score the costly published sampler on the 'first' seed or on 'all'")] = "first",
    out_file: Annotated[Optional[str], typer.Option("--out", help="JSON output \\[default: benchmarks/results/quality_<pipeline>.json]")] = None,
) -> None:
    """GenDD vs ce / kd students with equal read-outs: every student's own head, fitted read-outs and calibrated choice (the headline) on all test images, over seeds, with a verdict per setting. Students are reused from the artifact root, so a stopped run resumes."""
    from gendd_deploy.bench.quality import run_quality

    def go():
        if published_seeds not in ("first", "all"):
            raise UsageError(f"--published-seeds must be 'first' or 'all', not {published_seeds!r}")
        base = make_context(pipeline, artifacts, list(set_ or []))
        mk = lambda ov: make_context(pipeline, artifacts, list(set_ or []) + ov)  # noqa: E731
        name = "quality" if total_epochs is None else f"quality_{total_epochs}ep"
        run_quality(
            mk, list(seeds), _bench_out(out_file, name, base.pipeline), out,
            settings=list(settings) if settings else None, total_epochs=total_epochs, published_seeds=published_seeds,
        )

    guarded(go)


@bench_app.command("cache", cls=Command)
def bench_cache(
    pipeline: PipelineOpt = None,
    artifacts: ArtifactsOpt = None,
    set_: SetOpt = None,
    methods: Annotated[list[str], typer.Option("--methods", help="distill methods to time")] = ["gendd", "kd"],
    epochs: Annotated[int, typer.Option(help="epochs per timing run")] = 1,
    out_file: Annotated[Optional[str], typer.Option("--out", help="JSON output")] = None,
) -> None:
    """Distill epoch time with the teacher-feature cache vs the teacher run online (ratio, one run)."""
    from gendd_deploy.bench.quality import run_cache_ratio

    def go():
        base = make_context(pipeline, artifacts, list(set_ or []))
        mk = lambda ov: make_context(pipeline, artifacts, list(set_ or []) + ov)  # noqa: E731
        run_cache_ratio(mk, list(methods), epochs, _bench_out(out_file, "cache", base.pipeline), out)

    guarded(go)


@app.command(cls=Command, context_settings=StageCtx, epilog=_epilog("serve"))
def serve(
    ctx: typer.Context,
    pipeline: PipelineOpt = None,
    artifacts: ArtifactsOpt = None,
    set_: SetOpt = None,
    artifact: Annotated[Optional[list[str]], typer.Option("--artifact", help="onnx / aoti / engine artifact to serve (pipeline/stage/vN); repeat for several models or versions \\[default: latest onnx of the pipeline]", metavar="REF")] = None,
    http_port: Annotated[Optional[int], typer.Option("--http-port", help="HTTP port, as Triton names it (same as --port) \\[default: 8000]", show_default=False)] = None,
    trust_unsigned: Annotated[bool, typer.Option("--trust-unsigned", help="load an aoti package or TensorRT engine (native code) without a signature from GENDD_TRUSTED_KEYS", metavar="")] = False,
) -> None:
    """Serve the deployed student over HTTP and gRPC (Open Inference Protocol v2, as KServe and Triton speak): --host, --http-port, --grpc-port, --runtime, --max-batch, --max-delay-ms ..."""

    def go():
        from gendd_deploy.serve import serve_artifacts

        ports = [f"serve.port={http_port}"] if http_port is not None else []
        c = make_context(pipeline, artifacts, list(set_ or []) + flags_to_overrides("serve", ctx.args) + ports, writes=False)
        c.trust_unsigned = trust_unsigned
        serve_artifacts(c, version=list(artifact) if artifact else None)

    guarded(go)


@app.command(cls=Command)
def run(
    pipeline: Annotated[Optional[str], typer.Argument(help="TOML recipe: a file, or a shipped one by name (quickstart, fashion_mnist, ...) \\[default: pipelines/quickstart.toml]", show_default=False)] = None,
    pipeline_opt: PipelineOpt = None,
    artifacts: ArtifactsOpt = None,
    set_: SetOpt = None,
    rebuild_corrupt: Annotated[bool, typer.Option("--rebuild-corrupt", help="rebuild, as a new version, any stage whose existing artifact fails its size / sha256 check (default: stop with exit 3 naming the file)", metavar="")] = False,
) -> None:
    """Run every stage of a recipe in order, reusing each artifact whose fingerprint already exists (after checking its files)."""
    from gendd_deploy import stages

    def go():
        c = make_context(pipeline or pipeline_opt, artifacts, list(set_ or []))
        c.rebuild_corrupt = rebuild_corrupt
        built, seconds = {}, {}
        t0 = time.perf_counter()  # loading the data and the training code, timed apart from the stages
        c.data()
        for command in stages.ORDER[:-1]:  # build imports TensorRT only where there is one
            stages.get(command)
        seconds["start-up"] = time.perf_counter() - t0
        for command in stages.ORDER:
            if command == "build":
                from gendd_deploy.trt import require_tensorrt

                try:
                    require_tensorrt("build")
                except MissingDependency as e:
                    c.log(f"[dim]build: skipped on this machine ({escape(str(e))})[/]")
                    continue
            t0 = time.perf_counter()
            built[command] = stages.get(command).run(c)
            seconds[command] = time.perf_counter() - t0
        _summary(built)
        if "export" in built:
            out.print(_card(c, built, seconds, pipeline or pipeline_opt, artifacts))

    guarded(go)


def _summary(built: dict) -> None:
    table = Table(title="gendd run")
    for col in ("stage", "artifact", "fingerprint"):
        table.add_column(col)
    for command, art in built.items():
        table.add_row(command, art.ref, art.short)
    out.print(table)
    lines = []
    pct = lambda v: f"{v:.2f}%" if isinstance(v, (int, float)) else "?"  # noqa: E731
    if "teacher" in built:
        lines.append(f"teacher top-1 (test): {pct(built['teacher'].metrics.get('test_top1'))}")
    if "distill" in built:
        m = built["distill"].metrics
        names = {"published_top1": "published sampler", "ddim0_top1": "DDIM-8 zero noise", "probe_top1": "linear probe", "fit_ce_top1": "fitted linear"}
        lines.append("student top-1 (test), by read-out: " + ", ".join(f"{label} {pct(m[k])}" for k, label in names.items() if k in m))
    if "calibrate" in built:
        sm, si = built["calibrate"].metrics, built["calibrate"].manifest.get("info", {})
        setting = si.get("setting")
        if setting:
            from gendd_deploy.models.deployed import SamplerSetting

            label = SamplerSetting.from_dict(setting).label()
            ratio = sm.get("latency_ms") / sm["probe_latency_ms"] if sm.get("latency_ms") and sm.get("probe_latency_ms") else None
            ref = sm.get("latency_ms") / sm["reference_latency_ms"] if sm.get("latency_ms") and sm.get("reference_latency_ms") else None
            lines.append(f"chosen sampler: {label}; calibration top-1 {sm.get('calib_top1')}% (reference {sm.get('reference_top1')}%)")
            if ratio is not None:
                batch = built["calibrate"].config.get("calibrate", {}).get("latency_batch", "?")
                vs_ref = f", {ref:.4f}x the reference sampler" if ref is not None else ""  # kd / ce students have none
                lines.append(f"latency ({sm.get('runtime')}, batch {batch}): {ratio:.2f}x the plain student (linear probe){vs_ref}")
    if "export" in built:
        par = built["export"].metrics.get("parity") or {}
        if par.get("max_abs_diff") is not None:
            rel = f" ({par['max_rel_diff']:.1g} of the logit scale)" if par.get("max_rel_diff") is not None else ""
            lines.append(f"ONNX parity vs PyTorch: max |logit diff| {par['max_abs_diff']:.2g}{rel}, top-1 agreement {100 * par.get('top1_agreement', 0):.1f}% on {par.get('n')} calibration images")
    for line in lines:
        out.print(escape(line), soft_wrap=True)


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:.0f} s"


def _card(ctx, built: dict, seconds: dict, recipe: str | None, artifacts: str | None) -> Table:
    """What a newcomer needs after `gendd run`: the deployed model, how good and fast it is,
    where it is, how long each stage took and what to run next."""
    from gendd_deploy.evaluation import test_top1
    from gendd_deploy.loaders import ONNX_FILE, artifact_runner

    onnx_art, cal = built["export"], built.get("calibrate")
    info, metrics = onnx_art.manifest.get("info", {}), onnx_art.metrics
    spec = info.get("deployed") or {}
    precision = (info.get("precision") or {}).get("kept", "fp32")
    data = ctx.data()
    runner = artifact_runner(onnx_art, ctx.store)
    top1 = test_top1(lambda x, b: runner.run(x, runner.noise(len(x), b)), data, n=len(data.test), batch_size=256, device="cpu", numpy=True)
    card = Table(title="the deployed model", show_header=False, title_justify="left")
    card.add_column(style="bold")
    card.add_column(overflow="fold")
    card.add_row("model", f"{spec.get('method', '?')} student, read-out '{spec.get('readout', '?')}' (what calibrate chose), {precision} ONNX")
    teacher = built["teacher"].metrics.get("test_top1") if "teacher" in built else None
    card.add_row("test top-1", f"{top1:.2f}% on all {len(data.test)} test images" + (f" (teacher {teacher:.2f}%)" if isinstance(teacher, (int, float)) else ""))
    if cal is not None and cal.metrics.get("latency_ms"):
        m = cal.metrics
        batch = cal.config.get("calibrate", {}).get("latency_batch", "?")
        vs = f", {m['latency_ms'] / m['probe_latency_ms']:.2f}x a plain student" if m.get("probe_latency_ms") else ""
        card.add_row("latency", f"{m['latency_ms']:.2f} ms per batch of {batch} on {m.get('runtime', 'onnxruntime')}{vs}")
    card.add_row("size", f"{metrics.get('onnx_bytes', 0) / 2**20:.2f} MB")
    card.add_row("file", str(onnx_art.path / ONNX_FILE))
    if cal is not None and (cal.path / "accuracy_vs_latency.png").is_file():
        card.add_row("plot", f"{cal.path / 'accuracy_vs_latency.png'} (every read-out calibrate tried: accuracy against latency)")
    card.add_row("time", ", ".join(f"{k} {_duration(v)}" for k, v in seconds.items()) + f"; total {_duration(sum(seconds.values()))} (start-up: data and code; a reused stage takes ~0 s)")
    where = f" --artifacts {artifacts}" if artifacts else ""
    card.add_row("next", f"gendd serve -p {recipe or 'quickstart'}{where}    then: curl localhost:8000/v2/models/{ctx.recipe.serve.model_name or ctx.pipeline}")
    return card


# ---- artifacts ---------------------------------------------------------------------------------


@artifacts_app.command("ls", cls=Command)
def artifacts_ls(
    artifacts: ArtifactsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list", metavar="")] = False,
    stage: Annotated[Optional[str], typer.Option(help="only this stage")] = None,
) -> None:
    """List published artifacts."""
    from gendd_deploy.artifacts import Store

    store = Store(_artifact_root(artifacts))
    guarded(store.require_root)
    arts = store.list(stage=stage)
    for problem in store.broken():
        console.print(f"[red]unreadable:[/] {escape(problem)}")
    if as_json:
        print(json.dumps([a.summary() for a in arts], indent=2))
        return
    table = Table()
    for col in ("pipeline", "stage", "version", "fingerprint", "created", "path"):
        table.add_column(col)
    for a in arts:
        table.add_row(a.pipeline, a.stage, a.version, a.short, str(a.manifest.get("created")), str(a.path))
    out.print(table)


@artifacts_app.command("show", cls=Command)
def artifacts_show(
    version: Annotated[str, typer.Argument(help="pipeline/stage/vN, stage/vN, vN or a fingerprint prefix")],
    artifacts: ArtifactsOpt = None,
) -> None:
    """Print an artifact's manifest and its lineage back to the first stage."""
    from gendd_deploy.artifacts import Store

    def go():
        store = Store(_artifact_root(artifacts))
        art = store.resolve(version)
        out.print_json(json.dumps(art.manifest, default=str))
        out.print("[bold]lineage[/]")
        for depth, a in enumerate(store.lineage(art)):
            out.print(f"  {'<- ' if depth else ''}{a.ref}  {a.short}  {a.manifest.get('created')}")

    guarded(go)


@artifacts_app.command("verify", cls=Command)
def artifacts_verify(artifacts: ArtifactsOpt = None) -> None:
    """Re-hash every file of every artifact and check its signature; exit 3 naming each mismatch, each
    version folder without a manifest, each bad signature, and (with GENDD_TRUSTED_KEYS set) each
    aoti / engine artifact (native code) without a trusted signature."""
    from gendd_deploy import signing
    from gendd_deploy.artifacts import Store, verify_artifact

    store = Store(_artifact_root(artifacts))
    guarded(store.require_root)
    keys = guarded(signing.trusted_keys)
    arts, problems = store.list(), store.broken()
    signed = 0
    for a in arts:
        problems += verify_artifact(a)
        state, words = signing.status(a.path, a.manifest, keys)
        signed += state == "trusted"
        if state == "invalid" or (keys and a.stage in signing.NATIVE_STAGES and state != "trusted"):
            problems.append(f"{a.ref}: {words}")
        elif state != "trusted" and a.stage in signing.NATIVE_STAGES:
            console.print(f"[yellow]note:[/] {escape(a.ref)} holds native code and is {escape(words)} (set GENDD_TRUSTED_KEYS to require signatures)")
    for p in problems:
        console.print(f"[red]mismatch:[/] {escape(p)}")
    if problems:
        raise typer.Exit(3)
    out.print(f"{len(arts)} artifacts verified, all files match their manifests; {signed} signed by a trusted key")


@artifacts_app.command("keygen", cls=Command)
def artifacts_keygen(folder: Annotated[str, typer.Argument(help="folder for gendd-signing.pem (private, mode 0600) and gendd-signing.pub.pem")]) -> None:
    """Make an Ed25519 key pair for signing artifacts: keep the private key off the artifact root
    (GENDD_SIGNING_KEY on the builder), list the public key in GENDD_TRUSTED_KEYS where artifacts load."""
    from gendd_deploy import signing

    private, public = guarded(lambda: signing.keygen(Path(folder)))
    out.print(f"private key {private} (set GENDD_SIGNING_KEY to it where artifacts are built)")
    out.print(f"public key {public} (list it in GENDD_TRUSTED_KEYS where they are loaded)")


@artifacts_app.command("sign", cls=Command)
def artifacts_sign(
    versions: Annotated[list[str], typer.Argument(help="artifacts to sign: pipeline/stage/vN, stage/vN, vN or a fingerprint prefix")],
    artifacts: ArtifactsOpt = None,
) -> None:
    """Sign existing artifacts with GENDD_SIGNING_KEY, after checking their files."""
    from gendd_deploy import signing
    from gendd_deploy.artifacts import Store

    def go():
        key = signing.signing_key()
        if key is None:
            raise UsageError("GENDD_SIGNING_KEY is not set; point it at a private key made by 'gendd artifacts keygen DIR'")
        store = Store(_artifact_root(artifacts))
        for v in versions:
            art = store.check_input(store.resolve(v), "rebuild it before signing it")
            signing.sign(art.path, art.manifest, key)
            out.print(f"signed {art.ref} (key {signing.key_id(key.public_key())})")

    guarded(go)


@artifacts_app.command("gc", cls=Command)
def artifacts_gc(
    artifacts: ArtifactsOpt = None,
    unreachable: Annotated[
        bool, typer.Option("--unreachable", help="also list versions no recipe reaches and not in the lineage of the latest of each stage; deleted only with --yes", metavar="")
    ] = False,
    keep: Annotated[Optional[list[str]], typer.Option("--keep", help="recipe whose artifacts --unreachable keeps (repeat) \\[default: every ./pipelines/*.toml and every shipped recipe]")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="with --unreachable: delete what is listed", metavar="")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list what would go", metavar="")] = False,
) -> None:
    """Remove abandoned drafts (whose process is gone); with --unreachable, list (and with --yes
    delete) versions that no recipe reaches. Only folders this store creates are ever touched."""
    from gendd_deploy.artifacts import OWNER_SUFFIX, Store

    def go():
        store = Store(_artifact_root(artifacts))
        store.require_root()
        drafts = store.leftovers()
        for p in drafts:
            out.print(("would remove " if dry_run else "removed ") + f"abandoned draft {p}")
            if not dry_run:
                shutil.rmtree(p, ignore_errors=True)
                p.with_name(p.name + OWNER_SUFFIX).unlink(missing_ok=True)
        old = []
        if unreachable:
            local = {p.name: str(p) for p in Path("pipelines").glob("*.toml")}
            recipes = keep if keep else sorted({**{f"{n}.toml": n for n in packaged_recipes()}, **local}.values())
            fps, keep_pipelines = set(), set()
            for r in recipes:
                try:
                    fps |= _recipe_fingerprints(r, artifacts)
                except DataNotFound as e:  # a shipped recipe whose data is not here: keep all it may have made
                    name = load_recipe(_recipe_path(r), []).pipeline.name
                    keep_pipelines.add(name)
                    out.print(escape(f"recipe {r}: its data is absent here, so every version of pipeline '{name}' is kept ({str(e).split(';')[0]})"), soft_wrap=True)
                except GenddError as e:
                    raise UsageError(f"cannot tell what recipe {r} reaches ({e}); fix it or name the recipes to keep with --keep") from None
            old = [a for a in store.unreachable(keep_fingerprints=fps) if a.pipeline not in keep_pipelines]
            for a in old:
                out.print(("removed " if yes and not dry_run else "would remove ") + f"{a.ref} ({a.path})")
                if yes and not dry_run:
                    shutil.rmtree(a.path)
            if old and not yes:
                out.print(f"{len(old)} version(s) listed above; add --yes to delete them")
        if not drafts and not old:
            out.print("nothing to remove")

    guarded(go)


def _recipe_fingerprints(recipe: str, artifacts: Optional[str]) -> set[str]:
    """Fingerprints of every stage the recipe implies (teacher .. build). A stage whose
    fingerprint needs what this machine lacks (TensorRT for build) keeps all its versions."""
    from gendd_deploy import stages

    ctx = make_context(recipe, artifacts, [], quiet=True)
    fps = set()
    for name in stages.ORDER:
        stage = stages.get(name)
        try:
            fps.add(stage.fingerprint(ctx))
        except MissingDependency:
            fps |= {a.fingerprint for a in ctx.store.list(ctx.pipeline, stage.artifact)}
    return fps


def main() -> None:
    app(prog_name="gendd")


if __name__ == "__main__":
    sys.exit(main())
