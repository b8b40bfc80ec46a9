# -*- test-case-name: tests.test_oauth_cimd -*-
"""
Reading a document's body without letting its host choose how much we
read: the raw bytes are counted under treq's content decoding (a gzip body
can only inflate what was allowed in), the body is collected up to the cap,
and a response we will not read is stopped rather than drained.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from smeldr_oauth.oauth.cimd.errors import CIMDError


def _stop(transport: object) -> None:
    """
    Stop the connection under a response body.  The body protocol's
    transport is the agent's producer proxy, whose C{stopProducing} closes
    the connection and stops reading from it.
    """
    stop = getattr(transport, "stopProducing", None)
    if stop is not None:
        stop()


def too_large(max_bytes: int) -> CIMDError:
    return CIMDError(f"client metadata document is larger than {max_bytes} bytes")


class _RawCap(Protocol):
    """
    Counts bytes as they come off the connection, before any content
    decoding, and stops the connection once there are too many: a gzip
    body can only inflate what was allowed in.
    """

    def __init__(self, inner: Protocol, max_bytes: int) -> None:
        self._inner = inner
        self._max = max_bytes
        self._size = 0
        self._done = False

    def makeConnection(self, transport: Any) -> None:
        Protocol.makeConnection(self, transport)
        self._inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._size += len(data)
        if self._size > self._max:
            self._done = True
            _stop(self.transport)
            self._inner.connectionLost(Failure(too_large(self._max)))
            return
        self._inner.dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self._done:
            self._done = True
            self._inner.connectionLost(reason)


class _RawCappedResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    def __init__(self, original: IResponse, max_bytes: int) -> None:
        super().__init__(original)
        self._max = max_bytes

    def deliverBody(self, protocol: Protocol) -> None:
        self.original.deliverBody(_RawCap(protocol, self._max))


@implementer(IAgent)
class GuardedAgent:
    """
    Sits under treq's content-decoding agent: takes back its
    C{Accept-Encoding: gzip} (a 5 KB document gains nothing from it) and
    caps the raw body, whichever agent actually fetches.
    """

    def __init__(self, agent: IAgent, max_bytes: int) -> None:
        self._agent = agent
        self._max = max_bytes

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        headers = headers.copy() if headers is not None else Headers()
        headers.removeHeader(b"accept-encoding")
        d = self._agent.request(method, uri, headers, bodyProducer)
        d.addCallback(_RawCappedResponse, self._max)
        return d


class CappedBody(Protocol):
    """
    Collects a response body of at most C{max_bytes} into C{finished},
    stopping the connection as soon as it grows past the cap.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._chunks: list[bytes] = []
        self._size = 0
        self.finished: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[bytes]) -> None:
        if self.transport is not None:
            _stop(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._max:
            _stop(self.transport)
            if not self.finished.called:
                self.finished.errback(too_large(self._max))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)


class _Discard(Protocol):
    """
    Stops a response we will not read, so that its body is neither
    buffered nor waited for.
    """

    def makeConnection(self, transport: Any) -> None:
        Protocol.makeConnection(self, transport)
        _stop(transport)


def discard(response: IResponse) -> None:
    response.deliverBody(_Discard())
