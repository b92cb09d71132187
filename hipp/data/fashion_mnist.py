"""Fashion-MNIST read from the Debian package's IDX files; captions from templates per class."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HippError

DEFAULT_ROOT = Path(os.environ.get("HIPP_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle boot")
TEMPLATES = ("a photo of a {}.", "a black and white photo of a {}.", "a picture of a {}.",
             "a product photo of a {}.", "a small photo of the {}.", "an image of a {}.")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path) -> np.ndarray:
    """IDX format: zero bytes, a type code, the rank, big-endian dims, then raw data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise HippError(f"{path} is not an unsigned-byte IDX file")
    rank = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=rank, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank)
    if data.size != int(np.prod(dims)):
        raise HippError(f"{path} is truncated: {data.size} bytes for dims {tuple(dims)}")
    return data.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise HippError(f"Fashion-MNIST file {stem}(.gz) not found under {root}: "
                    f"install it with 'apt-get install dataset-fashion-mnist'")


def load_fashion_mnist(split: str, root: Path | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 28, 28] and int64 labels [N]."""
    if split not in _FILES:
        raise HippError(f"unknown Fashion-MNIST split {split!r}; expected train or test")
    root = Path(root) if root is not None else DEFAULT_ROOT
    images = _read_idx(_find(root, _FILES[split][0]))
    labels = _read_idx(_find(root, _FILES[split][1]))
    if images.shape[0] != labels.shape[0]:
        raise HippError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_rgb(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [N, 28, 28] -> uint8 [N, 3, S, S] (bilinear upsampling, grey copied to three channels)."""
    x = images[:, None].float()
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def class_prompts(templates: tuple[str, ...] = TEMPLATES) -> dict[str, list[str]]:
    return {c: [t.format(c) for t in templates] for c in CLASSES}
