"""Dynamic micro-batching of prediction requests.

Why: a vision transformer forward pass on 16 images costs far less than 16
passes on one image each, and the model side is only safe to call from one
thread at a time (several LoRA adapters share one base model). So every *batch
group* gets its own queue, a collector task on the event loop gathers whatever
is waiting (up to ``max_batch``, lingering at most ``max_wait_ms`` for more),
and the batch runs on ONE shared inference thread, keeping the event loop free
to accept uploads while the model works.

A batch group is either one adapter, or every adapter on one base model when
the model side can run them together (an adapter with a ``batch_group``
attribute: peft's per-sample ``adapter_names``, each row with its own head).
Then requests spread over 16 adapters still share one forward pass instead of
16 small ones.

A failing batch is retried one image at a time, so one poisoned image fails
only its own request, and no exception ever escapes a collector task.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from vitlora.errors import VitloraError

log = logging.getLogger(__name__)

Prediction = list[tuple[str, float]]
PredictFn = Callable[[list[Image.Image], int], Sequence[Sequence[tuple[str, float]]]]
#: ``(images, adapter name per image, top_k) -> ranked labels per image``.
MixedPredictFn = Callable[[list[Image.Image], list[str], int], Sequence[Sequence[tuple[str, float]]]]


class PredictionFailed(VitloraError):
    """The model raised while predicting this request's image (the server keeps going)."""


class BatcherClosed(VitloraError):
    """The server is shutting down and no longer accepts predictions."""


@dataclass
class _Job:
    image: Image.Image
    adapter: str
    top_k: int
    future: asyncio.Future[Prediction] = field(repr=False)


class Batcher:
    """Collects concurrent requests for one batch group into batched ``predict`` calls.

    The collector task is bound to the event loop of the first ``submit``;
    if the loop changes (a test client that runs each request on a fresh
    loop), it is restarted on the new one rather than hanging.
    """

    def __init__(
        self,
        name: str,
        predict: MixedPredictFn,
        executor: ThreadPoolExecutor,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
    ) -> None:
        if max_batch < 1:
            raise VitloraError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise VitloraError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.name = name
        self._predict = predict
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._pending: collections.deque[_Job] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def submit(self, image: Image.Image, top_k: int, adapter: str = "") -> Prediction:
        """Queue one image for ``adapter`` and wait for its top-k; raises PredictionFailed / BatcherClosed."""
        if self._closed:
            raise BatcherClosed("server is shutting down")
        loop = asyncio.get_running_loop()
        self._ensure_running(loop)
        assert self._wakeup is not None
        job = _Job(image, adapter or self.name, top_k, loop.create_future())
        self._pending.append(job)
        self._wakeup.set()
        return await job.future

    def _ensure_running(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is not None and self._loop is loop and not self._task.done():
            return
        self._loop = loop
        self._wakeup = asyncio.Event()
        # Jobs left from a dead loop can never be answered; their futures died with it.
        self._pending.clear()
        self._task = loop.create_task(self._collect(), name=f"vitlora-batcher-{self.name}")

    async def _collect(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Linger briefly so requests arriving together share one forward pass.
            deadline = loop.time() + self.max_wait
            while len(self._pending) < self.max_batch and not self._closed:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            batch = [job for job in batch if not job.future.done()]  # client went away
            if batch:
                await self._run_batch(loop, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        try:
            results = await loop.run_in_executor(self._executor, self._call_predict, batch)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the collector
            if len(batch) == 1:
                log.exception("adapter %r: predict failed", self.name)
                _fail(batch[0], exc)
                return
            log.warning("adapter %r: batch of %d failed (%s); retrying one by one", self.name, len(batch), exc)
            for job in batch:
                await self._run_batch(loop, [job])
            return
        for job, result in zip(batch, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    def _call_predict(self, batch: list[_Job]) -> list[Prediction]:
        """Runs on the inference thread: one predict call with the largest top_k asked."""
        k = max(job.top_k for job in batch)
        raw = self._predict([job.image for job in batch], [job.adapter for job in batch], k)
        if len(raw) != len(batch):
            raise RuntimeError(f"predict returned {len(raw)} results for {len(batch)} images")
        out: list[Prediction] = []
        for job, preds in zip(batch, raw, strict=True):
            ranked = sorted(((str(label), float(score)) for label, score in preds), key=lambda p: -p[1])
            out.append(ranked[: job.top_k])
        return out

    async def aclose(self) -> None:
        """Finish queued work, then stop the collector; later submits get BatcherClosed."""
        self._closed = True
        task = self._task
        if task is None or task.done():
            return
        if self._loop is not asyncio.get_running_loop():
            task.cancel()  # belongs to a loop we cannot await from here
            return
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=30)
        except asyncio.TimeoutError:
            log.warning("adapter %r: batcher did not drain in 30 s; cancelling", self.name)
            task.cancel()
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(BatcherClosed("server is shutting down"))
        self._pending.clear()


def _fail(job: _Job, exc: BaseException) -> None:
    if not job.future.done():
        msg = f"prediction failed: {type(exc).__name__}: {exc}"
        job.future.set_exception(PredictionFailed(msg[:500]))


def single(predict: PredictFn) -> MixedPredictFn:
    """A one-adapter ``predict`` as a batch group's predict (the names are all the same)."""
    return lambda images, _names, top_k: predict(images, top_k)


class BatchPool:
    """One Batcher per batch group, all sharing one inference thread.

    ``groups`` maps adapter name -> (group key, predict of that group); adapters
    with the same key share a queue and a forward pass. Created eagerly (cheap:
    threads start on first use); ``aclose`` shuts the thread down. ``reopen``
    exists because one app object may be started and stopped more than once
    (e.g. several ``with TestClient(app)`` blocks).
    """

    def __init__(
        self, groups: dict[str, tuple[object, MixedPredictFn]], max_batch: int, max_wait_ms: float
    ) -> None:
        self._groups = groups
        self._max_batch = max_batch
        self._max_wait_ms = max_wait_ms
        self._lock = threading.Lock()
        self._build()

    def _build(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitlora-infer")
        by_key: dict[object, Batcher] = {}
        self.batchers: dict[str, Batcher] = {}
        for name, (key, fn) in self._groups.items():
            if key not in by_key:
                by_key[key] = Batcher(name, fn, self.executor, self._max_batch, self._max_wait_ms)
            self.batchers[name] = by_key[key]
        self._unique = list(by_key.values())
        self.closed = False

    def reopen(self) -> None:
        """Start fresh batchers after an ``aclose`` (no-op while open)."""
        with self._lock:
            if self.closed:
                self._build()

    def __getitem__(self, name: str) -> Batcher:
        return self.batchers[name]

    async def submit(self, adapter: str, image: Image.Image, top_k: int) -> Prediction:
        """Queue ``image`` for ``adapter`` in its group's batcher."""
        return await self.batchers[adapter].submit(image, top_k, adapter)

    async def aclose(self) -> None:
        """Drain every adapter's queue, then stop the inference thread."""
        await asyncio.gather(*(b.aclose() for b in self._unique))
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown, True)
        self.closed = True
