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
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import VitloraError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Folders that archive tools / notebooks leave behind; never classes.
_JUNK_DIRS = frozenset({"__MACOSX", "__pycache__"})


@dataclass(frozen=True)
class Sample:
    """One image: a file path, or an in-memory HF image with a readable id as ``path``."""

    path: str
    label: str | None
    image: Any = None  # HF datasets: PIL image or {"bytes": ..., "path": ...}


@dataclass
class DataSource:
    """The discovered samples plus what the user needs to know about the layout."""

    samples: list[Sample]
    kind: str  # imagefolder | flat | manifest | hf
    root: str
    labels: list[str]  # sorted, unique
    ignored_files: int = 0


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_DIRS


def _walk_images(folder: str) -> tuple[list[str], int]:
    """Image files under ``folder`` (recursive, sorted, hidden skipped) and the count of other files."""
    images: list[str] = []
    ignored = 0
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for name in sorted(filenames):
            if _hidden(name):
                continue
            if is_image_file(name):
                images.append(os.path.join(dirpath, name))
            else:
                ignored += 1
    images.sort()
    return images, ignored


def _list_names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _discover_folder(spec: str, label: str | None) -> DataSource:
    with os.scandir(spec) as it:
        entries = sorted((e for e in it if not _hidden(e.name)), key=lambda e: e.name)
    subdirs = [e for e in entries if e.is_dir()]
    files = [e for e in entries if e.is_file()]
    top_images = [e.path for e in files if is_image_file(e.name)]
    top_ignored = len(files) - len(top_images)

    classes: dict[str, list[str]] = {}
    ignored = top_ignored
    for d in subdirs:
        imgs, ign = _walk_images(d.path)
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


def _read_csv(spec: str, base: str) -> list[Sample]:
    samples: list[Sample] = []
    with open(spec, newline="", encoding="utf-8-sig") as f:
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
                samples.append(Sample(_manifest_path(base, path), lab))
        except csv.Error as e:
            raise VitloraError(f"{spec} line {reader.line_num}: {e}") from None
    return samples


def _read_jsonl(spec: str, base: str) -> list[Sample]:
    samples: list[Sample] = []
    with open(spec, encoding="utf-8-sig") as f:
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
            missing = [k for k in ("path", "label") if k not in obj]
            if missing:
                raise VitloraError(f"{spec} line {n}: missing {', '.join(repr(k) for k in missing)}")
            path, lab = obj["path"], obj["label"]
            if not isinstance(path, str) or not path.strip():
                raise VitloraError(f"{spec} line {n}: 'path' must be a non-empty string")
            if isinstance(lab, bool) or not isinstance(lab, (str, int)) or not str(lab).strip():
                raise VitloraError(f"{spec} line {n}: 'label' must be a non-empty string")
            samples.append(Sample(_manifest_path(base, path), str(lab).strip()))
    return samples


def _discover_manifest(spec: str, label: str | None) -> DataSource:
    if label is not None:
        raise VitloraError(f"--label is for a flat folder of one class; {spec} is a manifest with its own labels")
    base = os.path.dirname(spec)
    samples = _read_csv(spec, base) if spec.lower().endswith(".csv") else _read_jsonl(spec, base)
    if not samples:
        raise VitloraError(f"no images found in {spec}")
    labels = sorted({s.label for s in samples if s.label is not None})
    return DataSource(samples, "manifest", base or ".", labels, 0)


# ---------------------------------------------------------------------------- hf


