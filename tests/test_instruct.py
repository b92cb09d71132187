"""Instruction samples (hipp/data/instruct.py), the word tokenizer and the LLaVA processor (hipp/data/words.py)."""
import json
from collections import Counter

import pytest
import torch
import transformers

from hipp.data import fashion_mnist, shapes, to_input
from hipp.data.instruct import (ALL_PAIRS, FMNIST_ANSWERS, FMNIST_TRAIN, KINDS, POPULAR_TOP, WORDS, eval_sets,
                                make_samples, mixed_kinds, pair_frequencies, pope_set, position_word)
from hipp.data.words import (EOS, IGNORE, IMAGE, build_processor, build_tokenizer, encode, encode_prompts,
                             image_tokens, prompt, vocabulary)
from hipp.errors import HippError

HAVE_FMNIST = (fashion_mnist.DEFAULT_ROOT / "t10k-labels-idx1-ubyte.gz").is_file()
SHAPE_KINDS = tuple(k for k in KINDS if k != "fmnist")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def _same(a, b) -> bool:
    return (a.kind, a.question, a.answer) == (b.kind, b.question, b.answer) and torch.equal(a.image, b.image) \
        and a.meta == b.meta


def test_sample_i_is_a_pure_function_of_seed_split_index_and_kinds():
    whole = make_samples("train", 24, seed=3, kinds=SHAPE_KINDS)
    part = make_samples("train", 10, seed=3, start=7, kinds=SHAPE_KINDS)
    assert all(_same(a, b) for a, b in zip(whole[7:17], part))
    assert all(_same(a, b) for a, b in zip(whole, make_samples("train", 24, seed=3, kinds=SHAPE_KINDS)))
    other = make_samples("train", 24, seed=4, kinds=SHAPE_KINDS)
    assert sum(_same(a, b) for a, b in zip(whole, other)) < 3
    assert [s.kind for s in whole] == [SHAPE_KINDS[i % len(SHAPE_KINDS)] for i in range(24)]  # kinds cycle


def test_a_shape_sample_shows_make_scenes_scene_of_its_index():
    samples = make_samples("val", 6, start=2, kinds=("caption", "attr/color"))
    scenes = shapes.make_scenes("val", 6, start=2)
    for s, image, objs, cap in zip(samples, scenes.images, scenes.objects, scenes.captions):
        assert torch.equal(s.image, image) and s.meta["objects"] == objs and s.image.dtype == torch.uint8
        if s.kind == "caption":
            assert s.question == "Describe the image." and s.answer == cap


def test_attribute_questions_name_exactly_one_object_without_the_asked_attribute():
    samples = make_samples("test", 300, kinds=("attr/color", "attr/shape", "attr/size", "attr/position"))
    for s in samples:
        attr, objs, ref = s.kind.split("/")[1], s.meta["objects"], s.meta["ref"]
        assert attr not in ref
        assert [o for o in objs if all(getattr(o, a) == v for a, v in ref.items())] == [s.meta["target"]]
        value = getattr(s.meta["target"], attr)
        assert s.answer == (position_word(value) if attr == "position" else value)
        assert " " not in s.answer and s.question.endswith("?")
    assert len({s.answer for s in samples if s.kind == "attr/position"}) == len(shapes.POSITIONS)


def test_count_answers_count_what_the_question_names():
    for s in make_samples("test", 60, kinds=("attr/count",)):
        counted = s.meta["counted"]
        n = sum(all(getattr(o, a) == v for a, v in counted.items()) for o in s.meta["objects"])
        assert s.answer == ("zero", "one", "two", "three")[n] and n >= 1


@pytest.mark.parametrize("sampling", ["random", "popular", "adversarial"])
def test_pope_is_balanced_and_right(sampling):
    samples = pope_set("test", 40, sampling=sampling)
    assert Counter(s.answer for s in samples) == {"yes": 20, "no": 20}
    assert [s.answer for s in samples[:4]] == ["yes", "no", "yes", "no"]
    for s in samples:
        present = {(o.color, o.shape) for o in s.meta["objects"]}
        assert (s.meta["pair"] in present) == (s.answer == "yes")
        assert s.question == f"Is there a {s.meta['pair'][0]} {s.meta['pair'][1]} in the image?"


def test_adversarial_absent_pairs_differ_from_a_present_object_in_one_attribute():
    for s in pope_set("test", 60, sampling="adversarial"):
        if s.answer == "no":
            c, sh = s.meta["pair"]
            assert any((c == o.color) != (sh == o.shape) for o in s.meta["objects"])


