#!/bin/sh
# Install what `python -m bench` needs beyond the venv: wrk, the load
# generator for the fixed GETs (Debian package).  Idempotent: does nothing
# when wrk is already on PATH.  Needs root (or sudo) for apt-get.
set -eu

if command -v wrk >/dev/null 2>&1; then
    echo "wrk already installed: $(command -v wrk)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends wrk; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends wrk
fi
command -v wrk
