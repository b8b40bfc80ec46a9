#!/usr/bin/env bash
# Install the upstream MCP servers the gateway's tests run behind smeldr-oauth: the official
# reference server @modelcontextprotocol/server-everything, exactly as pinned in
# tests/upstreams/package-lock.json, into tests/upstreams/node_modules (gitignored).
# The Python SDK server (tests/upstreams/sdk_server.py) needs only the `mcp` package pinned in
# requirements-test.txt. Idempotent; see scripts/npm-pinned.sh.
set -euo pipefail
exec bash "$(dirname "$0")/npm-pinned.sh" tests/upstreams setup-upstreams
