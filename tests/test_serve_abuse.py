"""A bounded, loopback-only abuse test of the server: big decoded images, slow clients, a full queue.

Everything is bounded in count and time (socket timeouts, a handful of
connections) and stops by itself; assertions are about behaviour (status codes,
closed connections, peak memory under a generous bound), never about timing.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from vitlora.serve import create_app, decode_image, running_server
from vitlora.serve.core import Limits

from fake_adapters import PALETTE, ColourAdapter
from test_serve import RGB

TESTS = Path(__file__).resolve().parent
DEFAULT_CAP = Limits().max_pixels


def solid(colour: str, side: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), PALETTE[colour]).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_png() -> bytes:
    return solid("red", 9000, "PNG")  # ~260 KB on the wire, 243 MB decoded


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return solid("green", 9000, "JPEG")


def test_decode_bounds(big_png: bytes, big_jpeg: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import PngImagePlugin

    from vitlora.serve import ApiError

    loads: list[str] = []
    real_load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda im: loads.append("png") or real_load(im))
    with pytest.raises(ApiError) as refused:
        decode_image(big_png, DEFAULT_CAP)
    assert refused.value.status == 413 and "9000x9000" in refused.value.message
    assert loads == []  # refused from the header: not one pixel decoded (PNG's getexif would decode them all)
    monkeypatch.undo()
    jpeg = decode_image(big_jpeg, DEFAULT_CAP)  # 81 Mpx on disk, decoded at 1/8 scale
    assert max(jpeg.size) < 1100 and jpeg.getpixel((5, 5))[1] > 150
    png = decode_image(solid("blue", 3000, "PNG"), DEFAULT_CAP)  # under the cap: decoded, then shrunk
    assert png.size == (600, 600)
    small = solid("red", 300, "PNG")
    assert decode_image(small, DEFAULT_CAP).size == (300, 300)  # small images are untouched


SERVER = f"""
import sys
from fake_adapters import ColourAdapter
from vitlora.serve import create_app, running_server
with running_server(create_app([ColourAdapter("rgb", {RGB!r})])) as url:
    print(url, flush=True)
    sys.stdin.read()
"""


@pytest.fixture(scope="module")
def server_process() -> Iterator[tuple[str, int]]:
    """A server in its own process, so its peak memory is its own."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield url, proc.pid
    finally:
        proc.communicate(timeout=30)  # closing stdin stops it


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for peak RSS")
def test_burst_of_big_images_keeps_memory_bounded(server_process, big_png: bytes, big_jpeg: bytes) -> None:
    url, pid = server_process
    under_cap = solid("blue", 6000, "PNG")  # 36 Mpx: decoded (108 MB), then shrunk
    bodies = [big_png, big_jpeg, under_cap, big_png] * 4  # 16 uploads at once

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=16)) as c:
            return await asyncio.gather(*(c.post("/v1/predict", content=b) for b in bodies))

    before = peak_rss_mb(pid)
    replies = asyncio.run(burst())
    for body, reply in zip(bodies, replies):
        if body is big_png:
            assert reply.status_code == 413 and "too many pixels" in reply.json()["error"], reply.text
        else:
            assert reply.status_code == 200, reply.text
            assert reply.json()["top_k"][0]["label"] == ("green" if body is big_jpeg else "blue")
    peak = peak_rss_mb(pid)
    # unbounded: 16 x 243 MB decoded at once; bounded: 2 decodes of <= 120 MB in flight
    assert peak < before + 700, (before, peak)


@pytest.fixture()
def tight() -> Iterator[tuple[str, ColourAdapter]]:
    adapter = ColourAdapter("rgb", RGB)
    app = create_app([adapter], max_queue=2, read_timeout_s=1.0)
    with running_server(app, header_timeout_s=1.0) as url:
        yield url, adapter


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=20)


def _read_until_closed(sock: socket.socket) -> bytes:
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    return reply


def test_stalled_upload_is_cut_off_and_closed(tight) -> None:
    url, _ = tight
    with _connect(url) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"\0" * 10)
        reply = _read_until_closed(sock)  # returns only because the server closed the connection
    assert reply.startswith(b"HTTP/1.1 408") and b"not received within 1 s" in reply


@pytest.mark.parametrize("partial", [b"", b"GET /hea", b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n"])
def test_headers_never_finished_are_cut_off(tight, partial: bytes) -> None:
    url, _ = tight
    with _connect(url) as sock:
        sock.sendall(partial)
        assert _read_until_closed(sock) == b""  # closed by the server's header deadline, nothing answered
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_idle_keep_alive_connection_is_closed(tight) -> None:
    url, _ = tight
    with _connect(url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = _read_until_closed(sock)  # then says nothing: the keep-alive timeout closes it
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"status":"ok"}')


def test_full_queue_answers_503_with_retry_after(tight) -> None:
    url, _ = tight
    stalled = [_connect(url) for _ in range(2)]  # two uploads in progress fill max_queue=2
    try:
        for sock in stalled:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        busy = None
        for _ in range(50):  # until the server has admitted both (no sleeps: each try is a round trip)
            busy = httpx.post(f"{url}/v1/predict", content=solid("red", 8, "PNG"), timeout=10)
            if busy.status_code == 503:
                break
        assert busy is not None and busy.status_code == 503, busy.text if busy else None
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]
        for sock in stalled:
            assert _read_until_closed(sock).startswith(b"HTTP/1.1 408")
    finally:
        for sock in stalled:
            sock.close()
    ok = httpx.post(f"{url}/v1/predict", content=solid("red", 8, "PNG"), timeout=10)
    assert ok.status_code == 200 and ok.json()["top_k"][0]["label"] == "red"  # slots were given back


@pytest.mark.parametrize("length", [71, 257, 5000])
def test_long_multipart_boundary_is_400(tight, length: int) -> None:
    url, _ = tight
    boundary = "b" * length
    body = f"--{boundary}\r\nContent-Disposition: form-data; name=image\r\n\r\nxx\r\n--{boundary}--\r\n"
    reply = httpx.post(f"{url}/v1/predict", content=body.encode(),
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=10)
    assert reply.status_code == 400 and "boundary" in reply.json()["error"]
