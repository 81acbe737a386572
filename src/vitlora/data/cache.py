"""Decode once, then train from uint8 tensors.

JPEG decoding dominates small-model training time on CPU, and a LoRA run
makes many passes over a small data set; so every image is decoded and
resized exactly once, in a thread pool (Pillow releases the GIL while
decoding and resizing), into one uint8 tensor. Augmentation then works on
whole batches of that tensor (see ``transforms.random_resized_crop_flip``).
When the tensor would not fit the memory budget it lives in a ``numpy.memmap``
on disk instead, so data sets larger than RAM still train (the OS page cache
does the rest).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from ..errors import BadImageError, VitloraError
from .decode import SkipReport, load_rgb, printable
from .samples import Sample
from .transforms import Preprocess, resize_for_eval, resize_for_train

T = TypeVar("T")
R = TypeVar("R")


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], num_threads: int, window: int) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) computed in a thread pool, in input order, at most ``window`` tasks in flight.

    Bounded (unlike ``Executor.map``, which submits everything up front) so a
    million-file predict run does not queue a million futures.
    """
    if num_threads <= 1:
        for item in items:
            yield item, fn(item)
        return
    with ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="vitlora-decode") as pool:
        pending: deque[tuple[T, Future[R]]] = deque()
        try:
            for item in items:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) >= window:
                    head, fut = pending.popleft()
                    yield head, fut.result()
            while pending:
                head, fut = pending.popleft()
                yield head, fut.result()
        finally:
            for _, fut in pending:  # consumer stopped early: do not decode the rest
                fut.cancel()


