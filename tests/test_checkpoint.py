import json
import open_clip
import pytest
import torch

from hipp import get_preprocess, get_tokenizer, load_model
from hipp.backends import describe, image_size
from hipp.storage.checkpoint import WEIGHTS_NAME, fingerprint
from hipp.errors import HippError

from conftest import TEACHER_DIR, counted_flops


def test_round_trip_and_open_clip_reads_the_folder(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    ours = open_clip.create_model(f"local-dir:{tiny_model_dir}")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.encode_image(x), ours.eval().encode_image(x), atol=1e-6)
    tokens = get_tokenizer(tiny_model_dir)(["a small red circle at the top"])
    assert tokens.shape == (1, 32)
    from PIL import Image
    img = get_preprocess(tiny_model_dir)(Image.new("RGB", (50, 40)))
    assert img.shape == (3, 32, 32)


def test_fingerprint_tracks_the_weights(tiny_model_dir):
    a, b = load_model(tiny_model_dir), load_model(tiny_model_dir)
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.visual.proj[0, 0] += 1e-3
    assert fingerprint(a) != fingerprint(b)


def test_corrupt_and_mismatched_folders(tiny_model_dir, tmp_path):
    with pytest.raises(HippError, match="neither a model folder"):
        load_model(tmp_path / "missing")
    with pytest.raises(HippError, match="open_clip_config.json.*config.json.*pruned_config.json"):
        load_model(tmp_path)  # neither backend's folder
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "open_clip_config.json").write_text((tiny_model_dir / "open_clip_config.json").read_text())
    raw = (tiny_model_dir / WEIGHTS_NAME).read_bytes()
    (bad / WEIGHTS_NAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(HippError, match="not a readable safetensors"):
        load_model(bad)
    (bad / WEIGHTS_NAME).write_bytes(raw)
    cfg = json.loads((bad / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["width"] = 48
    (bad / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(HippError, match="shape"):
        load_model(bad)
    (bad / "open_clip_config.json").write_text("{not json")
    with pytest.raises(HippError, match="not valid JSON"):
        load_model(bad)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(HippError, match="neither a model folder .* an open_clip model name nor a transformers hub id"):
        load_model("ViT-Z-99")


@pytest.mark.parametrize("which", ["tiny", "teacher"])
def test_analytic_flops_match_the_flop_counter(which, tiny_model_dir):
    path = tiny_model_dir if which == "tiny" else TEACHER_DIR
    model = load_model(path)
    space = describe(model)
    costs = space.dense_costs()
    size = image_size(model)
    x = torch.randn(3, 3, size, size, requires_grad=True)  # grad keeps MHA off its uncounted fast path
    tokens = torch.randint(1, 1000, (3, space.tower_layers("text")[0].tokens))
    with torch.enable_grad():
        assert counted_flops(model.encode_image, x) == 3 * costs["flops/image"]
        assert counted_flops(model.encode_text, tokens) == 3 * costs["flops/text"]
    assert costs["params/image"] + costs["params/text"] == sum(p.numel() for p in model.parameters())
