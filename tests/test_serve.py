"""Fast tests for `vitlora serve`: a real uvicorn on 127.0.0.1 with fake colour adapters.

The fake adapters classify an image by its mean colour, so every assertion
checks a real answer, and they record their calls so batching is proven by
counting ``predict`` invocations rather than assumed.
"""

from __future__ import annotations

import asyncio
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from PIL import Image

from vitlora.errors import VitloraError
from vitlora.serve import create_app, running_server
from vitlora.serve.batching import Batcher, BatcherClosed, PredictionFailed, single

from fake_adapters import PALETTE, ColourAdapter

RGB = ["red", "green", "blue"]


def image_bytes(colour: str | tuple[int, int, int], fmt: str = "PNG", size: int = 32) -> bytes:
    rgb = PALETTE[colour] if isinstance(colour, str) else colour
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but carries no pixel data (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


ADAPTERS = {
    "rgb": ColourAdapter("rgb", RGB),
    "palette": ColourAdapter("palette", list(PALETTE)),
    "slow": ColourAdapter("slow", RGB + ["black"], delay_s=0.05, poison="black"),
}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    app = create_app(list(ADAPTERS.values()), max_upload_mb=0.25)
    with running_server(app) as url:
        yield url


@pytest.fixture()
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=10) as c:
        yield c


