"""Atomic, durable writes: a file either has its old content or its complete new content, never a
torn one, and a rename that returned survives a power cut (the file and its folder are fsynced)."""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import HippError

TMP_SUFFIX = ".tmp"  # temp files are ".<name>.<random>.tmp" beside their target (see clean_temp_files)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entries to disk (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_error(path, e: OSError) -> HippError:
    """An OSError met while writing, as the one line the user sees."""
    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    return HippError(f"cannot write {path}: {why}; the previous contents are kept")


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; if the block succeeds, fsync it and rename it over `path`
    (then fsync the folder). On any failure the temp file goes and `path` keeps its old content."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise disk_error(path, e) from None
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes owner-only files; a saved file gets the usual mode
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        raise disk_error(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def clean_temp_files(folder: str | os.PathLike) -> None:
    """Remove the temp files a killed write left in `folder` (call it only while holding the folder's lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file():
            p.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise HippError(f"missing file: {path}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HippError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:
        raise HippError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(obj, dict):
        raise HippError(f"{path} must hold a JSON object")
    return obj


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:  # safetensors reports the OS error (e.g. "os error 28") in its text
            code = int(m.group(1)) if (m := re.search(r"os error (\d+)", str(e))) else errno.EIO
            raise OSError(code, os.strerror(code)) from None


def load_tensors(path, with_metadata: bool = False):
    """A safetensors file's tensors (and, with `with_metadata`, its string metadata); never unpickles."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise HippError(f"missing weights file: {path}")
    try:
        tensors = load_file(str(path))
        if not with_metadata:
            return tensors
        with safe_open(str(path), framework="pt") as f:
            return tensors, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise HippError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
