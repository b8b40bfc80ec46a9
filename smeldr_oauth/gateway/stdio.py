# -*- test-case-name: tests.test_gateway_stdio -*-
"""
The stdio channel: an upstream MCP server run as a child process, speaking
newline-delimited JSON-RPC on its stdin and stdout.

The process gets only the environment the configuration names (see
L{smeldr_oauth.gateway.config.UpstreamConfig.child_environment}) and its own
working directory.  Its stdout carries protocol frames only; a line that is
not JSON is logged and skipped, and a line longer than
C{max_message_bytes} ends the process (an upstream that never sends a
newline must not fill the gateway's memory).  Its stderr goes to the log,
line by line, at most C{stderr_lines_per_second} (the rest is counted and
the count logged), so a noisy upstream cannot flood the log either.

Stopping follows the MCP specification's advice: close stdin, wait
C{stop_grace}, send SIGTERM, wait again, send SIGKILL.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

from twisted.internet import error as twisted_error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from smeldr_oauth.gateway import errors
from smeldr_oauth.gateway.config import UpstreamConfig
from smeldr_oauth.gateway.flow import TokenBucket
from smeldr_oauth.gateway.interfaces import IChannelReceiver, IUpstreamChannel
from smeldr_oauth.mcp import jsonrpc

log = Logger()

#: A stderr line longer than this is logged cut.
STDERR_LINE_MAX = 500


def _printable(data: bytes, limit: int) -> str:
    text = data.decode("utf-8", "replace")
    return "".join(c if c.isprintable() or c == "\t" else "?" for c in text[:limit])


class StderrLog:
    """
    An upstream's stderr as log events, at a bounded rate.

    @ivar suppressed: lines not logged since the last one that was.
    """

    def __init__(self, clock: IReactorTime, upstream: str, rate: float) -> None:
        self.upstream = upstream
        self.bucket = TokenBucket(clock, max(rate, 0.001), max(1, int(rate * 5))) if rate > 0 else None
        self.suppressed = 0
        self._partial = b""

    def received(self, data: bytes, pid: Optional[int]) -> None:
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > 4 * STDERR_LINE_MAX:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            line = line.rstrip(b"\r")
            if line:
                self._line(line, pid)

    def flush(self, pid: Optional[int]) -> None:
        if self._partial:
            self._line(self._partial, pid)
            self._partial = b""
        if self.suppressed:
            self._report(pid)

    def _line(self, line: bytes, pid: Optional[int]) -> None:
        if self.bucket is None or not self.bucket.take():
            self.suppressed += 1
            return
        if self.suppressed:
            self._report(pid)
        log.info(
            "upstream {upstream} [{pid}] stderr: {line}",
            upstream=self.upstream,
            pid=pid,
            line=_printable(line, STDERR_LINE_MAX),
        )

    def _report(self, pid: Optional[int]) -> None:
        log.info(
            "upstream {upstream} [{pid}]: {count} stderr lines not logged (rate limit)",
            upstream=self.upstream,
            pid=pid,
            count=self.suppressed,
        )
        self.suppressed = 0


@implementer(IUpstreamChannel)
class StdioChannel(ProcessProtocol):
    """
    One upstream process.

    @ivar subject: the caller's subject when the process serves one user
        (given to it in C{subject_env} when configured).
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        clock: IReactorTime,
        config: UpstreamConfig,
        subject: Optional[str] = None,
        environ: Optional[dict[str, str]] = None,
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.config = config
        self.subject = subject
        self.environ = environ
        self.pid: Optional[int] = None
        self.receiver: Optional[IChannelReceiver] = None
        self.stderr = StderrLog(clock, config.name or "-", config.limits.stderr_lines_per_second)
        self._buffer = b""
        self._ended = False
        self._stopping = False
        self._violation: Optional[str] = None
        self._closed: list[Deferred] = []
        self._timers: list[IDelayedCall] = []

    # -- IUpstreamChannel --------------------------------------------------------

    def start(self, receiver: IChannelReceiver) -> Deferred:
        self.receiver = receiver
        env = self.config.child_environment(self.subject, self.environ)
        program = self.config.command[0]
        if os.sep in program:
            executable: Optional[str] = program if os.access(program, os.X_OK) else None
        else:
            executable = shutil.which(program, path=env.get("PATH"))
        if executable is None:
            return fail(errors.unavailable(self.config.name, "start_failed", "its command was not found"))
        try:
            self.reactor.spawnProcess(
                self, executable, list(self.config.command), env=env, path=self.config.cwd
            )
        except OSError as e:
            log.warn(
                "Upstream {upstream} could not be started: {error}",
                upstream=self.config.name,
                error=e.strerror or type(e).__name__,
            )
            return fail(errors.unavailable(self.config.name, "start_failed", "its command could not be started"))
        return succeed(None)

    def send(self, message: dict[str, Any], identity: Any = None) -> Deferred:
        if self._ended or self.transport is None or self._stopping:
            return fail(errors.unavailable(self.config.name, "exited", "its process is not running"))
        self.transport.write(jsonrpc.encode(message) + b"\n")
        return succeed(None)

    def negotiated(self, version: str) -> None:
        pass

    def close(self) -> Deferred:
        if self._ended or self.transport is None:
            # Ended, or never started.
            self._ended = True
            return succeed(None)
        d: Deferred = Deferred()
        self._closed.append(d)
        if not self._stopping:
            self._stopping = True
            if self.transport is not None:
                self.transport.closeStdin()
            grace = self.config.limits.stop_grace
            self._timers.append(self.clock.callLater(grace, self._signal, "TERM"))
            self._timers.append(self.clock.callLater(2 * grace, self._signal, "KILL"))
        return d

    def _signal(self, name: str) -> None:
        if self._ended or self.transport is None:
            return
        try:
            self.transport.signalProcess(name)
        except (twisted_error.ProcessExitedAlready, OSError):
            pass

    # -- ProcessProtocol ---------------------------------------------------------

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def outReceived(self, data: bytes) -> None:
        if self._violation is not None:
            return
        self._buffer += data
        limit = self.config.limits.max_message_bytes
        while not self._ended and self._violation is None:
            end = self._buffer.find(b"\n")
            if end == -1:
                break
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            if len(line) > limit:
                self._too_large(limit)
                return
            self._line(line)
        if len(self._buffer) > limit and self._violation is None:
            self._too_large(limit)

    def _too_large(self, limit: int) -> None:
        self._violation = f"it sent a message larger than {limit} bytes"
        self._buffer = b""
        errors.instance_event(
            log,
            LogLevel.warn,
            "sent a message over {limit} bytes; stopping it",
            upstream=self.config.name,
            pid=self.pid,
            event="gateway_protocol_error",
            limit=limit,
        )
        self._signal("KILL")

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            _, messages = jsonrpc.parse_frame(line)
        except jsonrpc.JSONRPCError:
            # Some servers print banners on stdout; the line is not ours to parse.
            self.stderr.received(b"(stdout, not JSON) " + line[:STDERR_LINE_MAX] + b"\n", self.pid)
            return
        for message in messages:
            if self.receiver is not None and not self._ended:
                self.receiver.messageReceived(message, None)

    def errReceived(self, data: bytes) -> None:
        self.stderr.received(data, self.pid)

    def processEnded(self, reason: Failure) -> None:
        self._ended = True
        self.stderr.flush(self.pid)
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        value = reason.value
        status = getattr(value, "exitCode", None)
        signal = getattr(value, "signal", None)
        if self._violation is not None:
            kind, detail = "protocol", self._violation
        elif self._stopping:
            kind, detail = "stopped", "it was stopped"
        elif signal:
            kind, detail = "exited", f"its process was killed by signal {signal}"
        else:
            kind, detail = "exited", f"its process exited with status {status}"
        if self.receiver is not None:
            self.receiver.channelLost(kind, detail)
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)
