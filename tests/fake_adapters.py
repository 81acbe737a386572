"""A fake serve adapter for the server tests: labels an image by its mean colour.

Deterministic, so tests can assert real answers; counts calls and threads to prove batching.
"""

from __future__ import annotations

import math
import threading
import time
from typing import cast

from PIL import Image

PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "cyan": (30, 210, 210),
    "magenta": (210, 30, 210),
    "yellow": (230, 220, 30),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}


class ColourAdapter:
    """Fake adapter: softmax over the distance from the image's mean colour to each label's colour."""

    def __init__(self, name: str, labels: list[str], delay_s: float = 0.0, poison: str | None = None):
        self.name = name
        self.base_model = "fake/vit-tiny"
        self.labels = labels
        self.metrics = {"val_accuracy": 0.97, "epochs": 5}
        self.delay_s = delay_s
        self.poison = poison  # images closest to this colour make predict raise
        self.calls: list[int] = []
        self.threads: set[int] = set()
        self.overlaps = 0
        self._busy = threading.Lock()

    def reset(self) -> None:
        self.calls.clear()
        self.threads.clear()
        self.overlaps = 0

    def scores(self, image: Image.Image) -> list[tuple[str, float]]:
        mean = cast(tuple[int, int, int], image.convert("RGB").resize((1, 1), Image.Resampling.BOX).getpixel((0, 0)))
        logits = [-math.dist(mean, PALETTE[label]) / 30.0 for label in self.labels]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        total = sum(exps)
        return sorted(((lab, e / total) for lab, e in zip(self.labels, exps)), key=lambda p: -p[1])

    def predict(self, images: list[Image.Image], top_k: int) -> list[list[tuple[str, float]]]:
        if not self._busy.acquire(blocking=False):
            self.overlaps += 1  # the server promised never to call us concurrently
            self._busy.acquire()
        try:
            self.calls.append(len(images))
            self.threads.add(threading.get_ident())
            time.sleep(self.delay_s)
            results = [self.scores(img)[:top_k] for img in images]
            if self.poison and any(r[0][0] == self.poison for r in results):
                raise RuntimeError(f"cannot classify {self.poison} images")
            return results
        finally:
            self._busy.release()


class ColourGroup:
    """Fake batch group: adapters on one 'base' answered in one call, each row by its own adapter."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.members: dict[str, ColourAdapter] = {}
        self.calls: list[list[str]] = []
        self.delay_s = delay_s

    def add(self, adapter: ColourAdapter) -> ColourAdapter:
        self.members[adapter.name] = adapter
        adapter.batch_group = self  # type: ignore[attr-defined]
        return adapter

    def predict_mixed(self, images: list[Image.Image], names: list[str], top_k: int) -> list[list[tuple[str, float]]]:
        self.calls.append(list(names))
        time.sleep(self.delay_s)
        return [self.members[n].scores(im)[:top_k] for im, n in zip(images, names)]
