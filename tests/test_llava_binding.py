"""The binding benchmark's pure parts: which questions are position- or content-keyed, how wrong
answers are sorted, and which patches an object covers."""
import torch

from benchmarks.llava_binding import KINDS, _probe_accuracy, keying, tally, value
from hipp.data.shapes import object_patches
from hipp.data import shapes
from hipp.data.instruct import eval_sets


def _multi(n=60):
    sets = eval_sets("val", n, 0, 64, KINDS)
    return [s for kind in KINDS for s in sets[kind] if len(s.meta["objects"]) > 1]


def test_tally_sorts_right_other_object_and_absent_answers():
    samples = _multi()
    attr = lambda s: s.kind.split("/")[1]  # noqa: E731
    others = [next(value(o, attr(s)) for o in s.meta["objects"] if value(o, attr(s)) != s.answer)
              if any(value(o, attr(s)) != s.answer for o in s.meta["objects"]) else s.answer for s in samples]
    right, other, absent = tally(samples, [s.answer for s in samples]), tally(samples, others), \
        tally(samples, ["wombat"] * len(samples))
    assert sum(right.values()) == sum(other.values()) == sum(absent.values()) == len(samples)
    assert {k[2] for k in right} == {"right"} and {k[2] for k in absent} == {"absent value"}
    n_differ = sum(o != s.answer for s, o in zip(samples, others))
    assert n_differ > 0 and sum(v for k, v in other.items() if k[2] == "other object") == n_differ
    # a position question can only name its object by what it looks like
    assert {keying(s) for s in samples if s.kind == "attr/position"} == {"content-keyed"}
    assert {keying(s) for s in samples if s.kind == "attr/color"} == {"content-keyed", "position-keyed"}


def test_object_patches_cover_the_object_and_stay_in_its_cell():
    big = shapes.Obj("red", "circle", "large", "center")
    small = shapes.Obj("red", "circle", "small", "top left")
    assert {27, 28, 35, 36} <= set(object_patches(big, 64, 8))  # the four patches around the centre
    assert set(object_patches(small, 64, 8)) <= {0, 1, 2, 8, 9, 10, 16, 17, 18}
    assert not set(object_patches(big, 64, 8)) & set(object_patches(small, 64, 8))


def test_probe_reads_a_linear_label_and_not_a_random_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(800, 16, generator=g)
    linear = (x[:, 3] > 0).long() + 2 * (x[:, 7] > 0).long()
    noise = torch.randint(4, (800,), generator=g)
    assert _probe_accuracy(x, linear, 4, 600) > 0.9
    assert _probe_accuracy(x, noise, 4, 600) < 0.4