class ImageCache:
    """Decoded, resized uint8 images [N,3,S,S] with their label ids (-1: unknown) and paths."""

    def __init__(self, images: torch.Tensor | np.memmap, labels: torch.Tensor, paths: list[str]) -> None:
        self.images = images
        self.labels = labels
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def on_disk(self) -> bool:
        return isinstance(self.images, np.ndarray)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 [b,3,S,S], long [b]) for the given indices, on CPU."""
        idx = indices.to("cpu", torch.long)
        if isinstance(self.images, torch.Tensor):
            return self.images.index_select(0, idx), self.labels.index_select(0, idx)
        arr = self.images[idx.numpy()]  # fancy indexing copies out of the memmap
        return torch.from_numpy(arr), self.labels.index_select(0, idx)

    def per_label_sample(self, per_label: int, seed: int) -> "ImageCache":
        """A seeded sample of at most `per_label` images of each label, as a cache of its own (copied)."""
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=g)
        labels, taken, keep = self.labels.tolist(), Counter(), []
        for i in order.tolist():
            if taken[labels[i]] < per_label:
                taken[labels[i]] += 1
                keep.append(i)
        idx = torch.tensor(sorted(keep), dtype=torch.long)
        images, labels = self.batch(idx)
        return ImageCache(images, labels, [self.paths[i] for i in idx.tolist()])


def _remove(path: str, is_dir: bool) -> None:
    try:
        if is_dir:
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    except OSError:
        pass


def _where(samples: Sequence[Sample]) -> str:
    paths = [s.path for s in samples]
    if all(p.startswith("hf:") for p in paths):
        return paths[0].split("#", 1)[0]
    try:
        return os.path.commonpath([os.path.dirname(p) or "." for p in paths]) or "."
    except ValueError:
        return f"{len(paths)} files"


class CacheSlots:
    """Preallocated uint8 storage for ``n`` images: a tensor, or a memmap file when over the budget."""

    def __init__(self, n: int, shape: tuple[int, int, int], memory_budget_bytes: int,
                 disk_dir: str | None = None) -> None:
        self._cleanup: Callable[[], None] | None = None
        self.images: torch.Tensor | np.memmap
        if n * int(np.prod(shape)) <= memory_budget_bytes:
            self.images = torch.empty((n, *shape), dtype=torch.uint8)
            return
        made_dir = disk_dir is None
        folder = tempfile.mkdtemp(prefix="vitlora-cache-") if made_dir else disk_dir
        os.makedirs(folder, exist_ok=True)
        file = os.path.join(folder, f"vitlora-cache-{uuid.uuid4().hex[:12]}.u8")
        try:
            self.images = np.memmap(file, dtype=np.uint8, mode="w+", shape=(n, *shape))
        except OSError as e:
            raise VitloraError(f"cannot create the image cache in {folder}: {e.strerror or e}") from None
        target, is_dir = (folder, True) if made_dir else (file, False)
        self._cleanup = lambda: _remove(target, is_dir)

    def put(self, k: int, image: torch.Tensor) -> None:
        if isinstance(self.images, torch.Tensor):
            self.images[k] = image
        else:
            self.images[k] = image.numpy()

    def discard(self) -> None:
        if self._cleanup is not None:
            self._cleanup()

    def finish(self, labels: list[int], paths: list[str]) -> ImageCache:
        """The first ``len(paths)`` slots as a cache; a memmap file is removed with the cache."""
        m = len(paths)
        images = self.images
        if isinstance(images, torch.Tensor):
            images = images[:m] if m < len(images) else images
        else:
            images.flush()
            images = images[:m]  # a view: still backed by the same file
        cache = ImageCache(images, torch.tensor(labels, dtype=torch.long), paths)
        if self._cleanup is not None:
            weakref.finalize(cache, self._cleanup)
        return cache


def decode_resized(src: object, pp: Preprocess, train: bool, work_size: int | None = None,
                   draft: tuple[int, int] | None = None) -> torch.Tensor | str:
    """One image as the cache stores it (uint8 [3,H,W], train or eval geometry), or why it was skipped."""
    try:
        img = load_rgb(src, draft=draft)
        return resize_for_train(img, pp, work_size) if train else resize_for_eval(img, pp)
    except BadImageError as e:
        return str(e)


def cache_geometry(pp: Preprocess, train: bool, work_size: int | None = None) -> tuple[tuple[int, int, int],
                                                                                      tuple[int, int]]:
    """(stored image shape, JPEG draft target) for a training or an evaluation cache."""
    if train:
        side = pp.work_size(work_size)
        return (3, side, side), (side, side)
    return (3, pp.height, pp.width), pp.eval_target()


def check_known_labels(labels: Iterable[str | None], label2id: dict[str, int] | None) -> None:
    if label2id is None:
        return
    unknown = sorted({lab for lab in labels if lab is not None and lab not in label2id})
    if unknown:
        shown = ", ".join(unknown[:10]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
        raise VitloraError(f"labels not known to the model: {shown}; known labels: {', '.join(sorted(label2id))}")


def check_every_label_kept(wanted: Iterable[str | None], kept: Sequence[int], label2id: dict[str, int] | None,
                           report: SkipReport) -> None:
    """A class all of whose training images were unreadable is an empty class: an error, as in discovery."""
    if label2id is None:
        return
    have = set(kept)
    lost = sorted({lab for lab in wanted if lab is not None and label2id[lab] not in have})
    if lost:
        noun = "class" if len(lost) == 1 else "classes"
        raise VitloraError(f"{noun} {', '.join(printable(x) for x in lost[:10])} {'has' if len(lost) == 1 else 'have'} "
                           f"no readable training images ({report.summary(max_paths=3)}); "
                           "add readable images or remove the class")


def _decode_all(samples: Sequence[Sample], slots: CacheSlots, work: Callable[[Sample], torch.Tensor | str],
                label2id: dict[str, int] | None, num_threads: int,
                progress: bool) -> tuple[list[str], list[int], SkipReport]:
    """Decode ``samples`` into ``slots`` in order; unreadable ones go to the report."""
    report = SkipReport(total=len(samples))
    paths: list[str] = []
    labels: list[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(samples), desc="decoding images", unit="img", leave=False)
    try:
        for s, out in _ordered_map(work, samples, num_threads, window=max(8, 4 * num_threads)):
            if isinstance(out, str):
                report.add(s.path, out)
            else:
                slots.put(len(paths), out)
                paths.append(s.path)
                labels.append(label2id[s.label] if label2id is not None and s.label is not None else -1)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return paths, labels, report


def build_cache(
    samples: Sequence[Sample],
    label2id: dict[str, int] | None,
    pp: Preprocess,
    train: bool,
    strict: bool = False,
    num_threads: int | None = None,
    disk_dir: str | None = None,
    memory_budget_bytes: int = 4 << 30,
    progress: bool = False,
    work_size: int | None = None,
    draft: bool = True,
) -> tuple[ImageCache, SkipReport]:
    """Decode every sample once (``resize_for_train`` if ``train`` else ``resize_for_eval``).

    Unreadable images are skipped and reported (``strict``: raise instead,
    after trying them all so the message lists every bad file at once). In a
    training cache, a class left with no readable image is an error.
    ``draft`` lets big JPEGs decode at reduced scale; pass ``False`` for an
    evaluation that must match ``pipeline()`` exactly.
    """
    if not samples:
        raise VitloraError("no images to cache")
    if num_threads is None:  # nothing else runs while the cache is built: every usable core decodes
        from ..runtime import usable_cores

        num_threads = usable_cores()
    check_known_labels((s.label for s in samples), label2id)
    shape, draft_wh = cache_geometry(pp, train, work_size)
    slots = CacheSlots(len(samples), shape, memory_budget_bytes, disk_dir)

    def work(s: Sample) -> torch.Tensor | str:
        return decode_resized(s.image if s.image is not None else s.path, pp, train, work_size,
                              draft_wh if draft else None)

    try:
        paths, labels, report = _decode_all(samples, slots, work, label2id, num_threads, progress)
        if not paths:
            raise VitloraError(f"no readable images in {_where(samples)}: {report.summary()}")
        if strict and report.count:
            raise BadImageError(f"{report.summary(max_paths=5)} (strict mode: fix or remove them)")
        if train:
            check_every_label_kept((s.label for s in samples), labels, label2id, report)
    except BaseException:
        slots.discard()
        raise
    return slots.finish(labels, paths), report


def iterate_batches(
    n: int,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Index batches for one epoch; under DDP, this rank's share of one shared permutation.

    Every rank must pass a generator in the same state (same seed + epoch) so
    all ranks draw the same permutation; rank ``r`` then takes positions
    ``r, r + world_size, ...``. To give every rank the same number of batches
    (a collective op waiting on a rank that finished early would hang), the
    permutation is padded by wrapping around, as ``DistributedSampler`` does;
    with ``drop_last`` it is truncated instead and the last partial batch dropped.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if n <= 0:
        return
    if shuffle:
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=device).cpu()
    else:
        order = torch.arange(n)
    if drop_last:
        total = (n // world_size) * world_size
        order = order[:total]
    else:
        total = -(-n // world_size) * world_size
        if total > n:
            reps = -(-total // n)
            order = order.repeat(reps)[:total]
    mine = order[rank::world_size]
    for start in range(0, len(mine), batch_size):
        idx = mine[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        yield idx


def stream_decoded(
    paths: Sequence[str],
    pp: Preprocess,
    batch_size: int,
    num_threads: int = 2,
    prefetch: int = 2,
    draft: bool = False,
) -> Iterator[tuple[torch.Tensor, list[str], SkipReport]]:
    """Decode files ahead of the model for ``predict``: yields (uint8 [b,3,H,W], paths, skips).

    Up to ``prefetch`` batches are decoded in the background while the caller
    runs the model on the current one. Batches are filled with readable images
    (``b == batch_size`` except the last); each item's report covers the inputs
    consumed since the previous item. A final item with ``b == 0`` is yielded
    only to report trailing unreadable files. ``draft`` is off by default so
    predictions match ``pipeline("image-classification")``.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    draft_wh = pp.eval_target() if draft else None

    def work(p: str) -> torch.Tensor | str:
        return decode_resized(p, pp, False, draft=draft_wh)

    window = max(1, prefetch) * batch_size
    tensors: list[torch.Tensor] = []
    names: list[str] = []
    report = SkipReport()
    for p, out in _ordered_map(work, paths, num_threads, window):
        report.total += 1
        if isinstance(out, str):
            report.add(p, out)
            continue
        tensors.append(out)
        names.append(p)
        if len(tensors) == batch_size:
            yield torch.stack(tensors), names, report
            tensors, names, report = [], [], SkipReport()
    if tensors or report.total:
        batch = torch.stack(tensors) if tensors else torch.empty((0, 3, pp.height, pp.width), dtype=torch.uint8)
        yield batch, names, report
