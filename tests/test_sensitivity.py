"""Visual sensitivity: each decoder layer's image attention measured through the prunable model agrees
with transformers' own attention maps; a controller made with it carries the scores through save and
load and moves exactly the layers' logits by gain x score; training reads it for a LLaVA only."""
import pytest
import torch
from safetensors.torch import load_file

from hipp import load_model
from hipp.backends import image_size, make_prunable
from hipp.cli.main import main
from hipp.controller.files import load_controller
from hipp.controller.network import Controller
from hipp.data.words import encode
from hipp.errors import HippError
from hipp.storage.checkpoint import get_processor
from hipp.tasks import get_task
from hipp.training.sensitivity import image_attention, layer_scores
from test_llava_controller import write_config
from test_query import assert_bad, cli

from conftest import LLAVA_TEACHER_DIR


def _stock_shares(n: int) -> torch.Tensor:
    """The same quantity from transformers' eager attention weights on the unmodified teacher."""
    model = load_model(LLAVA_TEACHER_DIR).eval()
    for cfg in (model.config, model.config.text_config, model.config.vision_config):
        cfg._attn_implementation = "eager"
    samples = get_task("instruct").calibration_batch(image_size(model), n, seed=0).samples
    inputs = encode(get_processor(LLAVA_TEACHER_DIR), samples, train=False)
    inputs.pop("answers")
    with torch.no_grad():
        maps = model(**inputs, output_attentions=True).attentions  # per decoder layer [B, H, T, T]
    image = (inputs["input_ids"] == model.config.image_token_id)[:, None, :]
    return torch.stack([(a[:, :, -1, :] * image).sum(-1).mean() for a in maps]).double()


def test_image_attention_matches_transformers_attention_maps():
    model = load_model(LLAVA_TEACHER_DIR).eval()
    space = make_prunable(model, 8)
    got = image_attention(model, get_processor(LLAVA_TEACHER_DIR), image_size(model), n=8)
    assert torch.allclose(got, _stock_shares(8), atol=1e-5), got
    assert bool(((got > 0) & (got < 1)).all())
    z = layer_scores(space, got)
    language = [i for i, layer in enumerate(space.layers) if layer.tower == "language"]
    assert len(language) == len(got) and z[language].mean().abs() < 1e-9 and abs(float(z[language].std()) - 1) < 1e-9
    assert z[[i for i in range(len(space.layers)) if i not in language]].abs().sum() == 0
    with pytest.raises(HippError, match="decoder layers measured"):
        layer_scores(space, got[:2])


def test_the_gain_moves_each_layer_by_its_score_and_survives_saving(tmp_path):
    model = load_model(LLAVA_TEACHER_DIR)
    space = make_prunable(model, 8)
    torch.manual_seed(0)
    c = Controller(space, ("utility", "flops"), hidden=8, rank=2, visual_sensitivity=True)
    scores = torch.linspace(-1, 1, len(space.layers)).double()
    c.set_sensitivity(scores)
    pref = torch.tensor([0.3, 0.7])
    before = c(pref)
    with torch.no_grad():
        c.sense.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))  # layer, head, channel gains
    after = c(pref)
    assert torch.allclose(after[0] - before[0], 0.5 * scores.float())
    for i, s in enumerate(scores.tolist()):
        assert torch.allclose(after[1][i] - before[1][i], torch.tensor(-1.0 * s), atol=1e-6)
        assert torch.allclose(after[2][i] - before[2][i], torch.tensor(2.0 * s), atol=1e-6)
    c.save(tmp_path / "c", fingerprint="abc")
    again = load_controller(tmp_path / "c")
    assert torch.equal(again.sensitivity, c.sensitivity) and torch.allclose(again(pref)[0], after[0])
    with pytest.raises(HippError, match="finite scores"):
        c.set_sensitivity(torch.zeros(3))
    with pytest.raises(HippError, match="without visual_sensitivity"):
        Controller(space, ("utility", "flops"), hidden=8, rank=2).set_sensitivity(scores)


def test_training_reads_the_signal_for_a_llava_only(tmp_path, capsys, tiny_model_dir):
    cfg = write_config(tmp_path, controller={"hidden": 16, "rank": 4, "visual_sensitivity": True})
    assert main(["train", "--config", cfg]) == 0
    state = load_file(str(tmp_path / "out" / "controller.safetensors"))
    c = load_controller(tmp_path / "out")
    assert c.hparams["visual_sensitivity"] and torch.equal(state["sensitivity"], c.sensitivity)
    model = load_model(LLAVA_TEACHER_DIR).eval()
    space = make_prunable(model, 64)
    expected = layer_scores(space, image_attention(model, get_processor(LLAVA_TEACHER_DIR), image_size(model)))
    assert torch.allclose(c.sensitivity.double(), expected, atol=1e-6)
    clip = tmp_path / "clip.yaml"
    clip.write_text(f"model: {tiny_model_dir}\noutput: {tmp_path / 'clip-out'}\nsteps: 1\n"
                    "controller: {visual_sensitivity: true}\n")
    capsys.readouterr()
    assert_bad(*cli(capsys, "train", "--config", clip), "controller.visual_sensitivity needs a LLaVA")
    assert not (tmp_path / "clip-out" / "controller.json").exists()
