"""Cache teacher features. Reads: teacher. Writes: teacher_features. Example: gendd cache -p pipelines/quickstart.toml

For every training image and each of V augmented views, the frozen teacher's pooled feature is
stored with the augmentation parameters that made the view, so distill can rebuild the exact
input image of a cached feature (`data.augment.apply(images, params[v, idx], ...)`).

Files (numpy .npy, memory-mappable, never loaded whole):
  features.npy  (V, N, D_t) float16   teacher pooled features
  params.npy    (V, N, 5)   int32     (top, left, height, width, flip) of each view
  labels.npy    (N,)        int64     training labels, in training-split order
Work is done in fixed chunks, each saved whole into the stage's work folder, so a killed run
resumes where it stopped; under torchrun every rank computes its own chunks and rank 0 assembles
the arrays once.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from gendd_deploy import dist, seeds
from gendd_deploy.artifacts import Artifact, Draft
from gendd_deploy.data import augment as aug
from gendd_deploy.data.loader import batch_stream
from gendd_deploy.errors import ArtifactError
from gendd_deploy.loaders import load_array, load_teacher
from gendd_deploy.models import backbone as bb
from gendd_deploy.stages.base import Context, Stage
from gendd_deploy.stages.teacher import TeacherStage
from gendd_deploy.training import Timer, progress_bar


def transform_of(ctx: Context) -> dict:
    """What makes a cached view: compared by distill before it trusts a cache."""
    d = ctx.data()
    dc = ctx.recipe.data
    return {"augment": dc.augment, "crop_padding": dc.crop_padding, "image_size": d.image_size, "mean": list(d.mean), "std": list(d.std)}


def num_views(ctx: Context) -> int:
    return 1 if ctx.recipe.data.augment == "none" else ctx.recipe.cache.views


def view_params(ctx: Context, view: int, n: int) -> torch.Tensor:
    """Augmentation parameters of one view for all n training images; a function of (seed, view)."""
    d, dc = ctx.data(), ctx.recipe.data
    g = seeds.cache_view(ctx.recipe.pipeline.seed, view)
    return aug.sample_params(n, d.image_size, dc.augment, dc.crop_padding, g)


class CachedFeatures:
    """Read side of a teacher_features artifact (memory-mapped)."""

    def __init__(self, art: Artifact):
        self.art = art
        self.features = load_array(art, "features.npy")  # (V, N, D_t)
        self.params = load_array(art, "params.npy")  # (V, N, 5)
        if self.features.ndim != 3 or self.params.shape != self.features.shape[:2] + (5,):
            raise ArtifactError(f"{art.ref}: features.npy {self.features.shape} and params.npy {self.params.shape} do not fit; delete {art.path} and rerun 'gendd cache'")
        self.views, self.n, self.dim = self.features.shape

    def batch(self, view: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (n, D_t) float32 and params (n, 5) for images idx, each at its own view."""
        v, i = view.numpy(), idx.numpy()
        return torch.from_numpy(np.asarray(self.features[v, i], dtype=np.float32)), torch.from_numpy(np.asarray(self.params[v, i]))


def check_lineage(cache: Artifact, teacher: Artifact, ctx: Context) -> None:
    """Refuse a cache made from another teacher, other data or another transform."""
    info, rebuild = cache.manifest.get("info", {}), ctx.command("cache")
    checks = [
        ("teacher", info.get("teacher_fingerprint"), teacher.fingerprint),
        ("data", info.get("data_fingerprint"), ctx.data().fingerprint),
        ("transform", info.get("transform"), transform_of(ctx)),
    ]
    for what, cached, wanted in checks:
        if cached != wanted:
            c = cached[:8] if isinstance(cached, str) else json.dumps(cached)
            w = wanted[:8] if isinstance(wanted, str) else json.dumps(wanted)
            raise ArtifactError(f"cache {cache.ref} was built for another {what} ({c}, this recipe needs {w}); run '{rebuild}'")


