"""The run directory: its file names, reading it, writing into it atomically, and where outputs may go.

A run directory is a contract: whatever is in it must load. Layout of RUN_DIR (see README):

    adapter_config.json, adapter_model.safetensors   PEFT adapter, trained head included
    labels.json                                       id2label / label2id, new labels, mode
    preprocessor_config.json                          the base model's image processor
    vitlora.json                                      exact settings + provenance (the run marker)
    metrics.json, training_curves.png, README.md      results and model card
    checkpoints/last/state.pt                         resume state (optimizer, RNG, history)
    checkpoints/best/                                 extend mode: the best epoch before calibration

Every file is written to a temporary name in the same folder and moved into place with
`os.replace` (atomic on POSIX); whole folders (a new run, a merged model) are built beside
their destination and swapped in by `publish_dir`, and `exclusive_lock` keeps a second writer
out. An interrupted save leaves the previous complete files, never half a file. Every module
that reads or writes these files takes the names from here.
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
from typing import Any, Iterator

from .errors import VitloraError

RUN_MARKER = "vitlora.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LABELS = "labels.json"
PREPROCESSOR = "preprocessor_config.json"
METRICS = "metrics.json"
CURVES = "training_curves.png"
CARD = "README.md"
CHECKPOINT = Path("checkpoints") / "last" / "state.pt"
RUN_MARKERS = (ADAPTER_CONFIG, RUN_MARKER)  # both present: the folder is a run


# ---- reading ---------------------------------------------------------------------------


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return all((p / name).is_file() for name in RUN_MARKERS)


def require_run_dir(run_dir: str | Path) -> Path:
    """`run_dir` as a Path, or one clear error when it is not a run."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise VitloraError(f"run directory not found: {run_dir}")
    if not is_run_dir(run_dir):
        missing = ", ".join(name for name in RUN_MARKERS if not (run_dir / name).is_file())
        raise VitloraError(f"{run_dir} is not a vitlora run folder (missing {missing}); pass the folder that training wrote")
    return run_dir


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VitloraError(f"cannot read {path}: {exc}") from None


def read_run_files(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(vitlora.json, labels.json) of a run, with a clear error when it is not a run."""
    run_dir = require_run_dir(run_dir)
    return read_json(run_dir / RUN_MARKER), read_json(run_dir / LABELS)


# ---- writing ---------------------------------------------------------------------------


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


def move_files_into(src: Path, dest: Path) -> None:
    """Move every entry of `src` into `dest`, one atomic replace each."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        target = dest / item.name
        if item.is_dir() and target.exists():
            shutil.rmtree(target)
        os.replace(item, target)


def remove_tree(path: Path) -> None:
    """Delete `path`: a folder tree without following any symlink in it, a file or a symlink itself."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)  # unlinks symlinks inside, never follows them


def aside_path(dest: Path) -> Path:
    """Where `publish_dir` keeps the old `dest` while swapping in the new one."""
    return dest.with_name(f".{dest.name}.old")


def recover_publish(dest: str | Path) -> None:
    """Finish or roll back a swap that a kill interrupted: the old folder back, or its leftover deleted."""
    dest = Path(dest)
    old = aside_path(dest)
    if old.exists() and not old.is_symlink():
        if dest.exists() or dest.is_symlink():
            shutil.rmtree(old)
        else:
            os.replace(old, dest)


def publish_dir(staged: Path, dest: str | Path) -> None:
    """Replace `dest` by the fully written folder `staged`; `dest` is always absent, the old or the new one.

    The old folder is moved aside (`aside_path`) first, put back if the swap fails, and
    deleted last; `recover_publish` completes a swap that a kill cut short.
    """
    dest = Path(dest)
    recover_publish(dest)
    if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
        dest.rmdir()
    if not dest.exists():
        os.replace(staged, dest)
        return
    old = aside_path(dest)
    os.replace(dest, old)
    try:
        os.replace(staged, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old)


@contextmanager
def exclusive_lock(dest: str | Path, what: str = "--out") -> Iterator[None]:
    """Hold `.<name>.lock` beside `dest` (fcntl.flock, freed by the kernel even on kill -9); refuse if taken."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = dest.with_name(f".{dest.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise VitloraError(f"another vitlora process is writing {what} {dest} (lock {path} is held); "
                                   "wait for it to finish or choose another folder") from None
            raise
        try:  # the holder before us may have unlinked the file: lock the one on disk
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


# ---- where outputs may go --------------------------------------------------------------


def check_out_dir(out: str | Path, overwrite: bool, what: str = "--out") -> Path:
    """Refuse a symlink, a path under a file, a non-folder, and a non-empty folder unless asked to replace it."""
    out = Path(out)
    if out.is_symlink():
        raise VitloraError(f"{what} {out} is a symbolic link; pass the real folder (vitlora never writes "
                           "through links)")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and existing != out and not existing.is_dir():
        raise VitloraError(f"{what} {out} is inside {existing}, which is a file, not a folder")
    if out.exists() and not out.is_dir():
        raise VitloraError(f"{what} {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise VitloraError(f"{what} {out} exists and is not empty; pass --overwrite to replace it or choose another folder")
    return out


def check_destination(dest: str | Path, run_dir: str | Path, overwrite: bool, kind_file: str | None = None,
                      what: str = "OUT_DIR") -> Path:
    """Where `merge`/`export` may write what they derive from `run_dir` (resolved path).

    Refused: the run itself, a folder inside it or one that contains it (replacing any of
    them would destroy the run), a non-folder, a non-empty folder without `overwrite`, and,
    with `overwrite`, a non-empty folder that holds no `kind_file` (not an earlier output of
    the same kind, e.g. a typo'd path).
    """
    check_out_dir(Path(dest).expanduser(), overwrite=True, what=what)  # a link, a path under a file: refused as given
    final, run = Path(dest).expanduser().resolve(), Path(run_dir).expanduser().resolve()
    if final == run or run in final.parents or final in run.parents:
        raise VitloraError(f"{what} {dest} is the run {run_dir}, inside it or contains it; choose another folder")
    check_out_dir(final, overwrite, what)
    if overwrite and kind_file and final.is_dir() and any(final.iterdir()) and not (final / kind_file).exists():
        raise VitloraError(f"{what} {dest} is not empty and holds no {kind_file}; refusing to replace it")
    return final
