"""Real photos to verify an export on: an int8 model's agreement with fp32 means something only
on the kind of images the model will see, so `export --int8` takes them from the run's own
training data (and its negatives) unless the user names others."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vitlora.errors import VitloraError

# 99 % agreement over 64 photos would allow no single near-tie flip; 128 allow one.
N_PHOTOS = 128


def photos(files: Sequence[str], preprocess: Any, n: int = N_PHOTOS) -> torch.Tensor:
    """Up to ``n`` of ``files``, spread evenly over the list (so over its classes), decoded and
    normalized as for prediction: [n, C, H, W] float32. Unreadable files are skipped."""
    from vitlora.data import normalize, stream_decoded

    if n < 1:
        raise VitloraError(f"need at least 1 verification photo, asked for {n}")
    chosen = list(files)[:: max(1, len(files) // n)][:n]
    batches = [normalize(b, preprocess) for b, names, _ in stream_decoded(chosen, preprocess, 32) if len(names)]
    if not batches:
        raise VitloraError(f"none of the {len(chosen)} verification photos could be read")
    return torch.cat(batches)


def run_photos(settings: dict, preprocess: Any, n: int = N_PHOTOS) -> torch.Tensor:
    """Verification photos of a run (``settings`` is its ``vitlora.json``): its training data
    plus its negatives, if any, as files."""
    from vitlora.data import discover

    config = settings.get("config", {})
    specs = [spec for spec in (config.get("data"), config.get("negatives")) if spec]
    files: list[str] = []
    try:
        for spec in specs:
            files += [s.path for s in discover(spec, config.get("label")).samples if s.image is None]
    except VitloraError as e:
        raise VitloraError(f"the run's training photos are needed to verify an int8 export ({e}); "
                           "name other photos to verify on") from e
    if not files:
        raise VitloraError("the run's training data has no image files to verify an int8 export on; "
                           "name photos to verify on")
    return photos(files, preprocess, n)
