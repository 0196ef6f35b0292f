#!/usr/bin/env bash
# Debian's Chromium for the console's browser tests (Playwright drives it via executable_path;
# Playwright's own browser download is not used). Idempotent; exits 0 even when it cannot install.
set -u
# A CJK font, so pages in Simplified Chinese render (and screenshot) with glyphs, not boxes.
if [ -x /usr/bin/chromium ] && fc-list 2>/dev/null | grep -qi "wenquanyi"; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends chromium fonts-wqy-zenhei >/dev/null 2>&1; then
    $SUDO apt-get update >/dev/null 2>&1 || true
    $SUDO apt-get install -y --no-install-recommends chromium fonts-wqy-zenhei >/dev/null 2>&1 || true
fi
if [ -x /usr/bin/chromium ]; then
    echo "chromium: $(/usr/bin/chromium --version 2>/dev/null)"
else
    echo "chromium: could not be installed (the console's browser tests will fail or skip)" >&2
fi
exit 0
