# -*- test-case-name: tests.test_gateway_agent -*-
"""
An upstream's response as the agent hands it on
(L{smeldr_oauth.gateway.connection} parses it): its headers by lower-case
name, and its body delivered to the caller's protocol, whose transport can
stop or pause the connection only while the response is the connection's.

Its tests are the agent's (C{tests/test_gateway_agent.py}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.python.failure import Failure

if TYPE_CHECKING:
    from smeldr_oauth.gateway.connection import Connection


class ResponseHeaders:
    """
    A response's headers by lower-case name, read as C{Headers} is read
    (C{getRawHeaders}, C{hasHeader}, C{getAllRawHeaders}); built once per
    response without normalising every name to Header-Case.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: dict[bytes, list[bytes]]) -> None:
        self._raw = raw

    def getRawHeaders(self, name: Any, default: Any = None) -> Any:
        if isinstance(name, str):
            values = self._raw.get(name.encode("latin-1").lower())
            return [v.decode("utf-8", "replace") for v in values] if values else default
        return self._raw.get(name.lower()) or default

    def hasHeader(self, name: Any) -> bool:
        key = name.encode("latin-1") if isinstance(name, str) else name
        return key.lower() in self._raw

    def getAllRawHeaders(self) -> Any:
        return iter(self._raw.items())

    # What wrappers of an agent (treq's content decoder) change.

    def setRawHeaders(self, name: Any, values: Any) -> None:
        key = name.encode("latin-1") if isinstance(name, str) else name
        self._raw[key.lower()] = [v.encode("utf-8") if isinstance(v, str) else v for v in values]

    def removeHeader(self, name: Any) -> None:
        key = name.encode("latin-1") if isinstance(name, str) else name
        self._raw.pop(key.lower(), None)

    def __repr__(self) -> str:
        return f"ResponseHeaders({self._raw!r})"


class _BodyTransport:
    """
    What a body protocol sees as its transport: stop (drop the connection),
    pause, resume; each only while its response is the connection's.  Once
    the body has ended the connection may be back in the pool, serving
    another request, which a late stop or pause must not touch (as
    twisted.web.client detaches its producer proxy at the response's end).
    """

    __slots__ = ("_connection", "_response")

    def __init__(self, connection: "Connection", response: "Response") -> None:
        self._connection = connection
        self._response = response

    def _current(self) -> Optional["Connection"]:
        connection = self._connection
        return connection if connection.response is self._response else None

    def stopProducing(self) -> None:
        connection = self._current()
        if connection is not None:
            connection.abort_body()

    # What twisted.web.client.readBody calls to give up on a body.
    abortConnection = stopProducing

    def pauseProducing(self) -> None:
        connection = self._current()
        if connection is not None and connection.transport is not None:
            connection.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        connection = self._current()
        if connection is not None and connection.transport is not None:
            connection.transport.resumeProducing()  # type: ignore[attr-defined]


class Response:
    """
    An upstream's response: C{code}, C{phrase}, C{version}, C{headers},
    C{length}; its body goes to the protocol given to L{deliverBody}
    (what arrived before is kept for it).
    """

    def __init__(self, connection: "Connection", version: tuple[bytes, int, int], code: int, phrase: bytes, headers: ResponseHeaders, length: Any) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._connection = connection
        self._protocol: Any = None
        self._early: Optional[list[bytes]] = []
        self._ended: Optional[Failure] = None

    def deliverBody(self, protocol: Any) -> None:
        if self._protocol is not None:
            raise RuntimeError("the body is already being delivered")
        self._protocol = protocol
        protocol.makeConnection(_BodyTransport(self._connection, self))
        early, self._early = self._early, None
        for data in early or ():
            protocol.dataReceived(data)
        if self._ended is not None:
            protocol.connectionLost(self._ended)

    def _data(self, data: bytes) -> None:
        if self._protocol is None:
            assert self._early is not None
            self._early.append(data)
        else:
            self._protocol.dataReceived(data)

    def _end(self, reason: Failure) -> None:
        if self._protocol is None:
            self._ended = reason
        else:
            self._protocol.connectionLost(reason)
