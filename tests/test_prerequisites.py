"""
Tests for L{tests.prerequisites}: the one rule for a missing test tool, the
checks of every end-to-end, conformance and browser module going through
it with the install step in the message, and the test command that makes
it strict and refuses skips (C{scripts/test.sh}, C{scripts/summary.py}).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any, Optional

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests import (
    prerequisites,
    test_browser_pages,
    test_conformance,
    test_e2e_python_sdk,
    test_e2e_python_sdk1,
    test_e2e_typescript_sdk,
)
from tests.e2e import CHECKOUT


class EnvironmentMixin:
    """
    Set environment variables for one test.
    """

    addCleanup: Callable[..., Any]

    def setEnvironment(self, name: str, value: Optional[str]) -> None:
        old = os.environ.get(name)

        def restore() -> None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

        self.addCleanup(restore)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class RequireTests(EnvironmentMixin, SynchronousTestCase):
    """
    L{prerequisites.require}: a failure under the README's test command, a
    skip elsewhere, and both say how to install what is missing.
    """

    def test_present(self) -> None:
        """
        Nothing missing: the test goes on, strict or not.
        """
        for value in ("1", None):
            self.setEnvironment(prerequisites.STRICT_ENV, value)
            prerequisites.require(None, "bash scripts/setup-x.sh")

    def test_strictFails(self) -> None:
        self.setEnvironment(prerequisites.STRICT_ENV, "1")
        with self.assertRaises(AssertionError) as raised:
            prerequisites.require("node is not on PATH", "bash scripts/setup-x.sh")
        message = str(raised.exception)
        self.assertIn("node is not on PATH", message)
        self.assertIn("install it with: bash scripts/setup-x.sh", message)

    def test_bareRunSkips(self) -> None:
        for value in (None, "", "0", "true"):
            self.setEnvironment(prerequisites.STRICT_ENV, value)
            with self.assertRaises(SkipTest) as raised:
                prerequisites.require("node is not on PATH", "bash scripts/setup-x.sh")
            self.assertIn("install it with: bash scripts/setup-x.sh", str(raised.exception))

    def test_ciVariableIsNotTheRule(self) -> None:
        """
        C{CI} (which the earlier rules read, each its own way) decides
        nothing: only the test command's variable does.
        """
        self.setEnvironment(prerequisites.STRICT_ENV, None)
        self.setEnvironment("CI", "true")
        self.assertRaises(SkipTest, prerequisites.require, "x", "y")

    def test_testCommandIsStrict(self) -> None:
        """
        C{scripts/test.sh} exports the variable before it runs trial.
        """
        with open(os.path.join(CHECKOUT, "scripts", "test.sh")) as f:
            script = f.read()
        exported = script.find(f"export {prerequisites.STRICT_ENV}=1\n")
        self.assertNotEqual(exported, -1, script)
        self.assertLess(exported, script.index("-m twisted.trial"), script)


class ToolChecksTests(EnvironmentMixin, SynchronousTestCase):
    """
    Each module's check, with its tool made unavailable: under the test
    command it fails and names the exact install step.
    """

    def setUp(self) -> None:
        self.setEnvironment(prerequisites.STRICT_ENV, "1")
        self.nowhere = os.path.abspath(self.mktemp())
        os.makedirs(self.nowhere)

    def assertFailsNaming(self, check: Callable[[], object], install: str) -> str:
        with self.assertRaises(AssertionError) as raised:
            check()
        message = str(raised.exception)
        self.assertIn(f"install it with: {install}", message)
        return message

    def test_nodeMissing(self) -> None:
        """
        No C{node} on C{PATH}.
        """
        self.setEnvironment("PATH", self.nowhere)
        message = self.assertFailsNaming(
            lambda: test_e2e_typescript_sdk.requireNodeClient(test_e2e_typescript_sdk.SDK_PACKAGE),
            "apt-get install nodejs npm (Node >= 20), then bash scripts/setup-node-clients.sh",
        )
        self.assertIn("node is not on PATH", message)

    def test_nodePackageMissing(self) -> None:
        """
        Node is there, the pinned client package is not.
        """
        package = os.path.join(self.nowhere, "package.json")
        self.assertFailsNaming(
            lambda: test_e2e_typescript_sdk.requireNodeClient(package), "bash scripts/setup-node-clients.sh"
        )

    def test_browserMissing(self) -> None:
        self.patch(test_browser_pages, "CHROMEDRIVER", os.path.join(self.nowhere, "chromedriver"))
        message = self.assertFailsNaming(test_browser_pages.requireBrowser, test_browser_pages.INSTALL)
        self.assertIn("bash scripts/setup-browser.sh", message)
        self.assertIn("chromedriver", message)

    def test_conformanceMissing(self) -> None:
        self.patch(test_conformance, "MODULES", self.nowhere)
        self.assertFailsNaming(test_conformance.requireTooling, "bash scripts/setup-conformance.sh")

    def test_pythonSDKMissing(self) -> None:
        """
        The Python SDK 2.x end-to-end tests no longer skip silently without
        C{mcp}.
        """
        real = importlib.util.find_spec
        self.patch(importlib.util, "find_spec", lambda name, *a: None if name == "mcp" else real(name, *a))
        message = self.assertFailsNaming(
            test_e2e_python_sdk._requireSDK, ".venv/bin/pip install -r requirements-test.txt"
        )
        self.assertIn("mcp", message)

    def test_pythonSDK1Missing(self) -> None:
        self.patch(test_e2e_python_sdk1, "PYTHON1", os.path.join(self.nowhere, "python"))
        self.assertFailsNaming(test_e2e_python_sdk1._requireSDK, "bash scripts/setup-python-sdk1.sh")


def _loadSummary() -> Any:
    spec = importlib.util.spec_from_file_location(
        "smeldr_scripts_summary", os.path.join(CHECKOUT, "scripts", "summary.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: What trial prints for a run with two skips.
TRIAL_OUTPUT = """\
tests.test_x
  A
    test_a ...                                                        [SKIPPED]
    test_b ...                                                        [SKIPPED]
    test_c ...                                                             [OK]

