"""The committed teacher: loads, matches its own record, and still clears the bars it was built for."""
import json

import open_clip
import pytest
import torch

from hipp import get_tokenizer, load_model
from hipp.storage.checkpoint import WEIGHTS_NAME, preprocess_cfg
from hipp.evaluation.evaluate import evaluate

from conftest import TEACHER_DIR

# Regression floors a little under what the committed checkpoint measures (see its model card).
FLOORS = {"shapes/zs_mean": 0.87, "shapes/ground_mean": 0.87, "fmnist/acc": 0.85}


@pytest.fixture(scope="module")
def teacher():
    return load_model(TEACHER_DIR)


def test_checkpoint_is_small_fp16_and_open_clip_readable(teacher):
    assert (TEACHER_DIR / WEIGHTS_NAME).stat().st_size <= 40 * 2**20
    theirs = open_clip.create_model(f"local-dir:{TEACHER_DIR}").eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(theirs.encode_image(x), teacher.encode_image(x), atol=1e-5)


def test_recorded_retrieval_is_reported():
    recorded = json.loads((TEACHER_DIR / "metrics.json").read_text())["metrics"]
    for key in ("shapes/i2t_r1", "shapes/i2t_r5", "shapes/t2i_r1", "shapes/t2i_r5"):
        assert 0.5 < recorded[key] <= 1


def test_remeasured_subset_agrees_with_the_record(teacher):
    """A smaller evaluation of the loaded checkpoint lands near the recorded full one."""
    recorded = json.loads((TEACHER_DIR / "metrics.json").read_text())["metrics"]
    now = evaluate(teacher, get_tokenizer(TEACHER_DIR), preprocess_cfg(teacher), n=300, fmnist_limit=2000)
    for key, floor in FLOORS.items():
        assert abs(now[key] - recorded[key]) < 0.05, (key, now[key], recorded[key])
        assert now[key] >= floor, (key, now[key])
