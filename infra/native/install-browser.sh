#!/usr/bin/env bash
# Make Debian's Chromium and its driver available for the browser test of the UIs
# (tests/flows/test_serve.py drives the Prefect and MLflow UIs with Selenium; no browser
# is downloaded by any tool, Debian's packages are the browser).
#
# Already there: nothing to do. Otherwise, as root with apt-get: install `chromium` and
# `chromium-driver`. Without root or apt-get it says why and exits 0: the browser test then
# skips with that reason. A failed install as root exits non-zero, so CI fails loudly.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "Chromium found: $(command -v chromium), driver $(command -v chromedriver)"
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "Chromium is not installed and installing it needs root (apt-get install chromium chromium-driver)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "Chromium is not installed and this system has no apt-get to install it with"
    exit 0
fi
echo "installing Chromium and chromium-driver from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
command -v chromedriver >/dev/null || { echo "chromium-driver installed but no chromedriver found" >&2; exit 1; }
echo "Chromium installed: $(command -v chromium)"
