#!/usr/bin/env bash
# Usage: npm-pinned.sh DIR NAME
# Install DIR's npm packages exactly as DIR/package-lock.json pins them (`npm ci`) into
# DIR/node_modules (gitignored), for the setup script NAME (used in messages).
#
# Idempotent: `npm ci` runs only when the lock file changed since the last successful install
# (its hash is kept in node_modules/.smeldr-lock-sha256). Needs node >= 20 and npm on PATH; the
# npm registry must be reachable on the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$1
NAME=$2

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "$NAME: node and npm are required (Node >= 20)" >&2
    exit 1
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
    echo "$NAME: Node >= 20 is required, found $(node --version)" >&2
    exit 1
fi

stamp="$DIR/node_modules/.smeldr-lock-sha256"
want=$(sha256sum "$DIR/package-lock.json" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
npm ci --prefix "$DIR" --no-audit --no-fund --loglevel=error
echo "$want" > "$stamp"
