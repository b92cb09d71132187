import numpy as np
import pytest
import torch
from PIL import Image

from hipp.data.user import read_csv_pairs, read_image_folder
from hipp.errors import HippError


def _preprocess(im):
    return torch.from_numpy(np.array(im.resize((8, 8)))).permute(2, 0, 1).float()


def _img(path, value):
    Image.fromarray(np.full((10, 10, 3), value, dtype=np.uint8)).save(path)


@pytest.mark.parametrize("sep", [",", "\t"])
def test_csv_pairs_relative_paths_and_separators(tmp_path, sep):
    (tmp_path / "img").mkdir()
    _img(tmp_path / "img" / "a.png", 10)
    _img(tmp_path / "img" / "b.png", 200)
    (tmp_path / "pairs.csv").write_text(f"filepath{sep}title\nimg/a.png{sep}a dark square\nimg/b.png{sep}a bright square\n")
    images, caps = read_csv_pairs(tmp_path / "pairs.csv", _preprocess)
    assert images.shape == (2, 3, 8, 8) and caps == ["a dark square", "a bright square"]
    assert images[0].max() == 10 and images[1].min() == 200


def test_csv_errors(tmp_path):
    with pytest.raises(HippError, match="not found"):
        read_csv_pairs(tmp_path / "none.csv", _preprocess)
    (tmp_path / "bad.csv").write_text("path,caption\nx.png,y\n")
    with pytest.raises(HippError, match="needs columns"):
        read_csv_pairs(tmp_path / "bad.csv", _preprocess)
    (tmp_path / "broken.csv").write_text("filepath,title\nbroken.png,y\n")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(HippError, match="cannot read image"):
        read_csv_pairs(tmp_path / "broken.csv", _preprocess)


def test_image_folder_classes_are_sorted_folder_names(tmp_path):
    for name, value in (("zebra", 0), ("apple", 255)):
        (tmp_path / name).mkdir()
        for i in range(2):
            _img(tmp_path / name / f"{i}.png", value)
    images, labels, classes = read_image_folder(tmp_path, _preprocess)
    assert classes == ["apple", "zebra"] and labels.tolist() == [0, 0, 1, 1]
    assert images[0].min() == 255 and images[3].max() == 0
    with pytest.raises(HippError, match="at least two"):
        read_image_folder(tmp_path / "apple", _preprocess)
