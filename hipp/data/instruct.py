"""Instruction samples for a generative VLM: captions, attribute questions, POPE probes, Fashion-MNIST.

Sample i of a split is a pure function of (seed, split, i, kinds): its kind is kinds[i % len(kinds)]
(kinds cycle, so a kind named twice is drawn twice as often), its shape scene is shapes' scene i
(the image make_scenes renders for index i), and every other choice comes from an rng seeded with
(seed, split, kind, i). Alternation that must be exact (POPE's yes / no, Fashion-MNIST's image) runs
on the kind's own ordinal, the count of earlier samples of that kind, so each kind sees 0, 1, 2, ...

Words stay in a closed vocabulary (hipp/data/words.py): a position is hyphenated ("top-left") in
questions and one-word answers; captions keep shapes.caption's own words ("at the top left").
Held-out colour-shape pairs are never named by a train question, so a pair's words carry no
train-time bias towards "no".
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations

import numpy as np
import torch

from ..errors import HippError
from . import shapes
from .fashion_mnist import load_fashion_mnist, to_rgb

KINDS = ("caption", "attr/color", "attr/shape", "attr/size", "attr/position", "attr/count",
         "pope/random", "pope/popular", "pope/adversarial", "fmnist")
ATTRIBUTE_KINDS = tuple(k for k in KINDS if k.startswith("attr/"))
POPE_SAMPLINGS = ("random", "popular", "adversarial")
POPE_KINDS = tuple(f"pope/{s}" for s in POPE_SAMPLINGS)  # the existence questions
FMNIST_ANSWERS = ("t-shirt", "trousers", "pullover", "dress", "coat",
                  "sandal", "shirt", "sneaker", "bag", "ankle-boot")  # fashion_mnist.CLASSES as one word
FMNIST_TRAIN = 55000  # the last 5000 train images are evaluate.py's val split; t10k is test
COUNT_WORDS = ("zero", "one", "two", "three")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in shapes.SHAPES}
CAPTION_QUESTION = "Describe the image."
FMNIST_QUESTION = "What is this?"
POPULAR_SCENES = 5000   # train scenes counted for the popular pairs (seed 0, independent of `seed`)
POPULAR_TOP = 3         # an absent popular pair is drawn among the scene's 3 most frequent absent ones
_REDRAW = 2 ** 40       # scene index offset of a redraw, far from every index range make_scenes is called on

# every word a question or answer may hold, in a fixed order (the tokenizer's ids follow it)
WORDS = (
    *"Describe the image What Where How Is is are there a in this".split(),
    *"color shape size many object objects at and yes no".split(),
    *shapes.COLORS, *shapes.SHAPES, *PLURALS.values(), *shapes.SIZES,
    "top", "bottom", "left", "right", "center", "top-left", "top-right", "bottom-left", "bottom-right",
    *COUNT_WORDS, *FMNIST_ANSWERS,
)


@dataclass(frozen=True)
class Sample:
    kind: str
    question: str
    answer: str
    image: torch.Tensor  # uint8 [3, H, W]
    meta: dict = field(default_factory=dict, compare=False)


def position_word(position: str) -> str:
    """shapes' position as one word: "top left" -> "top-left"."""
    return position.replace(" ", "-")


def _rng(seed: int, split: str, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode()), zlib.crc32(kind.encode()), index])


