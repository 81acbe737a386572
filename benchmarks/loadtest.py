"""Load test for `vitlora serve`: many concurrent clients against a local server.

Starts the server in a child process (so client and server do not share a
GIL and skew each other's numbers), on 127.0.0.1 with an OS-chosen port,
sends a bounded number of requests from N concurrent keep-alive clients,
then stops the server and prints throughput, latency percentiles and errors.
Exits 1 on any error (non-200 or, with the fake adapter, a wrong label).

    python benchmarks/loadtest.py                      # fake adapter, 2000 requests, 32 clients
    python benchmarks/loadtest.py --requests 500 --concurrency 8 --max-batch 1   # batching off
    python benchmarks/loadtest.py --run runs/beans runs/food   # real adapters (needs load_adapters)
    python benchmarks/loadtest.py --run runs/beans --copies 16 --spread   # 16 adapters, requests spread

``--spread`` sends request i to adapter i mod A (A = every adapter served);
without it every request goes to the default adapter. ``--copies N`` serves
each run directory (or the fake adapter) N times under distinct names: with
real runs these are N separate peft adapters, each with its own LoRA modules
and head (same weights, same cost as N different runs).

The fake adapter sleeps ``--batch-ms + --image-ms * batch_size`` per predict
call to mimic a forward pass (sleep releases the GIL, as torch kernels do),
so the effect of batching shows up in the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


class FakeAdapter:
    """Labels an image by its mean colour; costs a simulated forward pass per batch."""

    def __init__(self, batch_ms: float, image_ms: float, calls: Any, images: Any, name: str = "fake") -> None:
        self.name = name
        self.base_model = "fake/vit"
        self.labels = list(COLOURS)
        self.metrics = {"val_accuracy": 1.0}
        self._cost = (batch_ms / 1000, image_ms / 1000)
        self._calls, self._images = calls, images  # shared counters, read by the parent

    def predict(self, images: list, top_k: int) -> list[list[tuple[str, float]]]:
        from PIL import Image

        time.sleep(self._cost[0] + self._cost[1] * len(images))
        with self._calls.get_lock():
            self._calls.value += 1
            self._images.value += len(images)
        out = []
        for image in images:
            mean = image.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
            exps = {lab: math.exp(-math.dist(mean, rgb) / 30) for lab, rgb in COLOURS.items()}
            total = sum(exps.values())
            out.append(sorted(((lab, e / total) for lab, e in exps.items()), key=lambda p: -p[1])[:top_k])
        return out


def load_real_adapters(run_dirs: list[str]) -> list:
    """Real adapters through vitlora.serve.load_adapters, which may not exist yet in this checkout."""
    try:
        from vitlora.serve import load_adapters  # type: ignore[attr-defined]
    except ImportError as exc:
        raise SystemExit(f"--run needs vitlora.serve.load_adapters, not available here: {exc}") from None
    return list(load_adapters(run_dirs))


def run_server(args: argparse.Namespace, ready: Any, calls: Any, images: Any) -> None:
    """Child process: build the app, report the bound port (or an error) on ``ready``, serve."""
    import uvicorn

    from vitlora.errors import VitloraError
    from vitlora.serve import create_app

    try:
        if args.run:
            adapters = load_real_adapters([run for run in args.run for _ in range(args.copies)])
        else:
            adapters = [
                FakeAdapter(args.batch_ms, args.image_ms, calls, images, f"fake-{i}") for i in range(args.copies)
            ]
        app = create_app(adapters, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    except VitloraError as exc:  # a user mistake (bad run dir): the message says it all
        ready.put(f"error: {exc}")
        return
    except BaseException as exc:  # a bug: report it, and keep the traceback
        ready.put(f"error: {type(exc).__name__}: {exc}")
        raise
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))

    async def main() -> None:
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        names = [a.name for a in adapters]
        ready.put((server.servers[0].sockets[0].getsockname()[1], names) if server.started else "error: no start")
        await serving

    asyncio.run(main())


def make_bodies(size: int, fmt: str) -> list[tuple[bytes, str]]:
    from PIL import Image

    bodies = []
    for label, rgb in COLOURS.items():
        buf = io.BytesIO()
        Image.new("RGB", (size, size), rgb).save(buf, fmt)
        bodies.append((buf.getvalue(), label))
    return bodies


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    wall_s: float = 0.0


class Connection:
    """A bare keep-alive HTTP/1.1 client connection.

    Why not httpx: on a small machine its per-request CPU cost made the
    *client* the bottleneck (about 90 requests/s against a server that
    manages 300+), so the numbers described httpx, not vitlora.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(request)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        fields = (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        if headers.get(b"connection", b"").lower() == b"close":
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def build_requests(
    port: int, bodies: list[tuple[bytes, str]], names: list[str], fmt: str
) -> list[tuple[bytes, str]]:
    """Raw HTTP requests; request i goes to adapter i mod A with image i mod B."""
    content_type = "image/png" if fmt == "PNG" else "image/jpeg"
    out = []
    for i in range(len(names) * len(bodies)):
        name, (body, label) = names[i % len(names)], bodies[i % len(bodies)]
        head = (
            f"POST /v1/predict?adapter={name} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        out.append((head.encode() + body, label))
    return out


async def drive(port: int, requests: list[tuple[bytes, str]], args: argparse.Namespace, n: int, check: bool) -> Result:
    result = Result()
    todo = iter(range(n))

    async def client() -> None:
        conn = Connection(port)
        try:
            for i in todo:  # one shared iterator: exactly n requests in all
                request, label = requests[i % len(requests)]
                started = time.perf_counter()
                try:
                    status, body = await conn.post(request)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    result.errors[type(exc).__name__] += 1
                    await conn.close()
                    continue
                result.latencies.append(time.perf_counter() - started)
                if status != 200:
                    result.errors[f"HTTP {status}"] += 1
                elif check and json.loads(body)["top_k"][0]["label"] != label:
                    result.errors["wrong label"] += 1
        finally:
            await conn.close()

    started = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(args.concurrency))), args.deadline_s)
    except asyncio.TimeoutError:
        done = len(result.latencies) + sum(result.errors.values())
        result.errors[f"not done before the {args.deadline_s:g} s deadline"] += n - done
    result.wall_s = time.perf_counter() - started
    return result


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (Linux /proc; NaN elsewhere).

    On a shared machine wall-clock throughput mostly measures the neighbours;
    server CPU seconds per request measures the server.
    """
    try:
        fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="timed requests in all (default 2000)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--warmup", type=int, default=64, help="untimed requests first (default 64)")
    p.add_argument("--run", nargs="+", metavar="RUN_DIR", help="serve these run directories instead of the fake")
    p.add_argument("--copies", type=int, default=1, help="serve each run (or the fake) this many times")
    p.add_argument("--spread", action="store_true", help="spread requests evenly over every adapter")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--batch-ms", type=float, default=5.0, help="fake adapter: fixed cost per predict call")
    p.add_argument("--image-ms", type=float, default=0.5, help="fake adapter: extra cost per image")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--format", choices=["JPEG", "PNG"], default="JPEG")
    p.add_argument("--deadline-s", type=float, default=50.0, help="give up (and fail) after this long")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.copies < 1:
        raise SystemExit("--requests, --concurrency and --copies must be >= 1")
    if args.run:  # fail here, before spawning, if the model side is not wired yet
        import vitlora.serve

        if not hasattr(vitlora.serve, "load_adapters"):
            raise SystemExit("--run needs vitlora.serve.load_adapters, which this checkout does not have yet")
    ctx = mp.get_context("spawn")  # a clean interpreter: no inherited threads or event loop
    ready, calls, images = ctx.Queue(), ctx.Value("l", 0), ctx.Value("l", 0)
    server = ctx.Process(target=run_server, args=(args, ready, calls, images), daemon=True)
    server.start()
    try:
        started = ready.get(timeout=300 if args.run else 60)
        if not isinstance(started, tuple):
            print(f"server failed to start: {started}", file=sys.stderr)
            return 1
        port, names = started
        targets = names if args.spread else names[:1]
        requests = build_requests(port, make_bodies(args.image_size, args.format), targets, args.format)
        check = not args.run
        warm = asyncio.run(drive(port, requests, args, args.warmup, check)) if args.warmup else Result()
        calls.value = images.value = 0
        cpu_before = cpu_seconds(server.pid)
        result = asyncio.run(drive(port, requests, args, args.requests, check))
        server_cpu = cpu_seconds(server.pid) - cpu_before
    finally:
        server.terminate()  # SIGTERM: uvicorn shuts down gracefully
        server.join(15)
        if server.is_alive():
            server.kill()
            server.join(5)

    lat = sorted(result.latencies)
    errors = sum(result.errors.values()) + sum(warm.errors.values())
    ms = [1000 * percentile(lat, q) for q in (0.5, 0.9, 0.99)]
    print(
        f"server      : {'run dirs ' + ' '.join(args.run) if args.run else 'fake adapter'}"
        f" (max_batch={args.max_batch}, max_wait_ms={args.max_wait_ms:g}), pid {server.pid}, cpus {os.cpu_count()}"
    )
    print(
        f"load        : {args.requests} requests, {args.concurrency} concurrent clients,"
        f" {args.image_size}px {args.format}, {args.warmup} warm-up,"
        f" {'spread over ' + str(len(targets)) if args.spread else 'all to 1'} of {len(names)} adapters"
    )
    print(f"throughput  : {len(lat) / result.wall_s:.1f} requests/s over {result.wall_s:.2f} s")
    print(f"server cpu  : {server_cpu:.1f} s, {1000 * server_cpu / max(1, len(lat)):.1f} ms per request"
          f" ({len(lat) / server_cpu if server_cpu > 0 else float('nan'):.1f} requests per CPU-second)")
    worst = 1000 * lat[-1] if lat else float("nan")
    print(f"latency     : p50 {ms[0]:.1f} ms, p90 {ms[1]:.1f} ms, p99 {ms[2]:.1f} ms, max {worst:.1f} ms")
    if not args.run and calls.value:
        print(f"batching    : {calls.value} predict calls, mean batch {images.value / calls.value:.1f} images")
    print(f"errors      : {errors}" + (f" {dict(result.errors + warm.errors)}" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