def test_popular_absent_pairs_are_the_most_frequent_train_pairs_missing_from_the_scene():
    freq = pair_frequencies()
    assert pair_frequencies() is freq  # computed once
    assert all(freq[p] == 0 for p in shapes.HELD_OUT_PAIRS) and sum(freq.values()) > 0
    for s in pope_set("test", 40, sampling="popular"):
        if s.answer == "no":
            present = {(o.color, o.shape) for o in s.meta["objects"]}
            absent = sorted((p for p in ALL_PAIRS if p not in present), key=lambda p: (-freq[p], ALL_PAIRS.index(p)))
            assert s.meta["pair"] in absent[:POPULAR_TOP]


def test_train_questions_never_name_a_held_out_pair():
    for s in make_samples("train", 400, kinds=SHAPE_KINDS):
        for color, shape in shapes.HELD_OUT_PAIRS:
            assert f"{color} {shape}" not in f"{s.question} {s.answer}"


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST (dataset-fashion-mnist) is not installed")
def test_fmnist_splits_follow_evaluate_py():
    train_x, train_y = fashion_mnist.load_fashion_mnist("train")
    test_x, test_y = fashion_mnist.load_fashion_mnist("test")
    sources = {"train": (train_x, train_y, 0), "val": (train_x, train_y, FMNIST_TRAIN), "test": (test_x, test_y, 0)}
    for split, (x, y, offset) in sources.items():
        samples = make_samples(split, 3, start=1, kinds=("fmnist",))
        for j, s in enumerate(samples, start=1):
            assert s.meta["image_index"] == j and s.answer == FMNIST_ANSWERS[int(y[offset + j])]
            assert s.question == "What is this?" and torch.equal(s.image, fashion_mnist.to_rgb(x[offset + j:offset + j + 1], 64)[0])
    # a kind named twice is drawn twice as often, its images still one after another
    mixed = make_samples("train", 6, kinds=("fmnist", "caption", "fmnist"))
    assert [s.meta["image_index"] for s in mixed if s.kind == "fmnist"] == [0, 1, 2, 3]


def test_missing_fmnist_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_ROOT", tmp_path)
    with pytest.raises(HippError, match="apt-get install dataset-fashion-mnist") as e:
        make_samples("test", 1, kinds=("fmnist",))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("call,needle", [
    (lambda: make_samples("training", 2), "unknown split"),
    (lambda: make_samples("test", 2, kinds=("attr/texture",)), "unknown sample kind"),
    (lambda: make_samples("test", 2, kinds=()), "no sample kinds"),
    (lambda: make_samples("test", -1), "n must be"),
    (lambda: pope_set("test", 2, sampling="hard"), "unknown POPE sampling"),
])
def test_bad_arguments_are_one_line(call, needle):
    with pytest.raises(HippError, match=needle):
        call()


@pytest.mark.parametrize("share,expected", [(0.0, 1), (0.25, 16), (0.5, 32), (1.0, 63)])
def test_mixed_kinds_hold_existence_questions_in_the_share_asked_and_never_none_of_either(share, expected):
    kinds = mixed_kinds(share, 64)
    pope = [k for k in kinds if k.startswith("pope/")]
    assert len(kinds) == 64 and len(pope) == expected  # at least one of each: neither loss is ever empty
    if 3 <= expected <= 64 - 7:  # room for every kind
        assert set(kinds) == set(KINDS)
    assert Counter(pope).most_common()[0][1] - Counter(pope).most_common()[-1][1] <= 1  # samplings in turn
    batch = make_samples("train", 64, kinds=kinds)  # the present / absent answers stay balanced
    answers = Counter(s.answer for s in batch if s.kind.startswith("pope/"))
    assert abs(answers["yes"] - answers["no"]) <= len(set(pope))
    with pytest.raises(HippError, match="existence share"):
        mixed_kinds(1.5, 64)