def assert_error(client: httpx.Client, response: httpx.Response, status: int, needle: str = "") -> None:
    """The error is JSON ``{"error": ...}`` with the right status, and the server still answers."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"], body
    assert needle.lower() in body["error"].lower(), body
    assert client.get("/health").json() == {"status": "ok"}


def top(response: httpx.Response) -> list[tuple[str, float]]:
    assert response.status_code == 200, response.text
    return [(p["label"], p["score"]) for p in response.json()["top_k"]]


# --- endpoints --------------------------------------------------------------------


def test_health_and_page(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('id="file"', 'id="adapter"', 'id="token"', 'id="results"', 'id="error"', "localStorage"):
        assert needle in page.text
    # Offline machines: nothing may be fetched from elsewhere.
    for external in ('src="http', "src='http", 'href="http', "href='http", "@import", "//cdn"):
        assert external not in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_adapters_listed_default_first(client: httpx.Client) -> None:
    listed = client.get("/v1/adapters").json()
    assert [a["name"] for a in listed] == ["rgb", "palette", "slow"]
    assert [a["default"] for a in listed] == [True, False, False]
    assert listed[1] == {
        "name": "palette",
        "base_model": "fake/vit-tiny",
        "num_labels": 8,
        "metrics": {"val_accuracy": 0.97, "epochs": 5},
        "default": False,
        "explain": False,  # the fakes draw no explanations
    }


@pytest.mark.parametrize("colour", ["red", "green", "blue"])
def test_predict_raw_and_multipart_agree(client: httpx.Client, colour: str) -> None:
    data = image_bytes(colour, "JPEG")
    raw = client.post("/v1/predict", content=data, headers={"Content-Type": "image/jpeg"})
    multipart = client.post("/v1/predict", files={"image": ("x.jpg", data, "image/jpeg")})
    octet = client.post("/v1/predict", content=data, headers={"Content-Type": "application/octet-stream"})
    assert top(raw) == top(multipart) == top(octet)
    body = raw.json()
    assert body["adapter"] == "rgb" and body["latency_ms"] >= 0
    labels = [lab for lab, _ in top(raw)]
    scores = [s for _, s in top(raw)]
    assert labels[0] == colour and sorted(labels) == sorted(RGB)
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-6


def test_adapter_selection_and_top_k(client: httpx.Client) -> None:
    data = image_bytes("yellow")
    default = client.post("/v1/predict", content=data)
    assert default.json()["adapter"] == "rgb" and len(top(default)) == 3  # min(5, 3 labels)
    palette = client.post("/v1/predict?adapter=palette", content=data)
    assert palette.json()["adapter"] == "palette"
    assert len(top(palette)) == 5 and top(palette)[0][0] == "yellow"
    one = client.post("/v1/predict", params={"adapter": "palette", "top_k": 1}, content=data)
    assert top(one) == top(palette)[:1]
    everything = client.post("/v1/predict", params={"adapter": "palette", "top_k": 8}, content=data)
    assert {lab for lab, _ in top(everything)} == set(PALETTE)


@pytest.mark.parametrize("query", ["top_k=0", "top_k=-1", "top_k=4", "top_k=abc", "adapter=palette&top_k=9"])
def test_top_k_out_of_range(client: httpx.Client, query: str) -> None:
    assert_error(client, client.post(f"/v1/predict?{query}", content=image_bytes("red")), 422, "top_k")


def test_unknown_adapter(client: httpx.Client) -> None:
    response = client.post("/v1/predict?adapter=nope", content=image_bytes("red"))
    assert_error(client, response, 404, "unknown adapter 'nope'")


def test_bad_bodies(client: httpx.Client) -> None:
    assert_error(client, client.post("/v1/predict", content=b""), 400, "empty")
    assert_error(client, client.post("/v1/predict", files={"other": ("x.png", image_bytes("red"))}), 400, "'image'")
    assert_error(
        client,
        client.post("/v1/predict", content=b"--b\r\n", headers={"Content-Type": "multipart/form-data; boundary=b"}),
        400,
        "multipart",
    )
    text = client.post("/v1/predict", content=b"hello, I am not a picture", headers={"Content-Type": "text/plain"})
    assert_error(client, text, 415, "not an image")
    jpeg = image_bytes("red", "JPEG", size=256)
    truncated = client.post("/v1/predict", content=jpeg[: len(jpeg) * 2 // 3])
    assert_error(client, truncated, 415, "truncated")
    assert_error(client, client.post("/v1/predict", files={"image": ("x.jpg", jpeg[:400])}), 415)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [10_000, 30_000])  # over PIL's warning limit / over its error limit
def test_decompression_bomb_rejected_before_decoding(client: httpx.Client, side: int) -> None:
    # The file has no pixel data: decoding would answer 415, so 413 proves we never decoded.
    response = client.post("/v1/predict", content=png_header_only(side, side))
    assert_error(client, response, 413, "pixels")


def test_upload_limit(client: httpx.Client) -> None:
    limit = int(0.25 * 1024 * 1024)
    # Just over the limit (fits in socket buffers, so the client finishes writing).
    assert_error(client, client.post("/v1/predict", content=b"\0" * (limit + 1)), 413, "0.25 MB")
    # Exactly at the limit is read and then judged as an image.
    assert_error(client, client.post("/v1/predict", content=b"\0" * limit), 415)
    chunked = client.post("/v1/predict", content=iter([b"\0" * 65536] * 5))  # no Content-Length
    assert_error(client, chunked, 413)
    big_part = client.post("/v1/predict", files={"image": ("x.png", b"\0" * (limit + 1))})
    assert_error(client, big_part, 413)


def _raw_exchange(url: str, head: bytes, body_chunks: list[bytes]) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            sock.sendall(chunk)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < _content_length(reply):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
        return reply


def _content_length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_huge_content_length_refused_without_reading(server: str, client: httpx.Client) -> None:
    # Claims 1 GB and sends nothing: only an up-front Content-Length check can answer.
    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
    reply = _raw_exchange(server, head, [])
    assert reply.startswith(b"HTTP/1.1 413") and reply.endswith(b'{"error":"upload too large: the limit is 0.25 MB"}')
    assert client.get("/health").status_code == 200


def test_chunked_body_cut_off_at_limit(server: str, client: httpx.Client) -> None:
    # Never sends the final 0-chunk: the server must count bytes and stop on its own.
    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = [b"10000\r\n" + b"\0" * 0x10000 + b"\r\n"] * 5
    reply = _raw_exchange(server, head, chunks)
    assert reply.startswith(b"HTTP/1.1 413") and reply.endswith(b'"upload too large: the limit is 0.25 MB"}')
    assert client.get("/health").status_code == 200


def test_explain_on_an_adapter_that_cannot_is_422(client: httpx.Client) -> None:
    response = client.post("/v1/predict?explain=true", content=image_bytes("red"))
    assert_error(client, response, 422, "cannot explain")
    plain = client.post("/v1/predict?explain=false", content=image_bytes("red")).json()
    assert plain["explanation"] is None and plain["top_k"][0]["label"] == "red"


def test_unknown_route_and_method_are_json(client: httpx.Client) -> None:
    assert_error(client, client.get("/nope"), 404)
    assert_error(client, client.get("/v1/predict"), 405)


def test_openapi_documents_predict(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/v1/predict"]["post"]
    assert {"multipart/form-data", "image/*"} <= set(post["requestBody"]["content"])
    assert {p["name"] for p in post["parameters"]} == {"adapter", "top_k", "explain"}
    assert "explanation" in schema["components"]["schemas"]["PredictResponse"]["properties"]
    assert {"200", "400", "404", "413", "415", "422"} <= set(post["responses"])
    assert "/v1/adapters" in schema["paths"] and "/health" in schema["paths"]
    assert client.get("/docs").status_code == 200


# --- token ------------------------------------------------------------------------


def test_token_required_on_v1_only() -> None:
    app = create_app([ColourAdapter("rgb", RGB)], token="s3cret")
    with running_server(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/").status_code == 200
        missing = c.get("/v1/adapters")
        assert missing.headers["www-authenticate"] == "Bearer"
        assert_error(c, missing, 401, "missing")
        assert_error(c, c.get("/v1/adapters", headers={"Authorization": "Bearer nope"}), 401, "wrong")
        assert_error(c, c.get("/v1/adapters", headers={"Authorization": "Basic czNjcmV0"}), 401)
        assert_error(c, c.post("/v1/predict", content=image_bytes("red")), 401)
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/adapters", headers=ok).status_code == 200
        assert top(c.post("/v1/predict", content=image_bytes("red"), headers=ok))[0][0] == "red"


def test_create_app_rejects_bad_setup() -> None:
    with pytest.raises(VitloraError, match="at least one"):
        create_app([])
    with pytest.raises(VitloraError, match="unique"):
        create_app([ColourAdapter("a", RGB), ColourAdapter("a", RGB)])
    with pytest.raises(VitloraError, match="lacks"):
        create_app([object()])  # type: ignore[list-item]
    with pytest.raises(VitloraError, match="token"):
        create_app([ColourAdapter("a", RGB)], token="")


# --- batching -----------------------------------------------------------------------


def _concurrent_posts(url: str, bodies: list[bytes], adapter: str) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(bodies))
        async with httpx.AsyncClient(base_url=url, timeout=20, limits=limits) as c:
            return await asyncio.gather(*(c.post(f"/v1/predict?adapter={adapter}", content=b) for b in bodies))

    return asyncio.run(run())


def test_concurrent_requests_are_batched(server: str) -> None:
    slow = ADAPTERS["slow"]
    slow.reset()
    colours = [RGB[i % 3] for i in range(16)]
    responses = _concurrent_posts(server, [image_bytes(c) for c in colours], "slow")
    assert [top(r)[0][0] for r in responses] == colours  # each request got its own answer
    assert sum(slow.calls) == 16
    assert len(slow.calls) < 16 and max(slow.calls) > 1, slow.calls
    assert len(slow.threads) == 1 and slow.overlaps == 0  # one worker thread, never concurrent


def test_adapters_batch_separately_on_one_thread(server: str) -> None:
    for adapter in ADAPTERS.values():
        adapter.reset()
    names = ["rgb", "palette", "slow"] * 4
    colours = [RGB[i % 3] for i in range(len(names))]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=20) as c:
            return await asyncio.gather(
                *(c.post(f"/v1/predict?adapter={n}", content=image_bytes(col)) for n, col in zip(names, colours))
            )

    responses = asyncio.run(run())
    assert [(r.json()["adapter"], top(r)[0][0]) for r in responses] == list(zip(names, colours))
    assert all(sum(ADAPTERS[n].calls) == 4 for n in ADAPTERS)  # each adapter saw only its own images
    threads = set().union(*(a.threads for a in ADAPTERS.values()))
    assert len(threads) == 1  # the adapters share one base model: one inference thread for all


def test_failing_request_fails_alone(server: str, client: httpx.Client) -> None:
    slow = ADAPTERS["slow"]
    colours = ["red", "black", "green", "blue", "black", "red"]
    responses = _concurrent_posts(server, [image_bytes(c) for c in colours], "slow")
    for colour, response in zip(colours, responses):
        if colour == "black":
            assert_error(client, response, 500, "cannot classify black")
        else:
            assert top(response)[0][0] == colour
    assert slow.overlaps == 0
    assert top(client.post("/v1/predict?adapter=slow", content=image_bytes("blue")))[0][0] == "blue"


def test_batcher_groups_and_splits() -> None:
    adapter = ColourAdapter("unit", RGB)

    async def run() -> list[list[tuple[str, float]]]:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher("unit", single(adapter.predict), pool, max_batch=4, max_wait_ms=50)
            colours = [RGB[i % 3] for i in range(10)]
            images = [Image.new("RGB", (8, 8), PALETTE[c]) for c in colours]
            results = await asyncio.gather(*(batcher.submit(im, 1 + i % 3) for i, im in enumerate(images)))
            await batcher.aclose()
            with pytest.raises(BatcherClosed):
                await batcher.submit(images[0], 1)
            return results

    results = asyncio.run(run())
    assert adapter.calls == [4, 4, 2]  # max_batch respected; stragglers not kept waiting
    for i, ranked in enumerate(results):
        assert len(ranked) == 1 + i % 3 and ranked[0][0] == RGB[i % 3]


def test_batcher_isolates_a_poisoned_image() -> None:
    adapter = ColourAdapter("unit", RGB + ["black"], poison="black")

    async def run() -> list[Any]:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher("unit", single(adapter.predict), pool, max_batch=8, max_wait_ms=20)
            images = [Image.new("RGB", (8, 8), PALETTE[c]) for c in ["red", "black", "blue"]]
            out = await asyncio.gather(*(batcher.submit(im, 1) for im in images), return_exceptions=True)
            await batcher.aclose()
            return out

    red, black, blue = asyncio.run(run())
    assert isinstance(black, PredictionFailed) and "black" in str(black)
    assert red[0][0] == "red" and blue[0][0] == "blue"  # type: ignore[index]
    assert adapter.calls == [3, 1, 1, 1]  # the batch, then one by one


def test_clean_shutdown_finishes_in_flight_requests() -> None:
    adapter = ColourAdapter("rgb", RGB, delay_s=0.3)
    app = create_app([adapter])
    answers: list[httpx.Response] = []
    with running_server(app) as url:
        worker = threading.Thread(
            target=lambda: answers.append(httpx.post(f"{url}/v1/predict", content=image_bytes("green"), timeout=10))
        )
        worker.start()
        deadline = time.monotonic() + 5
        while not adapter.calls and time.monotonic() < deadline:
            time.sleep(0.01)
    worker.join(10)
    assert top(answers[0])[0][0] == "green"  # in flight when shutdown began, still answered
    pool = app.state.batch_pool
    assert pool.closed
    with pytest.raises(RuntimeError):
        pool.executor.submit(print)  # the inference thread is gone
    with running_server(app) as url:  # the same app starts again cleanly
        assert top(httpx.post(f"{url}/v1/predict", content=image_bytes("red"), timeout=10))[0][0] == "red"


def test_decode_image_applies_exif_rotation() -> None:
    from vitlora.serve import decode_image

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": how phones store portrait photos
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), PALETTE["red"]).save(buf, "JPEG", exif=exif)
    decoded = decode_image(buf.getvalue())
    assert decoded.size == (20, 40) and decoded.mode == "RGB"
