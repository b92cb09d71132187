import torch

from hipp.data import shapes


def test_scenes_are_deterministic_and_seed_dependent():
    a = shapes.make_scenes("train", 20, seed=3)
    b = shapes.make_scenes("train", 20, seed=3)
    c = shapes.make_scenes("train", 20, seed=4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and a.negatives == b.negatives
    assert a.captions != c.captions
    assert a.images.shape == (20, 3, 64, 64) and a.images.dtype == torch.uint8


def test_scene_structure_and_caption_grammar():
    batch = shapes.make_scenes("val", 200, seed=0)
    counts = {len(objs) for objs in batch.objects}
    assert counts == {1, 2, 3}
    for objs, cap in zip(batch.objects, batch.captions):
        cells = [shapes.POSITIONS.index(o.position) for o in objs]
        assert cells == sorted(set(cells)), "objects sit in distinct cells, in reading order"
        assert cap == " and ".join(f"a {o.size} {o.color} {o.shape} at the {o.position}" for o in objs)


def test_held_out_pairs_never_in_train_but_present_in_test():
    train = shapes.make_scenes("train", 1500, seed=0)
    pairs = {(o.color, o.shape) for objs in train.objects for o in objs}
    assert not pairs & shapes.HELD_OUT_PAIRS
    test = shapes.make_scenes("test", 1500, seed=0)
    test_pairs = {(o.color, o.shape) for objs in test.objects for o in objs}
    assert shapes.HELD_OUT_PAIRS <= test_pairs


def test_hard_negatives_are_false_and_typed():
    batch = shapes.make_scenes("test", 300, seed=1)
    seen = set()
    for objs, cap, negs in zip(batch.objects, batch.captions, batch.negatives):
        truth = {o.phrase() for o in objs}
        for kind, neg in negs.items():
            seen.add(kind)
            assert neg != cap
            assert set(neg.split(" and ")) != truth, (kind, cap, neg)
        if len(objs) == 1:
            assert "swap" not in negs
    assert seen == set(shapes.NEGATIVE_TYPES)


def test_swap_negative_keeps_the_bag_of_words():
    batch = shapes.make_scenes("test", 300, seed=2)
    for cap, negs in zip(batch.captions, batch.negatives):
        if "swap" in negs:
            assert sorted(cap.split()) == sorted(negs["swap"].split())


def test_objects_are_drawn_in_their_colour_and_cell():
    batch = shapes.make_scenes("test", 50, seed=0, n_objects=1)
    for img, objs in zip(batch.images, batch.objects):
        o = objs[0]
        row, col = divmod(shapes.POSITIONS.index(o.position), 3)
        cell = img[:, row * 21:(row + 1) * 21 + 1, col * 21:(col + 1) * 21 + 1].float()
        target = torch.tensor(shapes.COLORS[o.color], dtype=torch.float32).view(3, 1, 1)
        close = ((cell - target).abs().max(0).values <= 25).sum()
        assert close >= 20, o


def test_single_objects_cover_every_value_equally():
    objs = shapes.single_objects()
    assert len({o.phrase() for o in objs}) == len(objs)
    for attr, values in shapes.ATTRIBUTES.items():
        counts = [sum(getattr(o, attr) == v for o in objs) for v in values]
        assert len(set(counts)) == 1 and sum(counts) == len(objs)


def test_training_batches_always_contrast_required_negative_kinds():
    import pytest

    from hipp.data.mixed import MixedBatches
    from hipp.errors import HippError

    batch = MixedBatches(0, 16, 1.0, 3, 32, required_negatives=("shape",))(5)
    assert batch.n_shapes == 16 and len(batch.negatives) == 16 * 3
    again = MixedBatches(0, 16, 1.0, 3, 32, required_negatives=("shape",))(5)
    assert again.negatives == batch.negatives  # still a pure function of (seed, index)
    scenes = shapes.make_scenes("train", 16, seed=0, image_size=32, start=5 * 16)
    for i, negs in enumerate(scenes.negatives):
        assert batch.negatives[3 * i] == negs["shape"]  # the required kind comes first, every scene
        assert len(set(batch.negatives[3 * i:3 * i + 3])) == 3
    with pytest.raises(HippError, match="required negatives"):
        MixedBatches(0, 16, 1.0, 2, 32, required_negatives=("colour",))
