#!/usr/bin/env bash
# Install everything the test suite needs and run all of it: lint, the docs build, and every
# trial test (unit, real-socket, end-to-end with real clients, conformance, browser, bench smoke).
# Used by README.md ("run every test") and by .ci/run.  Safe to run again: setup steps are idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
quiet_pip() { grep -v "^WARNING: Location" || true; }

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip 2>&1 | quiet_pip
.venv/bin/pip install -q --disable-pip-version-check -r requirements-test.txt 2>&1 | quiet_pip
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | quiet_pip

# Client tooling for the end-to-end tests (npm packages, a second Python SDK, Chromium, wrk).
for setup in scripts/setup-*.sh; do
    echo "== $setup"
    bash "$setup"
done

echo "== lint"
.venv/bin/ruff check smeldr_oauth twisted tests bench examples
echo "== types"
.venv/bin/mypy smeldr_oauth
echo "== tests"
# Every end-to-end, conformance and browser test must run: see tests/prerequisites.py.
export SMELDR_TESTS_STRICT=1
export SMELDR_MATRIX_DIR=${SMELDR_MATRIX_DIR:-$PWD/.trial_temp-matrix}
rm -rf "$SMELDR_MATRIX_DIR" && mkdir -p "$SMELDR_MATRIX_DIR"
# The suite runs against the installed package (twisted/plugins included).
set +e
.venv/bin/python -m twisted.trial --temp-directory=.trial_temp "${@:-tests}" 2>&1 | tee .trial_temp-summary.txt
status=${PIPESTATUS[0]}
set -e
if [ "$status" -eq 0 ]; then
    .venv/bin/python scripts/matrix.py "$SMELDR_MATRIX_DIR" docs/clients.md
    echo "== docs"
    PY=.venv/bin/python bash scripts/docs.sh || status=1
fi
# One plain closing line: "N passed, N failed, N skipped" (after each skip's reason: under
# this command a skip fails the run).
.venv/bin/python scripts/summary.py .trial_temp-summary.txt "$status" || status=1
exit "$status"
