"""What every endpoint shares: the adapters, the limits, and one request's path to an answer.

A request is *admitted* (or refused with 503 + Retry-After when ``max_queue``
requests are already in the server), its bytes are read under a deadline,
decoded in a worker thread (at most ``max_decodes`` at once, each capped at
``max_pixels``), and queued for the model. So memory and threads stay bounded
however many clients arrive, and no client can hold a slot forever.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

import anyio
import anyio.to_thread
from PIL import Image

from vitlora.errors import VitloraError
from vitlora.serve.limits import ApiError, Limits
from vitlora.serve.batching import BatcherClosed, BatchPool, MixedPredictFn, PredictionFailed, single

DEFAULT_TOP_K = 5


@runtime_checkable
class Adapter(Protocol):
    """What the server needs from one loaded LoRA run (implemented by the model side).

    An adapter may also have ``batch_group``: an object with
    ``predict_mixed(images, adapter_names, top_k)`` shared by the adapters that
    can run in one forward pass; requests for them are then batched together.
    It may also have ``explain(image, label) -> bytes``: a PNG of where the
    model looked for ``label``, thread-safe against ``predict`` (``?explain=true``).
    """

    name: str  # unique, used in ?adapter=NAME
    base_model: str
    labels: list[str]
    metrics: dict  # JSON-serialisable summary, e.g. {"val_accuracy": 0.97, "epochs": 5}

    def predict(self, images: list[Image.Image], top_k: int) -> list[list[tuple[str, float]]]:
        """Blocking; called from one worker thread at a time, never concurrently."""
        ...


def check_adapters(adapters: Sequence[Adapter]) -> dict[str, Adapter]:
    """Name -> adapter, refusing what the server cannot serve."""
    if not adapters:
        raise VitloraError("serve needs at least one adapter (run directory)")
    by_name: dict[str, Adapter] = {}
    for adapter in adapters:
        if not isinstance(adapter, Adapter):
            raise VitloraError(f"{adapter!r} lacks what serve needs: name, base_model, labels, metrics, predict")
        if not adapter.name:
            raise VitloraError("an adapter has an empty name")
        if adapter.name in by_name:
            raise VitloraError(f"two adapters are named {adapter.name!r}; names must be unique")
        if not adapter.labels:
            raise VitloraError(f"adapter {adapter.name!r} has no labels")
        by_name[adapter.name] = adapter
    return by_name


def _batch_groups(by_name: dict[str, Adapter]) -> dict[str, tuple[object, MixedPredictFn]]:
    groups: dict[str, tuple[object, MixedPredictFn]] = {}
    for name, adapter in by_name.items():
        group = getattr(adapter, "batch_group", None)
        if group is not None and callable(getattr(group, "predict_mixed", None)):
            groups[name] = (id(group), group.predict_mixed)  # groups need not be hashable
        else:
            groups[name] = (name, single(adapter.predict))
    return groups


class Service:
    """Adapters, limits and the batch pool behind every endpoint."""

    def __init__(self, adapters: Sequence[Adapter], limits: Limits, max_batch: int, max_wait_ms: float) -> None:
        self.by_name = check_adapters(adapters)
        self.default_name = adapters[0].name
        self.limits = limits
        self.pool = BatchPool(_batch_groups(self.by_name), max_batch, max_wait_ms)
        self.in_flight = 0
        self._decoders: anyio.CapacityLimiter | None = None

    async def start(self) -> None:
        """Per event loop: fresh batchers and decode slots (an app may be started twice)."""
        from vitlora.serve.upload import image_formats

        self.pool.reopen()
        self._decoders = anyio.CapacityLimiter(self.limits.max_decodes)
        await anyio.to_thread.run_sync(image_formats)  # load PIL plugins now, not on request 1

    def adapter(self, name: str | None) -> Adapter:
        chosen = self.by_name.get(self.default_name if name is None else name)
        if chosen is None:
            raise ApiError(404, f"unknown adapter {name!r}; available: {', '.join(self.by_name)}")
        return chosen

    def top_k(self, adapter: Adapter, top_k: int | None) -> int:
        n = len(adapter.labels)
        if top_k is None:
            return min(DEFAULT_TOP_K, n)
        if not 1 <= top_k <= n:
            raise ApiError(422, f"top_k must be between 1 and {n} for adapter {adapter.name!r}")
        return top_k

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """Hold one of ``max_queue`` request slots, or answer 503 with Retry-After."""
        if self.in_flight >= self.limits.max_queue:
            raise ApiError(
                503,
                f"server busy: {self.in_flight} requests in progress; retry in {self.limits.retry_after_s} s",
                headers={"Retry-After": str(self.limits.retry_after_s)},
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def decode(self, data: bytes) -> Image.Image:
        """Decode in a worker thread, at most ``max_decodes`` at once."""
        from vitlora.serve.upload import decode_image

        return await anyio.to_thread.run_sync(
            decode_image, data, self.limits.max_pixels, limiter=self._decoders
        )

    async def classify(self, adapter: Adapter, image: Image.Image, top_k: int) -> list[tuple[str, float]]:
        """Queue a decoded image for the model; model failures become 500, shutdown 503."""
        try:
            return await self.pool.submit(adapter.name, image, top_k)
        except PredictionFailed as exc:
            raise ApiError(500, str(exc)) from None
        except BatcherClosed as exc:
            raise ApiError(503, str(exc)) from None

    @staticmethod
    def explainable(adapter: Adapter) -> bool:
        """Whether the adapter draws explanations (``?explain=true``); the test fakes do not."""
        return callable(getattr(adapter, "explain", None))

    def check_explainable(self, adapter: Adapter) -> None:
        """422 before the upload is read when the adapter cannot draw explanations."""
        if not self.explainable(adapter):
            raise ApiError(422, f"adapter {adapter.name!r} cannot explain its answers (explain=true)")

    async def explain(self, adapter: Adapter, image: Image.Image, label: str) -> str:
        """The adapter's overlay of ``label`` as a PNG data URL, drawn in a worker thread."""
        self.check_explainable(adapter)
        try:
            png = await anyio.to_thread.run_sync(adapter.explain, image, label)  # type: ignore[attr-defined]
        except ApiError:
            raise
        except VitloraError as exc:  # e.g. a model without a patch grid
            raise ApiError(422, f"adapter {adapter.name!r} cannot explain this answer: {exc}") from None
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
