"""The bounded loopback load test: thousands of concurrent requests, zero errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_load_test_has_zero_errors_and_batches():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "loadtest.py"), "--requests", "2000", "--concurrency", "32"],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^errors\s*: 0$", out.stdout, re.M), out.stdout
    assert "2000 requests" in out.stdout
    calls = int(re.search(r"(\d+) predict calls", out.stdout).group(1))
    assert calls < 2000  # concurrent requests were batched into fewer model calls


def test_load_test_spreads_requests_over_adapters():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "loadtest.py"), "--requests", "400", "--concurrency", "16",
         "--copies", "4", "--spread", "--warmup", "16"],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^errors\s*: 0$", out.stdout, re.M), out.stdout
    assert "spread over 4 of 4 adapters" in out.stdout
