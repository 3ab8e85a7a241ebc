#!/usr/bin/env bash
# Installs Debian's headless Chromium and its WebDriver (chromium, chromium-driver) for the browser
# tests, only when one of them is missing. Idempotent; needs root (or sudo) for apt-get.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "setup_browser.sh: chromium/chromedriver missing and not root; browser tests will fail" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
echo "setup_browser.sh: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
