"""A user's image-caption CSV as a task (the format `hipp eval --data csv:FILE` reads).

The last `calibration_rows` rows are held out: they are never trained on, they are the calibration
set of the baselines and polishing, and the metrics are measured on them. The rest are training
rows, visited in a fresh order every epoch. Utility is the mean of the four retrieval recalls
(image-to-text and text-to-image R@1 and R@5). There are no hard negatives, so the grounding
objective is refused at config load.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from ..data.mixed import Batch
from ..data.user import csv_items, load_image, show
from ..errors import HippError
from .base import REQUIRED, Batches, Task, register

CACHE_BYTES = 256 << 20  # decoded training images kept in memory; beyond it they are decoded each time
MAX_CALIBRATION = 64     # held-out rows when calibration_rows is not given (a fifth of a small CSV)
MIN_ROWS = 2             # a similarity matrix of one pair carries no ranking


@register
class CsvTask(Task):
    name = "csv"
    has_negatives = False
    utility_keys = ("csv/i2t_r1", "csv/t2i_r1", "csv/i2t_r5", "csv/t2i_r5")
    options = {"path": ((str,), REQUIRED), "image_column": ((str,), "filepath"),
               "caption_column": ((str,), "title"), "allow_outside": ((bool,), False),
               "calibration_rows": ((int, type(None)), None)}

    def __init__(self, options: dict):
        super().__init__(options)
        o = self.opts
        # every row and image path is checked here, at config load, before any model loads
        items = csv_items(o["path"], o["image_column"], o["caption_column"], o["allow_outside"])
        held = o["calibration_rows"]
        if held is None:
            held = max(MIN_ROWS, min(MAX_CALIBRATION, len(items) // 5))
        elif held < MIN_ROWS:
            raise HippError(f"task option task_options.calibration_rows must be >= {MIN_ROWS}, got {held}")
        if len(items) - held < MIN_ROWS:
            raise HippError(f"CSV file {show(o['path'])} has {len(items)} rows; holding out {held} for "
                            f"calibration leaves fewer than {MIN_ROWS} to train on (set task_options.calibration_rows)")
        self.train_items, self.held_out = items[:-held], items[-held:]
        self._pixels: dict[tuple[int, int], torch.Tensor] = {}

    def _image(self, i: int, size: int) -> torch.Tensor:
        """Training row i (_fit), decoded once while the cache has room."""
        key = (i, size)
        if key in self._pixels:
            return self._pixels[key]
        pixels = _fit(self.train_items[i][0], size)
        if (len(self._pixels) + 1) * pixels.numel() <= CACHE_BYTES:
            self._pixels[key] = pixels
        return pixels

    def batches(self, seed: int, batch_size: int, image_size: int, *, shape_fraction: float = 0.5,
                negatives: int = 2) -> Batches:
        orders: dict[int, list[int]] = {}
        n = len(self.train_items)

        def order(epoch: int) -> list[int]:
            if epoch not in orders:
                if len(orders) > 4:  # a batch spans at most two epochs; keep a few
                    orders.clear()
                g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                orders[epoch] = torch.randperm(n, generator=g).tolist()
            return orders[epoch]

        def batch(index: int) -> Batch:
            # position p of the endless stream is row order(p // n)[p % n]: every row once an epoch
            rows = [order(p // n)[p % n] for p in range(index * batch_size, (index + 1) * batch_size)]
            return _batch([self._image(r, image_size) for r in rows], [self.train_items[r][1] for r in rows])
        return batch

    def calibration_batch(self, image_size: int, size: int, seed: int, *, shape_fraction: float = 0.5,
                          negatives: int = 1) -> Batch:
        """The first `size` held-out rows; `seed` changes nothing (the slice is fixed)."""
        rows = self.held_out[:size]
        return _batch([_fit(path, image_size) for path, _ in rows], [caption for _, caption in rows])

    def metrics(self, model, tokenizer, preprocess_cfg: dict, split: str = "test",
                size: int | None = None) -> dict[str, float]:
        """Retrieval over the held-out rows, whatever the split: they are the CSV's only unseen rows."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        from ..evaluation.evaluate import retrieval_metrics
        preprocess = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
        images = torch.stack([preprocess(load_image(path)) for path, _ in self.held_out])
        return retrieval_metrics(model, tokenizer, preprocess_cfg, images, [c for _, c in self.held_out])


def _fit(path, size: int) -> torch.Tensor:
    """uint8 [3, size, size]: the shorter side scaled to `size`, centre-cropped, as open_clip's
    evaluation transform does."""
    im = ImageOps.fit(load_image(path), (size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()


def _batch(images: list[torch.Tensor], captions: list[str]) -> Batch:
    # no scenes and no hard negatives; a repeated caption is one positive group, as in retrieval metrics
    return Batch(torch.stack(images), captions, list(captions), [], 0, 0)
