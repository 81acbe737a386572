"""The HTTP API and web page behind ``vitlora serve``.

Design choices, and why:

* The upload body is read by hand (not by FastAPI's ``UploadFile``) so the
  size limit is enforced while bytes arrive: Content-Length is checked before
  reading, chunked bodies are counted, and nothing larger than the limit is
  ever held in memory or spooled to disk.
* Image decoding runs in a worker thread and inference on the single
  inference thread of :mod:`vitlora.serve.batching`, so the event loop only
  shuffles bytes and stays responsive under load.
* Every error is ``{"error": "..."}`` JSON with a meaningful status, so
  scripts and the web page can show the message as is; no request can take
  the server down.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import io
import logging
import time
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any, Protocol, runtime_checkable

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from vitlora.data.decode import load_rgb
from vitlora.errors import BadImageError, VitloraError
from vitlora.serve.batching import BatcherClosed, BatchPool, PredictionFailed

log = logging.getLogger(__name__)

#: Formats we agree to decode (JPEG includes phones' MPO). Keeps PIL away from
#: plugins that shell out (EPS -> Ghostscript) or that nobody sends to a classifier.
WANTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
#: Room for multipart boundaries and part headers on top of the image limit.
MULTIPART_OVERHEAD = 64 * 1024
DEFAULT_TOP_K = 5
IMAGE_FIELD = "image"


@runtime_checkable
class Adapter(Protocol):
    """What the server needs from one loaded LoRA run (implemented by the model side)."""

    name: str  # unique, used in ?adapter=NAME
    base_model: str
    labels: list[str]
    metrics: dict  # JSON-serialisable summary, e.g. {"val_accuracy": 0.97, "epochs": 5}

    def predict(self, images: list[Image.Image], top_k: int) -> list[list[tuple[str, float]]]:
        """Blocking; called from one worker thread at a time, never concurrently."""
        ...


class ApiError(VitloraError):
    """An error answered to the client as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- response models (they document the API in /openapi.json) -----------------


class ErrorBody(BaseModel):
    error: str = Field(description="Human-readable message.")


class AdapterInfo(BaseModel):
    name: str
    base_model: str
    num_labels: int
    metrics: dict[str, Any]
    default: bool = Field(description="Used when ?adapter= is omitted; always listed first.")


class Score(BaseModel):
    label: str
    score: float = Field(description="Probability in [0, 1].")


class PredictResponse(BaseModel):
    adapter: str
    top_k: list[Score] = Field(description="Best first.")
    latency_ms: float = Field(description="Server time from request to answer, upload included.")


class Health(BaseModel):
    status: str = "ok"


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Empty body, missing `image` field or malformed multipart.",
        401: "Missing or wrong bearer token (only when the server has a token).",
        404: "Unknown adapter.",
        413: "Upload larger than the limit, or image with too many pixels.",
        415: "Not an image, or a corrupt/truncated one.",
        422: "top_k out of range.",
        500: "The model failed on this request.",
    }.items()
}

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image: either multipart/form-data with field `image`, or the raw bytes "
        "as the whole body (any content type, e.g. image/jpeg).",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {IMAGE_FIELD: {"type": "string", "format": "binary"}},
                    "required": [IMAGE_FIELD],
                }
            },
            "image/*": _BINARY,
            "application/octet-stream": _BINARY,
        },
    }
}


# --- upload reading and decoding ------------------------------------------------


class _ImagePart:
    """Streams a multipart body, keeping only the first ``image`` part (size-capped)."""

    def __init__(self, content_type: str, limit: int) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise ApiError(400, "multipart body without a boundary in Content-Type")
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
        except MultipartParseError as exc:
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


async def read_upload(request: Request, limit_bytes: int, limit_text: str) -> bytes:
    """The image bytes from a raw or multipart body, never reading past the limit."""
    too_big = ApiError(413, f"upload too large: the limit is {limit_text}")
    content_type = request.headers.get("content-type", "")
    multipart = content_type.lower().startswith("multipart/form-data")
    body_limit = limit_bytes + (MULTIPART_OVERHEAD if multipart else 0)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length")
        if int(declared) > body_limit:
            raise too_big
    part = _ImagePart(content_type, limit_bytes) if multipart else None
    raw = bytearray()
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise too_big
            if part is not None:
                part.feed(chunk)
            else:
                raw += chunk
    except ClientDisconnect:
        raise ApiError(400, "client disconnected during upload") from None
    except ApiError as exc:
        if exc.status == 413:
            raise too_big from None
        raise
    data = part.image_bytes() if part is not None else bytes(raw)
    if not data:
        raise ApiError(400, f"empty image: send it as the request body or as multipart field '{IMAGE_FIELD}'")
    return data


