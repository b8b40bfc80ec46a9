"""
The C{smeldr-oauth} plugin is packaged: C{twist} finds it after a regular
C{pip install .} as well as after the editable install the test suite runs
from.  (Modern editable installs are known to hide C{twisted/plugins}; the
end-to-end tests start C{python -m twisted smeldr-oauth} from the editable
install outside the checkout, which covers that mode.)
"""

from __future__ import annotations

import os
import sys
import sysconfig

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.e2e import CHECKOUT, runProgram

PROBE = """
import smeldr_oauth
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
names = [p.tapname for p in getPlugins(IServiceMaker)]
print(smeldr_oauth.__file__)
print("smeldr-oauth" in names)
"""


class RegularInstallTests(TestCase):
    timeout = 120

    async def test_plugin_found_after_pip_install(self) -> None:
        target = os.path.abspath(self.mktemp())
        out, err, status = await runProgram(
            reactor,
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, CHECKOUT],
            timeout=100,
        )
        self.assertEqual(status, 0, err)
        self.assertTrue(os.path.exists(os.path.join(target, "twisted", "plugins", "smeldr_oauth_plugin.py")))
        self.assertFalse(os.path.exists(os.path.join(target, "twisted", "__init__.py")))
        # -S: no site processing, so the editable install's import hook (a
        # .pth file) is not active; only the regular install provides the
        # package and the plugin.  Run from elsewhere than the checkout.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([target, sysconfig.get_paths()["purelib"]])
        out, err, status = await runProgram(
            reactor, [sys.executable, "-S", "-c", PROBE], timeout=60, path=os.path.dirname(target), env=env
        )
        self.assertEqual(status, 0, err)
        where, found = out.split()
        self.assertTrue(where.startswith(target), where)
        self.assertEqual(found, "True", out + err)
