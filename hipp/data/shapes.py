"""Procedural shape scenes with compositional captions and named hard negatives.

Every scene is a pure function of (seed, split, index), so any split can be regenerated
bit-for-bit anywhere. Some colour-shape pairs never appear in the train split, so test
scenes measure composition rather than memorisation.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (155, 60, 205),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring")
SIZES = {"small": 0.10, "large": 0.16}  # radius as a fraction of the image side
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES), "position": POSITIONS}
# Pairs never rendered in train: each colour loses one shape, each shape loses at least one colour.
HELD_OUT_PAIRS = frozenset({
    ("red", "triangle"), ("green", "ring"), ("blue", "cross"),
    ("yellow", "circle"), ("purple", "square"), ("white", "triangle"),
})
NEGATIVE_TYPES = ("swap", "color", "shape", "size", "position", "absent")
MAX_NEGATIVES = len(NEGATIVE_TYPES) - 1  # every scene has them all but "swap", which needs two objects
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} at the {self.position}"


def caption(objs: list[Obj]) -> str:
    return " and ".join(o.phrase() for o in objs)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def sample_scene(seed: int, split: str, index: int, n_objects: int | None = None) -> list[Obj]:
    """Objects in distinct grid cells, listed in reading order (the canonical caption order)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = _rng(seed, split, index)
    n = n_objects if n_objects is not None else int(rng.integers(1, 4))
    cells = sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist())
    objs = []
    for cell in cells:
        while True:
            color = str(rng.choice(ATTRIBUTES["color"]))
            shape = str(rng.choice(SHAPES))
            if split != "train" or (color, shape) not in HELD_OUT_PAIRS:
                break
        objs.append(Obj(color, shape, str(rng.choice(ATTRIBUTES["size"])), POSITIONS[cell]))
    return objs


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.82 * r) & (np.abs(dy) <= 0.82 * r)
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "triangle":
        return (dy <= 0.8 * r) & (np.abs(dx) <= 0.62 * (dy + r))
    if shape == "cross":
        arm = 0.33 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render(objs: list[Obj], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 HxWx3 image: noisy dark background, flat jittered colours, jittered positions."""
    s = image_size
    img = rng.integers(0, 40, size=(s, s, 1)).repeat(3, axis=2).astype(np.int16)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    cell = s / 3
    for o in objs:
        row, col = divmod(POSITIONS.index(o.position), 3)
        r = SIZES[o.size] * s
        slack = max(cell / 2 - r, 0.0)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack) * 0.6
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack) * 0.6
        mask = _shape_mask(o.shape, xx - cx, yy - cy, r)
        rgb = np.array(COLORS[o.color]) + rng.integers(-20, 21, size=3)
        img[mask] = rgb
    return np.clip(img, 0, 255).astype(np.uint8)


def hard_negatives(objs: list[Obj], rng: np.random.Generator) -> dict[str, str]:
    """One false caption per negative type that applies to this scene (swap needs two objects)."""
    out: dict[str, str] = {}
    for attr in ("color", "shape", "size"):
        pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))
                 if getattr(objs[i], attr) != getattr(objs[j], attr)]
        if pairs:
            i, j = pairs[int(rng.integers(len(pairs)))]
            swapped = list(objs)
            swapped[i] = _with(objs[i], attr, getattr(objs[j], attr))
            swapped[j] = _with(objs[j], attr, getattr(objs[i], attr))
            out["swap"] = caption(swapped)
            break
    used_cells = {o.position for o in objs}
    for attr in ("color", "shape", "size", "position"):
        k = int(rng.integers(len(objs)))
        choices = [v for v in ATTRIBUTES[attr] if v != getattr(objs[k], attr)
                   and (attr != "position" or v not in used_cells)]
        changed = list(objs)
        changed[k] = _with(objs[k], attr, str(rng.choice(choices)))
        out[attr] = caption(changed)
    present = {(o.color, o.shape) for o in objs}
    color, shape = next((c, sh) for c, sh in _shuffled_pairs(rng) if (c, sh) not in present
                        and c not in {o.color for o in objs} and sh not in {o.shape for o in objs})
    free = [p for p in POSITIONS if p not in used_cells]
    absent = Obj(color, shape, str(rng.choice(ATTRIBUTES["size"])), str(rng.choice(free)))
    named = list(objs) + [absent] if len(objs) < 3 else list(objs[:-1]) + [absent]
    out["absent"] = caption(sorted(named, key=lambda o: POSITIONS.index(o.position)))
    return out


def object_patches(obj: Obj, image_size: int, patch: int) -> list[int]:
    """Patch indices (row-major) that the object's box at its cell centre overlaps (render's jitter is
    at most a few pixels, so the box is taken a little inside its radius)."""
    row, col = divmod(POSITIONS.index(obj.position), 3)
    cell, r = image_size / 3, 0.8 * SIZES[obj.size] * image_size
    cy, cx = (row + 0.5) * cell, (col + 0.5) * cell
    side = image_size // patch
    rows = range(max(0, int((cy - r) // patch)), min(side, int((cy + r) // patch) + 1))
    cols = range(max(0, int((cx - r) // patch)), min(side, int((cx + r) // patch) + 1))
    return [i * side + j for i in rows for j in cols]


def _with(o: Obj, attr: str, value: str) -> Obj:
    return Obj(**{**o.__dict__, attr: value})


def _shuffled_pairs(rng: np.random.Generator):
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    return [pairs[i] for i in rng.permutation(len(pairs))]


@dataclass
class SceneBatch:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    captions: list[str]
    negatives: list[dict[str, str]]
    objects: list[list[Obj]]


def make_scenes(split: str, n: int, seed: int = 0, image_size: int = 64, start: int = 0,
                n_objects: int | None = None) -> SceneBatch:
    """Scenes start..start+n of a split. Deterministic in (seed, split, index)."""
    images, caps, negs, objs_all = [], [], [], []
    for i in range(start, start + n):
        objs = sample_scene(seed, split, i, n_objects)
        rng = _rng(seed + 1, split, i)
        images.append(render(objs, image_size, rng))
        caps.append(caption(objs))
        negs.append(hard_negatives(objs, rng))
        objs_all.append(objs)
    arr = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return SceneBatch(arr, caps, negs, objs_all)


def single_objects() -> list[Obj]:
    """Every single-object description: the prompt set for attribute zero-shot."""
    return [Obj(c, sh, sz, p) for c in COLORS for sh in SHAPES for sz in SIZES for p in POSITIONS]
