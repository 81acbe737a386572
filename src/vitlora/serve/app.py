"""The HTTP API and web page behind ``vitlora serve``.

Design choices, and why:

* Uploads are read and decoded under explicit bounds (size, pixels, decodes
  in flight, requests in progress, read deadline: :mod:`vitlora.serve.core`
  and :mod:`vitlora.serve.upload`), so no client can exhaust memory or hold a
  connection forever; a full server answers 503 with Retry-After.
* Image decoding runs in worker threads and inference on the single
  inference thread of :mod:`vitlora.serve.batching`, so the event loop only
  shuffles bytes and stays responsive under load.
* Every error is ``{"error": "..."}`` JSON with a meaningful status, so
  scripts and the web page can show the message as is; no request can take
  the server down.
* Besides ``/v1``, the Open Inference Protocol v2 (:mod:`vitlora.serve.v2`);
  ``/docs`` works offline (:mod:`vitlora.serve.docs`).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from vitlora.errors import VitloraError
from vitlora.serve.core import Adapter, ApiError, Limits, Service
from vitlora.serve.docs import add_offline_docs
from vitlora.serve.schemas import ERRORS, PREDICT_BODY, AdapterInfo, Health, PredictResponse
from vitlora.serve.upload import decode_image, read_upload
from vitlora.serve.v2 import v2_router

__all__ = ["Adapter", "ApiError", "Limits", "create_app", "decode_image"]

log = logging.getLogger(__name__)
TITLE = "vitlora serve"


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, expected or not, as ``{"error": ...}`` JSON."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _json_error(exc.status, exc.message, exc.headers)

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


def _token_dependency(token: str | None) -> Callable[..., Any]:
    """A dependency that checks ``Authorization: Bearer <token>`` when the server has one."""
    bearer = HTTPBearer(auto_error=False, description="Only when the server was started with --token.")

    async def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise StarletteHTTPException(
                401,
                "missing bearer token" if credentials is None else "wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_token


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


def _v1_router(service: Service, require_token: Callable[..., Any]) -> APIRouter:
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses={401: ERRORS[401]})

    @v1.get("/adapters", response_model=list[AdapterInfo], tags=["predict"])
    async def list_adapters() -> list[dict[str, Any]]:
        """The loaded adapters, default first."""
        return [
            {
                "name": a.name,
                "base_model": a.base_model,
                "num_labels": len(a.labels),
                "metrics": dict(a.metrics or {}),
                "default": a.name == service.default_name,
                "explain": service.explainable(a),
            }
            for a in service.by_name.values()
        ]

    @v1.post(
        "/predict",
        response_model=PredictResponse,
        tags=["predict"],
        responses={c: ERRORS[c] for c in (400, 404, 408, 413, 415, 422, 500, 503)},
        openapi_extra=PREDICT_BODY,
    )
    async def predict(
        request: Request,
        adapter: str | None = Query(None, description="Adapter name; the default adapter if omitted."),
        top_k: int | None = Query(None, ge=1, description="How many labels to return (1..num_labels); default 5."),
        explain: bool = Query(False, description="Also return `explanation`: where the model looked for the top-1."),
    ) -> dict[str, Any]:
        """Classify one image, sent as the raw body or as multipart field `image`."""
        started = time.perf_counter()
        chosen = service.adapter(adapter)
        k = service.top_k(chosen, top_k)
        if explain:
            service.check_explainable(chosen)
        async with service.admitted():
            image = await service.decode(await read_upload(request, service.limits))
            ranked = await service.classify(chosen, image, k)
            explanation = await service.explain(chosen, image, ranked[0][0]) if explain else None
        return {
            "adapter": chosen.name,
            "top_k": [{"label": label, "score": score} for label, score in ranked],
            "explanation": explanation,
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
        }

    return v1


def create_app(
    adapters: Sequence[Adapter],
    token: str | None = None,
    max_upload_mb: float = 10,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    **limits: Any,
) -> FastAPI:
    """Build the FastAPI app; the first adapter is the default one.

    ``token``: when set, every ``/v1/*`` and ``/v2/models*`` call needs
    ``Authorization: Bearer <token>``; health, ``/`` and the docs stay open.
    ``limits``: the other :class:`~vitlora.serve.core.Limits` fields
    (``max_pixels``, ``max_decodes``, ``max_queue``, ``read_timeout_s``).
    """
    if token is not None and not token:
        raise VitloraError("--token must not be empty (leave it out to serve without a token)")
    try:
        bounds = Limits(max_upload_mb=max_upload_mb, **limits)
    except TypeError as exc:
        raise VitloraError(f"create_app: {exc}") from None
    service = Service(adapters, bounds, max_batch, max_wait_ms)
    page = _page()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.pool.aclose()

    app = FastAPI(
        title=TITLE,
        summary="Image classification with LoRA-fine-tuned vision transformers.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.adapters = service.by_name
    app.state.token_required = token is not None
    app.state.batch_pool = service.pool
    app.state.service = service
    _add_error_handlers(app)
    add_offline_docs(app, TITLE)
    require_token = _token_dependency(token)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> dict[str, str]:
        """Liveness probe; never needs a token."""
        return {"status": "ok"}

    app.include_router(_v1_router(service, require_token))
    app.include_router(v2_router(service, require_token))
    return app
