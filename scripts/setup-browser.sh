#!/usr/bin/env bash
# Install what tests/test_browser_pages.py needs: Debian's Chromium and its
# WebDriver (chromedriver). Idempotent: does nothing when both are present,
# and runs `apt-get update` only when the package lists are missing or the
# install fails on stale lists. The selenium Python binding itself is pinned
# in requirements-test.txt.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive

install() {
    $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
}

# An image with no package lists knows no chromium: update first then.
if ! apt-cache show chromium >/dev/null 2>&1 || ! apt-cache show chromium-driver >/dev/null 2>&1; then
    $SUDO apt-get update -q
    install
elif ! install; then
    # Lists that are old enough to name versions the mirror no longer has.
    $SUDO apt-get update -q
    install
fi

/usr/bin/chromium --version
/usr/bin/chromedriver --version
