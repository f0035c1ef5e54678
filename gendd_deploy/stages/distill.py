"""Distil the student. Reads: teacher, teacher_features. Writes: student. Example: gendd distill -p pipelines/quickstart.toml

method = "gendd": GenDD (gendd-method.md); "kd": Hinton KD (CE + T^2 KL); "ce": the student alone.
All three share data order, augmentation, optimiser and schedule, so they are comparable.
labels = false: unlabelled distillation (gendd with smooth = 0 and no CE; kd with the KL term only).
Teacher features come from the cache (replaying the cached views) or from the teacher run online.

Longer than most modules (~400 lines): stage 1, the GenDD / kd / ce training steps, the fitted
read-outs and the evaluation of every read-out are one stage's work and share its batches.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from gendd_deploy import dist, seeds
from gendd_deploy.artifacts import Artifact, Draft
from gendd_deploy.config import DistillConfig
from gendd_deploy.data import augment as aug
from gendd_deploy.errors import UsageError
from gendd_deploy.loaders import load_teacher
from gendd_deploy.models import backbone as bb
from gendd_deploy.models import readout
from gendd_deploy.models.deployed import SamplerSetting
from gendd_deploy.models.schedule import SamplingSchedule
from gendd_deploy.models.student import DDIM0_STEPS, DDIM0_T_START, GenDDStudent, HeadSpec, contract, deterministic_schedule, stage1_projector
from gendd_deploy.stages.base import Context, Stage
from gendd_deploy.stages.cache import CachedFeatures, CacheStage, check_lineage
from gendd_deploy.stages.teacher import TeacherStage
from gendd_deploy.evaluation import test_top1
from gendd_deploy.training import Checkpointer, Timer, cosine_ramp, model_input, param_groups, progress_bar, steps_per_epoch, train_epochs, wrap_ddp

# Deviations from the authors' code, recorded in every student manifest.
DEVIATIONS = [
    "stage-1 warm-up trains a Linear(D_s, D_t) projection with the backbone; both classifiers stay frozen",
    "deployed samplers may clip the x0 estimate to the per-feature range of the training targets (a calibrate candidate; the published reference does not)",
    "unconditional branch uses z = 0 (as the method page states) rather than a learned null condition",
]


def student_seed(ctx: Context) -> int:
    s = ctx.recipe.distill.seed
    return ctx.recipe.pipeline.seed if s is None else s


def uses_cache(ctx: Context) -> bool:
    return ctx.recipe.cache.enabled and ctx.recipe.distill.use_cache


def build_student(ctx: Context, teacher: nn.Module) -> nn.Module:
    dc, data = ctx.recipe.distill, ctx.data()
    backbone = bb.create_backbone(dc.student, data.num_classes, data.in_chans, dc.small_input, dc.student_kwargs, zero_init_last=dc.zero_init_last)
    bb.check_contract(backbone, data.in_chans, data.image_size)
    if dc.method != "gendd":
        return backbone
    fc = bb.classifier(teacher)
    d_t = fc.in_features
    if d_t % dc.token_dim:
        raise UsageError(f"teacher feature dim {d_t} is not a multiple of [distill] token_dim {dc.token_dim}; pick a divisor of {d_t}")
    return GenDDStudent(backbone, fc, HeadSpec.from_recipe(dc, d_t))


class RangeTracker(nn.Module):
    """Per-feature min / max of the training targets: the sampler clips its x0 estimate to it.

    Kept apart from the student because DDP re-broadcasts module buffers from rank 0 at each
    forward; checkpointed with it, and reduced over ranks at the end of training.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("lo", torch.full((dim,), float("inf")))
        self.register_buffer("hi", torch.full((dim,), -float("inf")))

    @torch.no_grad()
    def update(self, target: torch.Tensor) -> None:
        torch.minimum(self.lo, target.min(0).values, out=self.lo)
        torch.maximum(self.hi, target.max(0).values, out=self.hi)


