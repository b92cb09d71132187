"""Shared test fixtures: a tiny open_clip model saved in the project's folder format; a FLOPs counter."""
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from torch.utils import flop_counter

from hipp.data import fashion_mnist
from hipp.storage.checkpoint import save_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train/ (the embedded teacher's builder) is not installed
TEACHER_DIR = ROOT / "checkpoints" / "teacher-tiny"
LLAVA_TEACHER_DIR = ROOT / "checkpoints" / "llava-tiny"
# calibration sets take Fashion-MNIST train images when the optional package is installed
HAVE_FMNIST_TRAIN = any((fashion_mnist.DEFAULT_ROOT / f"train-labels-idx1-ubyte{s}").is_file() for s in ("", ".gz"))

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TINY_PP = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}


def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


# Some torch releases (2.14) count the other SDPA kernels but not the one CPUs run; the formula is the same.
_CPU_FLASH = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops}


def counted_flops(fn, *args) -> int:
    """torch.utils.flop_counter's total for fn(*args), SDPA on the CPU included."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_FLASH) as fc:
        fn(*args)
    return fc.get_total_flops()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny CLIP written with save_model (open_clip local-dir layout, fp32)."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CFG)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_model(model, path, TINY_CFG, TINY_PP, dtype=torch.float32)
    return path


@pytest.fixture(scope="session")
def hf_tiny_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as `hipp convert` writes it (transformers config, weights, tokenizer, preprocessor);
    tests read it, never change it."""
    from hipp.backends.convert import convert_folder
    out = tmp_path_factory.mktemp("hf-tiny") / "model"
    convert_folder(tiny_model_dir, out)
    return out


@pytest.fixture
def one_thread():
    """Small models on a shared 2-core machine: a second torch thread only waits on the first."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
