"""
The cost of access-token validation on the hot path: every MCP request
calls L{OAuthServer.verify_access_token}.  With the cache (the default, 30 s)
a repeat token is a dictionary hit; without it (C{access_cache_ttl=0}) each
call is a SQLite lookup on the store's database thread.

Run as C{python -m bench.verify N}: it builds a real L{SQLiteStore} on a
temporary file and an L{OAuthServer} on the global reactor (this is a
top-level program, like C{twist}), obtains a token through the real
authorize + code-exchange path, times C{N} sequential validations and C{N}
validations 50 at a time with each setting, and prints one JSON object.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred

from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.model import Approval
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.store.sqlite import SQLiteStore

ISSUER = "http://127.0.0.1:9"
REDIRECT = "http://127.0.0.1:33418/callback"


async def _token(server: OAuthServer) -> str:
    from bench.loadgen import pkce_pair

    registered = await server.register({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"})
    verifier, challenge = pkce_pair()
    params = {
        "response_type": ["code"],
        "client_id": [registered["client_id"]],
        "redirect_uri": [REDIRECT],
        "code_challenge": [challenge],
        "code_challenge_method": ["S256"],
    }
    authz = await server.validate_authorization_request(params)
    location = await server.approve(authz, Approval(subject="bench"))
    from urllib.parse import parse_qs, urlsplit

    code = parse_qs(urlsplit(location).query)["code"][0]
    issued = await server.token(
        {
            "grant_type": ["authorization_code"],
            "code": [code],
            "code_verifier": [verifier],
            "client_id": [registered["client_id"]],
            "redirect_uri": [REDIRECT],
        }
    )
    return str(issued["access_token"])


async def _measure(server: OAuthServer, token: str, count: int) -> dict[str, float]:
    assert (await server.verify_access_token(token)) is not None
    began = time.perf_counter()
    for _ in range(count):
        info = await server.verify_access_token(token)
    sequential = time.perf_counter() - began
    assert info is not None
    began = time.perf_counter()
    done = 0
    while done < count:
        batch = min(50, count - done)
        await DeferredList([server.verify_access_token(token) for _ in range(batch)])
        done += batch
    concurrent = time.perf_counter() - began
    return {
        "sequential_us": sequential / count * 1e6,
        "concurrent50_us": concurrent / count * 1e6,
    }


async def _main(count: int, directory: str) -> dict[str, Any]:
    store = SQLiteStore(os.path.join(directory, "oauth.db"), reactor)
    await store.ready
    try:
        results: dict[str, Any] = {"calls": count}
        for label, ttl in (("cached", 30.0), ("uncached", 0.0)):
            config = Config(issuer=ISSUER, verify_bearer=lambda token: True, access_cache_ttl=ttl)
            server = OAuthServer(config, store, reactor)
            token = await _token(server)
            results[label] = await _measure(server, token, count)
        return results
    finally:
        store.close()


def main(argv: list[str]) -> int:
    count = int(argv[1]) if len(argv) > 1 else 2000
    directory = tempfile.mkdtemp(prefix="smeldr-bench-verify-")
    outcome: dict[str, Any] = {}

    def finished(result: Any) -> None:
        outcome["result"] = result
        reactor.stop()

    def failed(failure: Any) -> None:
        outcome["error"] = failure.getTraceback()
        reactor.stop()

    def start() -> Deferred:
        return ensureDeferred(_main(count, directory)).addCallbacks(finished, failed)

    reactor.callWhenRunning(start)
    reactor.run()
    shutil.rmtree(directory, ignore_errors=True)
    if "error" in outcome:
        sys.stderr.write(outcome["error"])
        return 1
    print(json.dumps(outcome["result"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
