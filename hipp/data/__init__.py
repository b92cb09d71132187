"""Datasets: procedural shape scenes, Fashion-MNIST, and user image-caption / image-folder data."""
from __future__ import annotations

import torch


def to_input(images: torch.Tensor, preprocess_cfg: dict) -> torch.Tensor:
    """uint8 [N, 3, H, W] at the model's size -> normalised float input, as open_clip's transform does."""
    mean = torch.tensor(preprocess_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(preprocess_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std
