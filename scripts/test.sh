#!/usr/bin/env bash
# Installs what the tests need and runs them: the README's test command, and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q -r requirements.txt

# Browser tests drive Debian's Chromium (Playwright's own browser download cannot work offline).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is not installed and cannot be installed here: browser tests will be skipped"
  fi
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
# 1) everything that runs natively on the CPU
python3 -m pytest -q -m "not interpret" "$@" || status=$?
# 2) the Triton kernels under the interpreter (the variable must be set before Triton starts);
#    pytest's exit code 5 (nothing selected) is not a failure when a filter deselects them all
TRITON_INTERPRET=1 python3 -m pytest -q -m interpret "$@" || { rc=$?; [ "$rc" = 5 ] || status=$rc; }
exit $status
