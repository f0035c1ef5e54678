"""Train or load the teacher. Reads: data. Writes: teacher. Example: gendd teacher -p pipelines/quickstart.toml

The artifact holds `model.pt` (state_dict) and, in the manifest, the architecture needed to rebuild
it, its feature dim D_t, the preprocessing, class names and its test top-1.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from gendd_deploy import dist
from gendd_deploy.artifacts import Artifact, Draft, sha256_file
from gendd_deploy.data import augment as aug
from gendd_deploy.errors import UsageError
from gendd_deploy.models import backbone as bb
from gendd_deploy.stages.base import Context, Stage
from gendd_deploy.evaluation import test_top1
from gendd_deploy.training import Checkpointer, Timer, param_groups, steps_per_epoch, train_epochs, wrap_ddp




def load_state_dict_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"teacher checkpoint {p} not found; set [teacher] checkpoint to a state_dict file (torch.save(model.state_dict(), ...))")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"teacher checkpoint {p} is not a loadable torch state_dict ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UsageError(f"teacher checkpoint {p} holds a {type(obj).__name__}, not a state_dict")
    return obj






class TeacherStage(Stage):
    name = command = artifact = "teacher"
    distributed = True

    def config(self, ctx: Context) -> dict:
        cfg = ctx.recipe.teacher.model_dump()
        out = {"teacher": cfg, "seed": ctx.recipe.pipeline.seed}
        if cfg["mode"] == "load":
            if not cfg["checkpoint"] and not cfg["pretrained"]:
                raise UsageError(f"{ctx.recipe.source}: [teacher] mode = 'load' needs checkpoint = 'FILE' or pretrained = true")
            if cfg["checkpoint"]:
                if not Path(cfg["checkpoint"]).is_file():
                    load_state_dict_file(cfg["checkpoint"])  # raises the helpful error
                out["checkpoint_sha256"] = sha256_file(Path(cfg["checkpoint"]))
            # training knobs do not shape a loaded teacher
            for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "label_smoothing", "zero_init_last"):
                cfg.pop(k)
        return out

    def build(self, ctx: Context, draft: Draft, inputs: dict[str, Artifact]) -> None:
        tc, data, device = ctx.recipe.teacher, ctx.data(), ctx.device()
        torch.manual_seed(ctx.recipe.pipeline.seed)
        model = bb.create_backbone(
            tc.model, data.num_classes, data.in_chans, tc.small_input, tc.model_kwargs, pretrained=tc.pretrained, zero_init_last=tc.zero_init_last
        )
        feature_dim = bb.check_contract(model, data.in_chans, data.image_size)
        timer = Timer()
        if tc.mode == "load":
            if tc.checkpoint:
                try:
                    model.load_state_dict(load_state_dict_file(tc.checkpoint))
                except RuntimeError as e:
                    first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
                    raise UsageError(f"checkpoint {tc.checkpoint} does not fit timm '{tc.model}' with this data's {data.num_classes} classes / {data.in_chans} channels: {first}") from None
            model = model.to(device)
            train_metrics = {}
        else:
            model = model.to(device)
            train_metrics = self._train(ctx, model, device)
        model.eval()
        acc = test_top1(lambda x, b: model(x), data, n=len(data.test), batch_size=ctx.recipe.data.eval_batch_size, device=device)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, draft.path("model.pt"))
        draft.info.update(
            architecture=bb.architecture(model),
            feature_dim=feature_dim,
            world_size=dist.world_size(),
            global_batch=tc.batch_size * dist.world_size(),
            params=bb.count_params(model),
            preprocess=data.preprocess,
            class_names=data.class_names,
            data=data.describe(),
        )
        draft.metrics.update(test_top1=round(acc, 3), test_images=len(data.test), wall_s=round(timer(), 2), device=str(device), **train_metrics)
        ctx.log(f"teacher: {tc.model} test top-1 {acc:.2f}% on {len(data.test)} images")

    def _train(self, ctx: Context, model: torch.nn.Module, device: torch.device) -> dict:
        tc, dc, data = ctx.recipe.teacher, ctx.recipe.data, ctx.data()
        n = len(data.train)
        per_epoch = steps_per_epoch(n, tc.batch_size, section="teacher", limit_field="[data] train_limit")
        opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr)
        net = wrap_ddp(model, device)

        def step(epoch, idx, images_u8, gen):
            params = aug.sample_params(len(idx), data.image_size, dc.augment, dc.crop_padding, gen)
            x = aug.apply(images_u8, params, dc.augment, dc.crop_padding, data.image_size)
            x = aug.normalize(x, data.mean, data.std).to(device)
            loss = F.cross_entropy(net(x), data.train.labels[idx].to(device), label_smoothing=tc.label_smoothing)
            return loss, {"loss": loss.detach()}

        stats = train_epochs(
            train_images=ctx.data().train, loader_workers=ctx.recipe.data.loader_workers, console=ctx.console, quiet=ctx.quiet, log=ctx.log,
            label="teacher", failure_point="teacher", epochs=tc.epochs, n=n, batch_size=tc.batch_size,
            seed=ctx.recipe.pipeline.seed, opt=opt, lr=tc.lr, warmup_steps=tc.warmup_epochs * per_epoch,
            modules={"model": model}, ckpt=Checkpointer(self.work_dir(ctx)), step=step, device=device,
        )
        return {**stats, "train_images": n}
