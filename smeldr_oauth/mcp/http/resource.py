# -*- test-case-name: tests.test_mcp_http -*-
"""
The MCP endpoints of one protected resource, as Klein routes: L{MCPHTTP}
builds the parts and mounts them.

  - C{/mcp}: Streamable HTTP (L{StreamableHTTP}); a C{GET} I{without}
    C{Mcp-Session-Id} (whatever the C{Accept} header says) is the legacy
    transport's stream (L{LegacySSE});
  - C{/mcp/message}: the legacy transport's POSTs.

Both are routes in the site's idiom (L{smeldr_oauth.web.routes}): the
site's dispatcher answers C{OPTIONS} and 405, and its error path writes
every refusal (L{smeldr_oauth.mcp.http.errors} says which) as a JSON-RPC
error, so that no input can produce a 500.  Every answer carries
C{Cache-Control: no-store}; the C{Origin} check runs before any handler;
every handler starts with the bearer token.

Sessions are bound to the token's subject I{and} client: a request with
another caller's token on a session gets the same 404 as an unknown
session, so a session id reveals nothing to someone who is not its owner.

The protocol itself lives in L{smeldr_oauth.mcp.session}; these modules
only translate HTTP to those calls and back.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smeldr_oauth.mcp.app import MCPApp
from smeldr_oauth.mcp.auth import AuthFailure, BearerAuth, Challenger, Credential
from smeldr_oauth.mcp.calls import is_deferred
from smeldr_oauth.mcp.http import wire
from smeldr_oauth.mcp.http.cors import ALLOWED_HEADERS, OriginPolicy
from smeldr_oauth.mcp.http.errors import from_auth_failure, refused
from smeldr_oauth.mcp.http.legacy import LegacySSE
from smeldr_oauth.mcp.http.registry import SessionFactory, SessionRegistry
from smeldr_oauth.mcp.http.streamable import StreamableHTTP
from smeldr_oauth.mcp.http.streamauth import StreamGuard
from smeldr_oauth.mcp.state.interfaces import IEventLog, ISessionDelivery, ISessionStore
from smeldr_oauth.mcp.state.memory import LocalDelivery, MemoryEventLog, MemorySessionStore
from smeldr_oauth.mcp.state.records import SessionLimits
from smeldr_oauth.mcp.streams import StreamOptions
from smeldr_oauth.oauth.urls import canonical_resource
from smeldr_oauth.web.errors import JSONRPC
from smeldr_oauth.web.routes import CORS, Route, mount_routes

log = Logger()


class MCPHTTP:
    """
    The MCP endpoints of one protected resource.

    @param reactor: provides L{IReactorTime}; used only for timing
        (keepalives, idle sessions), so a L{Clock} drives it in tests.
    @param verifier: an L{IAccessVerifier}.
    @param resource_url: the public MCP URL (the token audience).
    @param resource_metadata_url: absolute URL of the RFC 9728 document,
        named in every challenge.
    @param challenge_scope: the scopes a 401 asks for.
    @param allowed_origins: browser origins allowed to call; C{None} allows
        only the origin of C{resource_url}.  Requests without C{Origin}
        (every non-browser client) are always allowed.
    @param session_idle_timeout: a Streamable HTTP session with no request
        and no open stream for this long is ended.
    @param new_session_timeout: the idle timeout of a session that saw
        nothing after C{initialize} (no request, no GET stream): scripted
        C{initialize} floods leave nothing behind for long.
    @param max_queue: events a stream may queue for a client that stopped
        reading before it is disconnected.
    @param resume_buffer: events each Streamable HTTP session keeps for
        C{Last-Event-ID} (when C{events} is not given).
    @param max_sessions_per_grant: live sessions (both transports) one
        grant may hold.  A new one ends the grant's least recently active
        idle session (no open stream, nothing in flight); if none is idle
        the answer is 429.
    @param max_sessions_per_subject: the same across all the grants of one
        subject (a user can make many grants by authorizing again).
    @param max_sessions: the server-wide cap, a last resort (503): one user
        reaches it only with C{max_sessions / max_sessions_per_subject}
        accounts.
    @param stream_recheck_interval: how often (seconds) an open stream's
        access token is verified again; it is also checked when it expires.
    @param store: where session records live (L{ISessionStore}); default:
        this process's memory.
    @param delivery: routes messages and replies to the process holding a
        session (L{ISessionDelivery}); default: this process.
    @param events: the resumption log (L{IEventLog}); default: memory,
        C{resume_buffer} events per session.
    @param session_factory: makes each session's protocol object instead
        of a L{ServerSession} over C{mcp_app} (the OAuth gateway's
        sessions: see L{smeldr_oauth.mcp.http.registry.SessionFactory});
        C{mcp_app} may then be C{None}.
    @param audience: the resource a token must have been issued for
        (RFC 8707); default C{resource_url}.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        mcp_app: Optional[MCPApp],
        verifier: Any,
        *,
        resource_url: str,
        resource_metadata_url: str,
        challenge_scope: str,
        allowed_origins: Optional[tuple[str, ...]] = None,
        keepalive_interval: float = 15.0,
        max_body: int = 1 << 20,
        session_idle_timeout: float = 3600.0,
        new_session_timeout: float = 60.0,
        max_queue: int = 256,
        resume_buffer: int = 256,
        max_sessions: int = 10000,
        max_sessions_per_grant: int = 50,
        max_sessions_per_subject: int = 200,
        stream_recheck_interval: float = 30.0,
        request_timeout: float = 300.0,
        store: Optional[ISessionStore] = None,
        delivery: Optional[ISessionDelivery] = None,
        events: Optional[IEventLog] = None,
        session_factory: Optional[SessionFactory] = None,
        audience: Optional[str] = None,
    ) -> None:
        self.clock = reactor
        self.app = mcp_app
        self.resource_url = resource_url
        self.max_body = max_body
        self.auth = BearerAuth(
            verifier,
            Challenger(resource_metadata_url, challenge_scope),
            reactor,
            audience=canonical_resource(audience or resource_url),
        )
        self.origins = OriginPolicy(resource_url, allowed_origins)
        self.guard = StreamGuard(
            StreamOptions.shared(reactor, keepalive_interval, max_queue), self.auth, stream_recheck_interval
        )
        self.sessions = SessionRegistry(
            mcp_app,
            reactor,
            store=store if store is not None else MemorySessionStore(),
            delivery=delivery if delivery is not None else LocalDelivery(),
            events=events if events is not None else MemoryEventLog(resume_buffer),
            limits=SessionLimits(max_sessions_per_grant, max_sessions_per_subject, max_sessions),
            idle_timeout=session_idle_timeout,
            new_session_timeout=new_session_timeout,
            request_timeout=request_timeout,
            session_factory=session_factory,
        )
        self.streamable = StreamableHTTP(
            mcp_app,
            reactor,
            sessions=self.sessions,
            guard=self.guard,
            auth=self.auth,
            max_body=max_body,
            request_timeout=request_timeout,
        )
        self.legacy = LegacySSE(sessions=self.sessions, guard=self.guard, auth=self.auth, max_body=max_body)

    # -- wiring ---------------------------------------------------------------

    @property
    def path(self) -> str:
        return self.legacy.path

    def routes(self, path: str = "/mcp") -> list[Route]:
        """
        The routes of the endpoint at C{path} and C{path + "/message"}, in
        the site's routing idiom (L{smeldr_oauth.web.routes}).
        """
        self.legacy.path = path = path.rstrip("/") or "/mcp"
        common = dict(
            dialect=JSONRPC,
            cors=CORS(allow_headers=ALLOWED_HEADERS, allow_origin=None, max_age=600),
            # Answers depend on the token and may carry private data: no
            # cache (browser, proxy, CDN) may keep any of them.  SSE streams
            # repeat it (see SSEStream.start).
            headers=((b"Cache-Control", b"no-store"),),
        )
        return [
            Route(
                path=path,
                methods={"POST": self._post, "GET": self._get, "DELETE": self._delete},
                # A HEAD is not a GET here: it must open no session, no stream.
                head=False,
                before=self.origins.check,
                name=f"smeldr_mcp:{path}",
                **common,  # type: ignore[arg-type]
            ),
            Route(
                path=path + "/message",
                methods={"POST": self._message},
                before=self.origins.check,
                name=f"smeldr_mcp_message:{path}",
                **common,  # type: ignore[arg-type]
            ),
        ]

    def register(self, klein_app: Any, path: str = "/mcp") -> None:
        """Mount C{path} and C{path + "/message"} on C{klein_app}."""
        mount_routes(klein_app, self.routes(path))

    def add_revocation_source(self, grant_events: Any) -> None:
        """Close what a grant opened when C{grant_events} says it was revoked."""
        grant_events.add_revocation_observer(self.close_grant)

    def close_grant(self, grant_id: str) -> None:
        """
        End the sessions created with C{grant_id} and every stream held
        open by one of its tokens.

        Only revocations this process makes reach here at once; the
        others (an access token revoked alone, another process's
        revocations) are found by the streams' periodic re-verification.
        """
        self.guard.close_grant(grant_id)
        self.sessions.close_grant(grant_id)
        log.info("MCP streams of a revoked grant closed")

    def shutdown(self) -> Deferred:
        """End every stream and let go of every session cleanly (SIGTERM)."""
        self.sessions.shutdown()
        self.guard.close_all()
        return succeed(None)

    @property
    def session_count(self) -> int:
        """Sessions this process holds live parts of."""
        return len(self.sessions)

    @property
    def stream_count(self) -> int:
        """Open SSE streams (legacy, server-initiated and POST responses)."""
        return len(self.guard)

    # -- routing ---------------------------------------------------------------

    def _authenticated(self, request: Any, then: Callable[..., Any], *args: Any) -> Any:
        """
        C{then(credential, *args)} once the bearer token is verified.

        A token found in the verifier's cache is known at once: then
        C{then} runs now and its own answer is returned (the stream's
        C{done}, the exchange's result), with L{refused} as its errback,
        instead of a second L{Deferred} chained to it, which an idle
        stream would hold for as long as it is open.
        """
        try:
            outcome = self.auth.credential(request)
        except AuthFailure as e:
            raise from_auth_failure(e)
        if is_deferred(outcome):
            # Still looking (a store look-up): wait for it.
            return outcome.addCallback(then, *args).addErrback(refused)
        try:
            result = then(outcome, *args)
        except AuthFailure as e:
            raise from_auth_failure(e)
        if is_deferred(result):
            result.addErrback(refused)
        return result

    def _post(self, request: Any) -> Deferred:
        return self._authenticated(request, self.streamable.post, request)

    def _get(self, request: Any) -> Deferred:
        return self._authenticated(request, self._open, request)

    def _open(self, credential: Credential, request: Any) -> Any:
        session_id = wire.header(request, b"mcp-session-id")
        if session_id is None:
            return self.legacy.open(credential, request)
        return self.streamable.get(credential, request, session_id)

    def _delete(self, request: Any) -> Deferred:
        return self._authenticated(request, self.streamable.delete, request)

    def _message(self, request: Any) -> Deferred:
        return self._authenticated(request, self.legacy.message, request)
