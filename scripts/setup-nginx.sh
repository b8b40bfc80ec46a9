#!/bin/sh
# Install nginx, the proxy the doctor tests use where HAProxy cannot show a
# fault (HAProxy never buffers responses; nginx does with
# `proxy_buffering on`): see tests/nginx.py.  Idempotent: does nothing when
# it is already installed.  Needs root (or sudo) for apt-get.  The tests
# start private instances (their own config, ephemeral ports); a service the
# package may start with its default site is not used.
set -eu

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    echo "nginx already installed: $(/usr/sbin/nginx -v 2>&1)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends nginx-light; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends nginx-light
fi
/usr/sbin/nginx -v
