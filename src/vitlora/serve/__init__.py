"""``vitlora serve``: an HTTP API and a small web page for LoRA image classifiers.

The model side (loading one base model and several run directories as
adapters) plugs in through the :class:`~vitlora.serve.app.Adapter` protocol;
this package only knows how to batch, validate and answer requests.

Importing this package needs the ``serve`` extra (fastapi, uvicorn,
python-multipart); the rest of vitlora does not.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from vitlora.errors import VitloraError
from vitlora.serve.app import Adapter, ApiError, Limits, create_app, decode_image

__all__ = [
    "Adapter", "ApiError", "Limits", "check_port", "create_app", "decode_image", "load_adapters",
    "running_server", "serve",
]


def __getattr__(name: str) -> Any:
    """``load_adapters`` imports torch and peft: load it on first use only.

    Keeps ``import vitlora.serve`` light for tests, benchmarks and tools that
    bring their own adapters.
    """
    if name == "load_adapters":
        from vitlora.serve.adapters import load_adapters

        return load_adapters
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


log = logging.getLogger(__name__)

#: Seconds uvicorn waits for in-flight requests on Ctrl-C before cutting them off.
GRACEFUL_SHUTDOWN_S = 10
#: Seconds an idle keep-alive connection stays open (a stalled upload is cut by the app's read timeout).
KEEP_ALIVE_S = 5


#: Seconds a connection may take to send a request's headers (uvicorn itself never times this out).
HEADER_TIMEOUT_S = 10.0


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection that does not finish its request headers in time.

    Without it a client that connects and sends a header byte now and then
    holds a connection forever (slowloris). The body has its own deadline in
    the app (``read_timeout_s``); idle keep-alive connections have uvicorn's.
    """

    class HeaderTimeoutH11(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            waiting_after = self.cycle  # a new request replaces self.cycle before the timer fires
            self.loop.call_later(seconds, self._header_deadline, waiting_after)

        def _header_deadline(self, waiting_after: object) -> None:
            if self.cycle is waiting_after and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11


def check_port(port: object) -> int:
    """The port as an int in 1..65535, or a one-line VitloraError (not uvicorn's OverflowError)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise VitloraError(f"--port must be between 1 and 65535, got {port}")
    return port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **uvicorn_options: Any) -> None:
    """Run ``app`` with uvicorn until Ctrl-C; loopback-only unless ``host`` says otherwise.

    Warns when listening beyond loopback without a token, because anyone on
    the network could then use (and load) the model.
    """
    port = check_port(port)
    if not _is_loopback(host) and not getattr(app.state, "token_required", True):
        log.warning("serving on %s without --token: anyone who can reach this port can use it", host)
    options: dict[str, Any] = {
        "log_level": "info",
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        "timeout_keep_alive": KEEP_ALIVE_S,
        "http": header_timeout_protocol(HEADER_TIMEOUT_S),
        "server_header": False,
    }
    options.update(uvicorn_options)
    uvicorn.run(app, host=host, port=port, **options)


@contextlib.contextmanager
def running_server(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = 20.0,
    header_timeout_s: float = HEADER_TIMEOUT_S,
) -> Iterator[str]:
    """Run ``app`` on a background thread for tests and benchmarks; yields its base URL.

    ``port=0`` lets the OS pick a free port, so parallel runs never collide.
    The server is always stopped (graceful, then joined) when the block exits.
    """
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="on", timeout_keep_alive=KEEP_ALIVE_S,
        http=header_timeout_protocol(header_timeout_s),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="vitlora-test-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive():
                raise VitloraError(f"server on {host}:{port} failed to start (see log above)")
            if time.monotonic() > deadline:
                raise VitloraError(f"server on {host}:{port} did not start in {startup_timeout:g} s")
            time.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()
        url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        yield f"http://{url_host}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
