"""``/docs`` and ``/redoc`` that work offline: their assets come from this server.

FastAPI's defaults load Swagger UI and ReDoc from a CDN (and ReDoc's fonts from
Google), which shows a blank page on an offline machine. The ``fastapi-offline``
package ships the same files (Swagger UI 5, which reads FastAPI's OpenAPI 3.1);
we serve those few files ourselves rather than vendor 2.7 MB of JavaScript.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from vitlora.serve.core import ApiError

ASSET_PREFIX = "/docs-assets"
_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}


def add_offline_docs(app: FastAPI, title: str) -> None:
    """Routes for the docs pages and their local assets (the app is built with docs_url=None)."""
    static = resources.files("fastapi_offline") / "static"
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} - docs",
            swagger_js_url=f"{ASSET_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSET_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{ASSET_PREFIX}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=f"{ASSET_PREFIX}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSET_PREFIX}/favicon.png",
            with_google_fonts=False,
        )

    @app.get(ASSET_PREFIX + "/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in _ASSETS:
            raise ApiError(404, f"no docs asset {name!r}")
        with resources.as_file(static / name) as path:
            return FileResponse(path, media_type=_ASSETS[name], headers={"Cache-Control": "max-age=86400"})
