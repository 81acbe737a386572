"""What the samples are: turn a user's ``--data`` argument into a list of (image, label).

Kept apart from decoding on purpose: discovery only looks at names and
manifests (fast, no pixel is read), so layout mistakes are reported in one
clear sentence before any expensive work starts. Unreadable files are the
decoder's business (skipped and reported there), not an error here.

Paths are joined onto the spec exactly as the user typed it (never made
absolute), so messages and reports show paths the user recognises.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import random
from collections.abc import Sequence

from ..errors import VitloraError
from .decode import printable
from .samples import SEPARATOR, DataSource, Sample, label_set

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Folders that archive tools / notebooks leave behind; never classes.
_JUNK_DIRS = frozenset({"__MACOSX", "__pycache__"})


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_DIRS


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def _check_link(link: str, fence: str, own: str) -> None:
    """Refuse a symlinked folder that loops (leads to ``fence``, the data folder, or above it) or
    leads into the data folder outside ``own`` (another class's images would join this class)."""
    real = os.path.realpath(link)
    if _inside(fence, real):
        raise VitloraError(f"{printable(link)} is a symlink to {printable(real)}, which contains the data folder "
                           "(a loop); remove the link")
    if _inside(real, fence) and not _inside(real, own):
        raise VitloraError(f"{printable(link)} is a symlink to {printable(real)}, outside its own folder; "
                           "a class folder may not link into another class, remove the link")


def _walk_images(folder: str, fence: str | None = None) -> tuple[list[str], int]:
    """Image files under ``folder`` (recursive, sorted, hidden skipped) and the count of other files.

    Only regular files count as images (``DirEntry.is_file`` is a ``stat``: a FIFO is
    never opened). Symlinked files are followed; symlinked folders too, unless
    :func:`_check_link` refuses them (``fence``: the data folder ``folder``
    belongs to, default ``folder``). Each real folder is listed once.
    """
    fence_real = os.path.realpath(fence if fence is not None else folder)
    own_real = os.path.join(fence_real, os.path.basename(folder.rstrip(os.sep))) if fence else fence_real
    images: list[str] = []
    ignored = 0
    seen: set[str] = set()
    stack = [folder]
    while stack:
        top = stack.pop()
        real = os.path.realpath(top)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(top) as it:
                entries = sorted((e for e in it if not _hidden(e.name)), key=lambda e: e.name)
        except OSError:
            continue  # unreadable folder: like os.walk, nothing to list
        subdirs = []
        for e in entries:
            if e.is_dir():
                if e.is_symlink():
                    _check_link(e.path, fence_real, own_real)
                subdirs.append(e.path)
            elif e.is_file() and is_image_file(e.name):  # DirEntry.is_file: S_ISREG, never opens
                images.append(e.path)
            else:
                ignored += 1
        stack.extend(reversed(subdirs))
    images.sort()
    return images, ignored


def _list_names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(printable(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_label_names(names: Sequence[str], where: str) -> None:
    """Labels are written to labels.json and the model card: they must be valid UTF-8 text."""
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise VitloraError(f"class name {printable(name)!r} in {printable(where)} is not valid UTF-8 text; "
                               "rename it (labels are written to labels.json and the model card)") from None


def _discover_folder(spec: str, label: str | None) -> DataSource:
    with os.scandir(spec) as it:
        entries = sorted((e for e in it if not _hidden(e.name)), key=lambda e: e.name)
    subdirs = [e for e in entries if e.is_dir()]
    files = [e for e in entries if not e.is_dir()]
    top_images = [e.path for e in files if e.is_file() and is_image_file(e.name)]  # is_file: S_ISREG
    top_ignored = len(files) - len(top_images)

    classes: dict[str, list[str]] = {}
    ignored = top_ignored
    fence = os.path.realpath(spec)
    for d in subdirs:
        if d.is_symlink():
            _check_link(d.path, fence, os.path.join(fence, d.name))
        imgs, ign = _walk_images(d.path, fence=spec)
        classes[d.name] = imgs
        ignored += ign
    with_images = [c for c, imgs in classes.items() if imgs]

    if with_images and top_images:
        raise VitloraError(
            f"{spec} mixes {len(top_images)} image{'s' if len(top_images) != 1 else ''} at the top level "
            "with class folders "
            f"{_list_names(with_images)}; move the top-level images into a class folder"
        )
    if with_images:
        names = sorted(classes)
        if label is not None:
            raise VitloraError(
                f"--label is for a flat folder of one class; {spec} is an ImageFolder "
                f"with classes {_list_names(names)}"
            )
        _check_label_names([c for c in names if classes[c]], spec)
        empty = [c for c in names if not classes[c]]
        if empty:
            which = "class folder" if len(empty) == 1 else "class folders"
            has = "has" if len(empty) == 1 else "have"
            paths = [os.path.join(spec, c) for c in empty]
            raise VitloraError(f"{which} {_list_names(paths)} {has} no images; add images or remove it")
        samples = [Sample(p, c) for c in names for p in classes[c]]
        return DataSource(samples, "imagefolder", spec, names, ignored)
    if top_images:
        if label is None:
            raise VitloraError(
                f"{spec} is a flat folder of {len(top_images)} images with no class sub-folders; "
                "pass --label NAME to give them all one class, or sort them into one sub-folder per class"
            )
        samples = [Sample(p, label) for p in top_images]
        return DataSource(samples, "flat", spec, [label], ignored)
    raise VitloraError(f"no images found in {spec}")


def _manifest_path(base: str, p: str) -> str:
    p = p.strip()
    return p if os.path.isabs(p) else os.path.join(base, p)


def _read_text(spec: str) -> str:
    """The manifest as text; bytes that are not UTF-8 are a one-line error naming the line."""
    with open(spec, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise VitloraError(f"{printable(spec)} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                           "save the manifest as UTF-8") from None


def _read_csv(spec: str, base: str) -> list[Sample]:
    samples: list[Sample] = []
    with io.StringIO(_read_text(spec), newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise VitloraError(f"{spec} is empty; expected a header line path,label") from None
        except csv.Error as e:
            raise VitloraError(f"{spec} line 1: {e}") from None
        cols = [h.strip().lower() for h in header]
        missing = [c for c in ("path", "label") if c not in cols]
        if missing:
            raise VitloraError(
                f"{spec} line 1: missing column(s) {', '.join(missing)}; the header must name path,label"
            )
        ip, il = cols.index("path"), cols.index("label")
        need = max(ip, il) + 1
        try:
            for row in reader:
                n = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) < need:
                    raise VitloraError(f"{spec} line {n}: expected {need} fields, got {len(row)}")
                path, lab = row[ip].strip(), row[il].strip()
                if not path:
                    raise VitloraError(f"{spec} line {n}: empty path")
                if not lab:
                    raise VitloraError(f"{spec} line {n}: empty label")
                samples.append(_labelled(_manifest_path(base, path), lab, f"{spec} line {n}"))
        except csv.Error as e:
            raise VitloraError(f"{spec} line {reader.line_num}: {e}") from None
    return samples


def _read_jsonl(spec: str, base: str) -> list[Sample]:
    samples: list[Sample] = []
    with io.StringIO(_read_text(spec), newline=None) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise VitloraError(f"{spec} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise VitloraError(f'{spec} line {n}: expected an object like {{"path": ..., "label": ...}}')
            missing = [k for k in ("path", "label") if k not in obj and not (k == "label" and "labels" in obj)]
            if missing:
                raise VitloraError(f"{spec} line {n}: missing {', '.join(repr(k) for k in missing)}")
            path, lab = obj["path"], obj["labels"] if "labels" in obj else obj["label"]
            if not isinstance(path, str) or not path.strip():
                raise VitloraError(f"{spec} line {n}: 'path' must be a non-empty string")
            if isinstance(lab, list):
                samples.append(_labelled(_manifest_path(base, path), lab, f"{spec} line {n}"))
                continue
            if isinstance(lab, bool) or not isinstance(lab, (str, int)) or not str(lab).strip():
                raise VitloraError(f"{spec} line {n}: 'label' must be a non-empty string")
            samples.append(_labelled(_manifest_path(base, path), str(lab).strip(), f"{spec} line {n}"))
    return samples


def _labelled(path: str, lab: str | list, where: str) -> Sample:
    """A manifest row: one label, or a label set (a `|`-separated field, a JSONL "labels" list)."""
    if isinstance(lab, str) and "|" not in lab:
        return Sample(path, lab)
    labels = label_set(lab.split(SEPARATOR) if isinstance(lab, str) else lab, where)
    return Sample(path, SEPARATOR.join(labels), labels=labels)


def _discover_manifest(spec: str, label: str | None) -> DataSource:
    if label is not None:
        raise VitloraError(f"--label is for a flat folder of one class; {spec} is a manifest with its own labels")
    base = os.path.dirname(spec)
    samples = _read_csv(spec, base) if spec.lower().endswith(".csv") else _read_jsonl(spec, base)
    if not samples:
        raise VitloraError(f"no images found in {spec}")
    labels = sorted({lab for s in samples for lab in (s.labels if s.labels is not None else (s.label,))})
    _check_label_names(labels, spec)
    return DataSource(samples, "manifest", base or ".", labels, 0)


# ----------------------------------------------------------------------- public


def discover(spec: str, label: str | None = None) -> DataSource:
    """Find the samples behind ``--data SPEC``: an ImageFolder, a flat folder, a manifest, ``hf:`` or tar shards."""
    if spec.startswith("hf:"):
        from .hf import discover_hf  # datasets is an optional extra

        return discover_hf(spec, label)
    if spec.lower().endswith(".tar"):  # WebDataset shards: one .tar or a brace pattern of them
        from .webdataset import discover_shards

        return discover_shards(spec, label)
    if not os.path.exists(spec):
        raise VitloraError(f"data not found: {spec}")
    if os.path.isdir(spec):
        return _discover_folder(spec, label)
    if spec.lower().endswith((".csv", ".jsonl")):
        return _discover_manifest(spec, label)
    raise VitloraError(
        f"{spec} is a file; expected a folder of images, a .csv/.jsonl manifest, .tar shards or hf:NAME/SPLIT"
    )


def expand_image_paths(paths: Sequence[str]) -> list[str]:
    """Expand ``predict`` arguments: files as given, folders recursively, glob patterns.

    Files (named directly or matched by a pattern) are kept whatever their
    extension or type: the decoder decides and reports (a FIFO or device is
    skipped there, by ``stat``, without being opened). Folders, also folders
    matched by a pattern, contribute their regular image-extension files
    recursively. Duplicates are dropped, first occurrence wins.
    """
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = _walk_images(p)[0]
            if not found:
                raise VitloraError(f"no images found in {printable(p)}")
        elif os.path.exists(p):
            found = [p]
        elif glob.has_magic(p):
            found = []
            for m in sorted(glob.glob(p, recursive=True)):
                found.extend(_walk_images(m)[0] if os.path.isdir(m) else [m])
            if not found:
                raise VitloraError(f"no images match {printable(p)}")
        else:
            raise VitloraError(f"no such file or folder: {printable(p)}")
        out.extend(found)
    return list(dict.fromkeys(out))


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of every label (at least one when it has 2+, never all of it).

    Per-label so a rare class is not missing from validation by bad luck;
    seeded ``random.Random`` so the same seed gives the same split on every
    machine and Python version. Both lists keep the input order.
    """
    if not 0.0 <= fraction < 1.0:
        raise VitloraError(f"validation fraction must be in [0, 1), got {fraction}")
    groups: dict[str | None, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.label, []).append(i)
    rng = random.Random(seed)
    val_idx: set[int] = set()
    for lab in sorted(groups, key=lambda x: (x is None, x or "")):
        idx = list(groups[lab])
        n = len(idx)
        k = round(fraction * n)
        if fraction > 0 and n >= 2:
            k = max(k, 1)
        k = min(k, n - 1)
        rng.shuffle(idx)
        val_idx.update(idx[:k])
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val
