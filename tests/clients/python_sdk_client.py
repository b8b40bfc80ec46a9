#!/usr/bin/env python
"""
Drive a real smeldr-oauth server with the official MCP Python SDK (PyPI C{mcp} 2.x).

This is a standalone asyncio script, run as a subprocess by
C{tests/test_e2e_python_sdk.py}; trial never imports it (it needs C{mcp}, and
C{mcp} brings anyio and httpx2, which must not leak into the Twisted tests).

It plays both parts a person would: the MCP application (C{mcp.Client} with an
C{OAuthClientProvider}) and the browser. The provider's C{redirect_handler}
receives the authorization URL; the browser part GETs it, fills in the consent
form's every C{<input>}, sets C{site_token}, presses the C{decision=approve}
button, POSTs the form without following redirects and expects a 303 whose
C{Location} carries C{code}, C{state} and C{iss}. Nothing listens on the
redirect URI: the C{callback_handler} just hands those values back to the SDK,
which is exactly what a loopback callback server would do.

The SDK is used as shipped: server bugs must surface as failures here, never be
smoothed over. The only reach into SDK internals is C{--refresh} on a server
whose access tokens live long: the SDK has no public way to say "this token
expired", so the driver moves the provider's expiry clock (see L{forceExpiry}).

Output: one JSON line on stdout. On success C{{"ok": true, ...}} with the
negotiated protocol version, tool names, the tool result, how many times the
browser authorized, token events (fingerprints, never tokens) and a trace of
every HTTP exchange. On failure C{{"ok": false, "error": ...}} with the same
trace, the traceback on stderr, and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from typing import Any
from urllib.parse import urljoin, urlsplit

import anyio
import httpx2
from mcp import Client
from mcp.client.auth import OAuthClientProvider, TokenStorage
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)

import consent  # this directory: Python puts a script's own directory on sys.path
from consent import (
    DriverError,
    consentForm,
    consentLocation,
    consentSubmission,
    describe,
    fingerprint,
    nextOnOrigin,
    redirectQuery,
)

#: Seconds to wait after a revocation before calling again (set by the
#: balanced suite: see tests/test_e2e_balanced.py); none by default.
REVOKE_SETTLE = "SMELDR_REVOKE_SETTLE_SECONDS"


class Trace(consent.Trace):
    """
    Every HTTP exchange either client made, in order, without bodies or
    credentials: the evidence a failure report needs.
    """

    notRead = httpx2.RequestNotRead


class MemoryStorage(TokenStorage):
    """
    The SDK's C{TokenStorage}, in memory, remembering every token it was
    handed so the driver can tell a refresh from a re-authorization.
    """

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.clientInfo: OAuthClientInformationFull | None = None
        self.history: list[OAuthToken] = []

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens
        self.history.append(tokens)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.clientInfo

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.clientInfo = client_info


class Browser:
    """
    The person at the browser: open the authorization URL, paste the site
    token, approve, and carry the redirect back to the application.
    """

    def __init__(self, siteToken: str, trace: Trace, decision: str = "approve") -> None:
        self.siteToken = siteToken
        self.trace = trace
        self.decision = decision
        self.authorizations = 0
        self._result: AuthorizationCodeResult | None = None

    async def redirectHandler(self, authorizationURL: str) -> None:
        self.authorizations += 1
        self._result = None
        async with httpx2.AsyncClient(
            follow_redirects=False, timeout=10.0, event_hooks=self.trace.hooks()
        ) as browser:
            page = await browser.get(authorizationURL, headers={"Accept": "text/html"})
            origin = urlsplit(authorizationURL)[:2]
            for _ in range(5):
                target = nextOnOrigin(page, origin)
                if target is None:
                    break
                page = await browser.get(target, headers={"Accept": "text/html"})
            form = consentForm(page, self.decision)
            action, content, headers = consentSubmission(page, form, self.siteToken, self.decision)
            answer = await browser.post(action, content=content, headers=headers)
            location = consentLocation(answer, action, self.decision)
        query = redirectQuery(location)
        self._result = AuthorizationCodeResult(
            code=query["code"][0],
            state=query.get("state", [None])[0],
            iss=query.get("iss", [None])[0],
        )

    async def callbackHandler(self) -> AuthorizationCodeResult:
        if self._result is None:
            raise DriverError("callback handler called before a redirect was captured")
        result, self._result = self._result, None
        return result


def forceExpiry(provider: OAuthClientProvider) -> None:
    """
    Make the provider believe its access token has expired, so that its next
    request starts with a refresh grant.

    The SDK keeps the expiry on the provider's context and reads stored tokens
    only once, without an expiry, so neither C{TokenStorage} nor any public
    API can do this: this is the one place the driver touches SDK internals,
    used only when the server's tokens live too long to wait for.
    """
    provider.context.token_expiry_time = time.time() - 1


def toolResult(result: Any) -> dict[str, Any]:
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


async def answerSampling(context: Any, params: Any) -> Any:
    """C{--then}: a model that always says the same thing."""
    from mcp.types import CreateMessageResult, TextContent

    return CreateMessageResult(
        role="assistant", content=TextContent(type="text", text="forty-two"), model="driver"
    )


async def answerElicitation(context: Any, params: Any) -> Any:
    """C{--then}: a person who always says their name is Ada."""
    from mcp.types import ElicitResult

    return ElicitResult(action="accept", content={"name": "Ada"})


async def followUp(client: Any, actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    C{--then}: each action in turn, each reported as a dict:
    C{{"call": TOOL, "args": {...}}} (with the progress it reported),
    C{{"read": URI}}, C{{"prompt": NAME, "args": {...}}}, and
    C{{"cancel": TOOL, "args": {...}, "after": SECONDS}} (the SDK cancels
    the call, sending C{notifications/cancelled}).
    """
    results: list[dict[str, Any]] = []
    for action in actions:
        if "call" in action:
            progress: list[float] = []

            async def onProgress(
                value: float, total: float | None, message: str | None, seen: list[float] = progress
            ) -> None:
                seen.append(value)

            result = await client.call_tool(
                action["call"], action.get("args", {}), progress_callback=onProgress
            )
            results.append({"result": toolResult(result), "progress": progress})
        elif "read" in action:
            read = await client.read_resource(action["read"])
            results.append({"result": read.model_dump(mode="json", exclude_none=True)})
        elif "prompt" in action:
            prompt = await client.get_prompt(action["prompt"], action.get("args", {}))
            results.append({"result": prompt.model_dump(mode="json", exclude_none=True)})
        elif "cancel" in action:
            with anyio.move_on_after(action.get("after", 1.0)) as scope:
                await client.call_tool(action["cancel"], action.get("args", {}))
            results.append({"cancelled": scope.cancelled_caught})
        else:
            raise DriverError(f"unknown --then action {action!r}")
    return results


