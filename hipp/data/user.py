"""User data: a CSV of image-caption pairs (open_clip's `filepath,title` columns) and an
image folder for zero-shot classification (class = sub-folder name).

Everything here is read from files the user points at, so every way they can be wrong is one
HippError line naming the file (and the CSV line) and what is wrong: nothing is opened before it
is known to be a regular file (a FIFO would block for ever, a device never ends), image headers
are checked before any pixel is decoded, and CSV paths stay inside the CSV's folder unless the
user allows otherwise.
"""
from __future__ import annotations

import csv
import io
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import HippError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# A declared size above this is refused from the header alone: decoding it would take gigabytes
# (a "decompression bomb"). 8192 x 8192 still admits a 48-megapixel photo (8000 x 6000).
MAX_PIXELS = 8192 * 8192
# Transparent pixels are composited on white: the colour stored under alpha 0 is arbitrary (often
# black or leftovers of editing), while white is what viewers show behind logos and icons.
BACKGROUND = (255, 255, 255)
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# What Pillow's decoders raise on malformed bytes besides OSError (which covers truncation):
# fuzzing of Pillow turns up each of these from one plugin or another.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError,
                 ZeroDivisionError, Image.DecompressionBombError)
CSV_FIELD_LIMIT = 1 << 20  # characters; csv's default (128 KiB) would refuse long captions


def show(path) -> str:
    """A path as one printable line: names from a CSV may hold newlines or control characters."""
    text = str(path)
    return text if text.isprintable() else ascii(text)


def _os_reason(e: OSError) -> str:
    return "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))


def check_regular(path: Path, what: str) -> None:
    """Refuse a missing path, a folder, a FIFO, a socket or a device, by its metadata alone."""
    try:
        mode = path.stat().st_mode  # follows symlinks: what open() would reach
    except FileNotFoundError:
        raise HippError(f"{what} not found: {show(path)}") from None
    except OSError as e:
        raise HippError(f"{what} {show(path)} cannot be read ({_os_reason(e)})") from None
    except ValueError as e:  # a NUL byte in the name
        raise HippError(f"{what} path {show(path)} is not a valid path ({e})") from None
    if stat.S_ISDIR(mode):
        raise HippError(f"{what} {show(path)} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise HippError(f"{what} {show(path)} is not a regular file (a FIFO, socket or device); not opening it")


def open_regular(path: str | os.PathLike, what: str) -> io.BufferedReader:
    """Open a regular file for binary reading, refusing anything else without blocking.

    O_NONBLOCK makes opening a FIFO return at once (a path can turn into one after a stat), and
    fstat on the open descriptor is the check that cannot race.
    """
    path = Path(path)
    check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise HippError(f"{what} {show(path)} cannot be read ({_os_reason(e)})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HippError(f"{what} {show(path)} is not a regular file (a FIFO, socket or device); not opening it")
    return os.fdopen(fd, "rb")


def read_bytes(path, what: str) -> bytes:
    with open_regular(path, what) as f:
        try:
            return f.read()
        except OSError as e:
            raise HippError(f"{what} {show(path)} cannot be read ({_os_reason(e)})") from None


# --- images ------------------------------------------------------------------------------------

def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, keeping what the picture shows."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # Pillow's own conversion clips these at 255 (most of a 16-bit image turns white); they
        # come from 16-bit PNG / TIFF, so their range is 0..65535 (mode I included) and is scaled.
        wide = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))  # 2-D uint8: mode L
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return im.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """A file as an 8-bit RGB image; any problem is one HippError line naming the file."""
    with open_regular(path, "image") as f, warnings.catch_warnings():
        if os.fstat(f.fileno()).st_size == 0:
            raise HippError(f"cannot read image {show(path)} (the file is empty)")
        warnings.simplefilter("ignore")  # Pillow's notes on odd files would add lines to stderr
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(f)
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise Image.DecompressionBombError("")
            im.load()
            return to_rgb(im)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise HippError(f"image {show(path)} declares more than {MAX_PIXELS:,} pixels "
                            "(a decompression bomb?); refusing to decode it") from None
        except UnidentifiedImageError:
            raise HippError(f"cannot read image {show(path)} (not an image format Pillow knows)") from None
        except DECODE_ERRORS as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise HippError(f"cannot read image {show(path)} ({reason})") from None


def _open(path: Path, preprocess) -> torch.Tensor:
    return preprocess(load_image(path))


# --- CSV of image-caption pairs ----------------------------------------------------------------

def _csv_text(path: Path) -> str:
    raw = read_bytes(path, "CSV file")
    try:
        return raw.decode("utf-8-sig")  # a BOM, as spreadsheet programs write, is not part of the header
    except UnicodeDecodeError as e:
        raise HippError(f"CSV file {show(path)} is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); "
                        "save it as UTF-8") from None


