"""Offline image data: `load_data(cfg)` -> `DataBundle` with train / calib / test `ImageSet`s.

    bundle = load_data(recipe.data)
    x = bundle.train.get_batch(torch.arange(8))          # uint8 (8, C, H, W)
    x = to_model_input(x, bundle.mean, bundle.std)        # float32, normalized

Splits: calibration is held out of the official train split (seeded by `split_seed`); test is the
official test split (digits: a fixed stratified 20%, see sources.py) and never mixes with the
others. `fingerprint` is a sha256 over everything that determines the bytes of the splits and the
augmentation recipe; `describe()` returns those inputs plus sizes and mean/std, for artifacts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from gendd_deploy.config import DataConfig
from gendd_deploy.data.augment import CROP_MODES, apply, normalize, sample_params, to_model_input
from gendd_deploy.data.preprocess import resize_uint8
from gendd_deploy.data.sources import FolderImageSet, ImageSet, RawSource, TensorImageSet, read_source
from gendd_deploy.data.splits import holdout_calib, index_digest, long_tail, take_first
from gendd_deploy.hashing import json_sha256
from gendd_deploy.imaging import decode_image, make_spec, preprocess_image

__all__ = [
    "DataBundle",
    "FolderImageSet",
    "ImageSet",
    "TensorImageSet",
    "apply",
    "decode_image",
    "load_data",
    "normalize",
    "preprocess_image",
    "sample_params",
    "to_model_input",
]


@dataclass
class DataBundle:
    """The three splits and everything a later stage needs to use them consistently."""

    train: ImageSet
    calib: ImageSet
    test: ImageSet
    num_classes: int
    in_chans: int
    image_size: int  # side of the (square) images that get_batch returns
    class_names: list[str]
    mean: tuple[float, ...]  # per channel, for images scaled to [0, 1]
    std: tuple[float, ...]
    fingerprint: str  # sha256 hex of the fingerprint inputs in describe()
    preprocess: dict  # recipe for preprocess_image, see gendd_deploy/imaging.py
    augment: str = "none"
    crop_padding: int = 0
    info: dict = field(default_factory=dict, repr=False)

    def describe(self) -> dict:
        """JSON-able: the fingerprint inputs plus root, split sizes, mean / std and the fingerprint."""
        return copy.deepcopy(self.info)


def _mean_std(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean / std of uint8 (N, C, H, W), for values scaled to [0, 1].

    Sums are exact int64, so the result does not depend on chunking or thread count; rounded to 6
    decimals so the numbers written to artifacts are stable. A constant channel gets std 1.
    """
    n, chans, h, w = images.shape
    total = torch.zeros(chans, dtype=torch.int64)
    total_sq = torch.zeros(chans, dtype=torch.int64)
    for start in range(0, n, chunk):
        x = images[start : start + chunk].to(torch.int64)
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = n * h * w
    mean = total.double() / count  # in 0..255 units, (C,)
    var = (total_sq.double() / count - mean**2).clamp(min=0)
    mean_unit = [round(float(m) / 255.0, 6) for m in mean]
    std_unit = [round(float(s) / 255.0, 6) for s in var.sqrt()]
    std_unit = [s if s > 1e-6 else 1.0 for s in std_unit]
    return tuple(mean_unit), tuple(std_unit)


def load_data(cfg: DataConfig) -> DataBundle:
    """Read the configured source from local files (never downloads) and split it."""
    raw: RawSource = read_source(cfg.source, cfg.root, cfg.image_size)

    if cfg.imbalance_factor is not None:
        # long-tailed training data (calibration is held out of it too); test stays as published
        pool = long_tail(raw.train.labels, cfg.imbalance_factor, cfg.split_seed)
        train_pos, calib_pos = holdout_calib(len(pool), cfg.calib_fraction, cfg.split_seed)
        train_idx, calib_idx = pool[train_pos], pool[calib_pos]
    else:
        train_idx, calib_idx = holdout_calib(len(raw.train), cfg.calib_fraction, cfg.split_seed)
    train_idx = take_first(train_idx, cfg.train_limit)
    test_idx = take_first(torch.arange(len(raw.test)), cfg.test_limit)
    train = raw.train.subset(train_idx, "train")
    calib = raw.train.subset(calib_idx, "calib")
    test = raw.test.subset(test_idx, "test")

    # In-memory sources are resized once, here, after the split so limits keep it cheap;
    # imagefolder decodes at image_size already (native_size None).
    image_size = cfg.image_size or raw.native_size
    if raw.native_size is not None and image_size != raw.native_size:
        train, calib, test = (
            TensorImageSet(resize_uint8(s.images, image_size), s.labels, s.name) for s in (train, calib, test)
        )

    if raw.mean is not None:
        mean, std = raw.mean, raw.std
    else:
        mean, std = _mean_std(train.images)

    # Padding only changes the data under the crop modes; keep it out of the fingerprint otherwise
    # so tweaking an unused knob does not invalidate cached artifacts.
    padding = cfg.crop_padding if cfg.augment in CROP_MODES else 0
    identity = {
        "source": raw.source,
        "files": raw.files,
        "split": {
            "seed": cfg.split_seed,
            "calib_fraction": cfg.calib_fraction,
            "train_limit": cfg.train_limit,
            "test_limit": cfg.test_limit,
            **({"imbalance_factor": cfg.imbalance_factor, "imbalance_profile": "exp"} if cfg.imbalance_factor is not None else {}),
            "indices_sha256": index_digest(train_idx, calib_idx, test_idx),
        },
        "image_size": image_size,
        "augment": cfg.augment,
        "crop_padding": padding,
        **raw.extra,
    }
    fingerprint = json_sha256(identity)
    info = {
        **identity,
        "root": raw.root,
        "native_size": raw.native_size,
        "sizes": {"train": len(train), "calib": len(calib), "test": len(test)},
        "num_classes": len(raw.class_names),
        "in_chans": raw.in_chans,
        "class_names": list(raw.class_names),
        "mean": list(mean),
        "std": list(std),
        "fingerprint": fingerprint,
    }
    return DataBundle(
        train=train,
        calib=calib,
        test=test,
        num_classes=len(raw.class_names),
        in_chans=raw.in_chans,
        image_size=image_size,
        class_names=list(raw.class_names),
        mean=tuple(mean),
        std=tuple(std),
        fingerprint=fingerprint,
        preprocess=make_spec(raw.in_chans, image_size, mean, std, raw.backend),
        augment=cfg.augment,
        crop_padding=cfg.crop_padding,
        info=info,
    )
