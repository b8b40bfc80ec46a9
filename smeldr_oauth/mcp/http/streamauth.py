# -*- test-case-name: tests.test_mcp_http -*-
"""
Every SSE stream the MCP endpoint opens, and the access token that keeps
it open.

A stream remembers the token it was opened with (in memory, in plain
text: the verifier takes nothing else; never logged) and verifies it again
every C{recheck_interval} seconds and at its expiry, so a revoked access
token, one revoked by another process, or an expired one does not keep a
stream open.  A session's own stream follows the last valid token its
owner presented on the session (L{StreamGuard.follow}), so a client that
refreshed keeps its stream past the old token's expiry.

All the checks share one timer (L{Deadlines}), not a timer per stream.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.mcp.auth import AuthFailure, BearerAuth, Credential
from smeldr_oauth.mcp.streams import Deadlines, SSEStream, StreamOptions
from smeldr_oauth.oauth.model import AccessInfo

log = Logger()


@attr.s(auto_attribs=True, eq=False, slots=True)
class _StreamAuth:
    """The access token that keeps one stream open (never in C{repr})."""

    stream: SSEStream
    subject: str
    client_id: Optional[str]
    grant_id: Optional[str]
    expires_at: float
    token: str = attr.ib(repr=False)
    on_close: Optional[Callable[[SSEStream], None]] = None
    opened: float = 0.0


class StreamGuard:
    """
    Opens an endpoint's streams and closes each when its token stops being
    valid (revoked, expired) or its grant is revoked.

    @param options: how streams are made (clock, keepalives, queue).
    @param auth: verifies tokens again.
    @param recheck_interval: seconds between two checks of one stream's
        token; it is also checked when it expires.
    """

    def __init__(self, options: StreamOptions, auth: BearerAuth, recheck_interval: float = 30.0) -> None:
        self.options = options
        self.auth = auth
        self.recheck_interval = recheck_interval
        self._clock = options.clock
        self._streams: dict[SSEStream, _StreamAuth] = {}
        self._checks = Deadlines(self._clock, self._recheck)  # type: ignore[arg-type]
        # One bound method for every stream (idle streams are many).
        self._on_close = self._closed

    def open(
        self,
        request: Any,
        credential: Credential,
        on_close: Optional[Callable[[SSEStream], None]] = None,
        done: Optional[Deferred] = None,
    ) -> SSEStream:
        """
        A new stream on C{request}, held open by C{credential}'s token.
        The caller starts it; C{on_close} is called when it ends.
        """
        stream = self.options.stream(request, on_close=self._on_close, done=done)
        info = credential.info
        auth = _StreamAuth(
            stream, info.subject, info.client_id, info.grant_id, credential.expires_at, credential.token, on_close
        )
        auth.opened = self._clock.seconds()
        self._streams[stream] = auth
        self._schedule(auth)
        return stream

    def follow(self, stream: Optional[SSEStream], credential: Credential) -> None:
        """
        The owner of C{stream}'s session presented a valid token on the
        session: from now on that token keeps the stream open (and its
        grant is the one L{close_grant} matches).
        """
        auth = self._streams.get(stream) if stream is not None else None
        if auth is None or auth.token == credential.token:
            return
        auth.token = credential.token
        auth.grant_id = credential.info.grant_id
        auth.expires_at = credential.expires_at
        self._schedule(auth)

    def close_grant(self, grant_id: str) -> None:
        """Close every stream held open by a token of C{grant_id}."""
        for stream, auth in list(self._streams.items()):
            if auth.grant_id == grant_id:
                stream.close()

    def close_all(self) -> None:
        for stream in list(self._streams):
            stream.close()

    def __len__(self) -> int:
        return len(self._streams)

    def _closed(self, stream: SSEStream) -> None:
        auth = self._streams.pop(stream, None)
        if auth is not None:
            log.debug(
                "MCP stream closed after {seconds} seconds ({client_id})",
                seconds=f"{self._clock.seconds() - auth.opened:.1f}",
                client_id=auth.client_id,
                grant_id=auth.grant_id,
                smeldr_event="stream_closed",
            )
            self._checks.cancel(auth)
            if auth.on_close is not None:
                auth.on_close(stream)

    def _schedule(self, auth: _StreamAuth) -> None:
        self._checks.schedule(auth, min(self._clock.seconds() + self.recheck_interval, auth.expires_at))

    def _recheck(self, auth: _StreamAuth) -> None:
        """
        A stream's token is due for checking: close the stream if the token
        expired, or if the verifier no longer accepts it (revoked here or
        by another process).  If the verifier cannot answer (its store is
        down) the stream stays open until the next check: expiry is still
        enforced, so a stream never outlives its token's lifetime.
        """
        stream = auth.stream
        if stream.closed or self._streams.get(stream) is not auth:
            return
        if auth.expires_at <= self._clock.seconds():
            log.info(
                "MCP stream closed: its access token expired ({subject} via {client_id})",
                subject=auth.subject,
                client_id=auth.client_id,
            )
            stream.close()
            return
        token = auth.token

        def checked(info: AccessInfo) -> None:
            if stream.closed or auth.token is not token:
                return  # ended meanwhile, or now follows a newer token
            if info.subject != auth.subject or info.client_id != auth.client_id:
                refused(None)
                return
            auth.grant_id = info.grant_id
            auth.expires_at = info.expires_at or float("inf")
            self._schedule(auth)

        def refused(failure: Optional[Failure]) -> None:
            if stream.closed or auth.token is not token:
                return
            if failure is not None and failure.check(AuthFailure) and failure.value.status == 503:  # type: ignore[attr-defined]
                log.warn("MCP stream token could not be verified again; checking later")
                self._schedule(auth)
                return
            log.info(
                "MCP stream closed: its access token is no longer valid ({subject} via {client_id})",
                subject=auth.subject,
                client_id=auth.client_id,
            )
            stream.close()

        def broken(failure: Failure) -> None:
            log.failure("MCP stream token check failed", failure)

        self.auth.verify(token).addCallbacks(checked, refused).addErrback(broken)
