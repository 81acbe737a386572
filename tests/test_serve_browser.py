"""The `vitlora serve` web page, driven in real headless Chromium.

Chromium is controlled over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages, NUL-terminated, on fds 3 and 4),
so the test needs no chromedriver, selenium or websocket package and no
debugging port that other processes could reach or collide with.

Without Chromium the tests skip locally but fail when ``CI`` is set, because
CI installs it (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vitlora.cli import main
from vitlora.serve import create_app, load_adapters, running_server

from fake_adapters import PALETTE, ColourAdapter

WAIT_S = 15.0


def find_chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "chromium", "chromium-browser"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


# Runs in the child: move our pipe ends to fds 3/4, where Chromium expects them, then exec it.
_LAUNCHER = (
    "import fcntl, os, sys\n"
    "hi = [fcntl.fcntl(int(fd), fcntl.F_DUPFD_CLOEXEC, 10) for fd in sys.argv[1:3]]\n"
    "os.dup2(hi[0], 3); os.dup2(hi[1], 4)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


class Browser:
    """Minimal DevTools-protocol client for one headless Chromium over a pipe."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", "--disable-dev-shm-usage", "--remote-debugging-pipe",
            f"--user-data-dir={profile}", "about:blank",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(to_chrome_r), str(from_chrome_w), *args],
            pass_fds=(to_chrome_r, from_chrome_w),
            start_new_session=True,  # its own process group, so teardown can reach every helper
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True, name="cdp-reader").start()

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._from_chrome, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                self._inbox.put(json.loads(raw))
        os.close(self._from_chrome)
        self._inbox.put(None)  # Chromium closed the pipe

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + WAIT_S
        while self._next_id not in self._replies:
            try:
                reply = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no reply to {method} in {WAIT_S:g} s") from None
            if reply is None:
                raise RuntimeError(f"Chromium exited (code {self.proc.poll()}) during {method}")
            if "id" in reply:
                self._replies[reply["id"]] = reply
            else:
                self.events.append(reply)
        reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def open(self, url: str) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Runtime", "Network", "Page"):
            self.call(f"{domain}.enable", session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        page.wait_for("document.readyState === 'complete' && location.href.startsWith('http')")
        return page

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("Browser.close")
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - whatever happened, the process must go
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        finally:
            os.close(self._to_chrome)


class Page:
    """One tab, addressed through its DevTools session."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def js(self, expression: str) -> Any:
        result = self.browser.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=self.session,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.js(expression)
            except RuntimeError:  # mid-navigation there is briefly no JS context
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still false after {timeout:g} s; page: {self.state()}")
            time.sleep(0.05)

    def state(self) -> dict[str, Any]:
        return self.js(
            "({status: document.querySelector('#status').dataset.state,"
            " error: document.querySelector('#error').textContent,"
            " adapter: document.querySelector('#results').dataset.adapter})"
        )

    def upload(self, path: Path) -> None:
        root = self.browser.call("DOM.getDocument", {"depth": 0}, session=self.session)["root"]["nodeId"]
        node = self.browser.call("DOM.querySelector", {"nodeId": root, "selector": "#file"}, session=self.session)
        files = {"files": [str(path)], "nodeId": node["nodeId"]}
        self.browser.call("DOM.setFileInputFiles", files, session=self.session)

    def bars(self) -> list[tuple[str, float, str]]:
        return [
            tuple(row)
            for row in self.js(
                "[...document.querySelectorAll('#results .bar[data-label]')].map(b =>"
                " [b.dataset.label, Number(b.dataset.score), b.querySelector('.pct').textContent])"
            )
        ]

    def choose_adapter(self, name: str) -> None:
        self.js(
            f"(() => {{ const s = document.querySelector('#adapter'); s.value = {json.dumps(name)};"
            " s.dispatchEvent(new Event('change')); })()"
        )

    def set_token(self, token: str) -> None:
        self.js(
            f"(() => {{ const t = document.querySelector('#token'); t.value = {json.dumps(token)};"
            " t.dispatchEvent(new Event('change')); })()"
        )

    def wait_for_result(self, adapter: str) -> list[tuple[str, float, str]]:
        self.wait_for(
            "document.querySelector('#status').dataset.state === 'done' &&"
            f" document.querySelector('#results').dataset.adapter === {json.dumps(adapter)}"
        )
        return self.bars()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    binary = find_chromium()
    if binary is None:
        message = "Chromium not found (Debian: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must install it")
        pytest.skip(message)
    b = Browser(binary, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    folder = tmp_path_factory.mktemp("images")

    def make(colour: str) -> Path:
        path = folder / f"{colour}.png"
        if colour == "text":
            path.write_text("definitely not a picture")
        else:
            Image.new("RGB", (48, 48), PALETTE[colour]).save(path)
        return path

    return make


def assert_no_page_problems(browser: Browser, origin: str) -> None:
    """No uncaught JS exceptions, and nothing fetched from anywhere but the server."""
    exceptions = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
    assert not exceptions, exceptions
    urls = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert urls, "network events were not recorded"
    foreign = [u for u in urls if not u.startswith((origin, "blob:", "data:", "about:"))]
    assert not foreign, foreign


def test_upload_shows_bars_and_adapter_switch(browser: Browser, images: Callable[[str], Path]) -> None:
    adapters = [ColourAdapter("rgb", ["red", "green", "blue"]), ColourAdapter("palette", list(PALETTE))]
    with running_server(create_app(adapters)) as url:
        browser.events.clear()
        page = browser.open(url + "/")
        page.wait_for("document.querySelectorAll('#adapter option').length === 2")
        assert page.js("document.querySelector('#adapter').value") == "rgb"

        page.upload(images("red"))
        bars = page.wait_for_result("rgb")
        assert bars[0][0] == "red"
        assert len(bars) == 3  # only 3 labels exist
        assert bars[0][2].endswith("%") and float(bars[0][2][:-1]) == pytest.approx(bars[0][1] * 100, abs=0.06)
        assert page.js("document.querySelector('#preview').hidden") is False

        page.choose_adapter("palette")
        bars = page.wait_for_result("palette")
        assert len(bars) == 5 and bars[0][0] == "red"
        assert [s for _, s, _ in bars] == sorted((s for _, s, _ in bars), reverse=True)

        page.upload(images("green"))
        page.wait_for("document.querySelector('#results .bar').dataset.label === 'green'")
        assert page.bars()[0][0] == "green" and len(page.bars()) == 5
        assert_no_page_problems(browser, url)


def test_token_field_and_error_display(browser: Browser, images: Callable[[str], Path]) -> None:
    adapters = [ColourAdapter("rgb", ["red", "green", "blue"])]
    with running_server(create_app(adapters, token="s3cret")) as url:
        page = browser.open(url + "/")
        error = page.wait_for(
            "!document.querySelector('#error').hidden && document.querySelector('#error').textContent"
        )
        assert "token" in error.lower()

        page.set_token("s3cret")
        page.wait_for("document.querySelectorAll('#adapter option').length === 1")
        assert page.js("document.querySelector('#error').hidden") is True
        assert page.js("localStorage.getItem('vitlora.token')") == "s3cret"

        page.upload(images("text"))
        message = page.wait_for(
            "document.querySelector('#status').dataset.state === 'error'"
            " && document.querySelector('#error').textContent"
        )
        assert "not an image" in message
        assert page.bars() == []

        page.upload(images("blue"))
        assert page.wait_for_result("rgb")[0][0] == "blue"

        # The token survives a reload (localStorage), so the page works straight away.
        page.js("window.beforeReload = true; location.reload()")
        page.wait_for("!window.beforeReload && document.querySelectorAll('#adapter option').length === 1")
        assert page.js("document.querySelector('#token').value") == "s3cret"


@pytest.fixture(scope="module")
def tiny_run(tiny_model: Path, colour_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) trained run: only real adapters draw explanations."""
    out = tmp_path_factory.mktemp("browser-run") / "colours"
    args = ["train", str(colour_folder), "--model", str(tiny_model), "--out", str(out), "--epochs", "1", "--quiet"]
    assert main(args) == 0
    return out


OVERLAY_SIZE = (
    "(() => { const o = document.querySelector('#overlay');"
    " return !document.querySelector('#explain').hidden && o.complete && o.naturalWidth > 0"
    " && [o.naturalWidth, o.naturalHeight, o.getBoundingClientRect().width, o.dataset.label]; })()"
)


def test_upload_shows_the_explanation_beside_the_bars(
    browser: Browser, images: Callable[[str], Path], tiny_run: Path, colour_folder: Path, tmp_path: Path
) -> None:
    photo = tmp_path / "wide.png"  # not square, so a wrong aspect would show
    Image.open(sorted((colour_folder / "green").iterdir())[1]).convert("RGB").resize((300, 200)).save(photo)
    with running_server(create_app(load_adapters([tiny_run], device="cpu"))) as url:
        browser.events.clear()
        page = browser.open(url + "/")
        page.wait_for("document.querySelectorAll('#adapter option').length === 1")
        assert page.js("document.querySelector('#explain').hidden") is True

        page.upload(photo)
        bars = page.wait_for_result("colours")
        width, height, shown_width, label = page.wait_for(OVERLAY_SIZE)
        assert width * 200 == height * 300 and shown_width > 0  # the upload's aspect, and laid out
        assert label == bars[0][0]

        page.upload(images("text"))  # an error clears the previous photo's explanation
        page.wait_for("document.querySelector('#status').dataset.state === 'error'")
        assert page.js("document.querySelector('#explain').hidden") is True
        assert page.js("document.querySelector('#overlay').hasAttribute('src')") is False
        assert_no_page_problems(browser, url)


def test_docs_page_renders_offline(browser: Browser) -> None:
    """Swagger UI draws the API from this server's own assets; nothing is fetched from a CDN."""
    with running_server(create_app([ColourAdapter("rgb", ["red", "green", "blue"])])) as url:
        browser.events.clear()
        page = browser.open(url + "/docs")
        title = page.wait_for("document.querySelector('.swagger-ui .info .title')?.textContent")
        assert "vitlora serve" in title
        page.wait_for("document.querySelectorAll('.opblock').length > 3")
        paths = page.js("[...document.querySelectorAll('.opblock-summary-path')].map(e => e.textContent)")
        assert any("/v1/predict" in p for p in paths) and any("/v2/models/{model}/infer" in p for p in paths)
        assert_no_page_problems(browser, url)
