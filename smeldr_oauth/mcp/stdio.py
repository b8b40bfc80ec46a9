# -*- test-case-name: tests.test_mcp_stdio -*-
"""
The stdio transport: newline-delimited JSON-RPC on stdin/stdout, for local
clients that spawn the server (Claude Desktop and similar).

There is no OAuth here: whoever can start the process is the local
operator and is trusted, so every call runs as subject C{"local"} with
every scope the application names.  stdout carries only protocol frames;
logs go to stderr.

Console command::

    smeldr-oauth-stdio [--app module:attr] [--site-db PATH | --database URL]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.app import AppLoadError, MCPApp, load_app
from smeldr_oauth.mcp.calls import CallbackOutlet, Principal, answer_lost
from smeldr_oauth.mcp.session import ServerSession
from smeldr_oauth.oauth.numbers import count

log = Logger()

DEFAULT_APP = "smeldr_oauth.site.tools:build_app"


@implementer(IHalfCloseableProtocol)
class StdioMCP(LineReceiver):
    """
    One MCP session over a byte stream of newline-delimited JSON.

    When stdin closes, requests already read are still answered before
    stdout closes: a client that writes its requests and then closes its
    end (a shell pipe, a test harness) gets every response.

    @ivar MAX_LENGTH: the longest accepted line (the stdio counterpart of
        the HTTP body limit).
    """

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, app: MCPApp, clock: IReactorTime, max_line: int = 1 << 20) -> None:
        self.MAX_LENGTH = max_line
        self.session = ServerSession(app, clock, default_outlet=CallbackOutlet(self._send))
        self.principal = Principal("local", None, app.all_scopes(), None)
        self.finished: Deferred = Deferred()
        self._pending = 0
        self._input_closed = False

    def _track(self, d: Deferred) -> Deferred:
        self._pending += 1

        def done(result: Any) -> Any:
            self._pending -= 1
            self._maybe_close()
            return result

        return d.addBoth(done)

    def _maybe_close(self) -> None:
        if self._input_closed and self._pending == 0 and self.transport is not None:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        """
        stdin reached its end: finish what is in flight, then close.
        """
        self._input_closed = True
        self._maybe_close()

    def writeConnectionLost(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def _send(self, message: Any) -> None:
        if self.transport is not None:
            self.transport.write(jsonrpc.encode(message) + b"\n")

    def lineReceived(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            is_batch, messages = jsonrpc.parse_frame(line)
        except jsonrpc.JSONRPCError as error:
            self._send(jsonrpc.error_response(None, error))
            return
        if is_batch and not self.session.allows_batch:
            self._send(
                jsonrpc.error_response(None, jsonrpc.invalid_request("Batches are not allowed at this protocol version"))
            )
            return
        if not is_batch:
            message = messages[0]
            self._track(
                self.session.handle(message, self.principal, self.session.default_outlet)
                .addCallback(self._reply)
                .addErrback(self._lost, message)
            )
            return
        responses: list[Any] = []
        remaining = [len(messages)]

        def collected(response: Optional[dict]) -> None:
            if response is not None:
                responses.append(response)
            remaining[0] -= 1
            if remaining[0] == 0 and responses:
                self._send(responses)

        for message in messages:
            self._track(
                self.session.handle(message, self.principal, self.session.default_outlet)
                .addCallback(collected)
                .addErrback(self._lost, message)
            )

    def _reply(self, response: Optional[dict]) -> None:
        if response is not None:
            self._send(response)

    def _lost(self, failure: Failure, message: jsonrpc.Message) -> None:
        answer_lost(failure, message, self._send, "stdio")

    def lineLengthExceeded(self, line: bytes) -> None:
        # The rest of the oversized line is discarded by LineReceiver; say
        # why instead of dropping the connection.
        self._send(jsonrpc.error_response(None, jsonrpc.invalid_request("Message too large")))

    def connectionLost(self, reason: Any = None) -> None:
        self.session.close()
        if not self.finished.called:
            self.finished.callback(None)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point: serve an app on stdin/stdout until stdin closes."""
    parser = argparse.ArgumentParser(prog="smeldr-oauth-stdio", description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default=DEFAULT_APP, help="module:attr of an MCPApp or a factory of one")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--site-db", default=None, help="path of the site content database")
    where.add_argument("--database", default=None, help="PostgreSQL URL of the site content (instead of --site-db)")
    parser.add_argument("--max-line", type=count, default=1 << 20, help="longest accepted message, in bytes")
    args = parser.parse_args(argv)
    from smeldr_oauth.db.postgres import is_postgres_url

    if args.database is not None and not is_postgres_url(args.database):
        # Not a SQLite file of that name in the working directory.
        parser.error("--database must be a postgresql:// URL (a SQLite file is --site-db)")
    site_db = args.database or args.site_db
    if args.app == DEFAULT_APP and site_db is None:
        parser.error("--site-db or --database is required for the default site-content app")

    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    status: list[int] = []

    def serve(app: MCPApp) -> Deferred:
        protocol = StdioMCP(app, reactor, args.max_line)
        StandardIO(protocol, reactor=reactor)
        return protocol.finished

    def failed(failure: Any) -> None:
        status.append(1)
        if failure.check(AppLoadError):
            log.error("smeldr-oauth-stdio: {problem}", problem=str(failure.value))
        else:
            log.failure("smeldr-oauth-stdio stopped", failure)

    def stop(_: object) -> None:
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]

    def start() -> None:
        # A factory gets what this command has: the site database (a
        # SQLite path or a PostgreSQL URL) and the reactor, when one is given.
        factory_args = (site_db, reactor) if site_db is not None else ()
        load_app(args.app, *factory_args).addCallback(serve).addErrback(failed).addBoth(stop)

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if status:
        sys.exit(status[0])


if __name__ == "__main__":  # pragma: no cover
    main()