@functools.cache
def image_formats() -> tuple[str, ...]:
    """The wanted formats this Pillow build can open (AVIF needs libavif)."""
    Image.init()
    return tuple(f for f in WANTED_FORMATS if f in Image.OPEN)


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> upright RGB image, exactly as `vitlora predict` decodes files (`load_rgb`).

    Only well-known raster formats are accepted (Pillow never shells out, e.g. to
    Ghostscript for EPS), and decompression bombs are refused from the header before any
    pixel is decoded. Runs in a worker thread: decoding a large JPEG takes tens of ms.
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
        return load_rgb(data)
    except BadImageError as exc:
        reason = str(exc)
        if reason.startswith("too large"):
            raise ApiError(413, f"image is {reason.removeprefix('too large: ')}") from None
        raise ApiError(415, f"corrupt or truncated image: {reason}") from None


# --- the app ----------------------------------------------------------------------


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _check_adapters(adapters: Sequence[Adapter]) -> dict[str, Adapter]:
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


def _page() -> str:
    return (resources.files("vitlora.serve") / "static" / "index.html").read_text(encoding="utf-8")


#: The page may only talk to this server: no CDN, no external fonts.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
    "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


def create_app(
    adapters: Sequence[Adapter],
    token: str | None = None,
    max_upload_mb: float = 10,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
) -> FastAPI:
    """Build the FastAPI app; the first adapter is the default one.

    ``token``: when set, every ``/v1/*`` call needs ``Authorization: Bearer <token>``;
    ``/health``, ``/`` and the OpenAPI docs stay open.
    """
    by_name = _check_adapters(adapters)
    default_name = adapters[0].name
    if token is not None and not token:
        raise VitloraError("--token must not be empty (leave it out to serve without a token)")
    if max_upload_mb <= 0:
        raise VitloraError(f"max_upload_mb must be > 0, got {max_upload_mb}")
    limit_bytes = int(max_upload_mb * 1024 * 1024)
    limit_text = f"{max_upload_mb:g} MB"
    pool = BatchPool({n: a.predict for n, a in by_name.items()}, max_batch, max_wait_ms)
    page = _page()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool.reopen()
        await anyio.to_thread.run_sync(image_formats)  # load PIL plugins now, not on request 1
        try:
            yield
        finally:
            await pool.aclose()

    app = FastAPI(
        title="vitlora serve",
        summary="Image classification with LoRA-fine-tuned vision transformers.",
        lifespan=lifespan,
    )
    app.state.adapters = by_name
    app.state.token_required = token is not None
    app.state.batch_pool = pool

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _json_error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json_error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_error(422, _validation_message(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _json_error(500, "internal server error (see the server log)")

    bearer = HTTPBearer(auto_error=False, description="Only when the server was started with --token.")

    async def require_token(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> None:
        if token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise StarletteHTTPException(
                401,
                "missing bearer token" if credentials is None else "wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> dict[str, str]:
        """Liveness probe; never needs a token."""
        return {"status": "ok"}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses={401: _ERRORS[401]})

    @v1.get("/adapters", response_model=list[AdapterInfo], tags=["predict"])
    async def list_adapters() -> list[dict[str, Any]]:
        """The loaded adapters, default first."""
        return [
            {
                "name": a.name,
                "base_model": a.base_model,
                "num_labels": len(a.labels),
                "metrics": dict(a.metrics or {}),
                "default": a.name == default_name,
            }
            for a in by_name.values()
        ]

    @v1.post(
        "/predict",
        response_model=PredictResponse,
        tags=["predict"],
        responses={c: _ERRORS[c] for c in (400, 404, 413, 415, 422, 500)},
        openapi_extra=_PREDICT_BODY,
    )
    async def predict(
        request: Request,
        adapter: str | None = Query(None, description="Adapter name; the default adapter if omitted."),
        top_k: int | None = Query(
            None, ge=1, description=f"How many labels to return (1..num_labels); default {DEFAULT_TOP_K}."
        ),
    ) -> dict[str, Any]:
        """Classify one image, sent as the raw body or as multipart field `image`."""
        started = time.perf_counter()
        name = default_name if adapter is None else adapter
        chosen = by_name.get(name)
        if chosen is None:
            raise ApiError(404, f"unknown adapter {name!r}; available: {', '.join(by_name)}")
        num_labels = len(chosen.labels)
        k = min(DEFAULT_TOP_K, num_labels) if top_k is None else top_k
        if k > num_labels:
            raise ApiError(422, f"top_k must be between 1 and {num_labels} for adapter {name!r}")
        data = await read_upload(request, limit_bytes, limit_text)
        image = await anyio.to_thread.run_sync(decode_image, data)
        del data
        try:
            ranked = await pool[name].submit(image, k)
        except PredictionFailed as exc:
            raise ApiError(500, str(exc)) from None
        except BatcherClosed as exc:
            raise ApiError(503, str(exc)) from None
        return {
            "adapter": name,
            "top_k": [{"label": label, "score": score} for label, score in ranked],
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
        }

    app.include_router(v1)
    return app
