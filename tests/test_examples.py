"""
The library example (examples/embed.py, shown in docs/library.md) works:
wired into a plain Klein app, over a real socket, its own route still
answers, the metadata is served, and its tool is protected.
"""

from __future__ import annotations

import importlib.util
import json
import os

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from tests.e2e import CHECKOUT
from tests.test_conformance import httpClient


def load_example():  # type: ignore[no-untyped-def]
    path = os.path.join(CHECKOUT, "examples", "embed.py")
    spec = importlib.util.spec_from_file_location("smeldr_example_embed", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class EmbedExampleTests(TestCase):
    async def test_example(self) -> None:
        example = load_example()
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(example.app.resource()))
        self.addCleanup(port.stopListening)
        issuer = f"http://127.0.0.1:{port.getHost().port}"
        oauth = example.wire(reactor, issuer, os.path.abspath(self.mktemp() + ".db"))
        self.addCleanup(oauth.store.close)
        await oauth.store.ready
        http = httpClient(self)

        home = await http.get(issuer + "/")
        self.assertEqual(await home.content(), b"My site")
        metadata = await http.get(issuer + "/.well-known/oauth-authorization-server")
        self.assertEqual(json.loads(await metadata.content())["issuer"], issuer)
        mcp = await http.post(issuer + "/mcp", data=b"{}", headers={"Content-Type": "application/json"})
        await mcp.content()
        self.assertEqual(mcp.code, 401)
        self.assertIn("resource_metadata=", mcp.headers.getRawHeaders("www-authenticate")[0])
        # The consent form accepts the example's pasted token.
        approval = await oauth.verify_paste("let-me-in")
        assert approval is not None
        self.assertEqual(approval.subject, "owner")
        self.assertIsNone(await oauth.verify_paste("wrong"))
