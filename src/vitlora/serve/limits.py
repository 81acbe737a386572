"""The server's bounds and its client-facing error: what both the request path (`core`) and the
upload reader (`upload`) need, kept apart so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass

from vitlora.errors import VitloraError


class ApiError(VitloraError):
    """An error answered to the client as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass(frozen=True)
class Limits:
    """Per-server bounds on memory, threads and time (see the module docstring)."""

    max_upload_mb: float = 10.0
    max_pixels: int = 40_000_000  # 120 MB as RGB; Pillow's own bomb limit is ~179 Mpx
    max_decodes: int = 2
    max_queue: int = 64
    read_timeout_s: float = 60.0  # the whole body; 10 MB needs ~1.4 Mbit/s
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "max_pixels", "max_decodes", "max_queue", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise VitloraError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