===============================================================================
[SKIPPED]
node is not on PATH; install it with: bash scripts/setup-node-clients.sh

tests.test_x.A.test_a
===============================================================================
[SKIPPED]
a reason
on two lines

tests.test_x.A.test_b
-------------------------------------------------------------------------------
Ran 3 tests in 0.010s

PASSED (skips=2, successes=1)
"""


class SummaryTests(EnvironmentMixin, SynchronousTestCase):
    """
    C{scripts/summary.py}: the closing line counts skips, each skip's reason
    is shown, and under the test command a skip fails the run.
    """

    def setUp(self) -> None:
        self.summary = _loadSummary()
        self.output = self.mktemp()
        with open(self.output, "w") as f:
            f.write(TRIAL_OUTPUT)
        self.printed: list[str] = []
        self.patch(sys, "stdout", self)

    def write(self, text: str) -> None:
        self.printed.append(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        return "".join(self.printed).splitlines()

    def test_bareRun(self) -> None:
        self.setEnvironment(prerequisites.STRICT_ENV, None)
        self.assertEqual(self.summary.main(self.output, "0"), 0)
        self.assertEqual(
            self.lines(),
            [
                "skipped: tests.test_x.A.test_a: node is not on PATH; install it with: "
                "bash scripts/setup-node-clients.sh",
                "skipped: tests.test_x.A.test_b: a reason on two lines",
                "tests: 1 passed, 0 failed, 2 skipped",
            ],
        )

    def test_testCommand(self) -> None:
        self.setEnvironment(prerequisites.STRICT_ENV, "1")
        self.assertEqual(self.summary.main(self.output, "0"), 1)
        self.assertEqual(self.lines()[-1], "tests: 1 passed, 0 failed, 2 skipped")

    def test_testCommandWithoutSkips(self) -> None:
        self.setEnvironment(prerequisites.STRICT_ENV, "1")
        with open(self.output, "w") as f:
            f.write("Ran 1 tests in 0.1s\n\nPASSED (successes=1)\n")
        self.assertEqual(self.summary.main(self.output, "0"), 0)
        self.assertEqual(self.lines(), ["tests: 1 passed, 0 failed, 0 skipped"])
