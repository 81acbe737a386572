"""Reading an upload and decoding it, with every size, pixel and time bound enforced.

* The body is read by hand (not by FastAPI's ``UploadFile``) so the size limit
  holds while bytes arrive: Content-Length is checked before reading, chunked
  bodies are counted, nothing larger is held in memory or spooled to disk, and
  a client that stops sending is cut off after ``read_timeout_s`` (408, the
  connection closed).
* Decoding refuses too many pixels from the header (``max_pixels``, far below
  Pillow's bomb limit), decodes big JPEGs at a reduced scale (libjpeg's DCT
  scaling, via ``load_rgb(draft=...)``) and shrinks any other big image right
  after decoding, so an image waiting for the model costs about 1 Mpx, not
  the 120 MB of a 40 Mpx RGB photo. Images whose shorter side is under
  ``2 * KEEP_SIDE`` are decoded exactly as ``vitlora predict`` decodes files.
"""

from __future__ import annotations

import functools
import io

import anyio
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from vitlora.data.decode import load_rgb
from vitlora.errors import BadImageError
from vitlora.serve.limits import ApiError, Limits

#: Formats we agree to decode (JPEG includes phones' MPO). Keeps PIL away from
#: plugins that shell out (EPS -> Ghostscript) or that nobody sends to a classifier.
WANTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
#: Room for multipart boundaries and part headers on top of the image limit.
MULTIPART_OVERHEAD = 64 * 1024
IMAGE_FIELD = "image"
#: Decoded images keep a shorter side of at least this (2x a 224 or 256 px model input).
KEEP_SIDE = 512


class _ImagePart:
    """Streams a multipart body, keeping only the first ``image`` part (size-capped)."""

    def __init__(self, content_type: str, limit: int) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise ApiError(400, "multipart body without a boundary in Content-Type")
        if len(boundary) > 70:  # RFC 2046; python-multipart itself fails (500) past 256
            raise ApiError(400, f"multipart boundary of {len(boundary)} characters: at most 70 are allowed")
        self.limit = limit
        self.data: bytearray | None = None
        self.done = False
        self._capturing = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_header_field": lambda d, s, e: self._add_header(name=d[s:e]),
                "on_header_value": lambda d, s, e: self._add_header(value=d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_end": self._end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except (MultipartParseError, FormParserError) as exc:
            raise ApiError(400, f"malformed multipart body: {exc}") from None

    def image_bytes(self) -> bytes:
        if not self.done:
            raise ApiError(400, "malformed multipart body: it ends before the closing boundary")
        if self.data is None:
            raise ApiError(400, f"multipart body has no '{IMAGE_FIELD}' field")
        return bytes(self.data)

    def _part_begin(self) -> None:
        self._disposition = b""
        self._capturing = False

    def _add_header(self, name: bytes = b"", value: bytes = b"") -> None:
        self._header_name += name
        self._header_value += value

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if options.get(b"name") == IMAGE_FIELD.encode() and self.data is None:
            self.data = bytearray()
            self._capturing = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._capturing and self.data is not None:
            if len(self.data) + (end - start) > self.limit:
                raise ApiError(413, "")  # message filled in by read_upload
            self.data += data[start:end]

    def _part_end(self) -> None:
        self._capturing = False

    def _end(self) -> None:
        self.done = True


def _too_big(limits: Limits) -> ApiError:
    return ApiError(413, f"upload too large: the limit is {limits.max_upload_mb:g} MB")


async def read_upload(request: Request, limits: Limits, multipart_ok: bool = True) -> bytes:
    """The image bytes from a raw or multipart body, never reading past the limit or the deadline."""
    content_type = request.headers.get("content-type", "")
    multipart = multipart_ok and content_type.lower().startswith("multipart/form-data")
    body_limit = limits.upload_bytes + (MULTIPART_OVERHEAD if multipart else 0)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length")
        if int(declared) > body_limit:
            raise _too_big(limits)
    part = _ImagePart(content_type, limits.upload_bytes) if multipart else None
    raw = bytearray()
    received = 0
    with anyio.move_on_after(limits.read_timeout_s) as deadline:
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > body_limit:
                    raise _too_big(limits)
                if part is not None:
                    part.feed(chunk)
                else:
                    raw += chunk
        except ClientDisconnect:
            raise ApiError(400, "client disconnected during upload") from None
        except ApiError as exc:
            raise (_too_big(limits) if exc.status == 413 else exc) from None
    if deadline.cancelled_caught:
        raise ApiError(
            408, f"upload not received within {limits.read_timeout_s:g} s", headers={"Connection": "close"}
        )
    data = part.image_bytes() if part is not None else bytes(raw)
    if not data:
        raise ApiError(400, f"empty image: send it as the request body or as multipart field '{IMAGE_FIELD}'")
    return data


@functools.cache
def image_formats() -> tuple[str, ...]:
    """The wanted formats this Pillow build can open (AVIF needs libavif)."""
    Image.init()
    return tuple(f for f in WANTED_FORMATS if f in Image.OPEN)


def _shrink(im: Image.Image) -> Image.Image:
    """Box-reduce by an integer factor so the shorter side stays in [KEEP_SIDE, 2 * KEEP_SIDE)."""
    factor = min(im.size) // KEEP_SIDE
    return im.reduce(factor) if factor >= 2 else im


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Bytes -> upright RGB image, decoded as `vitlora predict` decodes files (`load_rgb`), bounded.

    Only well-known raster formats are accepted (Pillow never shells out, e.g. to
    Ghostscript for EPS); more than ``max_pixels`` (or Pillow's bomb limit) is
    refused from the header before any pixel is decoded; big images come back
    reduced (see the module docstring). Runs in a worker thread.
    """
    try:
        with Image.open(io.BytesIO(data), formats=image_formats()):  # header only: format check
            pass
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"image has too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise ApiError(
            415, f"not an image, or an unsupported format (accepted: {', '.join(image_formats())})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise ApiError(415, f"corrupt or truncated image: {exc}") from None
    try:
        return _shrink(load_rgb(data, draft=(KEEP_SIDE // 2, KEEP_SIDE // 2), max_pixels=max_pixels))
    except BadImageError as exc:
        reason = str(exc)
        if reason.startswith("too large"):
            raise ApiError(413, f"image has too many pixels: {reason.removeprefix('too large: ')}") from None
        raise ApiError(415, f"corrupt or truncated image: {reason}") from None
