"""Offline readers for the data sources, and the two `ImageSet` kinds they produce.

Nothing here downloads anything: each reader looks in a local folder and, when the data is not
there, raises a UsageError that says where it looked and how to get the data.

- digits:        sklearn's bundled 8x8 digits (1797 images, values 0..16 scaled to 0..255).
                 It has no official test split, so a fixed stratified 20% (seed DIGITS_TEST_SEED,
                 independent of split_seed) is held out as test.
- fashion_mnist: the four IDX files (gzipped or not), parsed here with struct + numpy.
- cifar100:      the python-pickle release (`train`, `test`, `meta`), read by an unpickler that
                 builds only dicts, lists, strings, numbers and numpy arrays: a pickle that asks
                 for anything else (a callable, a class) is refused, so it cannot run code.
- imagefolder:   root/train/<class>/<image> and root/val/<class>/<image> (or test/), decoded lazily
                 by PIL, so the tree is never held in memory.

Each reader returns a `RawSource`: the official train and test sets plus what the fingerprint
needs to know about the files.

Longer than most modules (~440 lines): one offline reader per source format (digits, IDX,
CIFAR pickles, ImageFolder trees), each short, kept together with the image sets they fill.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import pickle
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gendd_deploy.data.preprocess import image_to_uint8
from gendd_deploy.data.splits import stratified_holdout
from gendd_deploy.errors import DataNotFound, UsageError
from gendd_deploy.hashing import file_sha256

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
CIFAR100_ROOT = "./data/cifar-100-python"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0


# --------------------------------------------------------------------------------------------
# Image sets


class ImageSet(torch.utils.data.Dataset):
    """A labelled split. `get_batch(idx)` -> uint8 (n, C, H, W); `labels` is int64 (N,)."""

    name: str
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def subset(self, idx: torch.Tensor, name: str) -> "ImageSet":
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.get_batch(torch.tensor([i]))[0], int(self.labels[i])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)})"


class TensorImageSet(ImageSet):
    """Images held in memory as one uint8 tensor (N, C, H, W); `get_batch` is plain indexing."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, name: str):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.name = name

    @property
    def in_chans(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    def get_batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx]

    def subset(self, idx: torch.Tensor, name: str) -> "TensorImageSet":
        return TensorImageSet(self.images[idx], self.labels[idx], name)


class FolderImageSet(ImageSet):
    """Image files decoded on demand: RGB, shorter side resized to `image_size`, centre-cropped."""

    in_chans = 3

    def __init__(self, paths: list[str], labels: torch.Tensor, image_size: int, name: str):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = paths
        self.labels = labels.to(torch.int64)
        self.image_size = image_size
        self.name = name

    def _load(self, path: str) -> torch.Tensor:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. palette images with transparency
                with Image.open(path) as img:
                    return image_to_uint8(img, 3, self.image_size, "pil")
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise UsageError(f"cannot read image {path}: {e}; fix or remove the file") from None

    def get_batch(self, idx: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        out = torch.empty((len(idx), 3, size, size), dtype=torch.uint8)
        for k, i in enumerate(idx.tolist()):
            out[k] = self._load(self.paths[i])
        return out

    def subset(self, idx: torch.Tensor, name: str) -> "FolderImageSet":
        return FolderImageSet([self.paths[i] for i in idx.tolist()], self.labels[idx], self.image_size, name)


@dataclass
class RawSource:
    """What a reader found: the official train / test sets and the identity of their files."""

    source: str
    root: str | None
    train: ImageSet  # official train split, before the calibration hold-out
    test: ImageSet
    class_names: list[str]
    in_chans: int
    native_size: int | None  # side of the stored images; None when decoded at image_size (imagefolder)
    files: list[dict]  # JSON-able identity of the data files, goes into the fingerprint
    backend: str  # resize backend for the server, see gendd_deploy/imaging.py
    mean: tuple[float, ...] | None = None  # fixed constants; None = compute from the train split
    std: tuple[float, ...] | None = None
    extra: dict = field(default_factory=dict)  # source-specific fingerprint inputs


# --------------------------------------------------------------------------------------------
# File identity


def file_identity(path: Path) -> dict:
    return {"name": path.name, "size": path.stat().st_size, "sha256": file_sha256(path)}


# --------------------------------------------------------------------------------------------
# digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported on use: scikit-learn takes seconds to import

    d = load_digits()
    # values 0..16 -> 0..255; (1797, 8, 8) float64 -> uint8
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    return images, d.target.astype(np.int64)


def read_digits() -> RawSource:
    images_np, labels_np = _digits_arrays()
    images = torch.from_numpy(images_np.copy())[:, None]  # (1797, 1, 8, 8)
    labels = torch.from_numpy(labels_np.copy())
    train_idx, test_idx = stratified_holdout(labels, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    full = TensorImageSet(images, labels, "all")
    digest = hashlib.sha256(images_np.tobytes() + labels_np.tobytes()).hexdigest()
    return RawSource(
        source="digits",
        root=None,
        train=full.subset(train_idx, "train"),
        test=full.subset(test_idx, "test"),
        class_names=[str(c) for c in range(10)],
        in_chans=1,
        native_size=8,
        files=[{"name": "sklearn.datasets.load_digits", "size": images_np.nbytes + labels_np.nbytes, "sha256": digest}],
        backend="torch",
        extra={"test_holdout": {"fraction": DIGITS_TEST_FRACTION, "seed": DIGITS_TEST_SEED, "stratified": True}},
    )


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)

_IDX_UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzipped when the name ends in .gz) into an array."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise UsageError(f"{path}: corrupt or truncated file ({e}); reinstall the data set") from None
    # header: 2 zero bytes, type code (0x08 = ubyte), number of dims, then one big-endian u32 per dim
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UsageError(f"{path}: truncated IDX header ({len(data)} bytes); reinstall the data set")
    zeros, dtype, dims_in_file = struct.unpack(">HBB", data[:4])
    if zeros != 0 or dtype != _IDX_UBYTE or dims_in_file != ndim:
        magic = struct.unpack(">I", data[:4])[0]
        raise UsageError(
            f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x{(_IDX_UBYTE << 8) | ndim:08x}); "
            "not a Fashion-MNIST file or corrupt"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise UsageError(
            f"{path}: {len(data) - header} data bytes for dims {dims} (expected {expected}); file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataNotFound(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}; install it with "
        "`apt-get install dataset-fashion-mnist` or set [data] root to a folder with the four IDX files"
    )


