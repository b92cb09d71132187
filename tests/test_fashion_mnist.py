import gzip
import struct

import numpy as np
import pytest
import torch

from hipp.data.fashion_mnist import CLASSES, class_prompts, load_fashion_mnist, to_rgb
from hipp.errors import HippError


def _write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_reads_idx_files_written_here(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28))
    labels = np.array([0, 3, 9, 1, 1])
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)
    x, y = load_fashion_mnist("test", tmp_path)
    assert torch.equal(x, torch.from_numpy(images.astype(np.uint8)))
    assert y.tolist() == labels.tolist()


def test_truncated_file_is_a_clear_error(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28)), gz=False)
    raw = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:-10])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5), gz=False)
    with pytest.raises(HippError, match="truncated"):
        load_fashion_mnist("test", tmp_path)


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(HippError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def test_real_package_files():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8
    assert sorted(y.unique().tolist()) == list(range(10))
    rgb = to_rgb(x[:3], 64)
    assert rgb.shape == (3, 3, 64, 64) and torch.equal(rgb[:, 0], rgb[:, 2])
    assert list(class_prompts()) == list(CLASSES)
