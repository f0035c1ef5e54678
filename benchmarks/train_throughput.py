"""GenDD training throughput (images/s) of two student backbones, measured in one run.

Times full training steps (student forward, GenDD loss with the recipe's head and K, backward,
AdamW step) on uint8 images of the recipe's size run through the real augmentation, with random
teacher features of the teacher's width. Steps alternate between the variants (ABAB...) so machine
noise hits both alike; prints a table and writes JSON.

"before" is the student as the project built it earlier: timm's 64-wide plain stem whatever
`channels` says, zero_init_last on, the 4-stage layout [1, 1, 1, 1] / [16, 32, 64, 64]. "after"
is the recipe's student.

Example:
    python benchmarks/train_throughput.py -p pipelines/fashion_mnist.toml --steps 30 --out throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from gendd_deploy.config import load_recipe
from gendd_deploy.data import augment as aug
from gendd_deploy.models import backbone as bb
from gendd_deploy.models.student import GenDDStudent, HeadSpec

BEFORE = {"student_kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 64]}, "stem_width": None, "zero_init_last": True}


def make_student(recipe, kwargs: dict, stem_width, zero_init_last, teacher_dim: int, size: int) -> GenDDStudent:
    dc = recipe.distill
    backbone = bb.create_backbone(dc.student, 10, 1, dc.small_input, kwargs, zero_init_last=zero_init_last, stem_width=stem_width)
    bb.check_contract(backbone, 1, size)
    fc = nn.Linear(teacher_dim, 10)
    return GenDDStudent(backbone, fc, HeadSpec.from_recipe(dc, fc.in_features))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-p", "--pipeline", default="pipelines/fashion_mnist.toml")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant (after 3 warm-up steps)")
    ap.add_argument("--size", type=int, default=28, help="image side")
    ap.add_argument("--teacher-dim", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args()

    recipe = load_recipe(args.pipeline)
    dc, data_cfg = recipe.distill, recipe.data
    torch.manual_seed(0)
    variants = {
        "before": make_student(recipe, BEFORE["student_kwargs"], BEFORE["stem_width"], BEFORE["zero_init_last"], args.teacher_dim, args.size),
        "after": make_student(recipe, dc.student_kwargs, "first_stage", dc.zero_init_last, args.teacher_dim, args.size),
    }
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in variants.items()}
    gen = torch.Generator().manual_seed(0)
    bs = dc.batch_size
    images = torch.randint(0, 256, (bs, 1, args.size, args.size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (bs,), generator=gen)
    f_t = torch.randn(bs, args.teacher_dim, generator=gen)

    def step(name: str) -> float:
        model, opt = variants[name], opts[name]
        t0 = time.perf_counter()
        params = aug.sample_params(bs, args.size, data_cfg.augment, data_cfg.crop_padding, gen)
        x = aug.normalize(aug.apply(images, params, data_cfg.augment, data_cfg.crop_padding, args.size), (0.5,), (0.25,))
        loss, _ = model.gendd_loss(x, f_t, labels, lam=dc.smooth, beta=dc.mixup_beta, mul=dc.diffusion_batch_mul, cfg_drop=dc.cfg_drop, probe_ce=dc.probe_ce, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    for name in variants:
        for _ in range(3):
            step(name)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.steps):
        for name in variants:
            times[name].append(step(name))
    rows = []
    for name, ts in times.items():
        ts = sorted(ts)
        med = ts[len(ts) // 2]
        m = variants[name]
        rows.append({"variant": name, "images_per_s": round(bs / med, 1), "median_step_s": round(med, 4),
                     "backbone_params": bb.count_params(m.backbone), "architecture": bb.architecture(m.backbone)})
    ratio = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    print(f"{'variant':8} {'images/s':>9} {'step s':>8} {'backbone params':>16}")
    for r in rows:
        print(f"{r['variant']:8} {r['images_per_s']:9.1f} {r['median_step_s']:8.4f} {r['backbone_params']:16d}")
    print(f"after / before: {ratio:.2f}x  (threads {torch.get_num_threads()}, batch {bs}, K {dc.diffusion_batch_mul}, head width {dc.head_width})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": args.pipeline, "rows": rows, "ratio": round(ratio, 3), "threads": torch.get_num_threads(),
                               "batch": bs, "machine": platform.machine(), "torch": torch.__version__}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
