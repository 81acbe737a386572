"""Open Inference Protocol v2 endpoints, mixed-adapter batching and offline /docs, with fake adapters.

The v2 client here is plain httpx following the protocol's JSON (what a KServe
or Triton REST client sends), so the test checks the wire format, not our code.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Iterator

import httpx
import pytest

from vitlora.serve import create_app, running_server

from fake_adapters import PALETTE, ColourAdapter, ColourGroup
from test_serve import RGB, image_bytes

GROUP = ColourGroup(delay_s=0.05)
ADAPTERS = [
    GROUP.add(ColourAdapter("rgb", RGB)),
    GROUP.add(ColourAdapter("palette", list(PALETTE))),
    ColourAdapter("alone", RGB),
]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with running_server(create_app(ADAPTERS, max_wait_ms=30)) as base:
        yield base


def infer_body(colours: list[str], **extra: object) -> dict[str, object]:
    data = [base64.b64encode(image_bytes(c)).decode() for c in colours]
    return {"inputs": [{"name": "image", "shape": [len(data)], "datatype": "BYTES", "data": data}], **extra}


def test_health_and_metadata(url: str) -> None:
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{url}/v2").json()["name"] == "vitlora"
    meta = httpx.get(f"{url}/v2/models/palette").json()
    assert meta["name"] == "palette" and meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("label", "BYTES"), ("score", "FP32")]
    assert httpx.get(f"{url}/v2/models/palette/ready").json() == {"name": "palette", "ready": True}
    missing = httpx.get(f"{url}/v2/models/nope")
    assert missing.status_code == 404 and set(missing.json()) == {"error"}


def test_infer_batch_of_images(url: str) -> None:
    colours = ["green", "red", "blue"]
    reply = httpx.post(f"{url}/v2/models/palette/infer", json=infer_body(colours, id="req-7",
                                                                          parameters={"top_k": 2}))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model_name"] == "palette" and body["id"] == "req-7"
    labels, scores = body["outputs"]
    assert labels["name"] == "label" and labels["datatype"] == "BYTES" and labels["shape"] == [3, 2]
    assert scores["name"] == "score" and scores["datatype"] == "FP32" and scores["shape"] == [3, 2]
    assert labels["data"][::2] == colours  # row-major [N, k]: each image's best label first
    assert all(a >= b for a, b in zip(scores["data"][::2], scores["data"][1::2]))
    default_k = httpx.post(f"{url}/v2/models/rgb/infer", json=infer_body(["red"])).json()
    assert default_k["outputs"][0]["shape"] == [1, 3]  # min(5, 3 labels)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"inputs": []}, 400, "exactly one input"),
        ({"inputs": [{"name": "pixels", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}]}, 400, "named"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400, "BYTES"),
        ({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["eA=="]}]}, 400, "shape"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}, 400, "base64"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}]}, 415, "image"),
        (infer_body(["red"], parameters={"top_k": 9}), 422, "top_k"),
    ],
)
def test_infer_errors_are_json(url: str, body: dict[str, object], status: int, needle: str) -> None:
    reply = httpx.post(f"{url}/v2/models/rgb/infer", json=body)
    assert reply.status_code == status, reply.text
    assert set(reply.json()) == {"error"} and needle in reply.json()["error"]


def test_infer_not_json(url: str) -> None:
    reply = httpx.post(f"{url}/v2/models/rgb/infer", content=b"{nope")
    assert reply.status_code == 400 and "JSON" in reply.json()["error"]


def test_requests_for_different_adapters_share_a_forward_pass(url: str) -> None:
    GROUP.calls.clear()
    names = ["rgb", "palette"] * 6
    colours = [RGB[i % 3] for i in range(len(names))]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=20) as c:
            return await asyncio.gather(*(
                c.post(f"/v1/predict?adapter={n}", content=image_bytes(col)) for n, col in zip(names, colours)))

    responses = asyncio.run(run())
    assert [(r.json()["adapter"], r.json()["top_k"][0]["label"]) for r in responses] == list(zip(names, colours))
    assert sum(len(c) for c in GROUP.calls) == 12 and len(GROUP.calls) < 12
    assert any(set(c) == {"rgb", "palette"} for c in GROUP.calls), GROUP.calls  # one call, both adapters
    # each row was answered by its own adapter: palette rows have palette's 8 labels to choose from
    assert all(len(r.json()["top_k"]) == (3 if n == "rgb" else 5) for n, r in zip(names, responses))


def test_docs_work_offline(url: str) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{url}{page}").text
        assert not re.search(r"https?://(?!www\.w3\.org)", html), html  # no CDN, no fonts.googleapis
        assets = re.findall(r"""(?:src|href)=["']?([^"' >]+)""", html) + re.findall(r"url: ?'([^']+)'", html)
        assert assets
        for asset in assets:
            reply = httpx.get(f"{url}{asset}")
            assert reply.status_code == 200 and len(reply.content) > 100, asset
    assert httpx.get(f"{url}/docs-assets/../../etc/passwd").status_code == 404