def test_the_vocabulary_is_closed_and_answers_round_trip(processor):
    tok = processor.tokenizer
    vocab = set(vocabulary())
    assert vocabulary()[:5] == ["<pad>", "<s>", "</s>", "<unk>", "<image>"] and len(vocab) == len(vocabulary())
    samples = make_samples("train", 400, kinds=SHAPE_KINDS) + make_samples("test", 200, kinds=SHAPE_KINDS)
    answers = [s.answer for s in samples] + list(FMNIST_ANSWERS)
    for text in [s.question for s in samples] + answers:
        assert set(text.replace("?", " ").replace(".", " ").split()) <= vocab, text
        assert tok.unk_token_id not in tok(text)["input_ids"]
    for a in answers:
        assert tok.decode(tok(a, add_special_tokens=False)["input_ids"]) == a
    assert tok("top-left t-shirt")["input_ids"] == [tok.bos_token_id, *tok.convert_tokens_to_ids(["top-left", "t-shirt"])]
    assert set(WORDS) <= vocab


def test_tokenizer_and_processor_round_trip_through_save_pretrained(processor, tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok", trust_remote_code=False, local_files_only=True)
    texts = [prompt("What color is the circle?") + " red" + EOS, "a small red circle at the top left"]
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert loaded.padding_side == "left" and loaded.pad_token_id == 0 and loaded.convert_tokens_to_ids(IMAGE) == 4
    assert "auto_map" not in json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    processor.save_pretrained(tmp_path / "proc")
    again = transformers.AutoProcessor.from_pretrained(tmp_path / "proc", trust_remote_code=False, local_files_only=True)
    assert isinstance(again, transformers.LlavaProcessor) and image_tokens(again) == 64
    samples = make_samples("test", 5, kinds=SHAPE_KINDS)
    a, b = encode(processor, samples, train=True), encode(again, samples, train=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pixels_are_the_teachers_preprocessing(processor):
    samples = make_samples("test", 4, kinds=("caption",))
    pixels = encode(processor, samples, train=False)["pixel_values"]
    reference = to_input(torch.stack([s.image for s in samples]), {"mean": [0.5] * 3, "std": [0.5] * 3})
    assert pixels.dtype == torch.float32 and torch.allclose(pixels, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("strategy,extra,expected", [("default", 1, 64), ("full", 1, 65), ("default", 0, 63)])
def test_image_tokens_follow_the_model_settings(strategy, extra, expected):
    proc = build_processor(vision_feature_select_strategy=strategy, num_additional_image_tokens=extra)
    ids = encode(proc, make_samples("test", 1, kinds=("caption",)), train=False)["input_ids"]
    assert image_tokens(proc) == expected and int((ids == proc.image_token_id).sum()) == expected


def test_labels_cover_the_answer_and_eos_only_and_padding_is_left(processor):
    samples = make_samples("test", 10, kinds=("caption", "attr/size"))
    batch = encode(processor, samples, train=True)
    tok = processor.tokenizer
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == labels.shape == mask.shape and ids[:, -1].eq(tok.eos_token_id).all()
    for row, s in enumerate(samples):
        pad = int((mask[row] == 0).sum())
        assert ids[row, :pad].eq(tok.pad_token_id).all() and ids[row, pad] == tok.bos_token_id
        kept = labels[row][labels[row] != IGNORE]
        assert tok.decode(kept) == f"{s.answer} {EOS}" and torch.equal(kept, ids[row, -len(kept):])
    prompts = encode(processor, samples, train=False)
    assert "labels" not in prompts and prompts["answers"] == [s.answer for s in samples]
    assert all(tok.decode(r[-1:]) == "ASSISTANT:" for r in prompts["input_ids"])


@pytest.mark.parametrize("image,text,needle", [
    (torch.zeros(3, 32, 32, dtype=torch.uint8), prompt("What is this?"), r"uint8 \[3, 64, 64\]"),
    (torch.zeros(3, 64, 64), prompt("What is this?"), r"uint8 \[3, 64, 64\]"),
    (torch.zeros(3, 64, 64, dtype=torch.uint8), "USER: What is this? ASSISTANT:", "exactly once"),
    (torch.zeros(3, 64, 64, dtype=torch.uint8), prompt("What is this wombat?"), "outside the vocabulary"),
])
def test_bad_prompts_and_images_are_one_line(processor, image, text, needle):
    with pytest.raises(HippError, match=needle) as e:
        encode_prompts(processor, [image], [text])
    assert "\n" not in str(e.value)


def test_eval_sets_hold_n_of_each_kind_on_their_own_scenes():
    sets = eval_sets("val", 3, kinds=("caption", "pope/random"))
    assert list(sets) == ["caption", "pope/random"] and all(len(v) == 3 for v in sets.values())
    assert [s.meta["scene"] for s in sets["caption"]] == [0, 1, 2]
