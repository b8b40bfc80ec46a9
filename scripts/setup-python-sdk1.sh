#!/usr/bin/env bash
# Install the official MCP Python SDK 1.x (pinned in tests/clients/requirements-mcp1.txt) into
# its own venv, .tooling/mcp1, for tests/test_e2e_python_sdk1.py. It cannot share .venv: the test
# venv holds mcp 2.x. Idempotent: a venv already holding exactly these pins is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.tooling/mcp1
REQUIREMENTS=tests/clients/requirements-mcp1.txt
STAMP="$VENV/.requirements-installed"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && cmp -s "$REQUIREMENTS" "$STAMP"; then
    exit 0
fi
mkdir -p .tooling
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
# --no-deps: the file pins every dependency, so nothing unpinned sneaks in.
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -r "$REQUIREMENTS"
"$VENV/bin/pip" check
"$VENV/bin/python" -c 'import importlib.metadata as m, mcp.client.auth; print("mcp", m.version("mcp"), "in '"$VENV"'")'
cp "$REQUIREMENTS" "$STAMP"
