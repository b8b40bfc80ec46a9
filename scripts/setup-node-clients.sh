#!/usr/bin/env bash
# Install the Node MCP clients the end-to-end tests drive (the official
# TypeScript SDK and mcp-remote), exactly as pinned in tests/node/package-lock.json,
# into tests/node/node_modules (gitignored). Idempotent; see scripts/npm-pinned.sh.
set -euo pipefail
exec bash "$(dirname "$0")/npm-pinned.sh" tests/node setup-node-clients
