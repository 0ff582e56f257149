"""Real image data sets as plain tensors, decoded once and cached.

Every image tensor in the project is float32 in [0, 1], shape [N, C, H, W]; labels are
int64. Models normalise internally, so triggers and the foundation model work on the same
[0, 1] pixels the classifier sees.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("fashion-mnist", "cifar10")

CLASS_NAMES = {
    "fashion-mnist": (
        "t-shirt", "trouser", "pullover", "dress", "coat",
        "sandal", "shirt", "sneaker", "bag", "ankle boot",
    ),
    "cifar10": (
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ),
}

IMAGE_SHAPE = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}

_FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


class DatasetNotFoundError(FileNotFoundError):
    """Raised before any training when a data set cannot be found or downloaded."""


@dataclass(frozen=True)
class ImageDataset:
    """A data set held in memory as uint8 arrays (converted to float on demand)."""

    name: str
    train_x: np.ndarray  # uint8 [N, C, H, W]
    train_y: np.ndarray  # int64 [N]
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES[self.name]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return IMAGE_SHAPE[self.name]


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 in [0, 1]."""
    tensor = torch.as_tensor(images)
    return tensor.float().div_(255.0) if tensor.dtype == torch.uint8 else tensor.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [0, 1] -> uint8, rounding to the nearest level."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


def cache_dir() -> Path:
    """Where the project caches decoded arrays, synthetic sets and default outputs."""
    return Path(os.environ.get("FMFL_CACHE_DIR") or Path.home() / ".cache" / "fmfl")


def resolve_data_dir(data_dir: str) -> Path:
    """Empty means `$FMFL_DATA_DIR`, then the per-user cache."""
    if data_dir:
        return Path(data_dir).expanduser().resolve()
    if os.environ.get("FMFL_DATA_DIR"):
        return Path(os.environ["FMFL_DATA_DIR"]).expanduser().resolve()
    return cache_dir() / "data"


def load_dataset(name: str, data_dir: str = "", download: bool = True) -> ImageDataset:
    """Load `name` from `data_dir` (see `resolve_data_dir`), via a decoded-array cache."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not known; accepted: {', '.join(DATASETS)}")
    root = resolve_data_dir(data_dir)
    key = hashlib.sha256(f"{name}|{root}".encode()).hexdigest()[:16]
    cached = cache_dir() / "arrays" / f"{name}-{key}.npz"
    if cached.exists():
        with np.load(cached) as arrays:
            return ImageDataset(name, **{k: arrays[k] for k in arrays.files})
    loader = _load_fashion_mnist if name == "fashion-mnist" else _load_cifar10
    arrays = loader(root, download)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, cached)
    return ImageDataset(name, **arrays)


def _not_found(name: str, looked: list[Path], why: str) -> DatasetNotFoundError:
    where = "\n  ".join(str(p) for p in looked)
    return DatasetNotFoundError(
        f"dataset {name!r} not found. Looked in:\n  {where}\n{why}\n"
        "Fix: set run-config data-dir (or $FMFL_DATA_DIR) to a folder holding it, e.g. "
        "data-dir='/path/to/shared/datasets', or allow internet access for the download."
    )


def _read_idx(path: Path) -> np.ndarray:
    """Decode an IDX file (optionally gzipped) as used by (Fashion-)MNIST."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx_folder(root: Path) -> tuple[Path | None, list[Path]]:
    candidates = [root / "fashion-mnist", root / "FashionMNIST" / "raw", root]
    for folder in candidates:
        if all(_idx_path(folder, f) for f in _FMNIST_FILES.values()):
            return folder, candidates
    return None, candidates


def _idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_fashion_mnist(root: Path, download: bool) -> dict[str, np.ndarray]:
    folder, looked = _find_idx_folder(root)
    if folder is None and download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        except Exception as err:  # noqa: BLE001 - any network failure means "not found"
            raise _not_found("fashion-mnist", looked, f"Download failed: {err}") from err
        folder, looked = _find_idx_folder(root)
    if folder is None:
        raise _not_found("fashion-mnist", looked, "Expected the four IDX files.")
    arrays = {k: _read_idx(_idx_path(folder, stem)) for k, stem in _FMNIST_FILES.items()}
    return {
        "train_x": arrays["train_x"][:, None].copy(),
        "train_y": arrays["train_y"].astype(np.int64),
        "test_x": arrays["test_x"][:, None].copy(),
        "test_y": arrays["test_y"].astype(np.int64),
    }


def _load_cifar10(root: Path, download: bool) -> dict[str, np.ndarray]:
    zips = [root / "cifar10" / "cifar10_jpg.zip", root / "cifar10_jpg.zip"]
    for path in zips:
        if path.is_file():
            return _read_image_folder_zip(path, CLASS_NAMES["cifar10"])
    torchvision_dir = root / "cifar-10-batches-py"
    if torchvision_dir.is_dir() or download:
        try:
            from torchvision.datasets import CIFAR10

            train = CIFAR10(str(root), train=True, download=download)
            test = CIFAR10(str(root), train=False, download=download)
        except Exception as err:  # noqa: BLE001 - any failure here means "not found"
            raise _not_found("cifar10", [*zips, torchvision_dir], f"torchvision: {err}") from err
        return {
            "train_x": train.data.transpose(0, 3, 1, 2).copy(),
            "train_y": np.asarray(train.targets, dtype=np.int64),
            "test_x": test.data.transpose(0, 3, 1, 2).copy(),
            "test_y": np.asarray(test.targets, dtype=np.int64),
        }
    raise _not_found("cifar10", [*zips, torchvision_dir], "Expected cifar10_jpg.zip.")


def _read_image_folder_zip(path: Path, classes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Decode `split/<class>/<file>.jpg` entries of a zip into uint8 arrays."""
    from PIL import Image

    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    with zipfile.ZipFile(path) as archive:
        for entry in sorted(archive.namelist()):
            parts = entry.split("/")
            if len(parts) < 3 or parts[-3] not in out or not parts[-1]:
                continue
            split, label = parts[-3], index[parts[-2]]
            with Image.open(io.BytesIO(archive.read(entry))) as image:
                out[split][0].append(np.asarray(image.convert("RGB")).transpose(2, 0, 1))
            out[split][1].append(label)
    return {
        "train_x": np.stack(out["train"][0]),
        "train_y": np.asarray(out["train"][1], dtype=np.int64),
        "test_x": np.stack(out["test"][0]),
        "test_y": np.asarray(out["test"][1], dtype=np.int64),
    }
