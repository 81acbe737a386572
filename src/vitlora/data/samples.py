"""What discovery returns: samples (an image and its label) and the data source they came from.

Apart from ``sources`` so the optional sources (``hf``, ``webdataset``) and the
cache can share these types without importing discovery (no import circle).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import VitloraError

SEPARATOR = "|"  # several labels in one manifest field: `a.jpg,raccoon|cat`


@dataclass(frozen=True)
class Sample:
    """One image: a file path, or an in-memory HF image with a readable id as ``path``."""

    path: str
    label: str | None
    image: Any = None  # HF datasets: PIL image or {"bytes": ..., "path": ...}
    labels: tuple[str, ...] | None = None  # multi-label rows (`a|b`, a "labels" list); then label = "a|b"


@dataclass
class DataSource:
    """The discovered samples plus what the user needs to know about the layout."""

    samples: list[Sample]
    kind: str  # imagefolder | flat | manifest | hf | webdataset
    root: str
    labels: list[str]  # sorted, unique (webdataset: labels.txt's order when it has one)
    ignored_files: int = 0
    shards: Any = None  # webdataset: a ShardSet; samples stream from it instead of ``samples`` (empty)


def label_set(labels: Iterable[Any], where: str) -> tuple[str, ...]:
    """Sorted unique label names of one manifest row; an empty name (`cat||dog`) is an error naming the row."""
    names = []
    for lab in labels:
        if isinstance(lab, bool) or not isinstance(lab, (str, int)) or not str(lab).strip():
            raise VitloraError(f"{where}: every label must be a non-empty string, got {lab!r}")
        names.append(str(lab).strip())
    return tuple(sorted(set(names)))
