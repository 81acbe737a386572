"""Response models and OpenAPI extras: they document the API in /openapi.json and /docs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from vitlora.serve.upload import IMAGE_FIELD


class ErrorBody(BaseModel):
    error: str = Field(description="Human-readable message.")


class AdapterInfo(BaseModel):
    name: str
    base_model: str
    num_labels: int
    metrics: dict[str, Any]
    default: bool = Field(description="Used when ?adapter= is omitted; always listed first.")
    explain: bool = Field(False, description="Whether `/v1/predict?explain=true` works for this adapter.")


class Score(BaseModel):
    label: str
    score: float = Field(description="Probability in [0, 1].")


class PredictResponse(BaseModel):
    adapter: str
    top_k: list[Score] = Field(description="Best first.")
    explanation: str | None = Field(
        None,
        description="Only with explain=true: a PNG data URL (`data:image/png;base64,...`), the Grad-CAM heat "
        "of the top-1 label over the photo, same aspect as the upload, at most 768 px on its long side.",
    )
    latency_ms: float = Field(description="Server time from request to answer, upload included.")


class Health(BaseModel):
    status: str = "ok"


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Empty body, missing `image` field or malformed multipart.",
        401: "Missing or wrong bearer token (only when the server has a token).",
        404: "Unknown adapter.",
        408: "The upload did not arrive within the read timeout.",
        413: "Upload larger than the limit, or image with more pixels than the server decodes.",
        415: "Not an image, or a corrupt/truncated one.",
        422: "top_k out of range, or explain=true for an adapter that cannot explain.",
        500: "The model failed on this request.",
        503: "Too many requests in progress (see Retry-After), or shutting down.",
    }.items()
}

BINARY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_BODY = {
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
            "image/*": BINARY,
            "application/octet-stream": BINARY,
        },
    }
}
