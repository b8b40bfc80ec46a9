"""
The one rule for tests that need a tool from outside Python (a Node
client, a browser, PostgreSQL, HAProxy, ...): under the README's test
command (C{bash scripts/test.sh}, which exports C{SMELDR_TESTS_STRICT=1}
after installing everything) a missing tool is a failure that names the
install step; in a bare C{trial} run by a developer it is a skip, which
trial's summary reports.
"""

from __future__ import annotations

import os
from typing import Optional

from twisted.trial.unittest import SkipTest

#: Set to C{1} by C{scripts/test.sh}: every prerequisite must be there.
STRICT_ENV = "SMELDR_TESTS_STRICT"


def strict() -> bool:
    """
    Whether this run must not skip (the README's test command, and CI).
    """
    return os.environ.get(STRICT_ENV) == "1"


def require(missing: Optional[str], install: str) -> None:
    """
    Stop the calling test when a prerequisite is missing.

    @param missing: what is missing (C{None} when nothing is).
    @param install: the step that installs it, e.g. C{"bash
        scripts/setup-node-clients.sh"}.
    @raise AssertionError: under L{strict} runs.
    @raise SkipTest: otherwise.
    """
    if missing is None:
        return
    message = f"{missing}; install it with: {install}"
    if strict():
        raise AssertionError(f"prerequisite missing under the README's test command: {message}")
    raise SkipTest(message)
