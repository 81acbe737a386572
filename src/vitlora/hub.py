"""Push a finished vitlora run folder to the Hugging Face hub.

Everything that can be checked locally or cheaply is checked before the first
call that changes anything on the hub: a half-done push (repo created, upload
failed) is worse than a clear refusal. So the order is: is this a run folder,
is the repo id valid, is the hub reachable (or offline mode on), is there a
token; only then create the repo and upload.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, constants, get_session, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .card import strip_local_paths
from .errors import VitloraError
from .rundir import require_run_dir

__all__ = ["push_run", "hub_unreachable_reason", "IGNORE_PATTERNS"]

# Training by-products that are not part of the published artifact. Patterns are
# fnmatch-style on paths relative to the run folder ("*" also matches "/").
IGNORE_PATTERNS = [
    "checkpoints/*",
    "checkpoint-*/*",
    "*/checkpoint-*/*",
    "logs/*",
    "tensorboard/*",
    "wandb/*",
    "__pycache__/*",
    "*/__pycache__/*",
    ".*",
    "*/.*",
    "*.tmp",
    "*.lock",
]
PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def push_run(run_dir: str | Path, repo_id: str, private: bool = False,
             token: str | None = None) -> str:
    """Upload a run folder to the hub model repo `repo_id` and return the repo URL.

    The repo is created if needed (`private` only applies when it is created;
    an existing repo keeps its visibility). Checkpoints and other training
    by-products are skipped (see `IGNORE_PATTERNS`). Raises `VitloraError`,
    before anything is created or uploaded, when the folder is not a run,
    the repo id is invalid, the hub is unreachable or offline mode is on, or
    no token is available.
    """
    run = require_run_dir(run_dir)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise VitloraError(f"invalid hub repo id {repo_id!r}: use 'username/name' ({_one_line(exc)})") from exc

    reason = hub_unreachable_reason()
    if reason is not None:
        raise VitloraError(f"cannot reach the Hugging Face hub ({reason}): check your connection "
                           "or HF_HUB_OFFLINE; nothing was uploaded")

    token = token or _stored_token()
    if not token:
        raise VitloraError("no Hugging Face token found: run `hf auth login` or pass a token "
                           "(or set HF_TOKEN); nothing was uploaded")

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="vitlora-push-") as tmp:
        upload = publishable_copy(run, Path(tmp) / run.resolve().name)
        try:
            repo_url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
            # create_repo resolves a bare "name" to "user/name"; upload to what it created.
            api.upload_folder(
                repo_id=getattr(repo_url, "repo_id", None) or repo_id,
                folder_path=str(upload),
                ignore_patterns=list(IGNORE_PATTERNS),
                commit_message=f"Upload vitlora run {run.resolve().name}",
                token=token,
            )
        except Exception as exc:  # HTTP errors (401/403/409...), connection drops mid-upload
            raise VitloraError(f"pushing {run} to {repo_id} failed: {_one_line(exc)}") from exc
    return str(repo_url)


def publishable_copy(run: Path, dest: Path) -> Path:
    """The run as it is uploaded: no checkpoints or links, and no absolute local paths in its JSON files
    (`vitlora.json`, `metrics.json`, `adapter_config.json` record where things lay on the trainer's disk)."""
    shutil.copytree(run, dest, symlinks=True, ignore=shutil.ignore_patterns("checkpoints", ".*"))
    for path in [p for p in dest.rglob("*") if p.is_symlink()]:
        path.unlink()
    for path in dest.rglob("*.json"):
        if path.is_file() and not path.is_symlink():
            try:
                doc = json.loads(path.read_text())
            except ValueError:
                continue
            path.write_text(json.dumps(strip_local_paths(doc), indent=2) + "\n")
    return dest


def hub_unreachable_reason(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used now, or None when it answered (`push`, and model loading before a download).

    HF_HUB_OFFLINE is read from the environment at call time as well as from
    huggingface_hub's constant (which is frozen at import). The probe goes
    through huggingface_hub's own HTTP client so proxies and certificates are
    the ones the upload will use.
    """
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        return "HF_HUB_OFFLINE=1"
    endpoint = endpoint or constants.ENDPOINT
    try:
        response = get_session().head(endpoint, timeout=timeout)
    except Exception as exc:  # DNS failure, refused, timeout, TLS error...
        return f"{endpoint}: {type(exc).__name__}"
    if response.status_code >= 500:
        return f"{endpoint} answered HTTP {response.status_code}"
    return None


def _stored_token() -> str | None:
    """Token from HF_TOKEN or `hf auth login`; None when there is none or it cannot be read."""
    try:
        return get_token()
    except Exception:  # e.g. a configured OIDC exchange that failed
        return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