def read_fashion_mnist(root: str | None) -> RawSource:
    folder = Path(root or FASHION_MNIST_ROOT)
    if not folder.is_dir():
        raise DataNotFound(
            f"Fashion-MNIST not found: {folder} does not exist; install it with "
            "`apt-get install dataset-fashion-mnist` or set [data] root to a folder with "
            "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
        )
    sets, files = {}, []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        lab_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        images = read_idx(img_path, 3)  # (N, H, W)
        labels = read_idx(lab_path, 1)  # (N,)
        if len(images) != len(labels):
            raise UsageError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels")
        if images.shape[1] != images.shape[2]:
            raise UsageError(f"{img_path}: images are {images.shape[1]}x{images.shape[2]}, expected square")
        if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise UsageError(f"{lab_path}: label {labels.max()} out of range 0..9")
        sets[split] = TensorImageSet(torch.from_numpy(images)[:, None], torch.from_numpy(labels).long(), split)
        files += [file_identity(img_path), file_identity(lab_path)]
    return RawSource(
        source="fashion_mnist",
        root=str(folder),
        train=sets["train"],
        test=sets["test"],
        class_names=list(FASHION_MNIST_CLASSES),
        in_chans=1,
        native_size=sets["train"].image_size,
        files=files,
        backend="torch",
    )


# --------------------------------------------------------------------------------------------
# CIFAR-100 (python pickles)


def _cifar_folder(root: Path) -> Path:
    for folder in (root, root / "cifar-100-python"):
        if all((folder / name).is_file() for name in ("train", "test", "meta")):
            return folder
    raise DataNotFound(
        f"CIFAR-100 not found: looked for train, test and meta in {root} and {root / 'cifar-100-python'}; "
        "download the python version (cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html), "
        "extract it and set [data] root to the cifar-100-python folder"
    )


