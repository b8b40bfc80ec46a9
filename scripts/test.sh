#!/usr/bin/env bash
# Install everything the test suite needs into ./.venv and run the whole suite.
# Used by README.md ("run every test") and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/pip install -q --disable-pip-version-check -r requirements-test.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
# The suite runs against the installed package (twisted/plugins included).
.venv/bin/python -m twisted.trial --temp-directory=.trial_temp "${@:-tests}"
