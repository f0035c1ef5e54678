"""ImageFolder decoding throughput: images/s through the training batch stream, by worker count.

Writes a tree of random JPEG files (or reads --root), then streams one epoch of batches in a
seeded order with 0, 1, ... workers (same batches each time: checked) and prints a table.

Example:
    python benchmarks/loader_throughput.py --images 2000 --side 160 --size 128 --workers 0 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gendd_deploy.config import DataConfig
from gendd_deploy.data import load_data
from gendd_deploy.data.loader import batch_stream
from gendd_deploy.training import batches, epoch_order


def write_tree(root: Path, n: int, side: int) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 10)):
        for k in range(count):
            d = root / split / f"c{k % 10}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)).save(d / f"{k}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="an ImageFolder tree (default: write one)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--side", type=int, default=160, help="side of the written images")
    ap.add_argument("--size", type=int, default=128, help="image_size to decode to")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--out", default="benchmarks/results/loader_throughput.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "tree"
        if not args.root:
            write_tree(root, args.images, args.side)
        data = load_data(DataConfig(source="imagefolder", root=str(root), image_size=args.size, calib_fraction=0.01))
        order = batches(epoch_order(len(data.train), 0, 0), args.batch)
        rows, first = [], None
        for w in args.workers:
            t0 = time.perf_counter()
            got = [b for b in batch_stream(data.train, order, w)]
            dt = time.perf_counter() - t0
            digest = sum(int(b.to(torch.int64).sum()) for b in got)
            first = digest if first is None else first
            assert digest == first, "worker count changed the batches"
            n = sum(len(b) for b in got)
            rows.append({"workers": w, "images": n, "seconds": round(dt, 2), "images_per_s": round(n / dt, 1)})
    base = rows[0]["images_per_s"]
    print(f"{'workers':>7} {'images':>7} {'s':>7} {'images/s':>9} {'vs first':>8}")
    for r in rows:
        print(f"{r['workers']:7d} {r['images']:7d} {r['seconds']:7.2f} {r['images_per_s']:9.1f} {r['images_per_s'] / base:7.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "image_size": args.size, "batch": args.batch, "cpus": torch.get_num_threads()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
