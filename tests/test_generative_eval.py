"""Generative evaluation of a LLaVA (hipp/evaluation/generative.py) and its scoring (answers.py)."""
import json

import pytest
import torch
import transformers

from hipp.data import fashion_mnist, words
from hipp.data.instruct import KINDS, Sample, make_samples
from hipp.data.shapes import Obj
from hipp.errors import HippError
from hipp.evaluation.answers import caption_counts, parse_caption, score, utility_of
from hipp.evaluation.generative import check_pair, costs, evaluate_generative, generate, kinds_for
from conftest import counted_flops

HAVE_FMNIST = (fashion_mnist.DEFAULT_ROOT / "t10k-labels-idx1-ubyte.gz").is_file()
SHAPE_KINDS = tuple(k for k in KINDS if k != "fmnist")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


def tiny_llava(processor, layers: int = 1, seed: int = 0):
    """64x64 images in 8x8 patches (64 image features without CLIP's class token), a 1-layer Llama."""
    tok = processor.tokenizer
    torch.manual_seed(seed)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  num_hidden_layers=layers, image_size=64, patch_size=8)
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                vocab_size=len(tok), max_position_embeddings=256, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                                   vision_feature_layer=-1, vision_feature_select_strategy="default")
    return transformers.LlavaForConditionalGeneration(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pair():
    processor = words.build_processor()
    return tiny_llava(processor), processor


def test_report_has_every_metric_in_0_1(pair):
    model, processor = pair
    kinds = KINDS if HAVE_FMNIST else SHAPE_KINDS
    rep = evaluate_generative(model, processor, n=4, batch_size=8, kinds=kinds)
    m = rep["metrics"]
    expected = {f"attr/{a}" for a in ("color", "shape", "size", "position", "count", "mean")}
    expected |= {f"pope/{s}_{k}" for s in ("random", "popular", "adversarial")
                 for k in ("acc", "precision", "recall", "f1", "yes_ratio", "f1_pope_script")} | {"pope/f1_mean"}
    expected |= {f"caption/{k}" for k in ("precision", "recall", "f1", "exact")}
    expected |= {"fmnist/acc"} if HAVE_FMNIST else set()
    assert set(m) == expected and all(0.0 <= v <= 1.0 for v in m.values())
    assert 0.0 <= rep["utility"] <= 1.0 and rep["params"] == sum(p.numel() for p in model.parameters())
    assert set(rep["flops"]) == {"prefill", "decode_token"} and rep["flops"]["prefill"] > rep["flops"]["decode_token"] > 0
    assert set(rep["latency_ms"]) == {"prefill", "decode_token", "batch"} and rep["latency_ms"]["batch"] == 8
    assert rep["samples"] == {k: 4 for k in kinds} and json.loads(json.dumps(rep)) == rep


def test_greedy_generation_is_batch_independent(pair):
    model, processor = pair
    samples = make_samples("test", 6, kinds=("caption", "attr/color", "pope/random"))
    images, prompts = [s.image for s in samples], [words.prompt(s.question) for s in samples]
    together = generate(model, processor, images, prompts, max_new_tokens=5, batch_size=6)
    alone = [generate(model, processor, [i], [p], max_new_tokens=5)[0] for i, p in zip(images, prompts)]
    assert together == alone and all(isinstance(t, str) for t in together)


def test_analytic_flops_equal_counted_flops(pair):
    """POPE prompts all have one length: prefill and one decoding step, counted by torch, per sample."""
    model, processor = pair
    samples = make_samples("test", 4, kinds=("pope/random",))
    batch = words.encode(processor, samples, train=False)
    batch.pop("answers")
    length = batch["input_ids"].shape[1]
    assert batch["attention_mask"].all() and words.prompt_lengths(processor, [s.question for s in samples]) == [length] * 4

    def run(steps):
        config = transformers.GenerationConfig(do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                                               pad_token_id=0, eos_token_id=2)
        return lambda: model.generate(**batch, generation_config=config)
    expected = costs(model, [length])
    prefill, two = counted_flops(run(1)), counted_flops(run(2))
    assert prefill == 4 * expected["prefill"] and two - prefill == 4 * expected["decode_token"]


def _s(kind, answer, objects=()):
    return Sample(kind, "q", answer, torch.zeros(3, 1, 1, dtype=torch.uint8), {"objects": list(objects)})


def test_score_by_hand():
    red = Obj("red", "circle", "small", "top left")
    blue = Obj("blue", "square", "large", "center")
    samples = [_s("attr/color", "red"), _s("attr/color", "blue"), _s("attr/position", "top-left"),
               _s("pope/random", "yes"), _s("pope/random", "yes"), _s("pope/random", "no"), _s("pope/random", "no"),
               _s("caption", "a small red circle at the top left and a large blue square at the center", [red, blue]),
               _s("fmnist", "ankle-boot"), _s("fmnist", "bag")]
    predictions = ["red", "blue blue", " top-left ",
                   "Yes.", "no", "yes", "maybe",
                   "a small red circle at the top left and a small green square at the center and a dog",
                   "ankle-boot", "sandal"]
    m = score(samples, predictions)
    assert m["attr/color"] == 0.5 and m["attr/position"] == 1.0 and m["attr/mean"] == 0.75
    # tp 1 (Yes.), fn 1 (no), fp 1, "maybe" is wrong and not yes
    assert m["pope/random_acc"] == 0.25 and m["pope/random_precision"] == 0.5 and m["pope/random_recall"] == 0.5
    assert m["pope/random_f1"] == 0.5 and m["pope/random_yes_ratio"] == 0.5 and m["pope/f1_mean"] == 0.5
    # as POPE's script reads them "maybe" is a yes: tp 1, fn 1, fp 2 -> precision 1/3, recall 1/2, F1 0.4
    assert abs(m["pope/random_f1_pope_script"] - 0.4) < 1e-12
    # stated: 4 (red, all true) + 4 (object and shape at the center true; colour and size false) + 4 unparsed
    assert caption_counts([red, blue], predictions[7]) == (6, 12, 8)
    assert m["caption/precision"] == 0.5 and m["caption/recall"] == 0.75 and m["caption/exact"] == 0.0
    assert m["caption/f1"] == pytest.approx(0.6)
    assert m["fmnist/acc"] == 0.5
    assert utility_of(m) == pytest.approx((0.75 + 0.5 + 0.6 + 0.5) / 4)
    assert set(score(samples[:3], predictions[:3])) == {"attr/color", "attr/position", "attr/mean"}


def test_parse_caption():
    assert parse_caption("a large red cross at the bottom right") == [Obj("red", "cross", "large", "bottom right")]
    assert parse_caption("  ") == [] and parse_caption("a red cross") == [None]
    assert caption_counts([Obj("red", "cross", "large", "top")], "a large red cross at the top and "
                          "a large red cross at the top") == (4, 8, 4)  # stated twice, true once


def test_bad_arguments_are_one_line(pair):
    model, processor = pair
    image = make_samples("test", 1, kinds=("caption",))[0].image
    cases = [
        (lambda: generate(model, processor, [image[:, :32, :32]], [words.prompt("What is this?")], 2), "uint8"),
        (lambda: generate(model, processor, [image], ["USER: What is this? ASSISTANT:"], 2), "exactly once"),
        (lambda: evaluate_generative(model, processor, split="train", n=1), "unknown split"),
        (lambda: evaluate_generative(model, processor, n=0), "n must be"),
        (lambda: evaluate_generative(model, processor, n=1, kinds=("vqa",)), "unknown sample kind"),
        (lambda: check_pair(model, words.build_processor(num_additional_image_tokens=0)), "63 tokens"),
        (lambda: check_pair(model, words.build_processor(image_size=32, patch_size=4)), "32x32"),
        (lambda: kinds_for(["csv:pairs.csv"]), "not 'csv:pairs.csv'"),
        (lambda: score([_s("fmnist", "bag")], []), "0 predictions for 1 samples"),
        (lambda: utility_of({}), "none of the utility metrics"),
    ]
    for call, needle in cases:
        with pytest.raises(HippError, match=needle) as e:
            call()
        assert "\n" not in str(e.value)


def test_get_processor_needs_the_processor_files(pair, tmp_path):
    from hipp.storage.checkpoint import get_processor

    model, processor = pair
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(HippError, match="has no processor") as e:
        get_processor(tmp_path / "m")
    assert "\n" not in str(e.value)
    with pytest.raises(HippError, match="not a folder"):
        get_processor(tmp_path / "nowhere")


def test_hipp_eval_runs_a_llava_folder(pair, tmp_path, monkeypatch, capsys):
    from hipp.cli.main import main
    from hipp.storage.checkpoint import get_processor

    model, processor = pair
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    assert isinstance(get_processor(tmp_path / "m"), transformers.LlavaProcessor)
    monkeypatch.setattr("hipp.evaluation.generative.KINDS", ("attr/size",))  # keeps the run short
    monkeypatch.setattr("hipp.evaluation.generative.DATASET_KINDS", {"shapes": ("attr/size",), "fmnist": ()})
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", "shapes", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["metrics"]) == {"attr/size", "attr/mean"} and rep["samples"] == {"attr/size": 200}
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", "shapes"]) == 0
    out = capsys.readouterr().out
    assert "utility" in out and "latency_ms/decode_token" in out


def test_teacher_loss_averages_per_answer(pair):
    """The LLaVA teacher's loss: 'token' equals the model's own next-token loss; 'sample' weighs a
    one-word answer as much as a caption, so it differs from 'token' on a mixed batch and equals the
    mean of each sample's own loss."""
    from train.llava_teacher import answer_loss
    model, processor = pair
    batch = words.encode(processor, make_samples("train", 4, seed=0, kinds=("caption", "pope/random")), train=True)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
        own = model(**batch, labels=labels).loss
        each = [model(**{k: v[i:i + 1] for k, v in batch.items()}, labels=labels[i:i + 1]).loss for i in range(4)]
    assert torch.allclose(answer_loss(logits, labels, "token"), own, atol=1e-5)
    per_sample = answer_loss(logits, labels, "sample")
    assert torch.allclose(per_sample, torch.stack(each).mean(), atol=1e-4)
    assert not torch.allclose(per_sample, own, atol=1e-3)
    assert torch.allclose(answer_loss(logits, labels, "mixed"), (per_sample + own) / 2, atol=1e-5)


def test_pointing_targets_mark_the_named_object_only():
    """The teacher's pointing loss is told the patches of the object a question names: an attribute
    question's target, a present POPE object; nothing for captions or absent POPE objects."""
    from train.llava_teacher import pointing_targets
    from hipp.data.shapes import object_patches
    samples = make_samples("train", 20, seed=0)
    targets = pointing_targets(samples, 64, 8)
    assert targets.shape == (20, 64)
    for s, row in zip(samples, targets):
        marked = set(row.nonzero().flatten().tolist())
        if "target" in s.meta:
            assert marked == set(object_patches(s.meta["target"], 64, 8))
        elif s.kind.startswith("pope/") and s.meta["present"]:
            named = [o for o in s.meta["objects"] if (o.color, o.shape) == s.meta["pair"]]
            assert named and marked == {p for o in named for p in object_patches(o, 64, 8)}
        else:
            assert not marked, s.kind


def test_pointing_loss_reads_the_answer_token_attention_and_trains_it(pair):
    """The loss is -log of the attention that the token before the answer pays to the named object's
    patches (checked by hand on a real eager Llama), and a few optimiser steps on it alone lower it."""
    from train.llava_teacher import LlavaTeacherConfig, check_pointing, pointing_loss, pointing_targets
    _, processor = pair
    model = tiny_llava(processor, layers=2, seed=1).train().requires_grad_(True)
    model.set_attn_implementation("eager")
    samples = make_samples("train", 10, seed=0, kinds=("attr/color", "pope/random", "caption"))
    batch = words.encode(processor, samples, train=True)
    labels = batch.pop("labels")
    targets = pointing_targets(samples, 64, 8)
    image_id = model.config.image_token_id

    def loss():
        return pointing_loss(model(**batch, output_attentions=True).attentions, batch["input_ids"], labels,
                             targets, image_id, [1], 1)

    with torch.no_grad():
        att = model(**batch, output_attentions=True).attentions[1]
    by_hand = []
    for i in range(len(samples)):
        if targets[i].sum() == 0:
            continue
        q = int((labels[i] != -100).nonzero()[0]) - 1
        image = (batch["input_ids"][i] == image_id).nonzero().flatten()
        by_hand.append(-torch.log(att[i, 0, q, image][targets[i] > 0].sum()))
    assert torch.allclose(loss().detach(), torch.stack(by_hand).mean(), atol=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = loss().item()
    for _ in range(15):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert loss().item() < 0.5 * first
    with pytest.raises(HippError, match="pointing_layers"):
        check_pointing(LlavaTeacherConfig(pointing_layers=[2]), model.config.text_config)


def test_a_llava_export_keeps_the_processor_and_writes_its_image_features_as_onnx(tmp_path):
    """A LLaVA export from a folder with a processor holds that processor (so hipp eval and
    get_processor read the export alone), and --onnx writes the image path (tower + projector),
    equal to transformers' get_image_features and checked by onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    from hipp.backends import make_prunable
    from hipp.core.plan import Plan
    from hipp.export.onnx import LLAVA_ONNX_FILE, ImageFeatures
    from hipp.export.pruned import export_pruned
    from hipp.query.bound import Base, base_config
    from hipp.storage.checkpoint import PROCESSOR_FILES, fingerprint, get_processor, load_model, preprocess_cfg
    from test_llava import plans

    processor = words.build_processor()
    tiny_llava(processor, layers=2).save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m")
    base = Base(model, str(tmp_path / "m"), None, base_config(model, str(tmp_path / "m")), preprocess_cfg(model),
                None, fingerprint(model))
    space = make_prunable(model)
    plan = Plan.from_gates(space, plans(space)["partial_and_dropped"], preference={"utility": 1.0})
    result = export_pruned(base, plan, tmp_path / "out", onnx=True)
    assert set(PROCESSOR_FILES) <= set(result["files"]) and LLAVA_ONNX_FILE in result["files"]
    assert result["onnx_max_abs_diff"]["image_features"] <= 1e-4
    again = get_processor(tmp_path / "out")
    assert again.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    loaded = load_model(tmp_path / "out")
    pixels = words.encode(again, make_samples("test", 3, seed=0), train=False)["pixel_values"]
    with torch.no_grad():
        ours = ImageFeatures(loaded)(pixels)
        theirs = torch.stack(list(loaded.get_image_features(
            pixel_values=pixels, vision_feature_layer=loaded.config.vision_feature_layer,
            vision_feature_select_strategy=loaded.config.vision_feature_select_strategy).pooler_output))
    assert torch.allclose(ours, theirs, atol=1e-6)
    session = ort.InferenceSession(str(tmp_path / "out" / LLAVA_ONNX_FILE), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"pixel_values": pixels.numpy()})[0])
    assert got.shape == ours.shape and torch.allclose(got, ours, atol=1e-4)
