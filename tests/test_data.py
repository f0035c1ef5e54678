"""Tests of gendd_deploy.data on small trees written to tmp_path, plus sklearn's bundled digits.

Synthetic images carry their identity in pixels: pixel (0, 0) = index in the official split,
pixel (0, 1) = 0 for train and 1 for test, so splits can be checked for overlap from the images.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gendd_deploy.config import DataConfig
from gendd_deploy.data import (
    DataBundle,
    FolderImageSet,
    ImageSet,
    apply,
    decode_image,
    load_data,
    preprocess_image,
    sample_params,
    to_model_input,
)
from gendd_deploy.data.augment import to_unit
from gendd_deploy.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT
from gendd_deploy.data.splits import holdout_calib, long_tail, stratified_holdout
from gendd_deploy.errors import UsageError
from gendd_deploy.imaging import ImageRejected

N_TRAIN, N_TEST = 40, 12


# ------------------------------------------------------------------------------------------
# tree builders


def _write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    blob = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if gz else blob)


def _tagged_images(n: int, split_tag: int, chans: int, size: int, seed: int) -> np.ndarray:
    """Random uint8 (n, C, size, size) with pixel (0, 0) = index and (0, 1) = split tag."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, chans, size, size), dtype=np.uint8)
    x[:, :, 0, 0] = np.arange(n)[:, None]
    x[:, :, 0, 1] = split_tag
    return x


def _ids(images: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in images[:, 0, 0, :2].tolist()}