async def revoke(
    revocationEndpoint: str | None,
    mcpURL: str,
    storage: MemoryStorage,
    trace: Trace,
) -> dict[str, Any]:
    """
    Revoke the current access token the way an application's "disconnect"
    would (RFC 7009, authenticated as at the token endpoint), then prove the
    token is dead by presenting it to the MCP endpoint directly.
    """
    assert storage.tokens is not None and storage.clientInfo is not None
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(mcpURL))
    endpoint = revocationEndpoint or urljoin(origin, "/oauth/revoke")
    token = storage.tokens.access_token
    async with httpx2.AsyncClient(timeout=10.0, event_hooks=trace.hooks()) as http:
        info = storage.clientInfo
        form = {
            "token": token,
            "token_type_hint": "access_token",
            "client_id": info.client_id,
        }
        auth: tuple[str, str] | None = None
        # Authenticate as at the token endpoint (RFC 7009 2.1): a public
        # client names itself, a confidential one also proves it.
        if (
            info.client_secret
            and info.token_endpoint_auth_method == "client_secret_basic"
        ):
            auth = (info.client_id, info.client_secret)
        elif info.client_secret:
            form["client_secret"] = info.client_secret
        response = await http.post(
            endpoint, data=form, auth=auth or httpx2.USE_CLIENT_DEFAULT
        )
        if response.status_code != 200:
            raise DriverError(
                f"POST {urlsplit(endpoint).path} (revoke access token) answered "
                f"{response.status_code}, expected 200 (RFC 7009 2.2); body: {response.text[:300]!r}"
            )
        # Behind a balancer the revocation reaches the other processes
        # within the server's bound (one second), pushed: a probe before
        # then may land on one not told yet.
        await anyio.sleep(float(os.environ.get(REVOKE_SETTLE, "0")))
        probe = await http.post(
            mcpURL,
            json={"jsonrpc": "2.0", "id": "probe", "method": "ping"},
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json, text/event-stream",
            },
        )
    return {
        "endpoint": urlsplit(endpoint).path,
        "status": response.status_code,
        "probe_status": probe.status_code,
        "probe_www_authenticate": probe.headers.get("www-authenticate"),
    }


