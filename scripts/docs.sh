#!/usr/bin/env bash
# Build the documentation: narrative pages with Sphinx (warnings are errors) and the API
# reference from the epytext docstrings with pydoctor (docstring syntax errors are errors).
# Output: docs/_build/html, with the API under docs/_build/html/api.
#
# pydoctor's "Cannot find link target" warnings for Twisted and stdlib names are not fatal:
# resolving them needs intersphinx inventories from the internet, which CI does not have.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m sphinx -W --keep-going -q -b html docs docs/_build/html
out=$("$PY" -m pydoctor --quiet --docformat=epytext --project-name=smeldr-oauth \
    --html-output=docs/_build/html/api smeldr_oauth 2>&1 || true)
if printf '%s\n' "$out" | grep -v "Cannot find link target" | grep -q .; then
    printf '%s\n' "$out" | grep -v "Cannot find link target" >&2
    echo "docs: pydoctor reported problems in docstrings" >&2
    exit 1
fi
echo "docs: built docs/_build/html"