class Stage1Net(nn.Module):
    """Stage-1 warm-up network: logits = teacher_fc(proj(f_s)), one module for DDP."""

    def __init__(self, student: GenDDStudent, proj: nn.Linear):
        super().__init__()
        self.student, self.proj = student, proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student.teacher_fc(self.proj(self.student.features(x)))


def published_setting(dc: DistillConfig) -> SamplerSetting:
    """The reference read-out distill scores, from the recipe's eval_* fields; their defaults are
    the authors' evaluation, SamplerSetting.published() (tests/test_fingerprints.py checks)."""
    return SamplerSetting(
        sampler=dc.eval_sampler, steps=dc.eval_steps, draws=dc.eval_draws, guidance=float(dc.eval_guidance),
        temperature=float(dc.eval_temperature), clip=False,
    )


# DDIM-8 from t = 900 at temperature 0: the deterministic read-out distill reports as ddim0 and
# that the sampler-distilled read-out is fitted to (models/student.deterministic_schedule)
DDIM0 = SamplerSetting(sampler="ddim", steps=DDIM0_STEPS, draws=1, guidance=1.0, temperature=0.0, t_start=DDIM0_T_START)


# The [distill] fields each method's fingerprint hashes: an allowlist, so a field added to the
# recipe changes no existing fingerprint until it is placed here (tests/test_fingerprints.py fails
# on a field that is in no list).
SHARED_FIELDS = (
    "method", "labels", "student", "student_kwargs", "small_input", "zero_init_last", "seed", "train_limit",
    "epochs", "batch_size", "lr", "weight_decay", "warmup_fraction", "beta1", "beta2_start", "beta2_end",
    "kd_temperature", "kd_weight", "ce_weight", "amp", "channels_last", "compile",
)  # fmt: skip
GENDD_FIELDS = (
    "stage1_epochs", "head_width", "head_depth", "token_dim", "smooth", "mixup_beta", "cfg_drop",
    "diffusion_batch_mul", "train_timesteps", "probe_ce",
    "eval_sampler", "eval_steps", "eval_draws", "eval_guidance", "eval_temperature", "eval_limit", "eval_published",
)  # fmt: skip
UNHASHED_FIELDS = ("use_cache",)  # how teacher features are read (cache or online), not what is trained
FINGERPRINT_FIELDS = {"ce": SHARED_FIELDS, "kd": SHARED_FIELDS, "gendd": SHARED_FIELDS + GENDD_FIELDS}

# How the fitted read-outs are made, part of every student's fingerprint: 2 = every method gets
# them, fitted on the un-augmented training images (1 was GenDD only, on the first cached view).
READOUT_PROTOCOL = 2

# The published sampler beside the authors' own run: the same noise with alpha_bar floored at 1e-3
# in the x0 estimate (gendd-method.md, "Numerical pitfalls": at t = 999 alpha_bar is ~2.4e-9).
PUBLISHED_FLOOR = 1e-3


