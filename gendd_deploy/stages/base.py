"""What every stage shares: the run context, fingerprinting of inputs, reuse, publishing.

A stage declares the upstream stages it reads and the part of the recipe that shapes its result.
Its fingerprint is computed from the recipe alone (recursively through its inputs), so a stage can
tell whether its artifact already exists before any input is loaded, and an input is found by the
fingerprint the current recipe implies, never by "latest".
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from gendd_deploy import dist
from gendd_deploy.artifacts import Artifact, Draft, Store, fingerprint, verify_artifact
from gendd_deploy.config import Recipe
from gendd_deploy.errors import ArtifactError, MissingDependency, UsageError

if TYPE_CHECKING:
    import torch

    from gendd_deploy.data import DataBundle


@dataclass
class Context:
    recipe: Recipe
    store: Store
    console: Console = field(default_factory=lambda: Console(stderr=True))
    recipe_path: str = "pipelines/quickstart.toml"
    quiet: bool = False
    rebuild_corrupt: bool = False  # a reused artifact whose files fail their check is rebuilt as a new version
    trust_unsigned: bool = False  # load native code (aoti, engine) without a trusted signature (signing.py)
    _data: Any = None
    _fps: dict = field(default_factory=dict)

    @property
    def pipeline(self) -> str:
        return self.recipe.pipeline.name

    def data(self) -> "DataBundle":
        if self._data is None:
            from gendd_deploy.data import load_data  # torch: imported when a stage first needs data, never to serve

            self._data = load_data(self.recipe.data)
        return self._data

    def device(self) -> "torch.device":
        import torch

        want = self.recipe.pipeline.device
        if want == "cuda" and not torch.cuda.is_available():
            raise MissingDependency("[pipeline] device = 'cuda' but no CUDA GPU is visible; set device = 'auto' or 'cpu'")
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            if dist.local_rank() >= torch.cuda.device_count():
                raise UsageError(
                    f"process {dist.local_rank()} on this node has no GPU of its own ({torch.cuda.device_count()} visible); "
                    f"start torchrun with --nproc-per-node={torch.cuda.device_count()}, or set [pipeline] device = 'cpu'"
                )
            return torch.device("cuda", dist.local_rank())
        return torch.device(want)

    def command(self, stage_command: str) -> str:
        return f"gendd {stage_command} -p {self.recipe_path}"

    def log(self, msg: str) -> None:
        if not self.quiet and dist.is_main():
            self.console.print(msg)


class ScratchDraft:
    """What a non-zero rank writes into: a private temporary folder, thrown away afterwards."""

    def __init__(self):

        self._tmp = tempfile.TemporaryDirectory(prefix="gendd-rank-")
        self.dir = Path(self._tmp.name)
        self.metrics: dict = {}
        self.info: dict = {}

    def __enter__(self) -> "ScratchDraft":
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def path(self, name: str) -> Path:
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


class Stage:
    """Subclasses set name/command/artifact and implement inputs(), config() and build()."""

    name: str = ""
    command: str = ""
    artifact: str = ""
    uses_data: bool = True
    # True: every torchrun rank runs build() (collectives inside), rank 0 alone writes.
    # False: rank 0 builds, the other ranks wait for the published artifact.
    distributed: bool = False

    def inputs(self, ctx: Context) -> dict[str, "Stage"]:
        return {}

    def config(self, ctx: Context) -> dict:
        raise NotImplementedError

    def build(self, ctx: Context, draft: Draft, inputs: dict[str, Artifact]) -> None:
        raise NotImplementedError

    def fingerprint(self, ctx: Context) -> str:
        key = self.artifact
        if key not in ctx._fps:
            ins = {name: stage.fingerprint(ctx) for name, stage in self.inputs(ctx).items()}
            if self.uses_data:
                ins["data"] = ctx.data().fingerprint
            ctx._fps[key] = fingerprint(self.artifact, self.config(ctx), ins)
        return ctx._fps[key]

    def existing(self, ctx: Context) -> Artifact | None:
        return ctx.store.find(ctx.pipeline, self.artifact, self.fingerprint(ctx))

    def require(self, ctx: Context) -> Artifact:
        """The artifact this recipe implies, verified; or an error naming the command that makes it."""
        fp = self.fingerprint(ctx)
        art = ctx.store.find(ctx.pipeline, self.artifact, fp)
        if art is None:
            raise ArtifactError(
                f"no {self.artifact} artifact for this recipe (fingerprint {fp[:8]}) under {ctx.store.root}; run '{ctx.command(self.command)}'"
            )
        return ctx.store.check_input(art, f"delete {art.path} and run '{ctx.command(self.command)}'")

    def run(self, ctx: Context) -> Artifact:
        fp = self.fingerprint(ctx)
        found = ctx.store.find(ctx.pipeline, self.artifact, fp)
        if found is not None:
            # what is reused is checked like an input: size and sha256 of every file it holds
            problems = verify_artifact(found)
            if not problems:
                ctx.log(f"[bold]{self.name}[/]: reused {found.ref} (fingerprint {fp[:8]}), nothing to do")
                return found
            if not ctx.rebuild_corrupt:
                more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
                raise ArtifactError(
                    f"{problems[0]}{more}; rebuild it as a new version with 'gendd run --rebuild-corrupt' "
                    f"(or delete {found.path} and run '{ctx.command(self.command)}')"
                )
            ctx.log(f"[bold]{self.name}[/]: {found.ref} fails its check ({problems[0]}); rebuilding it as a new version")
        inputs = {name: stage.require(ctx) for name, stage in self.inputs(ctx).items()}
        extra = {"data": ctx.data().fingerprint} if self.uses_data else {}
        if dist.is_main():
            wait = lambda: ctx.log(f"[bold]{self.name}[/]: another process is building fingerprint {fp[:8]}; waiting for it")  # noqa: E731
            with ctx.store.lock(ctx.pipeline, self.artifact, fp, on_wait=wait):
                art = ctx.store.find(ctx.pipeline, self.artifact, fp)  # published while we waited?
                if art is not None and (art.path == getattr(found, "path", None) or verify_artifact(art)):
                    art = None  # the corrupt version being rebuilt (or another broken one): not reused
                if art is not None:
                    ctx.log(f"[bold]{self.name}[/]: reused {art.ref} (fingerprint {fp[:8]}), published by another process")
                else:
                    with ctx.store.draft(ctx.pipeline, self.artifact, fp, self.config(ctx), list(inputs.values()), extra) as draft:
                        self.build(ctx, draft, inputs)
                        art = draft.publish()
                    ctx.log(f"[bold]{self.name}[/]: published {art.ref} (fingerprint {fp[:8]})")
        elif self.distributed:
            with ScratchDraft() as draft:  # same code path, nothing kept
                self.build(ctx, draft, inputs)
        dist.barrier()
        if not dist.is_main():
            art = ctx.store.find(ctx.pipeline, self.artifact, fp)
            if art is None:
                raise ArtifactError(f"rank {dist.rank()}: rank 0 did not publish {self.artifact} {fp[:8]}")
        return art

    def work_dir(self, ctx: Context):
        d = ctx.store.work_dir(ctx.pipeline, self.artifact, self.fingerprint(ctx))
        d.mkdir(parents=True, exist_ok=True)
        return d