class _DataUnpickler(pickle.Unpickler):
    """Only what the CIFAR release holds: builtin containers and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (only data may be unpickled)")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _DataUnpickler(f, encoding="bytes").load()
    except Exception as e:  # unpickling can fail in many ways (EOFError, UnpicklingError, ...)
        raise UsageError(f"{path}: not a readable CIFAR-100 pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: expected a dict pickle, got {type(obj).__name__}")
    return obj


def _cifar_split(path: Path, name: str, num_classes: int) -> TensorImageSet:
    d = _unpickle(path)
    if b"data" not in d or b"fine_labels" not in d:
        raise UsageError(f"{path}: missing b'data' or b'fine_labels'; is this the CIFAR-100 python version?")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = np.asarray(d[b"fine_labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise UsageError(f"{path}: data {data.shape} / {len(labels)} labels, expected (N, 3072) rows and N labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UsageError(f"{path}: fine label out of range 0..{num_classes - 1}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # rows are CHW-ordered
    return TensorImageSet(images, torch.from_numpy(labels), name)


def read_cifar100(root: str | None) -> RawSource:
    folder = _cifar_folder(Path(root or CIFAR100_ROOT))
    meta = _unpickle(folder / "meta")
    if b"fine_label_names" not in meta:
        raise UsageError(f"{folder / 'meta'}: missing b'fine_label_names'")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"fine_label_names"]]
    return RawSource(
        source="cifar100",
        root=str(folder),
        train=_cifar_split(folder / "train", "train", len(names)),
        test=_cifar_split(folder / "test", "test", len(names)),
        class_names=names,
        in_chans=3,
        native_size=32,
        files=[file_identity(folder / n) for n in ("train", "test", "meta")],
        backend="torch",
    )


# --------------------------------------------------------------------------------------------
# imagefolder


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _list_images(root: Path, split: str, classes: list[str]) -> tuple[list[str], list[int], list[list]]:
    """All images under root/split/<class>/ (recursive, sorted): (paths, labels, [relpath, size] rows)."""
    paths, labels, listing = [], [], []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / split / cls, followlinks=True):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith("."):
                    full = os.path.join(dirpath, fname)
                    paths.append(full)
                    labels.append(label)
                    listing.append([os.path.relpath(full, root), os.path.getsize(full)])
    return paths, labels, listing


def _listing_identity(split_name: str, listing: list[list]) -> dict:
    # hashing millions of image files is too slow: relative paths and sizes stand in for content
    blob = json.dumps(listing, separators=(",", ":")).encode()
    return {
        "name": split_name + "/",
        "count": len(listing),
        "size": sum(size for _, size in listing),
        "listing_sha256": hashlib.sha256(blob).hexdigest(),
    }


def read_imagefolder(root: str | None, image_size: int | None) -> RawSource:
    hint = "set [data] root to a folder with train/<class>/<images> and val/<class>/<images>"
    if root is None:
        raise UsageError(f"imagefolder needs a data folder; {hint}")
    if image_size is None:
        raise UsageError("imagefolder needs [data] image_size (e.g. 224): images are resized and centre-cropped to it")
    folder = Path(root)
    if not (folder / "train").is_dir():
        raise DataNotFound(f"imagefolder: {folder / 'train'} not found; {hint}")
    eval_split = next((s for s in ("val", "test") if (folder / s).is_dir()), None)
    if eval_split is None:
        raise UsageError(f"imagefolder: neither {folder / 'val'} nor {folder / 'test'} found; {hint}")
    classes = _class_dirs(folder / "train")
    if not classes:
        raise UsageError(f"imagefolder: no class folders in {folder / 'train'}; {hint}")
    eval_classes = _class_dirs(folder / eval_split)
    if eval_classes != classes:
        missing = sorted(set(classes) - set(eval_classes))[:5]
        extra = sorted(set(eval_classes) - set(classes))[:5]
        raise UsageError(
            f"imagefolder: class folders of {folder / eval_split} do not match {folder / 'train'} "
            f"(missing: {missing}, unexpected: {extra}); both need the same <class> folders"
        )
    sets, files = {}, []
    for split, name in (("train", "train"), (eval_split, "test")):
        paths, labels, listing = _list_images(folder, split, classes)
        if not paths:
            raise UsageError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder / split}")
        sets[name] = FolderImageSet(paths, torch.tensor(labels, dtype=torch.int64), image_size, name)
        files.append(_listing_identity(split, listing))
    return RawSource(
        source="imagefolder",
        root=str(folder),
        train=sets["train"],
        test=sets["test"],
        class_names=classes,
        in_chans=3,
        native_size=None,
        files=files,
        backend="pil",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def read_source(source: str, root: str | None, image_size: int | None) -> RawSource:
    if source == "digits":
        return read_digits()
    if source == "fashion_mnist":
        return read_fashion_mnist(root)
    if source == "cifar100":
        return read_cifar100(root)
    if source == "imagefolder":
        return read_imagefolder(root, image_size)
    raise UsageError(f"unknown data source {source!r}; use digits, fashion_mnist, cifar100 or imagefolder")
