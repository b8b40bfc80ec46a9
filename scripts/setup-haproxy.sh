#!/bin/sh
# Install the load balancer the tests put in front of real servers
# (tests/haproxy.py): Debian's haproxy.  Idempotent: does nothing when it is
# already installed.  Needs root (or sudo) for apt-get.  The tests start
# private instances (their own config, ephemeral ports); a service the
# package may start with its default configuration is not used.
set -eu

if command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; then
    echo "haproxy already installed: $(/usr/sbin/haproxy -v 2>/dev/null | head -1)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends haproxy; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends haproxy
fi
/usr/sbin/haproxy -v | head -1
