"""How much work a bound query does, and where: --candidates, --calib-images (defaults scaled to the
model) and --device on query / export / bench."""
import json

import open_clip
import pytest
import torch

from hipp.backends import describe
from hipp.cli.main import main
from hipp.query.bound import search_defaults
from hipp.storage.checkpoint import load_model
from test_query import tiny_controller_dir  # noqa: F401  (session fixture)
from conftest import TEACHER_DIR


def test_the_embedded_teacher_keeps_the_figures_chosen_on_it():
    if not TEACHER_DIR.is_dir():
        pytest.skip("embedded teacher not present")
    assert search_defaults(describe(load_model(TEACHER_DIR))) == {"n_rank": 16, "calib_n": 128}


def test_a_generative_model_ranks_on_instructions_scaled_to_its_prefill():
    from conftest import LLAVA_TEACHER_DIR
    if not LLAVA_TEACHER_DIR.is_dir():
        pytest.skip("embedded LLaVA teacher not present")
    space = describe(load_model(LLAVA_TEACHER_DIR))
    assert search_defaults(space, generative=True) == {"n_rank": 16, "calib_n": 300}
    bigger = type(space)(space.layers, {k: 1000 * v for k, v in space.fixed_flops.items()}, space.fixed_params)
    assert search_defaults(bigger, generative=True)["calib_n"] == 30  # never under 3 of each kind


def test_a_vit_b_32_ranks_fewer_candidates_on_fewer_images():
    torch.manual_seed(0)
    space = describe(open_clip.create_model("ViT-B-32").eval())
    assert search_defaults(space) == {"n_rank": 8, "calib_n": 32}


def test_the_options_reach_the_search_and_are_recorded(tiny_controller_dir, capsys):  # noqa: F811
    code = main(["query", "--controller", str(tiny_controller_dir), "--max-flops", "0.6", "--candidates", "2",
                 "--calib-images", "8", "--device", "cpu", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    search = out["meta"]["search"]
    assert search["candidates_ranked"] == 2 and search["calibration_images"] == 8
    assert 1 <= len(search["candidates"]) <= 2
    # 8 val scenes + 8 Fashion-MNIST images for each of the two losses
    assert search["ranked_by"].startswith("zero-shot loss on 16 + caption distillation loss on 16 "), search["ranked_by"]


@pytest.mark.parametrize("args, needle", [
    (["--candidates", "0"], "--candidates must be a positive whole number"),
    (["--calib-images", "-3"], "--calib-images must be a positive whole number"),
    (["--device", "tpu"], "device"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() or torch.cuda.device_count() < 8 else ["--device", "x"],
     "device"),
])
@pytest.mark.parametrize("command", ["query", "export", "bench"])
def test_bad_search_options_are_one_line(tiny_controller_dir, tmp_path, capsys, command, args, needle):  # noqa: F811
    rest = {"query": ["--max-flops", "0.5"], "export": ["--max-flops", "0.5", "--out", str(tmp_path / "x")],
            "bench": ["--out", str(tmp_path / "b")]}[command]
    code = main([command, "--controller", str(tiny_controller_dir), *rest, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()
