#!/bin/sh
# Install what the PostgreSQL tests need: the server binaries (Debian's
# `postgresql` package: initdb and postgres under /usr/lib/postgresql/*/bin).
# The tests start and stop their own throwaway cluster (tests/postgres.py);
# this script never starts one, and the package's own cluster is not used.
# Idempotent: does nothing when the binaries are already there.  Needs root
# (or sudo) for apt-get.
set -eu

find_bindir() {
    if [ -n "${SMELDR_PG_BINDIR:-}" ] && [ -x "$SMELDR_PG_BINDIR/initdb" ]; then
        echo "$SMELDR_PG_BINDIR"
        return 0
    fi
    # The newest installed major version.
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

if bindir=$(find_bindir); then
    echo "PostgreSQL already installed: $bindir"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends postgresql; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends postgresql
fi
find_bindir
