"""Validation split and held-out prompt templates in the evaluation: choices are made on validation
data, and utility is also reported with class prompts that neither training nor ranking use."""
import pytest

from hipp import get_preprocess, get_tokenizer, load_model  # noqa: F401
from hipp.data import fashion_mnist
from hipp.errors import HippError
from hipp.evaluation import evaluate as E
from hipp.storage.checkpoint import preprocess_cfg
from conftest import TEACHER_DIR


def test_heldout_templates_are_used_by_neither_training_nor_ranking():
    assert not set(E.HELDOUT_FMNIST_TEMPLATES) & set(fashion_mnist.TEMPLATES)
    assert "{}" not in E.HELDOUT_SHAPE_TEMPLATES  # the ranking's shape prompts are the plain descriptions


@pytest.fixture(scope="module")
def teacher():
    if not TEACHER_DIR.is_dir():
        pytest.skip("embedded teacher not present")
    model = load_model(TEACHER_DIR)
    return model, get_tokenizer(TEACHER_DIR), preprocess_cfg(model)


def test_validation_and_test_splits_measure_different_items(teacher):
    model, tok, pp = teacher
    try:
        fashion_mnist.load_fashion_mnist("test")
    except HippError:
        pytest.skip("Fashion-MNIST not installed")
    test = E.evaluate(model, tok, pp, n=60, fmnist_limit=300)
    val = E.evaluate(model, tok, pp, n=60, fmnist_limit=300, split="val")
    assert set(test) == set(val)
    for key in ("shapes/zs_heldout_prompts", "fmnist/acc_heldout_prompts"):
        assert 0.0 <= test[key] <= 1.0
    # a teacher that learned the task, not the templates, classifies with unseen prompts too
    assert test["fmnist/acc_heldout_prompts"] > 0.5 and test["shapes/zs_heldout_prompts"] > 0.5
    assert any(test[k] != val[k] for k in ("shapes/zs_mean", "fmnist/acc", "shapes/i2t_r1"))


def test_an_unknown_split_is_refused(teacher):
    model, tok, pp = teacher
    with pytest.raises(HippError, match="unknown split 'train'"):
        E.evaluate(model, tok, pp, n=10, split="train")
