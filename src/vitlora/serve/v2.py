"""Open Inference Protocol v2 (KServe / Triton REST) beside ``/v1``.

Each adapter is a model. ``infer`` takes one BYTES input holding encoded images
(base64 strings in JSON, as KServe's v2 JSON clients send binary data) and
answers two outputs of shape ``[N, top_k]``: ``label`` (BYTES) and ``score``
(FP32), best first. ``parameters.top_k`` picks k (default 5, at most the number
of labels). Errors are ``{"error": "..."}`` as the protocol asks. The images go
through the same admission, decoding and batching as ``/v1/predict``, so
requests for different adapters on one base still share forward passes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any

from fastapi import APIRouter, Depends, Request

import vitlora
from vitlora.serve.core import Adapter, ApiError, Service
from vitlora.serve.upload import read_upload

MODEL_INPUT = "image"
INPUT_META = [{"name": MODEL_INPUT, "datatype": "BYTES", "shape": [-1]}]


def _model_meta(adapter: Adapter) -> dict[str, Any]:
    return {
        "name": adapter.name,
        "versions": [],
        "platform": "vitlora",
        "inputs": INPUT_META,
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1, -1]},
            {"name": "score", "datatype": "FP32", "shape": [-1, -1]},
        ],
        "parameters": {"base_model": adapter.base_model, "labels": list(adapter.labels)},
    }


def _decode_request(body: bytes) -> tuple[list[bytes], int | None, str | None]:
    """(encoded images, top_k, request id) from an inference request's JSON."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not JSON") from None
    inputs = req.get("inputs") if isinstance(req, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, f"expected exactly one input, named {MODEL_INPUT!r}")
    tensor = inputs[0]
    if tensor.get("name") != MODEL_INPUT or tensor.get("datatype") != "BYTES":
        raise ApiError(400, f"the input must be named {MODEL_INPUT!r} with datatype BYTES")
    data = tensor.get("data")
    if not isinstance(data, list) or not data or not all(isinstance(d, str) for d in data):
        raise ApiError(400, "input 'image' needs data: a non-empty list of base64 strings")
    if tensor.get("shape") not in ([len(data)], [len(data), 1]):
        raise ApiError(400, f"input 'image' has shape {tensor.get('shape')} but {len(data)} elements")
    try:
        images = [base64.b64decode(d, validate=True) for d in data]
    except (binascii.Error, ValueError):
        raise ApiError(400, "input 'image' data must be base64-encoded image files") from None
    params = req.get("parameters") or {}
    top_k = params.get("top_k") if isinstance(params, dict) else None
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
        raise ApiError(422, "parameters.top_k must be an integer")
    req_id = req.get("id")
    return images, top_k, req_id if isinstance(req_id, str) else None


def v2_router(service: Service, require_token: Any) -> APIRouter:
    """The OIP v2 routes; health stays open, model routes need the token like /v1."""
    router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])
    guarded = [Depends(require_token)]

    @router.get("/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": not service.pool.closed}

    @router.get("", dependencies=guarded)
    async def server_meta() -> dict[str, Any]:
        return {"name": "vitlora", "version": vitlora.__version__, "extensions": []}

    @router.get("/models/{model}", dependencies=guarded)
    async def model_meta(model: str) -> dict[str, Any]:
        return _model_meta(service.adapter(model))

    @router.get("/models/{model}/ready", dependencies=guarded)
    async def model_ready(model: str) -> dict[str, Any]:
        return {"name": service.adapter(model).name, "ready": not service.pool.closed}

    @router.post("/models/{model}/infer", dependencies=guarded)
    async def infer(model: str, request: Request) -> dict[str, Any]:
        """Classify a batch of encoded images (BYTES input ``image``, base64 in JSON)."""
        adapter = service.adapter(model)
        async with service.admitted():
            encoded, top_k, req_id = _decode_request(await read_upload(request, service.limits, False))
            k = service.top_k(adapter, top_k)
            images = [await service.decode(data) for data in encoded]
            del encoded
            ranked = await asyncio.gather(*(service.classify(adapter, im, k) for im in images))
        n = len(ranked)
        answer: dict[str, Any] = {
            "model_name": adapter.name,
            "outputs": [
                {"name": "label", "datatype": "BYTES", "shape": [n, k], "data": [lab for r in ranked for lab, _ in r]},
                {"name": "score", "datatype": "FP32", "shape": [n, k], "data": [s for r in ranked for _, s in r]},
            ],
        }
        if req_id is not None:
            answer["id"] = req_id
        return answer

    return router