class DistillStage(Stage):
    name = command = "distill"
    artifact = "student"
    distributed = True

    def inputs(self, ctx: Context) -> dict[str, Stage]:
        ins: dict[str, Stage] = {"teacher": TeacherStage()}
        if uses_cache(ctx):
            ins["cache"] = CacheStage()
        return ins

    def config(self, ctx: Context) -> dict:
        dc = ctx.recipe.distill
        if dc.method == "ce" and not dc.labels:
            raise UsageError(f"{ctx.recipe.source}: [distill] method = 'ce' needs labels; set labels = true or method = 'gendd' / 'kd'")
        cfg = dc.model_dump(include=set(FINGERPRINT_FIELDS[dc.method]))
        cfg["seed"] = student_seed(ctx)  # an explicit seed equal to the pipeline's is the same run
        # The number of processes is not part of the fingerprint (the recipe is the same run); the
        # global batch it implies is recorded in the manifest (info.global_batch).
        return {"distill": cfg, "seed": student_seed(ctx), "augment": ctx.recipe.data.augment, "readout_protocol": READOUT_PROTOCOL}

    # ---- training --------------------------------------------------------------------------

    def build(self, ctx: Context, draft: Draft, inputs: dict[str, Artifact]) -> None:
        dc, data, device = ctx.recipe.distill, ctx.data(), ctx.device()
        torch.manual_seed(student_seed(ctx))  # same init on every rank (DDP also broadcasts rank 0's)
        teacher = load_teacher(inputs["teacher"], device)
        cache = None
        if "cache" in inputs:
            check_lineage(inputs["cache"], inputs["teacher"], ctx)
            cache = CachedFeatures(inputs["cache"])
        student = build_student(ctx, teacher).to(device)
        if device.type == "cuda" and dc.channels_last:
            student = student.to(memory_format=torch.channels_last)
        trainable = student.backbone if isinstance(student, GenDDStudent) else student
        torch.manual_seed(seeds.global_draws(student_seed(ctx), dist.rank()))
        timer = Timer()
        stats = self._stage1(ctx, student, teacher, cache, device) if (dc.method == "gendd" and dc.stage1_epochs and dc.labels) else {}
        stats.update(self._train(ctx, student, teacher, cache, device))
        readouts = self._fit_readouts(ctx, student, teacher, device)
        stats.update(self._evaluate(ctx, student, teacher, device, readouts))
        stats["teacher_top1"] = inputs["teacher"].metrics.get("test_top1")
        stats["wall_s"] = round(timer(), 2)
        torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, draft.path("model.pt"))
        if readouts:
            flat = {f"{name}.{k}": v.detach().cpu() for name, lin in readouts.items() for k, v in lin.state_dict().items()}
            torch.save(flat, draft.path("readouts.pt"))
        arch = bb.architecture(trainable)
        info = {
            "method": dc.method,
            "labels": dc.labels,
            "architecture": arch,
            "student_feature_dim": bb.feature_dim(trainable),
            "params_backbone": bb.count_params(trainable),
            "preprocess": data.preprocess,
            "class_names": data.class_names,
            "teacher_source": "cache" if cache else "online",
            "world_size": dist.world_size(),
            "global_batch": dc.batch_size * dist.world_size(),
            "device": str(device),
            "bf16_autocast": dc.amp and device.type == "cuda",
            "channels_last": dc.channels_last and device.type == "cuda",
        }
        if readouts:
            info["readouts"] = {name: {"in_features": lin.in_features, "out_features": lin.out_features} for name, lin in readouts.items()}
        if isinstance(student, GenDDStudent):
            info["head"] = student.spec.to_manifest(student.head)
            info["deviations"] = DEVIATIONS
        draft.info.update(info)
        draft.metrics.update(stats)
        self._report(ctx, stats)

    def _views(self, cache, n: int, seed: int, epoch: int) -> torch.Tensor:
        if cache is None or cache.views == 1:
            return torch.zeros(n, dtype=torch.long)
        return torch.randint(0, cache.views, (n,), generator=seeds.view_choice(seed, epoch))

    def _batch(self, ctx, idx, views, gen, *, cache, teacher, device, images_u8=None):
        """Inputs x (n, C, H, W), teacher features f_t (n, D_t), labels y (n,) for one batch."""
        data, dcfg = ctx.data(), ctx.recipe.data
        if images_u8 is None:
            images_u8 = data.train.get_batch(idx)
        if cache is not None:
            f_t, params = cache.batch(views[idx], idx)
            f_t = f_t.to(device)
        else:
            params = aug.sample_params(len(idx), data.image_size, dcfg.augment, dcfg.crop_padding, gen)
        x = aug.apply(images_u8, params, dcfg.augment, dcfg.crop_padding, data.image_size)
        x = aug.normalize(x, data.mean, data.std).to(device)
        if cache is None:
            with torch.no_grad():
                f_t = bb.pooled_features(teacher, x).float()
        return x, f_t, data.train.labels[idx].to(device)

    def _loop(self, ctx, *, label: str, epochs: int, opt, step_fn, teacher, cache, device, ckpt_name: str, modules: dict, beta2=None, warmup: bool = True) -> dict:
        """distill's use of the shared epoch loop (training.train_epochs): batches of (x, f_t, y)
        from the cache or the online teacher, bf16 autocast on CUDA, AdamW's beta2 on its ramp,
        a linear warm-up over [distill] warmup_fraction of the steps (none when `warmup` is off)."""
        dc, seed = ctx.recipe.distill, student_seed(ctx)
        n = min(len(ctx.data().train), dc.train_limit or len(ctx.data().train))
        per_epoch = steps_per_epoch(n, dc.batch_size, section="distill", limit_field="[distill] train_limit")
        views = functools.lru_cache(maxsize=1)(lambda epoch: self._views(cache, n, seed, epoch))

        def step(epoch, idx, images_u8, gen):
            x, f_t, y = self._batch(ctx, idx, views(epoch), gen, cache=cache, teacher=teacher, device=device, images_u8=images_u8)
            if device.type == "cuda" and dc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dc.amp and device.type == "cuda"):
                return step_fn(x, f_t, y, gen)

        return train_epochs(
            train_images=ctx.data().train, loader_workers=ctx.recipe.data.loader_workers, console=ctx.console, quiet=ctx.quiet, log=ctx.log,
            label=label, failure_point="distill", epochs=epochs, n=n, batch_size=dc.batch_size, seed=seed,
            opt=opt, lr=dc.lr, warmup_steps=round(dc.warmup_fraction * epochs * per_epoch) if warmup else 0,
            modules=modules, ckpt=Checkpointer(self.work_dir(ctx), ckpt_name), step=step, device=device,
            betas=None if beta2 is None else (lambda s, total: (dc.beta1, beta2(s, total))),
        )

    def _stage1(self, ctx, student: GenDDStudent, teacher, cache, device) -> dict:
        dc = ctx.recipe.distill
        proj = stage1_projector(bb.feature_dim(student.backbone), student.feature_dim_teacher).to(device)
        frozen = {id(p) for p in bb.classifier(student.backbone).parameters()}
        params = [p for p in student.backbone.parameters() if id(p) not in frozen]
        opt = torch.optim.AdamW([{"params": params, "weight_decay": dc.weight_decay}, {"params": proj.parameters(), "weight_decay": 0.0}], lr=dc.lr)

        net = wrap_ddp(Stage1Net(student, proj), device)

        def step_fn(x, f_t, y, gen):
            loss = F.cross_entropy(net(x), y)
            return loss, {"ce": loss.detach()}

        # its own schedule: cosine from the full lr, no warm-up ramp (it would eat a 1-epoch stage)
        stats = self._loop(
            ctx, label="distill stage 1", epochs=dc.stage1_epochs, opt=opt, step_fn=step_fn, teacher=teacher, cache=cache,
            device=device, ckpt_name="stage1.pt", modules={"student": student, "proj": proj}, warmup=False,
        )
        return {f"stage1_{k}": v for k, v in stats.items()}

    def _train(self, ctx, student, teacher, cache, device) -> dict:
        dc = ctx.recipe.distill
        beta2 = lambda s, t: cosine_ramp(s, t, dc.beta2_start, dc.beta2_end)  # noqa: E731
        if isinstance(student, GenDDStudent):
            if not dc.labels:
                # no labels, nothing to train the student's own fc on: frozen, and no probe is reported
                bb.classifier(student.backbone).requires_grad_(False)
            # no weight decay on the head and on norm layers (1-d params)
            groups = param_groups(student.backbone, dc.weight_decay)
            groups[1]["params"] += list(student.norm.parameters()) + list(student.head.parameters())
            opt = torch.optim.AdamW(groups, lr=dc.lr, betas=(dc.beta1, dc.beta2_start))
            lam = dc.smooth if dc.labels else 0.0
            # the sampling range: per-feature extremes of the contracted targets, kept outside the
            # module (DDP broadcasts module buffers from rank 0) and reduced over ranks at the end
            tracker = RangeTracker(student.feature_dim_teacher).to(device)
            net = wrap_ddp(student, device)

            def step_fn(x, f_t, y, gen):
                with torch.no_grad():
                    tgt = contract(f_t.float(), y, student.teacher_fc.weight, lam) if dc.labels else f_t.float()
                    tracker.update(tgt)
                return net(x, f_t, y if dc.labels else None, lam=lam, beta=dc.mixup_beta, mul=dc.diffusion_batch_mul, cfg_drop=dc.cfg_drop, probe_ce=dc.probe_ce, generator=gen)
        else:
            opt = torch.optim.AdamW(param_groups(student, dc.weight_decay), lr=dc.lr, betas=(dc.beta1, dc.beta2_start))
            t_fc = bb.classifier(teacher)
            net = wrap_ddp(student, device)
            fwd = torch.compile(net) if (dc.compile and device.type == "cuda") else net

            def step_fn(x, f_t, y, gen):
                logits = fwd(x)
                parts = {}
                loss = logits.new_zeros(())
                if dc.labels and dc.ce_weight > 0:
                    ce = F.cross_entropy(logits, y)
                    loss, parts["ce"] = loss + dc.ce_weight * ce, ce.detach()
                if dc.method == "kd":
                    T = dc.kd_temperature
                    with torch.no_grad():
                        t_logits = t_fc(f_t.float())
                    kl = F.kl_div(F.log_softmax(logits.float() / T, 1), F.log_softmax(t_logits / T, 1), reduction="batchmean", log_target=True) * T * T
                    loss, parts["kl"] = loss + (dc.kd_weight if dc.labels else 1.0) * kl, kl.detach()
                return loss, parts

        if not isinstance(student, GenDDStudent):
            modules = {"student": student}
        else:
            modules = {"student": student, "range": tracker}
        stats = self._loop(
            ctx, label=f"distill {dc.method}", epochs=dc.epochs, opt=opt, step_fn=step_fn, teacher=teacher, cache=cache,
            device=device, ckpt_name="train.pt", modules=modules, beta2=beta2,
        )
        if not isinstance(student, GenDDStudent):
            return stats
        student.clip_lo.copy_(dist.all_reduce_tensor(tracker.lo, "min"))
        student.clip_hi.copy_(dist.all_reduce_tensor(tracker.hi, "max"))
        return stats

    # ---- evaluation ------------------------------------------------------------------------

    @torch.no_grad()
    def _fit_readouts(self, ctx, student, teacher, device) -> dict[str, nn.Linear]:
        """Linear read-outs fitted on the frozen backbone of any student (models/readout.py), over
        the un-augmented training images, preprocessed as at test time: fit_ce where labels exist,
        fit_ridge (label-free, through the teacher classifier) for every student, fit_sampler for
        GenDD students. The teacher runs online on the same images (the cache holds augmented views)."""
        dc, data = ctx.recipe.distill, ctx.data()
        student.eval()
        gendd = isinstance(student, GenDDStudent)
        features = student.features if gendd else functools.partial(bb.pooled_features, student)
        n = min(len(data.train), dc.train_limit or len(data.train))
        ddim0 = deterministic_schedule(student) if gendd else None
        f_s, f_t, f_d, ys = [], [], [], []
        with progress_bar(ctx.console, ctx.quiet) as bar:
            task = bar.add_task("fit read-outs", total=n, info="")
            for idx in torch.arange(n).split(ctx.recipe.data.eval_batch_size):
                x = model_input(ctx.data(), data.train.get_batch(idx), device)
                fs = features(x)
                f_s.append(fs.float().cpu())
                f_t.append(bb.pooled_features(teacher, x).float().cpu())
                if gendd:  # sampler distillation: the deterministic sampler's teacher-like feature is the target
                    f_d.append(student.sample_features(fs, ddim0, "ddim", draws=1, guidance=1.0, temperature=0.0).float().cpu())
                ys.append(data.train.labels[idx])
                bar.update(task, advance=len(idx))
        f_s, f_t, ys = torch.cat(f_s), torch.cat(f_t), torch.cat(ys)
        out = {"fit_ridge": readout.fit_ridge(f_s, f_t, bb.classifier(teacher))}
        if gendd:
            out["fit_sampler"] = readout.fit_ridge(f_s, torch.cat(f_d), student.teacher_fc)
        if dc.labels:
            out["fit_ce"] = readout.fit_ce(f_s, ys, data.num_classes)
        return {k: v.to(device) for k, v in out.items()}

    @torch.no_grad()
    def _evaluate(self, ctx, student, teacher, device, readouts: dict | None = None) -> dict:
        dc, data = ctx.recipe.distill, ctx.data()
        student.eval()
        # every read-out is scored on the same test images: all of them unless eval_limit says fewer
        n = min(len(data.test), dc.eval_limit or len(data.test))
        out: dict = {"test_images": n}
        gendd = isinstance(student, GenDDStudent)
        if not gendd:
            out["test_top1"] = round(self._top1(ctx, device, n, lambda x, i: student(x), "eval"), 3)  # its own head
            features = functools.partial(bb.pooled_features, student)
        else:
            features = student.features
            if dc.labels:  # unlabelled students have no trained probe to report
                probe = lambda x, i: student.probe_logits(student.features(x))  # noqa: E731
                out["probe_top1"] = round(self._top1(ctx, device, n, probe, "eval probe"), 3)
            if dc.eval_published:
                # the published reference exactly as the authors run it (no x0 clipping, no alpha_bar
                # floor), then with the same noise and an alpha_bar floor, to show what t = 999 costs
                published = published_setting(dc)
                out["published_top1"] = round(self._top1(ctx, device, n, self._sampler_fn(ctx, student, published), f"eval {published.label()}"), 3)
                out["published_sampler"] = published.label()
                floored = replace(published, min_alpha_bar=PUBLISHED_FLOOR)
                out["published_floored_top1"] = round(self._top1(ctx, device, n, self._sampler_fn(ctx, student, floored), f"eval {published.label()} floor"), 3)
                out["test_top1"] = out["published_top1"]
            # deterministic read-out (DDIM from zero noise), the cheap alternative calibrate considers
            out["ddim0_top1"] = round(self._top1(ctx, device, n, self._sampler_fn(ctx, student, DDIM0), f"eval {DDIM0.label()}"), 3)
        for name, lin in (readouts or {}).items():
            fn = lambda x, i, lin=lin: lin(features(x))  # noqa: E731
            out[f"{name}_top1"] = round(self._top1(ctx, device, n, fn, f"eval {name}"), 3)
        return out

    def _sampler_fn(self, ctx, student, s: SamplerSetting):
        """logits_fn(x, batch_index) of sampler setting `s`, with fresh noise seeded per batch (the
        same numbers whatever the number of processes)."""
        h, seed = student.head, student_seed(ctx)
        sched = SamplingSchedule(h.train_schedule, s.steps, t_start=s.t_start, min_alpha_bar=s.min_alpha_bar)

        def fn(x, batch_index):
            g = seeds.eval_noise(seed, batch_index)
            noise = torch.randn(h.noise_shape(len(x), s.draws, s.steps, h.num_tokens, h.token_dim), generator=g).to(x.device)
            return student.sample_logits(x, sched, s.sampler, draws=s.draws, guidance=s.guidance, temperature=s.temperature, noise=noise, clip=s.clip)

        return fn

    def _top1(self, ctx, device, n, logits_fn, label) -> float:
        """Top-1 (%) of logits_fn over the first n test images (evaluation.test_top1), with a bar."""
        with progress_bar(ctx.console, ctx.quiet) as bar:
            task = bar.add_task(label, total=n, info="")
            return test_top1(logits_fn, ctx.data(), n=n, batch_size=ctx.recipe.data.eval_batch_size, device=device,
                             on_batch=lambda k: bar.update(task, advance=k))

    def _report(self, ctx, stats: dict) -> None:
        shown = {k: v for k, v in stats.items() if "top1" in k}
        ctx.log("distill: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