def _csv_rows(path: Path, text: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) for every non-blank row, header first."""
    header = text.splitlines()[0] if text else ""
    sep = "\t" if "\t" in header else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    previous = csv.field_size_limit(CSV_FIELD_LIMIT)
    rows = []
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                rows.append((reader.line_num, fields))
    except csv.Error as e:
        raise HippError(f"CSV file {show(path)} line {reader.line_num + 1}: {e}") from None
    finally:
        csv.field_size_limit(previous)
    return rows


def _inside(target: Path, folder: Path) -> bool:
    try:
        target.resolve().relative_to(folder)
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop
        return False
    return True


def csv_items(path: str | Path, img_key: str = "filepath", caption_key: str = "title",
              allow_outside: bool = False) -> list[tuple[Path, str]]:
    """(image path, caption) of every row, every path checked to be a regular file; no pixel read.

    Image paths are relative to the CSV's folder and must stay inside it (no absolute paths, `..`
    or symlinks out) unless `allow_outside`: a CSV from elsewhere should not make us read any
    file on the machine.
    """
    path = Path(path)
    rows = _csv_rows(path, _csv_text(path))
    want = f"'{img_key}' and '{caption_key}'"
    if not rows:
        raise HippError(f"CSV file {show(path)} is empty; it needs a header with columns {want} and rows")
    (_, header), body = rows[0], rows[1:]
    missing = [k for k in (img_key, caption_key) if k not in header]
    if missing:
        raise HippError(f"CSV file {show(path)} needs columns {want}; its header has "
                        f"{', '.join(repr(h) for h in header)}")
    if not body:
        raise HippError(f"CSV file {show(path)} has a header but no rows")
    img_col, cap_col = header.index(img_key), header.index(caption_key)
    try:
        folder = path.parent.resolve()
    except OSError as e:
        raise HippError(f"cannot resolve the folder of CSV file {show(path)} ({_os_reason(e)})") from None
    items = []
    for line, fields in body:
        where = f"CSV file {show(path)} line {line}"
        if len(fields) != len(header):
            raise HippError(f"{where} has {len(fields)} fields; the header has {len(header)} "
                            "(quote captions that hold the separator)")
        name, caption = fields[img_col].strip(), fields[cap_col].strip()
        if not name:
            raise HippError(f"{where} has an empty '{img_key}'")
        if not caption:
            raise HippError(f"{where} has an empty '{caption_key}'")
        if "\0" in name:
            raise HippError(f"{where}: image path {show(name)} is not a valid path (it holds a NUL byte)")
        image = path.parent / name
        if not allow_outside and not _inside(image, folder):
            raise HippError(f"{where}: image {show(name)} lies outside the CSV's folder (an absolute path, "
                            "'..' or a symlink out); pass --allow-outside to read it")
        try:
            check_regular(image, "image")
        except HippError as e:
            raise HippError(f"{where}: {e}") from None
        items.append((image, caption))
    return items


def read_csv_pairs(path: str | Path, preprocess, img_key: str = "filepath", caption_key: str = "title",
                   limit: int | None = None, allow_outside: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Images (preprocessed) and captions; relative image paths are relative to the CSV file.

    The separator (comma or tab, as open_clip's own CSV loader uses) is sniffed from the header.
    """
    items = csv_items(path, img_key, caption_key, allow_outside)
    items = items[:limit] if limit else items
    images = torch.stack([_open(image, preprocess) for image, _ in items])
    return images, [caption for _, caption in items]


# --- image folder ------------------------------------------------------------------------------

def _entries(folder: Path, what: str) -> list[os.DirEntry]:
    """Visible entries, sorted by name: dot-names are tool litter (.ipynb_checkpoints, macOS ._x.png)."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except FileNotFoundError:
        raise HippError(f"{what} not found: {show(folder)}") from None
    except NotADirectoryError:
        raise HippError(f"{what} {show(folder)} is not a folder") from None
    except OSError as e:
        raise HippError(f"{what} {show(folder)} cannot be read ({_os_reason(e)})") from None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def folder_items(root: str | Path, limit_per_class: int | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image path, label) per image and the class names (sorted sub-folder names); no pixel read."""
    root = Path(root)
    classes = [e.name for e in _entries(root, "image folder") if _is_dir(e)]
    if len(classes) < 2:
        found = f"found {len(classes)}" + (f" ({show(classes[0])})" if classes else "")
        raise HippError(f"image folder {show(root)} needs at least two class sub-folders; {found}")
    items = []
    for label, name in enumerate(classes):
        files = [Path(e.path) for e in _entries(root / name, "class folder")
                 if Path(e.name).suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise HippError(f"class folder {show(root / name)} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        for f in files[:limit_per_class] if limit_per_class else files:
            check_regular(f, "image")
            items.append((f, label))
    return items, classes


def read_image_folder(root: str | Path, preprocess, limit_per_class: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images, integer labels and class names (sorted sub-folder names)."""
    items, classes = folder_items(root, limit_per_class)
    images = torch.stack([_open(f, preprocess) for f, _ in items])
    return images, torch.tensor([label for _, label in items]), classes
