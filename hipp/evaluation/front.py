"""Fronts of two minimised objectives: exact 2-D hypervolume, non-dominated points, rank correlation."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import HippError

REFERENCE = (1.0, 1.0)  # (1 - utility, FLOPs ratio): zero utility at the dense model's cost


def _check_points(points, reference) -> tuple[list[tuple[float, float]], tuple[float, float]]:
    pts = [(float(a), float(b)) for a, b in points]
    ref = (float(reference[0]), float(reference[1]))
    if any(math.isnan(v) for p in (*pts, ref) for v in p):
        raise HippError("hypervolume points and reference must not be NaN")
    return pts, ref


def hypervolume_2d(points, reference=REFERENCE) -> float:
    """Exact area dominated by 2-D points (both minimised) and bounded by `reference`.

    Points not strictly better than the reference in both coordinates add nothing. Sweep in
    ascending first coordinate: each point adds the strip between its second coordinate and the
    best second coordinate seen so far.
    """
    pts, (r1, r2) = _check_points(points, reference)
    area, best = 0.0, r2
    for a, b in sorted(p for p in pts if p[0] < r1 and p[1] < r2):
        if b < best:
            area += (r1 - a) * (best - b)
            best = b
    return area


def non_dominated(points) -> list[bool]:
    """True where no other point is <= in both coordinates and < in one (duplicates all stay)."""
    pts, _ = _check_points(points, (0.0, 0.0))
    return [not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts) for p in pts]


def _ranks(x: Sequence[float]) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions)."""
    t = torch.tensor([float(v) for v in x], dtype=torch.float64)
    order = torch.argsort(t, stable=True)
    ranks = torch.empty_like(t)
    ranks[order] = torch.arange(len(t), dtype=torch.float64)
    for v in torch.unique(t):
        tied = t == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Rank correlation; None when fewer than 3 points or either side is constant."""
    if len(x) != len(y):
        raise ValueError("spearman needs two sequences of the same length")
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den > 0 else None