class CacheStage(Stage):
    name = command = "cache"
    artifact = "teacher_features"
    distributed = True

    def inputs(self, ctx: Context) -> dict[str, Stage]:
        return {"teacher": TeacherStage()}

    def config(self, ctx: Context) -> dict:
        cfg = ctx.recipe.cache.model_dump(exclude={"enabled", "batch_size"})
        cfg["views"] = num_views(ctx)
        return {"cache": cfg, "seed": ctx.recipe.pipeline.seed, "transform": transform_of(ctx)}

    def build(self, ctx: Context, draft: Draft, inputs: dict[str, Artifact]) -> None:
        data, device, cc = ctx.data(), ctx.device(), ctx.recipe.cache
        teacher_art = inputs["teacher"]
        teacher = load_teacher(teacher_art, device)
        train, V, N = data.train, num_views(ctx), len(data.train)
        D = teacher_art.manifest["info"]["feature_dim"]
        dtype = np.float16 if cc.dtype == "float16" else np.float32
        chunk_dir = self.work_dir(ctx) / "chunks"
        chunk_dir.mkdir(exist_ok=True)
        # Fixed chunks of batch_size images per view: the same inputs in the same batches whatever
        # the number of processes, so a 2-process cache equals a 1-process cache bit for bit.
        chunks = [(v, s) for v in range(V) for s in range(0, N, cc.batch_size)]
        mine = [c for i, c in enumerate(chunks) if i % dist.world_size() == dist.rank()]
        done = sum(1 for c in chunks if (chunk_dir / f"v{c[0]}-{c[1]}.npz").is_file())
        if done:
            ctx.log(f"cache: resuming, {done} of {len(chunks)} chunks already computed")
        timer, computed = Timer(), 0
        with progress_bar(ctx.console, ctx.quiet) as bar, torch.no_grad():
            task = bar.add_task("cache", total=len(chunks), completed=done, info=f"{V} view(s) x {N} images")
            todo = [(v, s) for v, s in mine if not (chunk_dir / f"v{v}-{s}.npz").is_file()]
            order = [torch.arange(s, min(N, s + cc.batch_size)) for _, s in todo]
            for (v, start), images_u8 in zip(todo, batch_stream(train, order, ctx.recipe.data.loader_workers)):
                target = chunk_dir / f"v{v}-{start}.npz"
                stop = min(N, start + cc.batch_size)
                p = view_params(ctx, v, N)[start:stop]
                x = aug.apply(images_u8, p, ctx.recipe.data.augment, ctx.recipe.data.crop_padding, data.image_size)
                x = aug.normalize(x, data.mean, data.std).to(device)
                feats = bb.pooled_features(teacher, x).float().cpu().numpy().astype(dtype)
                tmp = target.with_name(target.stem + ".part.npz")
                np.savez(tmp, features=feats, params=p.numpy().astype(np.int32))
                tmp.replace(target)  # a chunk file exists only when whole
                computed += stop - start
                bar.update(task, advance=dist.world_size())
        computed = dist.all_reduce_sum(computed)
        dist.barrier()  # every rank's chunks are on disk
        if dist.is_main():
            feats = np.lib.format.open_memmap(draft.path("features.npy"), mode="w+", dtype=dtype, shape=(V, N, D))
            params = np.lib.format.open_memmap(draft.path("params.npy"), mode="w+", dtype=np.int32, shape=(V, N, 5))
            for v, start in chunks:
                try:
                    with np.load(chunk_dir / f"v{v}-{start}.npz", allow_pickle=False) as z:
                        feats[v, start : start + len(z["features"])] = z["features"]
                        params[v, start : start + len(z["params"])] = z["params"]
                except (ValueError, OSError, EOFError, KeyError) as e:  # a chunk file planted or damaged in the work folder
                    raise ArtifactError(f"{chunk_dir / f'v{v}-{start}.npz'} is not a chunk this stage wrote ({e}); delete {chunk_dir} and run the command again") from None
            feats.flush(), params.flush()
            del feats, params
        np.save(draft.path("labels.npy"), train.labels.numpy().astype(np.int64))
        wall = dist.all_reduce_max(timer())
        draft.info.update(
            teacher_fingerprint=teacher_art.fingerprint,
            data_fingerprint=data.fingerprint,
            transform=transform_of(ctx),
            views=V,
            images=N,
            feature_dim=D,
            dtype=cc.dtype,
        )
        draft.metrics.update(wall_s=round(wall, 2), images_per_s=round(computed / max(wall, 1e-9), 1), device=str(device), world_size=dist.world_size())
