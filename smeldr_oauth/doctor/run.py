# -*- test-case-name: tests.test_doctor_run -*-
"""
The order of the doctor's checks, and what each needs from the ones
before: the discovery documents first (as a client finds them), then the
challenge, CORS and forwarded-header checks over what was fetched, then,
with credentials, the flow, a session and its stream.
"""

from __future__ import annotations

from typing import Any, Optional

import attr

from smeldr_oauth.doctor import checks, discovery, sse
from smeldr_oauth.doctor.fetch import PROTOCOL_VERSION, Fetcher
from smeldr_oauth.doctor.flow import Flow, FlowError
from smeldr_oauth.doctor.model import Fetched, Verdict
from smeldr_oauth.doctor.session import MCPSession, SessionReport, initialize

#: The Origin sent for the CORS check: MCP Inspector's, a browser-based
#: client people use to try a server.
CORS_ORIGIN = "http://localhost:6274"

#: Sent by the forwarded-header check as if a client had sent them.
SPOOFED_HEADERS = {
    "X-Forwarded-Proto": "http",
    "X-Forwarded-Host": "doctor-probe.invalid",
    "X-Forwarded-Port": "8081",
    "Forwarded": "for=192.0.2.1;proto=http;host=doctor-probe.invalid",
}


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class DoctorOptions:
    """
    @ivar url: the MCP URL to check.
    @ivar keepalive: the server's keepalive interval (C{--keepalive}).
    @ivar stream_seconds: how long to watch the stream.
    @ivar min_cert_days: the certificate must stay valid this long.
    @ivar site_token: runs a real flow (never printed).
    @ivar access_token: used as it is instead (never printed).
    """

    url: str
    keepalive: float = 15.0
    stream_seconds: Optional[float] = None
    min_cert_days: float = 14.0
    site_token: Optional[str] = attr.ib(default=None, repr=False)
    access_token: Optional[str] = attr.ib(default=None, repr=False)


async def diagnose(fetcher: Fetcher, options: DoctorOptions) -> list[Verdict]:
    """
    Run every check against C{options.url}; one verdict per check, in the
    order of the report.
    """
    url, problem = discovery.parse_mcp_url(options.url)
    verdicts = [checks.check_url(problem, options.url)]
    if url is None:
        return verdicts
    mcp_url = options.url
    now = float(fetcher.reactor.seconds())

    certificate = await fetcher.certificate(mcp_url) if url.scheme.lower() == "https" else None
    verdicts.append(checks.check_tls(certificate, now, options.min_cert_days))

    # The challenge first: it tells whether the MCP URL reaches the server,
    # which names the cause when a well-known URL does not.
    challenge = await fetcher.post_json(mcp_url, initialize(0))
    reached = challenge.status == 401 and bool(challenge.headers.get("www-authenticate"))

    documents: dict[str, dict[str, Any]] = {}
    fetched_documents: list[Fetched] = []
    for check, where in discovery.protected_resource_metadata_urls(url):
        fetched = await fetcher.get(where)
        fetched_documents.append(fetched)
        verdict, body = checks.check_protected_resource_metadata(check, fetched, reached)
        verdicts.append(verdict)
        if body is not None:
            documents[where] = body
    verdicts.append(checks.check_resource(mcp_url, documents))

    first = next(iter(documents.values()), None)
    named: Optional[str] = None
    as_fetched: Optional[Fetched] = None
    as_head: Optional[Fetched] = None
    if first is not None:
        named = first["authorization_servers"][0]
        as_url = discovery.authorization_server_metadata_url(named or "")
        if as_url is not None:
            as_fetched = await fetcher.get(as_url)
            fetched_documents.append(as_fetched)
            as_head = await fetcher.request("HEAD", as_url, {"MCP-Protocol-Version": PROTOCOL_VERSION})
    verdict, metadata = checks.check_authorization_server_metadata(as_fetched, named, reached, as_head)
    verdicts.append(verdict)
    if metadata is not None and named is not None:
        verdicts.append(checks.check_issuer(metadata, named))
        verdicts.append(checks.check_metadata_fields(metadata))

    oidc = await fetcher.get(discovery.openid_configuration_url(url))
    verdicts.append(checks.check_openid_configuration(oidc, metadata.get("issuer") if metadata else None))

    metadata_ok = {where: str(doc.get("resource")) for where, doc in documents.items()}
    verdicts.append(checks.check_challenge(challenge, metadata_ok))

    verdicts.append(await _cors(fetcher, [f.url for f in fetched_documents if f.status == 200]))

    challenge_params = None
    for header in challenge.headers.get("www-authenticate", ()):
        challenge_params = checks.parse_bearer_challenge(header) or challenge_params
    spoofed = []
    for fetched in fetched_documents:
        if fetched.status != 200:
            continue
        normal, _ = fetched.json_object()
        again = await fetcher.get(fetched.url, SPOOFED_HEADERS)
        changed, _ = again.json_object()
        if normal is not None and changed is not None:
            spoofed.append((normal, changed))
    all_documents = list(documents.values()) + ([metadata] if metadata else [])
    verdicts.append(
        checks.check_forwarded(
            mcp_url, all_documents, (challenge_params or {}).get("resource_metadata"), spoofed
        )
    )
    verdicts.append(checks.check_clock(fetcher.answers))
    verdicts.extend(await _with_token(fetcher, options, first, metadata))
    return verdicts


async def _cors(fetcher: Fetcher, urls: list[str]) -> Verdict:
    gets = []
    preflights = []
    for where in urls:
        gets.append(await fetcher.get(where, {"Origin": CORS_ORIGIN}))
        preflights.append(
            await fetcher.request(
                "OPTIONS",
                where,
                {
                    "Origin": CORS_ORIGIN,
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "mcp-protocol-version",
                },
            )
        )
    return checks.check_cors(gets, preflights, CORS_ORIGIN)


async def _with_token(
    fetcher: Fetcher,
    options: DoctorOptions,
    resource_metadata: Optional[dict[str, Any]],
    metadata: Optional[dict[str, Any]],
) -> list[Verdict]:
    """
    The flow (with a site token), the session and the stream (with any
    token); skipped, saying why, without one.
    """
    # Never shorter than one keepalive and its margin: less proves nothing.
    seconds = max(options.stream_seconds or 0.0, sse.watch_time(options.keepalive))
    token = options.access_token
    flow: Optional[Flow] = None
    credentials = None
    reason = ""
    if token is None and options.site_token is not None:
        if resource_metadata is None or metadata is None:
            reason = "no metadata to run a flow with (see above)"
        elif not isinstance(metadata.get("registration_endpoint"), str):
            # Not a fault: the doctor has no metadata document to offer.
            reason = "the server offers no dynamic registration: give an access token (--access-token-file)"
        else:
            flow = Flow(fetcher, options.url, str(resource_metadata["resource"]), metadata)
            try:
                credentials = await flow.run(options.site_token)
            except FlowError as e:
                reason = f"the flow failed at {e.step}"
            else:
                token = credentials.access_token
    report = SessionReport(reason=reason)
    if token is not None:
        try:
            report = await MCPSession(fetcher, options.url, token).check(seconds)
        finally:
            if flow is not None and credentials is not None:
                await flow.revoke(credentials)
    verdicts = []
    if options.access_token is None:
        verdicts.append(checks.check_flow(flow.steps if flow is not None else [], reason))
    verdicts.append(checks.check_session(report.probe, report.reason))
    verdicts.append(sse.judge(report.stream, options.keepalive, report.reason))
    return verdicts