_SPLIT_RE = re.compile(r"^(?P<name>[^\[\]]+?)(?:\[(?P<a>-?\d+%?)?:(?P<b>-?\d+%?)?\])?$")


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG]/SPLIT`` -> (name, config, split). NAME may contain ``/``."""
    body = spec[3:]
    rest, sep, split = body.rpartition("/")
    if not sep or not rest or not split:
        raise VitloraError(f"expected hf:NAME[:CONFIG]/SPLIT (e.g. hf:beans/train), got {spec}")
    name, config = rest, None
    if not os.path.isdir(rest) and ":" in rest:
        name, _, config = rest.rpartition(":")
        if not name or not config:
            raise VitloraError(f"expected hf:NAME[:CONFIG]/SPLIT (e.g. hf:beans/train), got {spec}")
    return name, config, split


def _parse_split(split: str, spec: str) -> tuple[str, str | None, str | None]:
    m = _SPLIT_RE.match(split)
    if not m:
        raise VitloraError(f"cannot read split {split!r} in {spec}; use e.g. train, train[:500] or train[10%:]")
    return m["name"], m["a"], m["b"]


def _slice_bound(v: str | None, n: int) -> int | None:
    if v is None:
        return None
    if v.endswith("%"):
        return round(int(v[:-1]) * n / 100)  # same rounding as datasets' "closest"
    return int(v)


def _is_hub_unreachable(e: BaseException) -> bool:
    markers = ("ConnectionError", "ConnectError", "Timeout", "OfflineModeIsEnabled", "LocalEntryNotFoundError")
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (ConnectionError, TimeoutError)) or any(
            m in t.__name__ for t in type(cur).__mro__ for m in markers
        ):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _load_hf(spec: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise VitloraError(
            f"{spec} needs the Hugging Face datasets library; install the extra: pip install 'vitlora[datasets]'"
        ) from None
    name, config, split = parse_hf_spec(spec)
    base, a, b = _parse_split(split, spec)
    saved = os.path.isdir(name) and any(
        os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")
    )
    if saved:
        try:
            ds = datasets.load_from_disk(name)
        except Exception as e:
            raise VitloraError(f"could not load {name}: {_first_line(e)}") from None
        if isinstance(ds, datasets.DatasetDict):
            if base not in ds:
                raise VitloraError(f"{name} has no split {base!r}; it has {', '.join(sorted(ds))}")
            ds = ds[base]
        elif ds.split is not None and str(ds.split) != base:
            raise VitloraError(f"{name} holds the {ds.split!r} split, not {base!r}")
        start, stop, _ = slice(_slice_bound(a, len(ds)), _slice_bound(b, len(ds))).indices(len(ds))
        offset = start
        if (start, stop) != (0, len(ds)):
            ds = ds.select(range(start, max(start, stop)))
    else:
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:
            if _is_hub_unreachable(e):
                raise VitloraError(
                    f"the Hugging Face hub is unreachable, so {spec} cannot be downloaded; "
                    "pass a local folder (or a save_to_disk folder as hf:PATH/SPLIT) instead"
                ) from None
            raise VitloraError(f"could not load {spec}: {_first_line(e)}") from None
        if isinstance(ds, datasets.DatasetDict):  # split=None cannot happen, but be safe
            ds = ds[base]
        offset = 0  # index of the first row in the unsliced split, for readable sample ids
        if a is not None:
            try:
                total = ds.info.splits[base].num_examples
                offset = slice(_slice_bound(a, total), _slice_bound(b, total)).indices(total)[0]
            except Exception:
                offset = int(a) if a.isdigit() else 0
    return datasets, ds, name, split, offset


def _discover_hf(spec: str, label: str | None) -> DataSource:
    if label is not None:
        raise VitloraError(f"--label is for a flat folder of one class; {spec} takes labels from its ClassLabel column")
    datasets, ds, name, split, offset = _load_hf(spec)
    feats = ds.features
    img_col = next((c for c, f in feats.items() if isinstance(f, datasets.Image)), None)
    if img_col is None:
        raise VitloraError(f"{spec} has no Image column (columns: {', '.join(feats)})")
    lab_col = next((c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    names: list[str] | None = None
    if lab_col is not None:
        names = list(feats[lab_col].names)
    else:  # plain string label column, as some hub data sets have
        lab_col = next(
            (
                c
                for c in ("label", "labels", "class")
                if c in feats and isinstance(feats[c], datasets.Value) and feats[c].dtype in ("string", "large_string")
            ),
            None,
        )
    # Keep encoded bytes: decoding happens once, in the cache's thread pool.
    ds = ds.cast_column(img_col, datasets.Image(decode=False))
    images = ds[img_col]
    raw_labels = ds[lab_col] if lab_col is not None else [None] * len(images)
    base_name = name.rstrip("/")
    samples: list[Sample] = []
    split_base = split.split("[", 1)[0]
    for i, (img, lab) in enumerate(zip(images, raw_labels)):
        if names is not None:
            lab = names[lab] if isinstance(lab, int) and 0 <= lab < len(names) else None
        samples.append(Sample(f"hf:{base_name}/{split_base}#{offset + i}", lab, img))
    if not samples:
        raise VitloraError(f"no images found in {spec}")
    labels = sorted(set(names)) if names is not None else sorted({s.label for s in samples if s.label})
    return DataSource(samples, "hf", name, labels, 0)


# ----------------------------------------------------------------------- public


def discover(spec: str, label: str | None = None) -> DataSource:
    """Find the samples behind ``--data SPEC``: an ImageFolder, a flat folder, a manifest or ``hf:``."""
    if spec.startswith("hf:"):
        return _discover_hf(spec, label)
    if not os.path.exists(spec):
        raise VitloraError(f"data not found: {spec}")
    if os.path.isdir(spec):
        return _discover_folder(spec, label)
    if spec.lower().endswith((".csv", ".jsonl")):
        return _discover_manifest(spec, label)
    raise VitloraError(
        f"{spec} is a file; expected a folder of images, a .csv/.jsonl manifest or hf:NAME/SPLIT"
    )


def expand_image_paths(paths: Sequence[str]) -> list[str]:
    """Expand ``predict`` arguments: files as given, folders recursively, glob patterns.

    Files (named directly or matched by a pattern) are kept whatever their
    extension: the decoder decides and reports. Folders, also folders matched
    by a pattern, contribute their image-extension files recursively.
    Duplicates are dropped, first occurrence wins.
    """
    out: list[str] = []
    for p in paths:
        if os.path.isfile(p):
            found = [p]
        elif os.path.isdir(p):
            found = _walk_images(p)[0]
            if not found:
                raise VitloraError(f"no images found in {p}")
        elif glob.has_magic(p):
            found = []
            for m in sorted(glob.glob(p, recursive=True)):
                if os.path.isdir(m):
                    found.extend(_walk_images(m)[0])
                elif os.path.isfile(m):
                    found.append(m)
            if not found:
                raise VitloraError(f"no images match {p}")
        else:
            raise VitloraError(f"no such file or folder: {p}")
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
