"""Atomic writes for run directories.

A run directory is a contract: whatever is in it must load. Every file is written to a
temporary name in the same folder and moved into place with `os.replace` (atomic on
POSIX), and `vitlora.json`, the marker that makes a folder a run, is written last on the
first save. An interrupted save leaves the previous complete files, never half a file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


@contextmanager
def staging_dir(parent: str | Path) -> Iterator[Path]:
    """A scratch folder inside `parent` (same filesystem, so renames are atomic), removed after."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_files_into(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Move every file of `src` into `dest`, one atomic replace each."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        if item.name in skip:
            continue
        target = dest / item.name
        if item.is_dir():
            if target.exists():
                shutil.rmtree(target)
            os.replace(item, target)
        else:
            os.replace(item, target)


def publish_dir(staged: Path, dest: str | Path) -> None:
    """Replace `dest` by the fully written folder `staged` (rename; old one removed after)."""
    dest = Path(dest)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(staged, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_out_dir(out: str | Path, overwrite: bool, what: str = "--out") -> Path:
    """Refuse to clobber a non-empty folder unless asked to."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise_error(f"{what} {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise_error(f"{what} {out} exists and is not empty; pass --overwrite to replace it or choose another folder")
    return out


def raise_error(message: str) -> None:
    from .errors import VitloraError

    raise VitloraError(message)