def _ordinal(index: int, kinds: tuple[str, ...]) -> int:
    """How many samples before `index` have its kind (kinds cycle, a kind may be listed twice)."""
    kind, period = kinds[index % len(kinds)], len(kinds)
    slots = [j for j, k in enumerate(kinds) if k == kind]
    return (index // period) * len(slots) + slots.index(index % period)


def _scene_image(seed: int, split: str, scene: int, objs, image_size: int) -> torch.Tensor:
    # shapes.make_scenes' rendering rng: sample i's image is make_scenes' image i
    img = shapes.render(objs, image_size, shapes._rng(seed + 1, split, scene))
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


# --- attribute questions ---------------------------------------------------------------------------

def _matches(o: shapes.Obj, ref: dict) -> bool:
    return all(getattr(o, a) == v for a, v in ref.items())


def refer(ref: dict) -> str:
    """A referring expression: "the large red circle", "the red object", "the object at the top-left"."""
    words = ["the"] + [ref[a] for a in ("size", "color") if a in ref] + [ref.get("shape", "object")]
    if "position" in ref:
        words += ["at", "the", position_word(ref["position"])]
    return " ".join(words)


def _unique_refs(objs, target: shapes.Obj, asked: str) -> list[dict]:
    """Every description of `target` by other attributes than `asked` that no other object fits; the empty
    one ("the object") only in a one-object scene."""
    attrs = [a for a in ("size", "color", "shape", "position") if a != asked]
    refs = []
    for r in range(len(attrs) + 1):
        for subset in combinations(attrs, r):
            ref = {a: getattr(target, a) for a in subset}
            if sum(_matches(o, ref) for o in objs) == 1:
                refs.append(ref)
    return refs


ATTRIBUTE_QUESTIONS = {"color": "What color is {}?", "shape": "What shape is {}?",
                       "size": "What size is {}?", "position": "Where is {}?"}


def _attribute(objs, attr: str, rng: np.random.Generator):
    """(question, answer, meta) or None when no object can be named without the asked attribute."""
    for k in rng.permutation(len(objs)):
        target = objs[int(k)]
        refs = _unique_refs(objs, target, attr)
        if refs:
            ref = refs[int(rng.integers(len(refs)))]
            value = getattr(target, attr)
            answer = position_word(value) if attr == "position" else value
            return ATTRIBUTE_QUESTIONS[attr].format(refer(ref)), answer, {"target": target, "ref": ref}
    return None


def _count(objs, rng: np.random.Generator):
    """How many objects, or objects of a present colour or shape: one, two or three, never zero."""
    form = int(rng.integers(3))
    if form == 0:
        return "How many objects are there?", COUNT_WORDS[len(objs)], {"counted": {}}
    attr = "color" if form == 1 else "shape"
    value = getattr(objs[int(rng.integers(len(objs)))], attr)
    n = sum(getattr(o, attr) == value for o in objs)
    noun = f"{value} objects" if attr == "color" else PLURALS[value]
    return f"How many {noun} are there?", COUNT_WORDS[n], {"counted": {attr: value}}


# --- POPE existence probes -------------------------------------------------------------------------

ALL_PAIRS = tuple((c, s) for c in shapes.COLORS for s in shapes.SHAPES)


@lru_cache(maxsize=1)
def pair_frequencies() -> dict[tuple[str, str], int]:
    """Objects per colour-shape pair over POPULAR_SCENES train scenes of seed 0, computed once."""
    counts = dict.fromkeys(ALL_PAIRS, 0)
    for i in range(POPULAR_SCENES):
        for o in shapes.sample_scene(0, "train", i):
            counts[(o.color, o.shape)] += 1
    return counts


def _absent_pair(objs, sampling: str, split: str, rng: np.random.Generator) -> tuple[str, str]:
    present = {(o.color, o.shape) for o in objs}
    allowed = [p for p in ALL_PAIRS if p not in present and (split != "train" or p not in shapes.HELD_OUT_PAIRS)]
    if sampling == "popular":
        freq = pair_frequencies()  # held-out pairs count 0 in train, so they come last
        allowed = sorted(allowed, key=lambda p: (-freq[p], ALL_PAIRS.index(p)))[:POPULAR_TOP]
    elif sampling == "adversarial":
        near = [p for p in allowed if any((p[0] == c) != (p[1] == s) for c, s in present)]
        allowed = near or allowed  # one attribute off a present object; never empty (each colour keeps 4 shapes)
    return allowed[int(rng.integers(len(allowed)))]


def _pope(objs, sampling: str, present: bool, split: str, rng: np.random.Generator):
    if present:
        o = objs[int(rng.integers(len(objs)))]
        pair = (o.color, o.shape)
    else:
        pair = _absent_pair(objs, sampling, split, rng)
    meta = {"sampling": sampling, "pair": pair, "present": present}
    return f"Is there a {pair[0]} {pair[1]} in the image?", "yes" if present else "no", meta


# --- Fashion-MNIST ---------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _fmnist_source(source: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    return load_fashion_mnist(source, root)


def fmnist_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 28, 28] images and labels of a split: train the first FMNIST_TRAIN train images, val the
    rest (evaluate.py's VAL_IMAGES), test t10k. Read once per process and cached."""
    from . import fashion_mnist

    images, labels = _fmnist_source("test" if split == "test" else "train", str(fashion_mnist.DEFAULT_ROOT))
    if split == "train":
        return images[:FMNIST_TRAIN], labels[:FMNIST_TRAIN]
    if split == "val":
        return images[FMNIST_TRAIN:], labels[FMNIST_TRAIN:]
    return images, labels


# --- samples ---------------------------------------------------------------------------------------

def check_kinds(kinds) -> tuple[str, ...]:
    kinds = tuple(kinds)
    if not kinds:
        raise HippError("no sample kinds given; choose from " + ", ".join(KINDS))
    for k in kinds:
        if k not in KINDS:
            raise HippError(f"unknown sample kind {k!r}; choose from {', '.join(KINDS)}")
    return kinds


def mixed_kinds(existence_share: float, n: int) -> tuple[str, ...]:
    """n kinds, round(existence_share * n) of them POPE samplings in turn (at least one, and one of
    something else, so that neither loss is ever empty), the rest the other kinds in turn."""
    if not 0.0 <= existence_share <= 1.0 or n < 2:
        raise HippError(f"an existence share in [0, 1] over at least 2 samples, got {existence_share!r} over {n}")
    pope, rest = POPE_KINDS, tuple(k for k in KINDS if k not in POPE_KINDS)
    m = min(max(round(existence_share * n), 1), n - 1)
    return tuple(pope[i % len(pope)] for i in range(m)) + tuple(rest[i % len(rest)] for i in range(n - m))


def _check(split: str, n: int, start: int, image_size: int) -> None:
    if split not in shapes.SPLITS:
        raise HippError(f"unknown split {split!r}; choose from {', '.join(shapes.SPLITS)}")
    for name, value, low in (("n", n, 0), ("start", start, 0), ("image_size", image_size, 8)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise HippError(f"{name} must be a whole number of at least {low}, got {value!r}")


def _shape_sample(kind: str, seed: int, split: str, index: int, ordinal: int, image_size: int) -> Sample:
    rng = _rng(seed, split, kind, index)
    scene, attempt, qa = index, 0, None
    while qa is None:  # a redraw: about one position question in 140
        if attempt:  # no object can be named without the asked attribute: still a function of index
            scene = index + attempt * _REDRAW
        attempt += 1
        objs = shapes.sample_scene(seed, split, scene)
        if kind == "caption":
            qa = CAPTION_QUESTION, shapes.caption(objs), {}
        elif kind == "attr/count":
            qa = _count(objs, rng)
        elif kind.startswith("attr/"):
            qa = _attribute(objs, kind.split("/")[1], rng)
        else:  # POPE: present and absent alternate on the kind's own ordinal, exactly balanced
            qa = _pope(objs, kind.split("/")[1], ordinal % 2 == 0, split, rng)
    question, answer, meta = qa
    image = _scene_image(seed, split, scene, objs, image_size)
    return Sample(kind, question, answer, image, {**meta, "objects": objs, "scene": scene})


def make_samples(split: str, n: int, seed: int = 0, image_size: int = 64, start: int = 0,
                 kinds: tuple[str, ...] = KINDS) -> list[Sample]:
    """Samples start..start+n of a split; sample i has kind kinds[i % len(kinds)] (see the module doc)."""
    kinds = check_kinds(kinds)
    _check(split, n, start, image_size)
    out: list[Sample | None] = []
    wanted = []  # (position in out, image index, label): Fashion-MNIST images are resized in one go
    for i in range(start, start + n):
        kind, ordinal = kinds[i % len(kinds)], _ordinal(i, kinds)
        if kind != "fmnist":
            out.append(_shape_sample(kind, seed, split, i, ordinal, image_size))
            continue
        labels = fmnist_split(split)[1]
        j = ordinal % len(labels)  # each image once before any repeats
        wanted.append((len(out), j, int(labels[j])))
        out.append(None)
    for c in range(0, len(wanted), 4096):
        chunk = wanted[c:c + 4096]
        images = to_rgb(fmnist_split(split)[0][[j for _, j, _ in chunk]], image_size)
        for (pos, j, label), image in zip(chunk, images):
            out[pos] = Sample("fmnist", FMNIST_QUESTION, FMNIST_ANSWERS[label], image.clone(),
                              {"label": label, "image_index": j})
    return out


def pope_set(split: str, n: int, seed: int = 0, sampling: str = "adversarial", image_size: int = 64) -> list[Sample]:
    """n POPE probes of one sampling, half yes (even positions) and half no."""
    if sampling not in POPE_SAMPLINGS:
        raise HippError(f"unknown POPE sampling {sampling!r}; choose from {', '.join(POPE_SAMPLINGS)}")
    return make_samples(split, n, seed, image_size, kinds=(f"pope/{sampling}",))


def eval_sets(split: str, n: int, seed: int = 0, image_size: int = 64,
              kinds: tuple[str, ...] = KINDS) -> dict[str, list[Sample]]:
    """n samples per kind, each kind on its own scenes 0..n-1 (Fashion-MNIST: the split's first n images)."""
    return {k: make_samples(split, n, seed, image_size, kinds=(k,)) for k in dict.fromkeys(check_kinds(kinds))}
