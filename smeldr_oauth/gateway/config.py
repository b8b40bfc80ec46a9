# -*- test-case-name: tests.test_gateway_config -*-
"""
Gateway configuration: the frozen records every part of the gateway runs
on (an upstream, its limits, its credential, the headers that carry the
caller's identity).

They are made, validated, by L{smeldr_oauth.gateway.configfile} from the
C{--upstream} options and the TOML file, or directly by a Python caller
(tests, the bench, an embedding application); here they only describe.
The credential's value is kept out of C{repr}.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import attr
import hyperlink

from smeldr_oauth.gateway.scopes import ScopeMap
from smeldr_oauth.mcp.versions import SESSION_VERSIONS

ISOLATIONS = ("user", "session", "shared")
TRANSPORTS = ("auto", "streamable", "sse")

#: Environment variables a stdio upstream inherits by default: enough to
#: find and run a program (npx needs C{HOME} for its cache), nothing that
#: could hold the gateway's own secrets.
DEFAULT_ENV_INHERIT = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME")

@attr.s(frozen=True, auto_attribs=True)
class Credential:
    """
    A static header the gateway sends to an HTTP upstream: its own
    credential there, never the caller's token.

    @ivar source: where the value came from (C{file:PATH} or C{env:NAME}),
        for messages; the value itself is never printed.
    """

    header: str
    value: str = attr.ib(repr=False)
    source: str


@attr.s(frozen=True, auto_attribs=True)
class IdentityHeaders:
    """
    Header names carrying the caller's identity to an HTTP upstream
    (C{None}: not sent).  The values are ours (the token's subject, client
    and scopes), so an upstream that trusts the gateway can trust them; an
    upstream reachable by others must not.
    """

    subject: Optional[str] = None
    client: Optional[str] = None
    scopes: Optional[str] = None

    def names(self) -> list[str]:
        return [n for n in (self.subject, self.client, self.scopes) if n is not None]


@attr.s(frozen=True, auto_attribs=True)
class Limits:
    """
    Bounds for one upstream.  Times are seconds, sizes bytes.

    @ivar max_instances: upstream processes (stdio) or upstream MCP
        sessions (HTTP) running at once.
    @ivar idle_timeout: an instance with no call in flight, no resource
        subscription and no traffic for this long is stopped.
    @ivar startup_timeout: spawn (or connect) plus C{initialize}.
    @ivar request_timeout: a call with no answer and no progress for this
        long is cancelled upstream and fails downstream.
    @ivar max_request_time: the cap on a call however much progress it
        reports.
    @ivar max_in_flight: calls in flight on one instance.
    @ivar max_server_requests: server-to-client requests (sampling,
        elicitation, roots) waiting for a client on one instance.
    @ivar max_message_bytes: the largest message accepted from the upstream.
    @ivar notification_rate: upstream notifications per second passed on
        (per instance); see L{smeldr_oauth.gateway.flow}.
    @ivar notification_burst: how many may come at once before the rate
        applies.
    @ivar restart_backoff: the delay before restarting an instance that
        crashed again soon after its last start; doubled each time.
    @ivar restart_backoff_max: the longest such delay.
    @ivar stderr_lines_per_second: stderr lines of a stdio upstream written
        to the log (more are counted, not written).
    @ivar stop_grace: how long a stopping process gets after its stdin
        closes before SIGTERM, and again before SIGKILL.
    """

    max_instances: int = 16
    idle_timeout: float = 300.0
    startup_timeout: float = 30.0
    request_timeout: float = 300.0
    max_request_time: float = 3600.0
    max_in_flight: int = 64
    max_server_requests: int = 16
    max_message_bytes: int = 8 * 1024 * 1024
    notification_rate: float = 100.0
    notification_burst: int = 500
    restart_backoff: float = 1.0
    restart_backoff_max: float = 60.0
    stderr_lines_per_second: float = 20.0
    stop_grace: float = 5.0


@attr.s(frozen=True, auto_attribs=True)
class UpstreamConfig:
    """
    One upstream MCP server.

    @ivar name: its name (C{/mcp/NAME}); C{""} for a single unnamed one.
    @ivar kind: C{stdio} or C{http}.
    @ivar command: the program and its arguments (stdio).
    @ivar env: variables set for the program, on top of L{env_inherit}.
    @ivar env_inherit: names of the gateway's own variables passed on.
    @ivar cwd: the program's working directory (C{None}: the gateway's).
    @ivar subject_env: a variable that carries the caller's subject to a
        per-user process (C{isolation = "user"} only).
    @ivar url: the MCP endpoint (http).
    @ivar transport: C{auto} (Streamable HTTP, falling back to the legacy
        HTTP+SSE transport), C{streamable} or C{sse}.
    @ivar isolation: C{user} (one instance per subject), C{session} (one
        per downstream session) or C{shared} (one for everybody).
    @ivar protocol_version: the version the gateway offers the upstream.
    """

    name: str
    kind: str
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = attr.ib(factory=dict, hash=False)
    env_inherit: tuple[str, ...] = DEFAULT_ENV_INHERIT
    cwd: Optional[str] = None
    subject_env: Optional[str] = None
    url: Optional[str] = None
    transport: str = "auto"
    credential: Optional[Credential] = None
    identity_headers: IdentityHeaders = IdentityHeaders()
    isolation: str = "user"
    protocol_version: str = SESSION_VERSIONS[0]
    limits: Limits = Limits()
    scopes: ScopeMap = ScopeMap()

    def child_environment(self, subject: Optional[str], source: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """
        The environment of a stdio upstream's process: the inherited names
        (from C{source}, default C{os.environ}), then L{env}, then the
        subject variable.
        """
        base = os.environ if source is None else source
        env = {k: base[k] for k in self.env_inherit if k in base}
        env.update(self.env)
        if self.subject_env is not None and subject is not None:
            env[self.subject_env] = subject
        return env

    def describe(self) -> str:
        """A log-safe description: the program's name or the URL's origin, never arguments or secrets."""
        if self.kind == "stdio":
            return "stdio:" + os.path.basename(self.command[0])
        url = hyperlink.URL.from_text(self.url or "")
        return f"{url.scheme}://{url.host}" + (f":{url.port}" if url.port else "")


@attr.s(frozen=True, auto_attribs=True)
class GatewayConfig:
    """Every configured upstream, in order."""

    upstreams: tuple[UpstreamConfig, ...] = ()

    def paths(self) -> dict[str, str]:
        """
        The MCP path of each upstream: a single upstream stays at C{/mcp};
        several each get C{/mcp/NAME}.
        """
        if len(self.upstreams) == 1:
            return {self.upstreams[0].name: "/mcp"}
        return {u.name: f"/mcp/{u.name}" for u in self.upstreams}

    def all_scopes(self) -> frozenset[str]:
        found: set[str] = set()
        for upstream in self.upstreams:
            found |= upstream.scopes.all_scopes()
        return frozenset(found)