async def run(
    options: argparse.Namespace, trace: Trace, report: dict[str, Any]
) -> None:
    storage = MemoryStorage()
    browser = Browser(options.site_token, trace, decision=options.decision)
    redirectURI = f"http://127.0.0.1:{options.callback_port}/callback"
    metadata = OAuthClientMetadata(
        client_name="smeldr e2e (mcp python sdk)",
        redirect_uris=[redirectURI],
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        token_endpoint_auth_method=options.auth_method,
    )
    provider = OAuthClientProvider(
        server_url=options.url,
        client_metadata=metadata,
        storage=storage,
        redirect_handler=browser.redirectHandler,
        callback_handler=browser.callbackHandler,
        client_metadata_url=options.client_metadata_url
        if options.identity == "cimd"
        else None,
    )

    if options.transport == "streamable":
        http = httpx2.AsyncClient(
            auth=provider,
            timeout=httpx2.Timeout(10.0, read=30.0),
            event_hooks=trace.hooks(),
        )
        transport: Any = streamable_http_client(options.url, http_client=http)
    else:
        http = None

        def factory(
            headers: dict[str, str] | None = None,
            timeout: httpx2.Timeout | None = None,
            auth: httpx2.Auth | None = None,
        ) -> httpx2.AsyncClient:
            return httpx2.AsyncClient(
                headers=headers, timeout=timeout, auth=auth, event_hooks=trace.hooks()
            )

        transport = sse_client(
            options.url,
            auth=provider,
            timeout=10.0,
            sse_read_timeout=30.0,
            httpx_client_factory=factory,
        )

    arguments = json.loads(options.args)
    try:
        callbacks: dict[str, Any] = {}
        if options.then:
            callbacks = dict(
                sampling_callback=answerSampling, elicitation_callback=answerElicitation
            )
        async with Client(
            transport, mode=options.mode, read_timeout_seconds=15.0, **callbacks
        ) as client:
            report["protocol_version"] = client.protocol_version
            info = client.server_info
            report["server_info"] = info.model_dump(mode="json") if info else None
            report["client_id_is_url"] = bool(
                storage.clientInfo
                and storage.clientInfo.client_id.startswith("https://")
            )
            tools = await client.list_tools()
            report["tools"] = sorted(t.name for t in tools.tools)
            first = await client.call_tool(options.tool, arguments)
            report["tool_result"] = toolResult(first)
            report["authorizations_before_followup"] = browser.authorizations
            report["code_grants_before_followup"] = trace.count(
                grant_type="authorization_code", status=200
            )

            if options.refresh:
                assert storage.tokens is not None
                before = storage.tokens
                expiresIn = before.expires_in
                if expiresIn is not None and expiresIn <= options.max_wait:
                    # Let the server's own TTL run out: the most honest refresh.
                    report["refresh_method"] = "waited"
                    await anyio.sleep(expiresIn + 1.0)
                else:
                    report["refresh_method"] = "forced"
                    forceExpiry(provider)
                again = await client.call_tool(options.tool, arguments)
                report["after_refresh_result"] = toolResult(again)
                report["refreshed"] = storage.tokens is not before and (
                    storage.tokens.access_token != before.access_token
                )

            if options.then:
                report["then"] = await followUp(client, json.loads(options.then))

            if options.revoke:
                oauthMetadata = provider.context.oauth_metadata
                report["revoke"] = await revoke(
                    str(oauthMetadata.revocation_endpoint)
                    if oauthMetadata and oauthMetadata.revocation_endpoint
                    else None,
                    options.url,
                    storage,
                    trace,
                )
                again = await client.call_tool(options.tool, arguments)
                report["after_revoke_result"] = toolResult(again)
    finally:
        if http is not None:
            await http.aclose()
        report["authorizations"] = browser.authorizations
        report["tokens"] = [
            {
                "access": fingerprint(t.access_token),
                "refresh": fingerprint(t.refresh_token),
                "expires_in": t.expires_in,
                "scope": t.scope,
                "token_type": t.token_type,
            }
            for t in storage.history
        ]
        report["registered"] = (
            {
                "client_id_is_url": storage.clientInfo.client_id.startswith("https://"),
                "token_endpoint_auth_method": storage.clientInfo.token_endpoint_auth_method,
                "has_secret": storage.clientInfo.client_secret is not None,
            }
            if storage.clientInfo
            else None
        )
        report["refresh_grants"] = trace.count(grant_type="refresh_token", status=200)
        report["code_grants"] = trace.count(grant_type="authorization_code", status=200)


def parseArguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", required=True, help="the MCP URL, e.g. http://127.0.0.1:PORT/mcp"
    )
    parser.add_argument(
        "--transport", choices=["streamable", "sse"], default="streamable"
    )
    parser.add_argument("--site-token", required=True)
    parser.add_argument("--identity", choices=["dcr", "cimd"], default="dcr")
    parser.add_argument(
        "--client-metadata-url", help="https URL of the CIMD document (--identity cimd)"
    )
    parser.add_argument("--tool", default="list_posts")
    parser.add_argument(
        "--args", default="{}", help="the tool's arguments as a JSON object"
    )
    parser.add_argument(
        "--mode", default="auto", help="mcp.Client mode: auto (default) or legacy"
    )
    parser.add_argument(
        "--auth-method",
        default=None,
        choices=["none", "client_secret_post", "client_secret_basic"],
        help="token_endpoint_auth_method to ask for at registration (default: ask for none in particular)",
    )
    parser.add_argument("--decision", default="approve", choices=["approve", "deny"])
    parser.add_argument("--callback-port", type=int, default=33418)
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="then make the SDK refresh and call again",
    )
    parser.add_argument(
        "--revoke",
        action="store_true",
        help="then revoke the access token and call again",
    )
    parser.add_argument(
        "--then",
        default=None,
        help="a JSON list of further actions after the first call (see followUp); "
        "also answers sampling and elicitation",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=5.0,
        help="for --refresh: wait out a token TTL up to this many seconds, else force the expiry",
    )
    parser.add_argument(
        "--timeout", type=float, default=20.0, help="give up after this many seconds"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="SDK debug logs on stderr"
    )
    options = parser.parse_args(argv)
    if options.identity == "cimd" and not options.client_metadata_url:
        parser.error("--identity cimd needs --client-metadata-url")
    return options


def main(argv: list[str]) -> int:
    options = parseArguments(argv)
    logging.basicConfig(
        level=logging.DEBUG if options.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(name)s %(levelname)s %(message)s",
    )
    trace = Trace()
    report: dict[str, Any] = {
        "transport": options.transport,
        "identity": options.identity,
    }

    async def bounded() -> None:
        with anyio.fail_after(options.timeout):
            await run(options, trace, report)

    try:
        anyio.run(bounded)
    except BaseException as exc:  # noqa: BLE001 - report everything, KeyboardInterrupt too
        traceback.print_exception(exc, file=sys.stderr)
        report.update(ok=False, error=describe(exc), http=trace.events)
        print(json.dumps(report), flush=True)
        return 1
    report.update(ok=True, http=trace.events)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
