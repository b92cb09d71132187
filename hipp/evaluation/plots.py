"""Figures of fronts and method comparisons (matplotlib's Agg canvas, written atomically)."""
from __future__ import annotations

from collections.abc import Sequence

from ..storage.fileio import atomic_path
from .front import REFERENCE, non_dominated


def _figure():
    from matplotlib.backends.backend_agg import (
        FigureCanvasAgg,  # Agg directly: no global backend switch
    )
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def _front_line(xy: list[tuple[float, float]]):
    """Staircase through the non-dominated (flops, utility) points, cheapest first."""
    keep = non_dominated([(f, 1 - u) for f, u in xy])
    pts = sorted(p for p, k in zip(xy, keep) if k)
    xs, ys = [], []
    for f, u in pts:
        if xs:
            xs.append(f)
            ys.append(ys[-1])
        xs.append(f)
        ys.append(u)
    return xs, ys


def plot_front(rows: list[dict], path, hypervolume: float | None = None, dense: dict | None = None,
               utility_label: str = "utility", grounding_label: str = "grounding") -> None:
    """Utility vs FLOPs ratio, one dot per preference coloured by grounding, the front as a staircase."""
    fig = _figure()
    ax = fig.add_subplot()
    x = [r["flops_ratio"] for r in rows]
    y = [r["utility"] for r in rows]
    g = [r["grounding"] for r in rows]
    if rows and all(v is not None for v in g):
        sc = ax.scatter(x, y, c=g, cmap="viridis", s=36, edgecolors="k", linewidths=0.4, zorder=3)
        fig.colorbar(sc, ax=ax, label=grounding_label)
    else:
        ax.scatter(x, y, s=36, edgecolors="k", linewidths=0.4, zorder=3)
    xs, ys = _front_line(list(zip(x, y)))
    ax.plot(xs, ys, color="tab:red", lw=1.2, zorder=2)
    front = [(a, b) for a, b, r in zip(x, y, rows) if r.get("non_dominated")]
    ax.scatter([a for a, _ in front], [b for _, b in front], s=110, facecolors="none", edgecolors="tab:red",
               linewidths=1.2, label="non-dominated", zorder=4)
    if dense is not None:
        ax.scatter([1.0], [dense["utility"]], marker="*", s=140, color="tab:orange", edgecolors="k",
                   label="dense", zorder=4)
    ax.set_xlabel("FLOPs ratio (vs dense)")
    ax.set_ylabel(utility_label)
    title = "HiPP Pareto front"
    if hypervolume is not None:
        title += f": hypervolume {hypervolume:.3f} (ref {REFERENCE[0]:g}, {REFERENCE[1]:g})"
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_methods(series: dict[str, list[tuple[float, float]]], path, title: str = "",
                 highlight: Sequence[str] = ("hipp",), dense: tuple[float, float] | None = None) -> None:
    """Utility vs FLOPs ratio, one line of (flops_ratio, utility) points per method; `highlight`ed
    methods drawn heavier, the dense model as a star."""
    fig = _figure()
    ax = fig.add_subplot()
    for name, pts in series.items():
        pts = sorted(pts)
        bold = name in highlight
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=6 if bold else 4, lw=2.4 if bold else 1.2,
                label=name, zorder=3 if bold else 2)
    if dense is not None:
        ax.scatter([dense[0]], [dense[1]], marker="*", s=140, color="tab:orange", edgecolors="k", label="dense",
                   zorder=4)
    ax.set_xlabel("FLOPs ratio (vs dense)")
    ax.set_ylabel("utility")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
