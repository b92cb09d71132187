"""User data: a CSV of image-caption pairs (open_clip's `filepath,title` columns) and an
image folder for zero-shot classification (class = sub-folder name)."""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import HippError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _open(path: Path, preprocess) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            return preprocess(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise HippError(f"cannot read image {path} ({e})") from None


def read_csv_pairs(path: str | Path, preprocess, img_key: str = "filepath", caption_key: str = "title",
                   limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Images (preprocessed) and captions; relative image paths are relative to the CSV file.

    The separator (comma or tab, as open_clip's own CSV loader uses) is sniffed from the header.
    """
    path = Path(path)
    if not path.is_file():
        raise HippError(f"CSV file not found: {path}")
    text = path.read_text()
    header = text.splitlines()[0] if text else ""
    sep = "\t" if "\t" in header else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=sep))
    if not rows or img_key not in rows[0] or caption_key not in rows[0]:
        raise HippError(f"{path} needs columns '{img_key}' and '{caption_key}' and at least one row")
    rows = rows[:limit] if limit else rows
    images = torch.stack([_open(path.parent / r[img_key], preprocess) for r in rows])
    return images, [r[caption_key] for r in rows]


def read_image_folder(root: str | Path, preprocess, limit_per_class: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images, integer labels and class names (sorted sub-folder names)."""
    root = Path(root)
    if not root.is_dir():
        raise HippError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise HippError(f"{root} needs at least two class sub-folders")
    images, labels = [], []
    for i, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for f in files[:limit_per_class] if limit_per_class else files:
            images.append(_open(f, preprocess))
            labels.append(i)
    if not images:
        raise HippError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return torch.stack(images), torch.tensor(labels), classes
