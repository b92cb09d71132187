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


# --- image modes: every valid image becomes the 8-bit RGB it shows ---

def _rgb(path):
    from hipp.data.user import load_image
    im = load_image(path)
    assert im.mode == "RGB"
    return np.asarray(im)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)  # 0, 64, 127.5, 255 in 8 bits
    Image.fromarray(levels).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    Image.fromarray(levels.astype(np.int32)).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    for name in ("i16.png", "i32.tif"):
        got = _rgb(tmp_path / name)
        assert got[0, :, 0].tolist() == [0, 64, 128, 255], name
        assert (got == got[..., :1]).all(), "grey stays grey"


def test_grey_cmyk_and_palette_images_convert(tmp_path):
    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    assert (_rgb(tmp_path / "l.png") == 77).all()
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = _rgb(tmp_path / "cmyk.jpg")[0, 0].tolist()
    assert r > 200 and g < 60 and b < 60  # cyan-free, full magenta and yellow: red
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert _rgb(tmp_path / "p.png")[0, 0].tolist() == [10, 200, 30]


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)   # opaque red
    rgba[0, 1] = (0, 0, 0, 0)       # transparent black: shows the background
    rgba[1, 0] = (0, 0, 255, 128)   # half-transparent blue
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = _rgb(tmp_path / "rgba.png")
    assert got[0, 0].tolist() == [255, 0, 0] and got[0, 1].tolist() == [255, 255, 255]
    assert got[1, 0, 2] == 255 and 120 <= got[1, 0, 0] <= 135
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert (_rgb(tmp_path / "la.png") == 255).all()
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([5, 5, 5] * 256)
    pal.save(tmp_path / "ptrans.png", transparency=0)
    assert (_rgb(tmp_path / "ptrans.png") == 255).all()


# --- CSV rows ---

def test_csv_with_a_bom_quoted_captions_and_blank_lines(tmp_path):
    _img(tmp_path / "a.png", 10)
    (tmp_path / "pairs.csv").write_bytes('\ufefffilepath,title\n\na.png,"red, big"\n\n'.encode())
    images, caps = read_csv_pairs(tmp_path / "pairs.csv", _preprocess)
    assert caps == ["red, big"] and images.shape == (1, 3, 8, 8)


def test_csv_paths_outside_the_folder_need_allow_outside(tmp_path):
    (tmp_path / "data").mkdir()
    _img(tmp_path / "outside.png", 90)
    (tmp_path / "data" / "link.png").symlink_to(tmp_path / "outside.png")
    for name in (str(tmp_path / "outside.png"), "../outside.png", "link.png"):
        (tmp_path / "data" / "pairs.csv").write_text(f"filepath,title\n{name},x\n")
        with pytest.raises(HippError, match="outside the CSV's folder.*--allow-outside"):
            read_csv_pairs(tmp_path / "data" / "pairs.csv", _preprocess)
        images, _ = read_csv_pairs(tmp_path / "data" / "pairs.csv", _preprocess, allow_outside=True)
        assert images.min() == 90
    (tmp_path / "data" / "inner").mkdir()
    _img(tmp_path / "data" / "inner" / "ok.png", 30)
    (tmp_path / "data" / "pairs.csv").write_text("filepath,title\ninner/../inner/ok.png,x\n")
    assert read_csv_pairs(tmp_path / "data" / "pairs.csv", _preprocess)[0].max() == 30  # '..' that stays inside


def test_a_fifo_is_refused_without_blocking(tmp_path):
    import os
    import signal

    os.mkfifo(tmp_path / "f.png")
    (tmp_path / "pairs.csv").write_text("filepath,title\nf.png,x\n")
    os.mkfifo(tmp_path / "fifo.csv")
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("opening a FIFO blocked"))
    signal.alarm(20)
    try:
        with pytest.raises(HippError, match="not a regular file"):
            read_csv_pairs(tmp_path / "pairs.csv", _preprocess)
        with pytest.raises(HippError, match="not a regular file"):
            read_csv_pairs(tmp_path / "fifo.csv", _preprocess)
        from hipp.data.user import load_image
        with pytest.raises(HippError, match="not a regular file"):
            load_image(tmp_path / "f.png")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_image_folder_ignores_dot_entries(tmp_path):
    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
        _img(tmp_path / name / "0.png", 100)
    (tmp_path / ".ipynb_checkpoints").mkdir()  # tool litter, not a class
    (tmp_path / "cats" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    images, labels, classes = read_image_folder(tmp_path, _preprocess)
    assert classes == ["cats", "dogs"] and labels.tolist() == [0, 1]


def test_eval_cli_reads_odd_image_modes_and_outside_paths_only_when_allowed(tiny_model_dir, tmp_path, capsys):
    import json

    from hipp.cli.main import main

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((12, 12), 40000, dtype=np.uint16)).save(data / "deep.png")
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(data / "print.jpg")
    Image.new("LA", (12, 12), (30, 128)).save(data / "grey-alpha.png")
    Image.new("RGBA", (12, 12), (0, 0, 255, 0)).save(tmp_path / "outside.png")
    rows = ["deep.png,a grey square", "print.jpg,a red square", "grey-alpha.png,a faded square",
            "../outside.png,an empty square"]
    (data / "pairs.csv").write_text("\n".join(["filepath,title", *rows]) + "\n")
    argv = ["eval", "--model", str(tiny_model_dir), "--data", f"csv:{data / 'pairs.csv'}", "--json"]
    assert main(argv) == 2
    assert "pass --allow-outside" in capsys.readouterr().err
    assert main([*argv, "--allow-outside"]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads(out)["metrics"]
    assert set(metrics) == {"csv/i2t_r1", "csv/t2i_r1", "csv/i2t_r5", "csv/t2i_r5"} and metrics["csv/i2t_r5"] == 1.0
    assert err == ""  # no Pillow warning lines either
