"""Output folders: a command writes only where it may, one run at a time, and a crash leaves the old
or the new folder, never a mix.

- Ownership. Every command that writes a folder leaves a marker file naming itself. A non-empty folder
  without the same command's marker (or, for folders from before markers, the command's own files) is
  refused unless the user passes --overwrite; then only the command's files are replaced, the others
  are left alone.
- A lock. `claim` holds an exclusive lock on a hidden sibling file for the whole command, so a second
  run on the same folder stops with one line instead of interleaving writes.
- Swaps. Commands that write a whole folder at once (export, convert, pareto, bench) build it in a
  hidden sibling (`staged`) and rename it into place; over an earlier output of theirs the old folder
  is renamed aside first and removed last. A kill between the two renames is repaired by the next
  `claim`, which puts the old folder back; leftover temp folders from a killed run are removed there.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ..errors import HippError
from .fileio import current_umask, clean_temp_files, fsync_path, write_json

MARKER = ".hipp-output.json"


def _sibling(out: Path, what: str) -> Path:
    return out.parent / f".{out.name}.hipp-{what}"


def _marker(out: Path) -> dict:
    try:
        found = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def written_by(out: Path) -> str | None:
    """The command whose marker the folder holds (None without a readable one)."""
    return _marker(out).get("command")


def _real(out) -> Path:
    """One name per folder: `.` and symlinks resolved, so the lock and the swap act on the folder itself."""
    return Path(os.path.realpath(out))


def check(out, command: str, overwrite: bool = False, legacy: Callable[[Path], bool] | None = None) -> Path:
    """Refuse an output path the command must not write; reads only, so it can run before any work.

    `legacy(out)` says whether a folder without a marker is an earlier output of this command."""
    out = _real(out)
    for part in (out, *out.parents):
        if part.exists() and not part.is_dir():
            where = "is a file" if part == out else f"lies under {part}, which is a file"
            raise HippError(f"output {out} {where}; give a folder")
    if not out.is_dir():
        return out
    try:
        names = os.listdir(out)
    except OSError as e:
        raise HippError(f"cannot read the output folder {out}: {e.strerror or e}") from None
    if not names or overwrite:
        return out
    owner = written_by(out)
    if owner == command or (owner is None and MARKER not in names and legacy is not None and legacy(out)):
        return out
    whose = f"was written by 'hipp {owner}'" if owner else "was not written by this command"
    raise HippError(f"output folder {out} is not empty and {whose}; choose another folder or pass --overwrite")


def _lock(path: Path) -> int:
    """An exclusive, non-blocking lock on `path` (created if missing); retried if the file was
    replaced between open and lock, so two runs can never both hold it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise HippError(f"cannot create the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise HippError(f"another hipp run is writing {path.parent / path.name[1:].rsplit('.hipp-', 1)[0]}"
                                " right now; wait for it to finish or choose another folder") from None
            raise HippError(f"cannot lock {path}: {e.strerror or e}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def recover(out: Path) -> None:
    """Repair what a killed swap or write left behind (call it holding the lock)."""
    old = _sibling(out, "old")
    if old.exists():
        if out.exists():  # the new folder was in place: the old one was only waiting to be removed
            shutil.rmtree(old, ignore_errors=True)
        else:  # killed between the two renames: the old folder is the last complete state
            os.rename(old, out)
    for p in out.parent.glob(f".{out.name}.hipp-tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


@contextmanager
def claim(out, command: str, overwrite: bool = False, legacy: Callable[[Path], bool] | None = None):
    """Hold `out` for `command`: lock it, repair a killed run's leftovers, check ownership again under
    the lock. Yields the folder path; creates nothing in it (the command decides when to write)."""
    out = _real(out)
    check(out, command, overwrite, legacy)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HippError(f"cannot create {out.parent}: {e.strerror or e}") from None
    lock = _sibling(out, "lock")
    fd = _lock(lock)
    try:
        recover(out)
        check(out, command, overwrite, legacy)  # the folder may have changed before we held the lock
        if written_by(out) == command:  # only in the command's own folder are .*.tmp files its leftovers
            clean_temp_files(out)
        if out.is_dir() and written_by(out) is None and legacy is not None and legacy(out):
            mark(out, command, os.listdir(out))  # an earlier output from before markers: adopt it
        yield out
    finally:
        os.unlink(lock)
        os.close(fd)


def mark(folder: Path, command: str, files=None) -> None:
    """Write the marker that says `command` owns `folder` (and, for a folder written whole, which files
    it wrote: only a folder holding nothing else is ever swapped out and removed)."""
    from .. import __version__

    entry = {"command": command, "hipp_version": __version__}
    if files is not None:
        entry["files"] = sorted(set(files) - {MARKER})
    if _marker(folder) != entry:
        write_json(folder / MARKER, entry)


@contextmanager
def staged(out, command: str):
    """Yield a hidden sibling folder to build the output in; on success it becomes `out` (module doc)."""
    out = _real(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.hipp-tmp-", dir=out.parent))
    except OSError as e:
        raise HippError(f"cannot create the output folder {out}: {e.strerror or e}") from None
    try:
        yield stage
        mark(stage, command, os.listdir(stage))
        _share(stage)
        for name in os.listdir(stage):
            fsync_path(stage / name)
        _publish(stage, out, command)
    except OSError as e:
        raise HippError(f"cannot write {out}: {e.strerror or e}; the previous contents are kept") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _share(stage: Path) -> None:
    """mkdtemp creates an owner-only folder; an output gets the permissions the umask gives."""
    os.chmod(stage, 0o777 & ~current_umask())


def _publish(stage: Path, out: Path, command: str) -> None:
    if out.is_dir() and not os.listdir(out):
        out.rmdir()
    if not out.exists():
        os.rename(stage, out)
    elif _only_ours(out, command):
        old = _sibling(out, "old")
        os.rename(out, old)
        try:
            os.rename(stage, out)
        except OSError:
            os.rename(old, out)
            raise
        fsync_path(out.parent)
        shutil.rmtree(old)
    else:  # files someone else wrote are there (--overwrite was given, or the user added some): replace
        ours = written_by(out) == command  # our files one by one and keep theirs
        for name in sorted(os.listdir(stage)):
            if name != MARKER or ours:  # a folder that was not ours does not become ours
                os.replace(stage / name, out / name)
        fsync_path(out)
        return
    fsync_path(out.parent)


def _only_ours(out: Path, command: str) -> bool:
    """The folder holds the command's marker and nothing but the files that marker lists."""
    entry = _marker(out)
    return (entry.get("command") == command and isinstance(entry.get("files"), list)
            and set(os.listdir(out)) <= set(entry["files"]) | {MARKER})

