"""``hf:NAME[:CONFIG]/SPLIT`` data sets: a hub data set or a ``save_to_disk`` folder, as samples.

Images stay encoded (bytes) here; they are decoded once, with every other
source, by the cache's thread pool. The hub is often unreachable: it is
probed once with a short timeout before ``datasets.load_dataset``, which
would otherwise retry for half a minute.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..errors import VitloraError
from ..modeling import hub_reachable  # its home may move (issue 9): one probe for models and data sets
from .samples import DataSource, Sample

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


def _offline_mode() -> bool:
    """HF_HUB_OFFLINE is set: datasets reads its cache only, failing fast on its own."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


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
        unreachable = (f"the Hugging Face hub is unreachable, so {spec} cannot be downloaded; "
                       "pass a local folder (or a save_to_disk folder as hf:PATH/SPLIT) instead")
        if not _offline_mode() and not hub_reachable():  # one short probe, not datasets' retries
            raise VitloraError(unreachable + " (or set HF_HUB_OFFLINE=1 to use a copy in the Hugging Face cache)")
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:
            if _is_hub_unreachable(e):
                raise VitloraError(unreachable) from None
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


def discover_hf(spec: str, label: str | None) -> DataSource:
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
