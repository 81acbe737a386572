#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the web page is tested in a real headless Chromium (Debian's package)
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will fail under CI" >&2
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1
python -m pytest -q -ra "$@"
