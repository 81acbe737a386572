"""WebDataset tar shards as training data: read, decoded and batched in a stream, never all in memory.

``--data shards/train-{0000..0015}.tar`` (a brace pattern or one ``.tar``):
each sample is ``KEY.jpg|jpeg|png|webp`` plus ``KEY.cls`` holding the label
*text*. Why a stream: the decode-once cache (``data.cache``) needs every
decoded image at once, on disk at least; shards are for data sets too big
for that. Memory stays bounded by the shuffle buffer (encoded bytes), the
loader's prefetch and one batch, whatever the data set's size.

* Labels: the lines of ``labels.txt`` beside the first shard if it exists (its
  order is the label order; a ``.cls`` text not in it is an error), else the
  sorted set of ``.cls`` texts. They come from a first pass over the shards
  that reads tar headers and the small ``.cls`` members only (image bytes are
  seeked over), which also counts the samples so a run knows its epoch length.
* Validation: a sample is held out when a stable hash of its key (blake2b,
  not Python's salted ``hash``) falls below the fraction: disjoint from
  training, the same on every run and machine, decided without a list of
  keys. Not stratified: a rare class may have no validation image.
* Ranks and workers: shards are dealt to ranks (``nodesplitter``, rank ``r``
  takes shards ``r, r + world, ...``), then to loader workers
  (``wds.split_by_worker``). Every rank yields the same number of batches
  (the largest rank's sample count; smaller ranks wrap around, as
  ``DistributedSampler`` pads), so a collective op never waits on a rank that
  has finished.
* Pixels: the same decode and resize as the cache (``decode_resized``), so a
  run on shards sees exactly the pixels a run on the same images as a folder does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from ..errors import VitloraError
from .cache import (
    CacheSlots,
    ImageCache,
    _ordered_map,
    cache_geometry,
    check_every_label_kept,
    check_known_labels,
    decode_resized,
)
from .decode import SkipReport, printable
from .samples import DataSource
from .transforms import Preprocess

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABELS_FILE = "labels.txt"


def expand_shards(spec: str) -> list[str]:
    """The shard files a brace pattern names, in order; every one must exist."""
    from braceexpand import braceexpand  # a webdataset dependency

    shards = list(dict.fromkeys(braceexpand(spec)))
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise VitloraError(f"shard not found: {printable(missing[0])}"
                           + (f" ({len(missing)} of {len(shards)} shards missing)" if len(missing) > 1 else ""))
    return shards


def key_fraction(key: str) -> float:
    """A sample key's stable position in [0, 1): below the validation fraction means held out."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _scan_shard(path: str) -> tuple[list[str], list[str], int]:
    """(keys, label texts) of the usable samples in one shard, and how many lacked an image or a label.

    Reads headers and ``.cls`` members only: image data is seeked over.
    """
    from webdataset.tariterators import base_plus_ext

    has_image: dict[str, bool] = {}
    label: dict[str, str] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                key, ext = base_plus_ext(m.name)
                if key is None or not m.isfile():
                    continue
                ext = ext.lower()
                has_image.setdefault(key, False)
                if ext in IMAGE_EXTS:
                    has_image[key] = True
                elif ext == "cls":
                    label[key] = _cls_text(tf.extractfile(m).read(), path, key)  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise VitloraError(f"cannot read shard {printable(path)}: {e}") from None
    keys = [k for k, img in has_image.items() if img and k in label]
    return keys, [label[k] for k in keys], len(has_image) - len(keys)


def _cls_text(data: bytes, shard: str, key: str) -> str:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise VitloraError(f"{printable(shard)}: {printable(key)}.cls is not UTF-8 text") from None
    if not text:
        raise VitloraError(f"{printable(shard)}: {printable(key)}.cls is empty")
    return text