@pytest.fixture
def fashion_root(tmp_path: Path) -> Path:
    root = tmp_path / "fashion"
    root.mkdir()
    for prefix, n, tag in (("train", N_TRAIN, 0), ("t10k", N_TEST, 1)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", _tagged_images(n, tag, 1, 28, seed=tag)[:, 0])
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for name, n, tag in (("train", 20, 0), ("test", 10, 1)):
        data = _tagged_images(n, tag, 3, 32, seed=tag)
        data[:, :, 1, 1] = [0, 100, 200]  # channel marker, checks the CHW row order
        blob = {b"data": data.reshape(n, 3072), b"fine_labels": [i % 100 for i in range(n)]}
        (root / name).write_bytes(pickle.dumps(blob))
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"class{i:02d}".encode() for i in range(100)]}))
    return root


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    """3 classes; images of various sizes and modes (RGB, L, RGBA) to exercise resize + convert."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    sizes = [(20, 30), (30, 20), (16, 16), (40, 24)]
    for split, per_class in (("train", 4), ("val", 2)):
        for c in ("cat", "dog", "emu"):
            (root / split / c).mkdir(parents=True)
            for k in range(per_class):
                h, w = sizes[k % len(sizes)]
                mode = ("RGB", "L", "RGBA")[k % 3]
                shape = (h, w) if mode == "L" else (h, w, len(mode))
                img = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8))  # mode from the shape
                img.save(root / split / c / f"{k}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def _load(source: str, root: Path | None = None, **kw) -> DataBundle:
    return load_data(DataConfig(source=source, root=str(root) if root else None, **kw))


def _png_bytes(chw: torch.Tensor) -> bytes:
    arr = chw[0].numpy() if chw.shape[0] == 1 else chw.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# sources


def test_digits_shapes_and_fixed_test_holdout():
    b = _load("digits")
    assert (b.in_chans, b.image_size, b.num_classes) == (1, 8, 10)
    assert b.class_names == [str(i) for i in range(10)]
    assert len(b.train) + len(b.calib) + len(b.test) == 1797
    assert abs(len(b.test) - 0.2 * 1797) < 10
    x = b.train.get_batch(torch.arange(5))
    assert x.dtype == torch.uint8 and x.shape == (5, 1, 8, 8)
    assert int(b.train.images.max()) == 255  # 16 * 255 / 16
    assert b.train.labels.dtype == torch.int64 and set(b.test.labels.tolist()) == set(range(10))
    assert b.preprocess["in_chans"] == 1 and b.preprocess["image_size"] == 8
    # the test holdout does not depend on split_seed; train / calib do
    other = _load("digits", split_seed=1)
    assert torch.equal(other.test.images, b.test.images)
    assert not torch.equal(other.calib.images, b.calib.images)
    assert other.fingerprint != b.fingerprint


def test_fashion_mnist_tree(fashion_root: Path):
    b = _load("fashion_mnist", fashion_root, calib_fraction=0.25)
    assert b.class_names == FASHION_MNIST_CLASSES
    assert (b.in_chans, b.image_size, b.num_classes) == (1, 28, 10)
    assert (len(b.train), len(b.calib), len(b.test)) == (30, 10, N_TEST)
    train, calib, test = _ids(b.train.images), _ids(b.calib.images), _ids(b.test.images)
    assert train.isdisjoint(calib) and train | calib == {(i, 0) for i in range(N_TRAIN)}
    assert test == {(i, 1) for i in range(N_TEST)}
    # labels travel with their images; train keeps the original order
    assert torch.equal(b.train.labels, b.train.images[:, 0, 0, 0].long() % 10)
    assert b.train.images[:, 0, 0, 0].tolist() == sorted(b.train.images[:, 0, 0, 0].tolist())
    # torch Dataset protocol
    img, label = b.test[3]
    assert img.shape == (1, 28, 28) and img.dtype == torch.uint8 and isinstance(label, int) and label == 3
    loader = torch.utils.data.DataLoader(b.train, batch_size=8)
    xb, yb = next(iter(loader))
    assert xb.shape == (8, 1, 28, 28) and yb.shape == (8,)
    d = b.describe()
    assert d["sizes"] == {"train": 30, "calib": 10, "test": N_TEST} and d["root"] == str(fashion_root)
    assert [f["name"] for f in d["files"]][0] == "train-images-idx3-ubyte.gz" and d["fingerprint"] == b.fingerprint


def test_fashion_mnist_plain_idx_names(tmp_path: Path, fashion_root: Path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in fashion_root.iterdir():
        (plain / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    a, b = _load("fashion_mnist", fashion_root), _load("fashion_mnist", plain)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)


def test_splits_deterministic_and_limits(fashion_root: Path):
    a, b = _load("fashion_mnist", fashion_root), _load("fashion_mnist", fashion_root)
    for s in ("train", "calib", "test"):
        assert torch.equal(getattr(a, s).images, getattr(b, s).images)
        assert torch.equal(getattr(a, s).labels, getattr(b, s).labels)
    assert a.fingerprint == b.fingerprint and a.describe() == b.describe()
    lim = _load("fashion_mnist", fashion_root, train_limit=5, test_limit=3)
    assert torch.equal(lim.train.images, a.train.images[:5]) and torch.equal(lim.test.images, a.test.images[:3])
    assert torch.equal(lim.calib.images, a.calib.images)  # the limit is applied after the hold-out
    assert lim.fingerprint != a.fingerprint


def test_split_functions():
    train, calib = holdout_calib(101, 0.1, seed=3)
    assert len(calib) == 10 and len(train) == 91
    assert sorted(torch.cat([train, calib]).tolist()) == list(range(101))
    assert torch.equal(train, torch.sort(train).values)
    assert len(holdout_calib(5, 0.01, seed=0)[1]) == 1  # at least one calibration image
    assert not torch.equal(calib, holdout_calib(101, 0.1, seed=4)[1])
    with pytest.raises(UsageError):
        holdout_calib(1, 0.1, seed=0)
    labels = torch.arange(100) % 4
    keep, held = stratified_holdout(labels, 0.2, seed=0)
    assert torch.bincount(labels[held]).tolist() == [5, 5, 5, 5]
    assert sorted(torch.cat([keep, held]).tolist()) == list(range(100))


def test_long_tail_profile():
    labels = torch.arange(10).repeat_interleave(100)  # 10 classes of 100
    kept = long_tail(labels, 100.0, seed=0)
    counts = torch.bincount(labels[kept], minlength=10).tolist()
    # exponential: class c keeps floor(100 * 100 ** (-c / 9)); head keeps all, tail 1/100
    assert counts == [int(100 * 100 ** (-c / 9)) for c in range(10)]
    assert counts[0] == 100 and counts[-1] == 1
    assert torch.equal(kept, long_tail(labels, 100.0, seed=0)) and torch.equal(kept, torch.sort(kept).values)


def test_long_tail_data_keeps_test_and_changes_fingerprint(fashion_root: Path):
    plain = _load("fashion_mnist", fashion_root)
    lt = _load("fashion_mnist", fashion_root, imbalance_factor=10.0)
    assert lt.fingerprint != plain.fingerprint
    assert torch.equal(lt.test.labels, plain.test.labels)  # the test set is unchanged
    both = torch.cat([lt.train.labels, lt.calib.labels])
    counts = torch.bincount(both, minlength=lt.num_classes)
    plain_counts = torch.bincount(torch.cat([plain.train.labels, plain.calib.labels]), minlength=lt.num_classes)
    n_max = int(plain_counts.max())
    expect = [max(1, min(int(plain_counts[c]), int(n_max * 10.0 ** (-c / 9)))) for c in range(10)]
    assert counts.tolist() == expect and expect[0] > expect[-1]  # the exponential profile
    assert len(lt.train) + len(lt.calib) < len(plain.train) + len(plain.calib)


def test_fingerprint_changes(tmp_path: Path, fashion_root: Path):
    base = _load("fashion_mnist", fashion_root).fingerprint
    assert _load("fashion_mnist", fashion_root, split_seed=1).fingerprint != base
    assert _load("fashion_mnist", fashion_root, augment="crop").fingerprint != base
    assert _load("fashion_mnist", fashion_root, augment="crop", crop_padding=4).fingerprint != _load(
        "fashion_mnist", fashion_root, augment="crop"
    ).fingerprint
    assert _load("fashion_mnist", fashion_root, crop_padding=4).fingerprint == base  # unused without crop
    # one byte of one label changes; written to a new file and renamed, like a real update
    labels = fashion_root / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10
    tmp = tmp_path / "new.gz"
    tmp.write_bytes(gzip.compress(bytes(raw)))
    os.replace(tmp, labels)
    assert _load("fashion_mnist", fashion_root).fingerprint != base


def test_missing_data_errors(tmp_path: Path, fashion_root: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UsageError, match=str(missing)) as e:
        _load("fashion_mnist", missing)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    (fashion_root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UsageError, match="t10k-labels-idx1-ubyte"):
        _load("fashion_mnist", fashion_root)
    with pytest.raises(UsageError, match=str(missing)):
        _load("cifar100", missing)
    with pytest.raises(UsageError, match=str(missing)):
        _load("imagefolder", missing, image_size=16)
    with pytest.raises(UsageError, match="image_size"):
        _load("imagefolder", tmp_path)


@pytest.mark.parametrize("damage", ["magic", "truncated", "gzip"])
def test_corrupt_idx(fashion_root: Path, damage: str):
    path = fashion_root / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    if damage == "magic":
        path.write_bytes(gzip.compress(struct.pack(">I", 0x0801) + raw[4:]))
    elif damage == "truncated":
        path.write_bytes(gzip.compress(raw[:-100]))
    else:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(UsageError, match="train-images-idx3-ubyte.gz"):
        _load("fashion_mnist", fashion_root)


def test_cifar100_tree(cifar_root: Path):
    for root in (cifar_root, cifar_root.parent):  # the folder itself or its parent
        b = _load("cifar100", root, calib_fraction=0.2)
        assert (b.in_chans, b.image_size, b.num_classes) == (3, 32, 100)
        assert b.class_names[:2] == ["class00", "class01"]
        assert (len(b.train), len(b.calib), len(b.test)) == (16, 4, 10)
        assert b.train.images[:, :, 1, 1].tolist() == [[0, 100, 200]] * 16  # channels in CHW order
        assert _ids(b.train.images).isdisjoint(_ids(b.calib.images)) and _ids(b.test.images) == {(i, 1) for i in range(10)}
        assert len(b.mean) == 3 and len(b.std) == 3
    (cifar_root / "train").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="train"):
        _load("cifar100", cifar_root)


def test_imagefolder_tree(folder_root: Path):
    b = _load("imagefolder", folder_root, image_size=16, calib_fraction=0.2)
    assert isinstance(b.train, FolderImageSet) and not hasattr(b.train, "images")  # lazy
    assert b.class_names == ["cat", "dog", "emu"] and (b.in_chans, b.image_size) == (3, 16)
    assert (len(b.train), len(b.calib), len(b.test)) == (10, 2, 6)
    assert b.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert set(b.train.paths).isdisjoint(b.calib.paths)
    x = b.train.get_batch(torch.arange(len(b.train)))
    assert x.shape == (10, 3, 16, 16) and x.dtype == torch.uint8
    assert b.mean == (0.485, 0.456, 0.406) and b.preprocess["resize_backend"] == "pil"
    # every test image: server preprocessing == evaluation path
    for i, path in enumerate(b.test.paths):
        got = torch.from_numpy(preprocess_image(decode_image(Path(path).read_bytes()), b.preprocess))
        assert torch.equal(got, to_model_input(b.test.get_batch(torch.tensor([i])), b.mean, b.std)[0])
    # a new file changes the fingerprint (listing of paths and sizes)
    Image.new("RGB", (8, 8)).save(folder_root / "val" / "dog" / "extra.png")
    assert _load("imagefolder", folder_root, image_size=16, calib_fraction=0.2).fingerprint != b.fingerprint


def test_imagefolder_test_dir_and_class_mismatch(folder_root: Path):
    (folder_root / "val").rename(folder_root / "test")
    assert len(_load("imagefolder", folder_root, image_size=8).test) == 6
    (folder_root / "test" / "emu").rename(folder_root / "test" / "owl")
    with pytest.raises(UsageError, match="owl"):
        _load("imagefolder", folder_root, image_size=8)


def test_in_memory_resize(fashion_root: Path):
    native = _load("fashion_mnist", fashion_root)
    b = _load("fashion_mnist", fashion_root, image_size=16)
    assert b.train.images.shape[1:] == (1, 16, 16) and b.image_size == 16
    assert b.describe()["native_size"] == 28 and b.describe()["image_size"] == 16
    assert b.fingerprint != native.fingerprint
    # the server resizes a native-size upload exactly as the data was resized at load
    img = decode_image(_png_bytes(native.test.images[2]))
    got = torch.from_numpy(preprocess_image(img, b.preprocess))
    assert torch.equal(got, to_model_input(b.test.get_batch(torch.tensor([2])), b.mean, b.std)[0])


# ------------------------------------------------------------------------------------------
# preprocessing


def test_preprocess_png_matches_eval_input(fashion_root: Path, cifar_root: Path):
    for b in (_load("fashion_mnist", fashion_root), _load("cifar100", cifar_root)):
        for i in range(3):
            x = b.test.get_batch(torch.tensor([i]))  # uint8 (1, C, S, S)
            got = torch.from_numpy(preprocess_image(decode_image(_png_bytes(x[0])), b.preprocess))
            assert got.dtype == torch.float32 and got.shape == x.shape[1:]
            assert torch.equal(got, to_model_input(x, b.mean, b.std)[0])


def test_decode_image_errors():
    with pytest.raises(ImageRejected, match="undecodable image"):
        decode_image(b"definitely not an image")
    png = _png_bytes(torch.zeros((3, 8, 8), dtype=torch.uint8))
    with pytest.raises(ImageRejected, match="undecodable image"):
        decode_image(png[: len(png) // 2])


# ------------------------------------------------------------------------------------------
# augmentation


def _batch(n: int = 32, size: int = 28, chans: int = 1) -> torch.Tensor:
    return torch.from_numpy(_tagged_images(n, 0, chans, size, seed=5))


@pytest.mark.parametrize("mode", ["none", "crop", "crop_flip", "rrc_flip"])
def test_augment_replay(mode: str):
    x = _batch()
    p1 = sample_params(32, 28, mode, 3, torch.Generator().manual_seed(0))
    p2 = sample_params(32, 28, mode, 3, torch.Generator().manual_seed(0))
    assert p1.dtype == torch.int32 and p1.shape == (32, 5) and torch.equal(p1, p2)
    y1, y2 = apply(x, p1, mode, 3, 28), apply(x.clone(), p1.clone(), mode, 3, 28)
    assert y1.dtype == torch.float32 and y1.shape == (32, 1, 28, 28) and torch.equal(y1, y2)
    assert 0.0 <= y1.min() and y1.max() <= 1.0
    p3 = sample_params(32, 28, mode, 3, torch.Generator().manual_seed(1))
    assert torch.equal(p1, p3) == (mode == "none")


def test_augment_uses_only_the_generator():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for mode in ("crop_flip", "rrc_flip"):
        sample_params(16, 28, mode, 2, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


def test_augment_none_is_identity():
    x = _batch(chans=3)
    p = sample_params(32, 28, "none", 2, torch.Generator().manual_seed(0))
    assert torch.equal(apply(x, p, "none", 2, 28), to_unit(x))


def test_augment_crop_and_flip_geometry():
    x, pad = _batch(n=64), 3
    p = sample_params(64, 28, "crop_flip", pad, torch.Generator().manual_seed(0))
    assert p[:, :2].min() >= 0 and p[:, :2].max() <= 2 * pad and set(p[:, 4].tolist()) == {0, 1}
    y = apply(x, p, "crop_flip", pad, 28)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    for k, (top, left, h, w, flip) in enumerate(p.tolist()):
        ref = to_unit(padded[k, :, top : top + h, left : left + w])
        assert torch.equal(y[k], ref.flip(-1) if flip else ref)


def test_augment_rrc_boxes():
    x = _batch(n=200)
    p = sample_params(200, 28, "rrc_flip", 0, torch.Generator().manual_seed(0))
    top, left, h, w, flip = p.T
    assert (h >= 1).all() and (w >= 1).all() and (top + h <= 28).all() and (left + w <= 28).all()
    assert len(set(zip(h.tolist(), w.tolist()))) > 20 and set(flip.tolist()) == {0, 1}
    y = apply(x, p, "rrc_flip", 0, 20)
    assert y.shape == (200, 1, 20, 20)
    # a full box without flip at the native size is the identity
    full = torch.tensor([[0, 0, 28, 28, 0]], dtype=torch.int32)
    assert torch.allclose(apply(x[:1], full, "rrc_flip", 0, 28), to_unit(x[:1]))


# ------------------------------------------------------------------------------------------
# the real data set, when installed


@pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT).is_dir(), reason=f"{FASHION_MNIST_ROOT} not installed (apt-get install dataset-fashion-mnist)"
)
def test_real_fashion_mnist():
    b = load_data(DataConfig(source="fashion_mnist"))
    assert len(b.train) + len(b.calib) == 60000 and len(b.calib) == 6000 and len(b.test) == 10000
    assert b.train.images.shape[1:] == (1, 28, 28)
    assert abs(b.mean[0] - 0.286) < 1e-3 and abs(b.std[0] - 0.353) < 1e-3
    assert isinstance(b.train, ImageSet)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_pickle_with_code_is_refused(cifar_root: Path):
    """A pickle that would call a function (os.system here) is refused before anything runs."""
    (cifar_root / "train").write_bytes(pickle.dumps({b"data": _Payload(), b"fine_labels": [0]}))
    with pytest.raises(UsageError, match="refused to load"):
        _load("cifar100", cifar_root)


def test_cifar_pickle_with_numpy_arrays_loads(cifar_root: Path):
    d = pickle.loads((cifar_root / "train").read_bytes())
    d[b"data"] = np.asarray(d[b"data"])  # the real release stores an ndarray
    (cifar_root / "train").write_bytes(pickle.dumps(d))
    assert len(_load("cifar100", cifar_root).train) > 0
