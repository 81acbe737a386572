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
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from ..errors import BadImageError, VitloraError
from .decode import SkipReport, load_rgb
from .sources import Sample
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
    after trying them all so the message lists every bad file at once).
    ``draft`` lets big JPEGs decode at reduced scale; pass ``False`` for an
    evaluation that must match ``pipeline()`` exactly.
    """
    if not samples:
        raise VitloraError("no images to cache")
    if num_threads is None:  # nothing else runs while the cache is built: every usable core decodes
        from ..runtime import usable_cores

        num_threads = usable_cores()
    if label2id is not None:
        unknown = sorted({s.label for s in samples if s.label is not None and s.label not in label2id})
        if unknown:
            shown = ", ".join(unknown[:10]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
            raise VitloraError(f"labels not known to the model: {shown}; known labels: {', '.join(sorted(label2id))}")

    if train:
        side = pp.work_size(work_size)
        shape = (3, side, side)
        draft_wh = (side, side)
    else:
        shape = (3, pp.height, pp.width)
        draft_wh = pp.eval_target()
    n = len(samples)
    nbytes = n * int(np.prod(shape))

    cleanup: Callable[[], None] | None = None
    images: torch.Tensor | np.memmap
    if nbytes <= memory_budget_bytes:
        images = torch.empty((n, *shape), dtype=torch.uint8)
    else:
        made_dir = disk_dir is None
        folder = tempfile.mkdtemp(prefix="vitlora-cache-") if made_dir else disk_dir
        os.makedirs(folder, exist_ok=True)
        file = os.path.join(folder, f"vitlora-cache-{uuid.uuid4().hex[:12]}.u8")
        try:
            images = np.memmap(file, dtype=np.uint8, mode="w+", shape=(n, *shape))
        except OSError as e:
            raise VitloraError(f"cannot create the image cache in {folder}: {e.strerror or e}") from None
        target, is_dir = (folder, True) if made_dir else (file, False)
        cleanup = lambda: _remove(target, is_dir)  # noqa: E731

    def work(s: Sample) -> torch.Tensor | str:
        try:
            img = load_rgb(s.image if s.image is not None else s.path, draft=draft_wh if draft else None)
            return resize_for_train(img, pp, work_size) if train else resize_for_eval(img, pp)
        except BadImageError as e:
            return str(e)

    report = SkipReport(total=n)
    keep_paths: list[str] = []
    keep_labels: list[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="decoding images", unit="img", leave=False)
    try:
        for s, out in _ordered_map(work, samples, num_threads, window=max(8, 4 * num_threads)):
            if isinstance(out, str):
                report.add(s.path, out)
            else:
                k = len(keep_paths)
                if isinstance(images, torch.Tensor):
                    images[k] = out
                else:
                    images[k] = out.numpy()
                keep_paths.append(s.path)
                keep_labels.append(label2id[s.label] if label2id is not None and s.label is not None else -1)
            if bar is not None:
                bar.update(1)
    except BaseException:
        if cleanup is not None:
            cleanup()
        raise
    finally:
        if bar is not None:
            bar.close()

    if not keep_paths:
        if cleanup is not None:
            cleanup()
        raise VitloraError(f"no readable images in {_where(samples)}: {report.summary()}")
    if strict and report.count:
        if cleanup is not None:
            cleanup()
        raise BadImageError(f"{report.summary(max_paths=5)} (strict mode: fix or remove them)")

    m = len(keep_paths)
    if isinstance(images, torch.Tensor):
        images = images[:m] if m < n else images
    else:
        images.flush()
        images = images[:m]  # a view: still backed by the same file
    cache = ImageCache(images, torch.tensor(keep_labels, dtype=torch.long), keep_paths)
    if cleanup is not None:
        weakref.finalize(cache, cleanup)
    return cache, report


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
        try:
            return resize_for_eval(load_rgb(p, draft=draft_wh), pp)
        except BadImageError as e:
            return str(e)

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
