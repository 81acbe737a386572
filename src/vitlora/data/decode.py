"""Decode one image to RGB robustly, with the same pixels transformers would get.

Why this module exists: training on pixels that differ from what
``pipeline("image-classification")`` feeds the model at inference time is a
silent accuracy bug. ``transformers.image_utils.load_image`` does exactly two
things to a file: ``ImageOps.exif_transpose`` and a plain ``.convert("RGB")``
(alpha is *dropped*, not composited; the image processor's own white-background
compositing never runs because the image is already RGB by then). We do the
same, so predictions match the pipeline bit for bit, with these deliberate
exceptions:

* 16-bit / 32-bit / float images (modes ``I;16*``, ``I``, ``F``): Pillow's
  ``convert("RGB")`` clips every value above 255 to white, which turns a normal
  16-bit photo or scan into a blown-out silhouette. We scale to 8 bits instead
  (``I;16``: ``v / 257``, so 65535 -> 255). Here vitlora and the pipeline differ,
  on purpose.
* ``draft=``: large JPEGs may be decoded at 1/2, 1/4 or 1/8 scale (see
  :func:`load_rgb`), which changes pixels slightly; callers that must match the
  pipeline exactly (``predict``) leave it off.

Every failure becomes a :class:`~vitlora.errors.BadImageError` whose message is
a short reason ("truncated", "not an image", ...) so callers can skip and report.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image

from ..errors import BadImageError

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: PIL.Image.Transpose.FLIP_LEFT_RIGHT,
    3: PIL.Image.Transpose.ROTATE_180,
    4: PIL.Image.Transpose.FLIP_TOP_BOTTOM,
    5: PIL.Image.Transpose.TRANSPOSE,
    6: PIL.Image.Transpose.ROTATE_270,
    7: PIL.Image.Transpose.TRANSVERSE,
    8: PIL.Image.Transpose.ROTATE_90,
}
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")

ImageSource = Any  # str path | bytes | PIL.Image.Image | {"bytes": ..., "path": ...}


def _check_pixels(width: int, height: int) -> None:
    """Refuse decompression bombs from the header alone, before any pixel is decoded."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise BadImageError(f"too large: {width}x{height} pixels (limit {int(limit)})")


def _open(src: ImageSource) -> PIL.Image.Image:
    """Open lazily (header only); map every way of failing to a short reason."""
    if isinstance(src, dict):
        data, path = src.get("bytes"), src.get("path")
        if data is not None:
            src = bytes(data)
        elif path:
            src = str(path)
        else:
            raise BadImageError("no image data")
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            return PIL.Image.open(io.BytesIO(bytes(src)))
        if isinstance(src, (str, os.PathLike)):
            if not stat.S_ISREG(os.stat(src).st_mode):  # opening a FIFO would block forever
                raise BadImageError("not a regular file")
            return PIL.Image.open(os.fspath(src))
    except FileNotFoundError:
        raise BadImageError("file not found") from None
    except IsADirectoryError:
        raise BadImageError("is a folder") from None
    except PermissionError:
        raise BadImageError("permission denied") from None
    except PIL.Image.DecompressionBombError as e:
        raise BadImageError(f"too large: {e}") from None
    except PIL.UnidentifiedImageError:
        raise BadImageError("not an image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"unreadable: {e}") from None
    raise TypeError(f"cannot decode an image from {type(src).__name__}")


def _orientation(im: PIL.Image.Image) -> int:
    try:
        return int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # corrupt EXIF must not lose the image; transformers would fail the same way
        return 1


def _high_depth_to_l(im: PIL.Image.Image) -> PIL.Image.Image:
    """Scale a 16/32-bit or float single-channel image to 8 bits instead of clipping."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        a8 = (a.astype(np.float32) / 257.0).round()
    else:
        a = a.astype(np.float64)
        hi = float(np.nanmax(a)) if a.size else 0.0
        if im.mode == "F" and hi <= 1.0:
            scale = 255.0  # float images in [0, 1]
        elif hi <= 255.0:
            scale = 1.0  # already 8-bit range
        elif hi <= 65535.0:
            scale = 1.0 / 257.0  # 16-bit data stored as 32-bit
        else:
            scale = 255.0 / hi
        a8 = np.nan_to_num(a * scale).round()
    return PIL.Image.fromarray(np.clip(a8, 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: PIL.Image.Image) -> PIL.Image.Image:
    """``im.convert("RGB")`` as transformers does it (alpha dropped), but 16-bit scaled, not clipped."""
    if im.mode == "RGB":
        return im
    if im.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_l(im).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        # Same RGB values as P->RGB, without Pillow's "transparency expressed in bytes" warning.
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def load_rgb(src: ImageSource, draft: tuple[int, int] | None = None) -> PIL.Image.Image:
    """Decode ``src`` (path, bytes, PIL image or HF ``{"bytes", "path"}`` dict) to an upright RGB image.

    ``draft=(w, h)`` is the size the caller will resize to. For a JPEG at least
    twice that size in both dimensions we ask libjpeg to decode at a reduced
    scale (1/2, 1/4 or 1/8, chosen so the result stays >= 2x the target), which
    makes decoding big photos several times faster. The DCT-domain downscale is
    not bit-identical to a full decode followed by the resize: after the final
    resize to 224x224 pixels typically differ by a few levels out of 255
    (see the tests), which is harmless for training but is why ``predict``
    decodes without it.
    """
    if isinstance(src, PIL.Image.Image):
        im = src
        _check_pixels(*im.size)
    else:
        im = _open(src)
        _check_pixels(*im.size)
    orientation = _orientation(im)
    try:
        if draft is not None and im.format == "JPEG":
            w, h = draft
            if orientation in (5, 6, 7, 8):  # stored sideways: target is in upright coordinates
                w, h = h, w
            if im.width >= 2 * w and im.height >= 2 * h:
                im.draft("RGB", (2 * w, 2 * h))
        im.load()
        if orientation in _TRANSPOSE:
            im = im.transpose(_TRANSPOSE[orientation])
        return to_rgb(im)
    except BadImageError:
        raise
    except PIL.Image.DecompressionBombError as e:
        raise BadImageError(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        if "truncated" in msg or "broken data stream" in msg or isinstance(e, EOFError):
            raise BadImageError("truncated") from None
        raise BadImageError(f"corrupt: {msg}") from None


def printable(path: str) -> str:
    """A path safe to print as UTF-8 (undecodable file-name bytes as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace") if isinstance(path, str) else str(path)


@dataclass
class SkipReport:
    """Which inputs were skipped and why, so one bad file never kills a run silently."""

    total: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.skipped)

    def add(self, path: str, reason: str) -> None:
        self.skipped.append((path, reason))

    def summary(self, max_paths: int = 3) -> str:
        """``"skipped 2 of 150 images: a.jpg (truncated), b.jpg (not an image)"``; ``""`` if none."""
        if not self.skipped:
            return ""
        shown = ", ".join(f"{printable(p)} ({r})" for p, r in self.skipped[:max_paths])
        more = self.count - max_paths
        tail = f", and {more} more" if more > 0 else ""
        noun = "image" if self.total == 1 else "images"
        return f"skipped {self.count} of {self.total} {noun}: {shown}{tail}"

