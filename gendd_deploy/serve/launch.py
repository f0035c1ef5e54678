"""Starting the server: `serve()` (blocking, until SIGTERM / SIGINT, then drain) and what
`gendd serve` serves from the artifact store (the description of a model from its manifest;
the artifact lookup and runners themselves are gendd_deploy/loaders.py).
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Callable

from gendd_deploy import loaders
from gendd_deploy.config import ServeConfig
from gendd_deploy.errors import ArtifactError
from gendd_deploy.runtime.base import Runner
from gendd_deploy.runtime import registry
from gendd_deploy.serve.protocol import ServedModel
from gendd_deploy.serve.server import InferenceServer
from gendd_deploy.spec import DeployedSpec

if TYPE_CHECKING:
    from gendd_deploy.artifacts import Artifact
    from gendd_deploy.stages.base import Context


def serve(
    runner: Runner,
    model_meta: ServedModel | dict,
    cfg: ServeConfig,
    ready_event: threading.Event | None = None,
    stop_event: threading.Event | None = None,
    *,
    drain_timeout_s: float = 30.0,
    request_timeout_s: float = 30.0,
    log: Callable[[str], None] | None = None,
    more: list[tuple[Runner, ServedModel | dict]] = (),
) -> None:
    """Serve until SIGTERM / SIGINT (or `stop_event`), then drain and return. `more`: further
    (runner, model) pairs served beside the first (other models, or other versions).

    `ready_event` is set once the model is warmed up and the port answers (the bound port is in the
    log line, useful with port 0). Signal handlers are installed only from the main thread and put
    back on return.
    """
    server = InferenceServer(runner, model_meta, cfg, more=more, request_timeout_s=request_timeout_s, log=log)
    stop = stop_event or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        server.start()
        for s in server.served():
            r = s.runner
            server.log(f"gendd serve: model '{s.model.name}' version {s.model.version} ({r.describe().get('runtime') or type(r).__name__})")
        grpc = f", gRPC on {cfg.host}:{server.grpc_port}" if server.grpc_port is not None else ""
        server.log(f"gendd serve: max_batch {cfg.max_batch}, max_delay {cfg.max_delay_ms:g} ms; HTTP on {server.url}{grpc}")
        if ready_event is not None:
            ready_event.set()
        while not stop.wait(0.5):
            pass
        server.log("gendd serve: shutting down, draining queued requests")
        drained = server.stop(drain_timeout_s)
        server.log("gendd serve: stopped" + ("" if drained else f" (some requests were cut off after {drain_timeout_s:g} s)"))
    finally:
        if server.running:
            server.stop(drain_timeout_s=1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---- from the artifact store ----------------------------------------------------------------


def numeric_version(version: str) -> str:
    """Triton numbers versions ('1'); the store spells them 'v001'."""
    digits = version.lstrip("v")
    return str(int(digits)) if digits.isdigit() else version


def served_model(spec: DeployedSpec, art: "Artifact", name: str, runner: Runner) -> ServedModel:
    """How the server describes the artifact `art` (described by `spec`) run by `runner`."""
    if not spec.preprocess:
        raise ArtifactError(f"{art.ref} records no preprocessing in its description; re-export it with 'gendd export'")
    runtime = runner.describe().get("runtime") or runner.name
    extra = {"artifact": art.ref, "fingerprint": art.fingerprint, **({"sampler": spec.readout} if spec.readout else {}), "runtime": runtime}
    return ServedModel.from_meta(
        {
            "name": name,
            "version": numeric_version(art.version),
            "input_name": spec.images.name,
            "output_name": spec.logits.name,
            "preprocess": spec.preprocess,
            "class_names": spec.class_names,
            "needs_noise": runner.needs_noise,
            "platform": registry.triton_platform(runtime),
            "extra": extra,
        }
    )


def load_artifact_model(ctx: "Context", runtime: str = "onnxruntime", version: str | None = None) -> tuple[Runner, ServedModel]:
    """The deployed model and its description.

    Default: the newest onnx artifact of the recipe's pipeline, run by `runtime` (for aoti the aoti
    package and for tensorrt the engine made from that same onnx artifact; for torch the PyTorch
    model it was exported from). `version` (any 'gendd artifacts show' handle) picks an onnx, aoti
    or engine artifact instead.
    """
    art = loaders.servable_artifact(ctx.store, ctx.pipeline, version, ctx.command)
    cfg = ctx.recipe.serve
    threads = {"intra_op_threads": cfg.intra_op_threads or None, "inter_op_threads": cfg.inter_op_threads or None, "spinning": cfg.spinning} if runtime == "onnxruntime" else {}
    runner, served = loaders.runner_for_artifact(ctx.store, runtime, art, device=ctx.device, command=ctx.command, trust_unsigned=ctx.trust_unsigned, **threads)
    name = ctx.recipe.serve.model_name or art.pipeline
    return runner, served_model(loaders.spec_of(served, ctx.store), served, name, runner)


def serve_artifacts(
    ctx: "Context",
    runtime: str | None = None,
    version: str | list[str] | None = None,
    ready_event: threading.Event | None = None,
    stop_event: threading.Event | None = None,
) -> None:
    """`gendd serve`: the recipe's [serve] section (host, ports, batching...), `runtime` overriding
    its runtime. `version`: one artifact handle or several (each its own model, or version of a
    model: artifacts of one pipeline are versions of one model)."""
    cfg = ctx.recipe.serve
    if runtime is not None and runtime != cfg.runtime:
        registry.get(runtime)  # an unknown name is refused with the registered ones
        cfg = ServeConfig.model_validate({**cfg.model_dump(), "runtime": runtime})
    handles = version if isinstance(version, list) else [version]
    loaded = [load_artifact_model(ctx, cfg.runtime, v) for v in (handles or [None])]
    (runner, model), more = loaded[0], loaded[1:]
    serve(runner, model, cfg, ready_event, stop_event, log=lambda msg: ctx.console.print(msg, markup=False, highlight=False), more=more)