def _labels_txt(shards: list[str]) -> list[str] | None:
    path = os.path.join(os.path.dirname(shards[0]), LABELS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        try:
            names = [line.strip() for line in f.read().decode("utf-8-sig").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise VitloraError(f"{printable(path)} is not UTF-8 text") from None
    if len(set(names)) != len(names) or not names:
        raise VitloraError(f"{printable(path)} must list each label once, one per line")
    return names


@dataclass
class ShardSet:
    """Tar shards in WebDataset layout, indexed once: labels, and per shard each sample's key hash and label."""

    spec: str
    shards: list[str]
    labels: list[str]
    fractions: list[np.ndarray]  # per shard: key_fraction of each usable sample
    label_ids: list[np.ndarray]  # per shard: index into labels
    incomplete: int = 0  # samples without an image or a .cls, left out

    @classmethod
    def open(cls, spec: str) -> ShardSet:
        shards = expand_shards(spec)
        fixed = _labels_txt(shards)
        names: dict[str, int] = {lab: i for i, lab in enumerate(fixed or [])}
        fractions, raw_ids, incomplete = [], [], 0
        for path in shards:
            keys, texts, bad = _scan_shard(path)
            incomplete += bad
            if fixed is not None and (unknown := sorted(set(texts) - set(names))):
                raise VitloraError(f"{printable(path)} has labels missing from {LABELS_FILE}: {', '.join(unknown[:10])}")
            fractions.append(np.array([key_fraction(k) for k in keys], dtype=np.float64))
            raw_ids.append(np.array([names.setdefault(t, len(names)) for t in texts], dtype=np.int64))
        if not any(len(f) for f in fractions):
            raise VitloraError(f"no samples with an image and a .cls label in {spec}")
        labels = fixed if fixed is not None else sorted(names)
        remap = np.array([labels.index(t) for t in names], dtype=np.int64)  # first-seen order -> label order
        return cls(spec, shards, labels, fractions, [remap[r] for r in raw_ids], incomplete)

    def _in_split(self, fractions: np.ndarray, split: str, val_fraction: float) -> np.ndarray:
        if split == "all":
            return np.ones(len(fractions), dtype=bool)
        held = fractions < val_fraction
        return held if split == "val" else ~held

    def count(self, split: str, val_fraction: float, shards: Iterable[int] | None = None) -> int:
        """Samples of ``split`` ("train", "val" or "all") in the given shards (default all)."""
        idx = range(len(self.shards)) if shards is None else shards
        return int(sum(self._in_split(self.fractions[i], split, val_fraction).sum() for i in idx))

    def split_labels(self, split: str, val_fraction: float) -> set[str]:
        return {self.labels[j] for j in np.flatnonzero(self.label_counts(split, val_fraction))}

    def rank_shards(self, rank: int, world_size: int) -> list[int]:
        """Which shards rank ``rank`` reads (the ``nodesplitter``'s choice, fixed for the run)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if world_size > len(self.shards):
            raise VitloraError(f"{len(self.shards)} shards cannot be shared by {world_size} processes; "
                               "write at least one shard per process (ideally a multiple)")
        return list(range(len(self.shards)))[rank::world_size]

    def samples_per_rank(self, val_fraction: float, world_size: int = 1) -> int:
        """Training samples each rank yields per epoch: the largest rank's share (others wrap around)."""
        return max(self.count("train", val_fraction, self.rank_shards(r, world_size)) for r in range(world_size))

    def batches_per_epoch(self, batch_size: int, val_fraction: float, world_size: int = 1) -> int:
        return -(-self.samples_per_rank(val_fraction, world_size) // batch_size)

    def train_batches(self, label2id: dict[str, int], pp: Preprocess, batch_size: int, val_fraction: float,
                      seed: int, epoch: int, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000,
                      num_workers: int = 0, num_threads: int = 2, work_size: int | None = None,
                      report: SkipReport | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of (uint8 [b,3,S,S] at work size, long [b] label ids) for this rank.

        The streaming counterpart of ``iterate_batches`` + ``ImageCache.batch``:
        the images are what ``build_cache(train=True)`` stores, ready for
        ``random_resized_crop_flip``. Every rank yields ``batches_per_epoch``
        batches. ``num_workers`` > 0 decodes in loader worker processes,
        else ``num_threads`` threads decode here. Unreadable images go to
        ``report`` (skipped, not fatal); their places are filled from the
        next pass, so the epoch's length is always the indexed one.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        check_known_labels(self.labels, label2id)
        empty = sorted(set(self.labels) - self.split_labels("train", val_fraction))
        if empty:
            raise VitloraError(f"no training samples of {', '.join(empty[:10])} in {self.spec} "
                               "(every class needs one outside the validation share)")
        mine = frozenset(self.shards[i] for i in self.rank_shards(rank, world_size))
        _, draft = cache_geometry(pp, True, work_size)
        work = partial(_decode_sample, pp=pp, train=True, work_size=work_size, draft=draft, label2id=label2id)
        opts = _StreamOptions(val_fraction, "train", shuffle_buffer, seed, num_workers, num_threads)
        passes = (_decoded(self.spec, self.shards, mine, work, opts, cycle=epoch * 1000 + c)
                  for c in itertools.count())
        good = _readable(_cycle(passes, self.spec), report if report is not None else SkipReport())
        return _batched(itertools.islice(good, self.samples_per_rank(val_fraction, world_size)), batch_size)

    def label_counts(self, split: str, val_fraction: float) -> np.ndarray:
        """Samples of each label (in ``labels`` order) in ``split``."""
        return sum((np.bincount(ids[self._in_split(f, split, val_fraction)], minlength=len(self.labels))
                    for f, ids in zip(self.fractions, self.label_ids)), np.zeros(len(self.labels), dtype=np.int64))

    def decode_split(self, split: str, label2id: dict[str, int] | None, pp: Preprocess, val_fraction: float,
                     train: bool = False, per_label: int | None = None, draft: bool = True, num_threads: int = 2,
                     memory_budget_bytes: int = 4 << 30, disk_dir: str | None = None) -> tuple[ImageCache, SkipReport]:
        """``split`` decoded into an ``ImageCache``, read in one pass by this process (no rank split).

        For the validation set, "all" for ``eval``, or (``per_label``, ``train``) a bounded
        sample of training images, e.g. to imprint new head rows from class-mean features:
        the first ``per_label`` of each label in file order, stopping once every label has them.
        ``draft`` as in ``build_cache`` (``False`` to match ``pipeline()`` exactly).
        """
        counts = self.label_counts(split, val_fraction)
        n = int(np.minimum(counts, per_label).sum() if per_label else counts.sum())
        if n == 0:
            raise VitloraError(f"no {split} samples in {self.spec} (validation fraction {val_fraction})")
        if label2id is not None:
            check_known_labels(self.labels, label2id)
        elif per_label:
            raise ValueError("per_label needs label2id")
        shape, draft_wh = cache_geometry(pp, train, None)
        slots = CacheSlots(n, shape, memory_budget_bytes, disk_dir)
        work = partial(_decode_sample, pp=pp, train=train, work_size=None, draft=draft_wh if draft else None,
                       label2id=label2id)
        opts = _StreamOptions(val_fraction, split, 0, 0, 0, num_threads)
        report, paths, labels, taken = SkipReport(), [], [], Counter()
        try:
            for item in _readable(_decoded(self.spec, self.shards, frozenset(self.shards), work, opts, cycle=0), report):
                if per_label and taken[item.label] >= per_label:
                    continue
                taken[item.label] += 1
                slots.put(len(paths), item.image)
                paths.append(item.name)
                labels.append(item.label)
                if len(paths) == n:
                    break
            if not paths:
                raise VitloraError(f"no readable images in {self.spec}: {report.summary()}")
            if train:
                check_every_label_kept(self.split_labels(split, val_fraction), labels, label2id, report)
        except BaseException:
            slots.discard()
            raise
        return slots.finish(labels, paths), report


def discover_shards(spec: str, label: str | None) -> DataSource:
    """``discover()`` for shards: labels and counts from the index pass; ``samples`` stays empty."""
    if label is not None:
        raise VitloraError(f"--label is for a flat folder of one class; {spec} takes labels from its .cls files")
    if importlib.util.find_spec("webdataset") is None:
        raise VitloraError(f"{spec} needs the webdataset library; install the extra: pip install 'vitlora[webdataset]'")
    shards = ShardSet.open(spec)
    return DataSource([], "webdataset", os.path.dirname(shards.shards[0]) or ".", shards.labels,
                      shards.incomplete, shards=shards)


# ----------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class _StreamOptions:
    val_fraction: float
    split: str  # train | val | all
    shuffle_buffer: int  # 0: file order
    seed: int
    num_workers: int
    num_threads: int


@dataclass
class _Item:
    image: torch.Tensor | str  # decoded, or why it was skipped
    label: int
    name: str  # shard:key, for reports


def _wanted(sample: dict[str, Any], split: str, val_fraction: float) -> bool:
    """A complete sample (an image and a .cls) of the split; decided before any pixel is decoded."""
    if "cls" not in sample or not any(e in sample for e in IMAGE_EXTS):
        return False
    if split == "all":
        return True
    return (key_fraction(sample["__key__"]) < val_fraction) == (split == "val")


def _decode_sample(sample: dict[str, Any], pp: Preprocess, train: bool, work_size: int | None,
                   draft: tuple[int, int] | None, label2id: dict[str, int] | None) -> _Item:
    data = next(sample[e] for e in IMAGE_EXTS if e in sample)
    text = bytes(sample["cls"]).decode("utf-8", "replace").strip()
    label = label2id[text] if label2id is not None else -1
    name = f"{os.path.basename(str(sample.get('__url__', '')))}:{sample['__key__']}"
    return _Item(decode_resized(bytes(data), pp, train, work_size, draft), label, name)


def _rank_split(src: Iterator[Any], keep: frozenset[str]) -> Iterator[Any]:
    """The nodesplitter: only this rank's shards (chosen by ``ShardSet.rank_shards``) pass."""
    return (u for u in src if u["url"] in keep)


def _pipeline(shards: list[str], mine: frozenset[str], opts: _StreamOptions, cycle: int) -> Any:
    import webdataset as wds

    ds = wds.WebDataset(shards, shardshuffle=len(mine) if opts.shuffle_buffer else False,
                        seed=opts.seed * 100_003 + cycle, nodesplitter=partial(_rank_split, keep=mine),
                        workersplitter=wds.split_by_worker, empty_check=False)
    ds = ds.select(partial(_wanted, split=opts.split, val_fraction=opts.val_fraction))
    if opts.shuffle_buffer:
        ds = ds.shuffle(opts.shuffle_buffer, rng=random.Random(opts.seed * 100_003 + cycle))
    return ds


def _decoded(spec: str, shards: list[str], mine: frozenset[str], work: Callable[[dict[str, Any]], _Item],
             opts: _StreamOptions, cycle: int) -> Iterator[_Item]:
    """One pass over this rank's shards (``mine``): decoded items, in loader workers or a thread pool here."""
    ds = _pipeline(shards, mine, opts, cycle)
    try:
        if opts.num_workers > 0:
            loader = torch.utils.data.DataLoader(ds.map(work), batch_size=None, num_workers=opts.num_workers,
                                                 collate_fn=_identity)
            yield from loader
        else:
            for _, item in _ordered_map(work, ds, opts.num_threads, window=max(8, 4 * opts.num_threads)):
                yield item
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise VitloraError(f"cannot read the shards {printable(spec)}: {str(e).splitlines()[0] if str(e) else e}") \
            from None


def _identity(x: Any) -> Any:
    return x


def _cycle(passes: Iterator[Iterator[_Item]], spec: str) -> Iterator[_Item]:
    """Pass after pass (each reshuffled) so a rank with fewer samples can fill its epoch."""
    for one in passes:
        n = 0
        for item in one:
            n += 1
            yield item
        if n == 0:
            raise VitloraError(f"no training samples in this process's shards of {spec}")


def _readable(items: Iterator[_Item], report: SkipReport) -> Iterator[_Item]:
    """Decoded items only; each unreadable image is counted in ``report`` instead."""
    for item in items:
        report.total += 1
        if isinstance(item.image, str):
            report.add(item.name, item.image)
        else:
            yield item


def _batched(items: Iterator[_Item], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while chunk := list(itertools.islice(items, batch_size)):
        yield torch.stack([i.image for i in chunk]), torch.tensor([i.label for i in chunk], dtype=torch.long)


class ShardStream:
    """Shards as the training loop's data: ``len`` and ``batch(idx)`` like an ``ImageCache``, but streamed.

    The loop draws index batches from ``iterate_batches(len(stream), ...)`` and asks
    ``batch(part)`` for each micro-batch. A stream has no random access, so the indices
    only say *how many* samples come next: they are taken in the stream's own order
    (shuffled per epoch with a buffer, see ``ShardSet.train_batches``). ``len`` is every
    rank's epoch share times the world size, so each rank's index batches add up to
    exactly one pass over its shards. Anything that needs a sample's identity (extend
    mode's cached teacher outputs, a balanced sampler) cannot use a stream.
    """

    labels = None  # per-sample labels are not known ahead of the stream

    def __init__(self, shards: ShardSet, label2id: dict[str, int], pp: Preprocess, val_fraction: float,
                 seed: int, rank: int, world_size: int, num_threads: int, report: SkipReport,
                 chunk: int = 64) -> None:
        self.shards, self.world_size = shards, world_size
        self._per_rank = shards.samples_per_rank(val_fraction, world_size)
        self._batches = partial(shards.train_batches, label2id, pp, chunk, val_fraction, seed,
                                rank=rank, world_size=world_size, num_threads=num_threads, report=report)
        self._epochs = itertools.count(1)
        self._source: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())
        self._images: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def __len__(self) -> int:
        return self._per_rank * self.world_size

    def label_counts(self, val_fraction: float) -> np.ndarray:
        """Training samples per label (for class weights), from the index pass."""
        return self.shards.label_counts("train", val_fraction)

    def _take(self, n: int) -> None:
        while sum(len(t) for t in self._images) < n:
            nxt = next(self._source, None)
            if nxt is None:  # this epoch's pass is used up: the next one, reshuffled
                self._source = iter(self._batches(next(self._epochs)))
                continue
            self._images.append(nxt[0])
            self._labels.append(nxt[1])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``len(idx)`` samples: uint8 [b,3,S,S] at work size and long label ids."""
        n = len(idx)
        self._take(n)
        images, labels = torch.cat(self._images), torch.cat(self._labels)
        self._images, self._labels = [images[n:]], [labels[n:]]
        return images[:n], labels[:n]
