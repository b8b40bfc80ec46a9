# -*- test-case-name: tests.test_e2e_python_sdk -*-
"""
Shared helpers for end-to-end tests: a real C{twist smeldr-oauth} process on
a free 127.0.0.1 port with its own temporary databases, a site token made with
the admin CLI, and a way to run client programs against it.

Everything waits on the real reactor (endpoint connects retried with
C{deferLater}); nothing sleeps. Every child is started bound to the test
process (L{tests.lifetime}): none outlives an interrupted run. Each helper takes the reactor it should use;
only the test modules pick the global one.

The server's output is kept: L{RunningServer.annotate} appends it to a failure
message, and at cleanup it is written to C{server.log} beside the databases
(under C{_trial_temp}), so a failing run always shows what the server said.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attr
from twisted.internet import error, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorCore, IReactorProcess, IReactorTime
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests import certificates
from tests.lifetime import spawnBound

#: The checkout, where the client programs under C{tests/clients} live.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ServerFailed(Exception):
    """
    The server process did not come up, or died; the message carries its log.
    """


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.

    The server must know its port before it starts (it is part of the
    issuer), so the port is picked here and released; another process could
    take it in between, which on a test machine is rare enough.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocessEnvironment() -> dict[str, str]:
    """
    The environment for every child: this interpreter's, unbuffered.

    The checkout is deliberately not put on C{PYTHONPATH}: the server must
    come from the installed package (children run outside the checkout), so
    these tests also prove that C{twisted/plugins} and the admin script are
    packaged.
    """
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _OutputCollector(ProcessProtocol):
    """
    Keep everything a child writes (stdout and stderr apart, and both in
    order), and say when it ends.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)
        self.chunks.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)
        self.chunks.append(data)

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.callback(None)

    def output(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")

    def status(self) -> int:
        """
        The exit status; C{-N} for a child killed by signal N.
        """
        assert self.reason is not None
        value = self.reason.value
        if getattr(value, "signal", None):
            return -int(value.signal)
        return int(getattr(value, "exitCode", 0) or 0)


@attr.s(auto_attribs=True)
class RunningServer:
    """
    A C{twist smeldr-oauth} process and what a client needs to reach it.

    @ivar issuer: The issuer it was started with, C{http://127.0.0.1:PORT}.
    @ivar mcpURL: The MCP endpoint, C{<issuer>/mcp}.
    """

    reactor: Any
    port: int
    issuer: str
    mcpURL: str
    directory: str
    oauthDB: str
    siteDB: str
    argv: list[str]
    _process: Any
    _collector: _OutputCollector

    def log(self) -> str:
        """
        Everything the server printed so far.
        """
        return self._collector.output()

    def isRunning(self) -> bool:
        return self._collector.reason is None

    def annotate(self, message: str) -> str:
        """
        C{message} followed by the server's command line and log, for a
        failure that the log may explain.
        """
        return (
            f"{message}\n--- server: {' '.join(self.argv)}\n--- server log ---\n"
            f"{self.log()}--- end of server log ---"
        )

    async def stop(self, timeout: float = 5.0) -> None:
        """
        End the process: SIGTERM, then SIGKILL if it has not gone after
        C{timeout} seconds; then write its log to C{server.log}.
        """
        if self.isRunning():
            try:
                self._process.signalProcess("TERM")
            except error.ProcessExitedAlready:
                pass
            killer = self.reactor.callLater(timeout, self._kill)
            await self._collector.ended
            if killer.active():
                killer.cancel()
        self._saveLog()

    def _saveLog(self) -> None:
        with open(os.path.join(self.directory, "server.log"), "w") as f:
            f.write(self.log())

    def _kill(self) -> None:
        try:
            self._process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass


#: With L{waitForListening}'s C{spent}, a server that never listens while
#: spending no CPU (blocked) is still given up on after this many seconds,
#: before trial's own 120-second test timeout, so that the failure shows
#: its log.
WALL_LIMIT = 90.0


def processCPU(pid: int) -> float:
    """
    The CPU seconds (user and system) process C{pid} and the children it
    has reaped have used, from C{/proc}; 0 when it cannot be read (the
    process is gone, or there is no C{/proc}).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


async def waitForListening(
    reactor: IReactorTime,
    port: int,
    alive: Any,
    timeout: float = 15.0,
    interval: float = 0.1,
    spent: Callable[[], float] | None = None,
) -> None:
    """
    Connect to C{127.0.0.1:port} until a connection succeeds.

    @param alive: A callable that says whether the process is still running:
        a server that died will never listen, so stop waiting at once.
    @param spent: A callable giving the CPU seconds the process has used
        (L{processCPU}).  Given, C{timeout} counts those, not the wall
        clock's: a server's start is about two seconds of CPU, which a
        2-core box running the whole suite beside other jobs (load average
        15-25) stretched past 15 wall-clock seconds before the server had
        printed a line ("nothing listened ... within 15.0s", empty log),
        while a server that is really stuck in a loop still fails after
        C{timeout} seconds of its own work; one that waits without working
        is given up on after L{WALL_LIMIT}.
    @raise ServerFailed: The process died, or C{timeout} passed.
    """
    started = reactor.seconds()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
    while True:
        if not alive():
            raise ServerFailed(f"the server exited before listening on port {port}")
        try:
            connected = await endpoint.connect(Factory.forProtocol(Protocol))
        except (error.ConnectError, error.ConnectionRefusedError):
            waited = reactor.seconds() - started
            if spent is None and waited > timeout:
                raise ServerFailed(f"nothing listened on 127.0.0.1:{port} within {timeout}s")
            if spent is not None and (spent() > timeout or waited > max(timeout, WALL_LIMIT)):
                raise ServerFailed(
                    f"nothing listened on 127.0.0.1:{port} within {timeout}s of the server's CPU"
                    f" ({spent():.1f}s used in {waited:.1f}s)"
                )
            await deferLater(reactor, interval, lambda: None)
        else:
            connected.transport.loseConnection()
            return


async def startServer(
    testCase: TestCase,
    reactor: Any,
    extraArguments: Sequence[str] = (),
    timeout: float = 15.0,
) -> RunningServer:
    """
    Start C{twist smeldr-oauth} on a free loopback port with fresh databases
    in a new temporary directory, and wait until it accepts connections.

    The process is stopped at the test's cleanup, and its log kept.

    @param extraArguments: More C{smeldr-oauth} options, such as
        C{["--access-token-ttl", "2"]}.
    @raise ServerFailed: It died or never listened; the message has its log.
    """
    assert IReactorProcess.providedBy(reactor) and IReactorCore.providedBy(reactor)
    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    port = freePort()
    issuer = f"http://127.0.0.1:{port}"
    oauthDB = os.path.join(directory, "oauth.db")
    siteDB = os.path.join(directory, "site.db")
    argv = [
        sys.executable,
        "-m",
        "twisted",
        "--log-format=text",
        "smeldr-oauth",
        "--issuer",
        issuer,
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--oauth-db",
        oauthDB,
        "--site-db",
        siteDB,
        "--dev",
        *extraArguments,
    ]
    return await launchServer(testCase, reactor, argv, port, issuer, directory, timeout=timeout)


async def launchServer(
    testCase: TestCase,
    reactor: Any,
    argv: Sequence[str],
    port: int,
    issuer: str,
    directory: str,
    env: dict[str, str] | None = None,
    timeout: float = 15.0,
) -> RunningServer:
    """
    Run C{argv}, a server command that listens on C{port} (on 127.0.0.1 at
    least) with its databases C{oauth.db} and C{site.db} in C{directory}
    (its working directory), and wait until it accepts connections.

    The process is stopped at the test's cleanup, and its log kept.

    @param env: Its environment; L{subprocessEnvironment} if C{None}.
    @raise ServerFailed: It died or never listened; the message has its log.
    """
    collector = _OutputCollector()
    process = spawnBound(
        reactor, collector, argv, env=subprocessEnvironment() if env is None else env, path=directory
    )
    server = RunningServer(
        reactor=reactor,
        port=port,
        issuer=issuer,
        mcpURL=f"{issuer}/mcp",
        directory=directory,
        oauthDB=os.path.join(directory, "oauth.db"),
        siteDB=os.path.join(directory, "site.db"),
        argv=list(argv),
        process=process,
        collector=collector,
    )
    testCase.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
    try:
        pid = process.pid
        await waitForListening(
            reactor, port, server.isRunning, timeout=timeout, spent=lambda: processCPU(pid) if pid else 0.0
        )
    except ServerFailed as e:
        await server.stop()
        raise ServerFailed(server.annotate(str(e))) from None
    return server


async def runProgram(
    reactor: Any,
    command: Sequence[str],
    timeout: float = 30.0,
    path: str | None = None,
    env: dict[str, str] | None = None,
) -> tuple[str, str, int]:
    """
    Run C{command}; give back its stdout, stderr and exit status (C{-N} when
    killed by signal N). A child still running after C{timeout} seconds is
    killed, so a hung client cannot hang the suite.
    """
    collector = _OutputCollector()
    process = spawnBound(
        reactor,
        collector,
        command,
        env=subprocessEnvironment() if env is None else env,
        path=path,
    )

    def kill() -> None:
        try:
            process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    killer = reactor.callLater(timeout, kill)
    await collector.ended
    if killer.active():
        killer.cancel()
    return (
        b"".join(collector.out).decode("utf-8", "replace"),
        b"".join(collector.err).decode("utf-8", "replace"),
        collector.status(),
    )


async def runPython(
    reactor: Any,
    arguments: Sequence[str],
    timeout: float = 30.0,
    path: str | None = None,
) -> tuple[str, str, int]:
    """
    L{runProgram} with this interpreter: C{arguments} are its arguments.
    """
    return await runProgram(reactor, [sys.executable, *arguments], timeout, path)


def adminCommand() -> list[str]:
    """
    How to run the admin CLI: the installed C{smeldr-oauth-admin} script
    beside this interpreter when there is one (what an operator runs), else
    the module behind it.
    """
    script = os.path.join(os.path.dirname(sys.executable), "smeldr-oauth-admin")
    if os.path.exists(script):
        return [script]
    for module in ("smeldr_oauth.service.admin", "smeldr_oauth.site.admin"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if found:
            return [sys.executable, "-m", module]
    raise ServerFailed(
        "no admin CLI: neither smeldr-oauth-admin nor its module is installed"
    )


async def createSiteToken(
    reactor: Any, server: RunningServer, name: str = "e2e", database: str | None = None
) -> str:
    """
    Make a site token with the admin CLI, as an operator would, and return
    it (the last word it prints).

    @param database: the server's PostgreSQL URL, if it runs on one.
    @raise ServerFailed: The CLI failed or printed no token.
    """
    where = ["--database", database] if database else ["--site-db", server.siteDB]
    command = [*adminCommand(), "token", "create", name, *where]
    out, err, code = await runProgram(reactor, command)
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    if code != 0 or not lines:
        raise ServerFailed(
            server.annotate(
                f"{' '.join(command)} exited {code}\nstdout: {out!r}\nstderr: {err}"
            )
        )
    return lines[-1].split()[-1]


@attr.s(auto_attribs=True, frozen=True)
class MetadataHost:
    """
    An HTTPS server on 127.0.0.1 publishing one client metadata document.

    @ivar url: The document's URL, which is also the client's C{client_id}.
    @ivar caFile: A PEM file with the certificate to trust for it (pass it
        to the server as C{--cimd-ca-file}).
    """

    url: str
    caFile: str


def _selfSignedCertificate(directory: str) -> tuple[str, bytes]:
    """
    Make a certificate for C{127.0.0.1} and C{localhost} that is its own CA.

    @return: The file its certificate was written to (what the server must
        trust) and its certificate and key together, as PEM.
    """
    key, certificate = certificates.self_signed()
    certificatePEM = certificates.cert_pem(certificate)
    keyPEM = certificates.key_pem(key)
    certFile = os.path.join(directory, "cimd-ca.pem")
    with open(certFile, "wb") as f:
        f.write(certificatePEM)
    return certFile, keyPEM + certificatePEM


class _Document(Resource):
    """
    One JSON document, whatever the request's path below it.
    """

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return self.body


async def serveClientMetadata(
    testCase: TestCase,
    reactor: Any,
    redirectURIs: Sequence[str],
    name: str = "client.json",
) -> MetadataHost:
    """
    Publish a Client ID Metadata Document over HTTPS on a free loopback
    port, as an MCP application would on its own site, for the lifetime of
    the test.

    The document describes a public client (C{token_endpoint_auth_method}
    C{none}) using the authorization code and refresh grants. Its URL is only
    known once the port is, so the document is filled in after listening.
    """
    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    caFile, pem = _selfSignedCertificate(directory)
    options = ssl.PrivateCertificate.loadPEM(pem.decode("ascii")).options()
    document = _Document(b"")
    root = Resource()
    root.putChild(name.encode("ascii"), document)
    endpoint = SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
    port = await endpoint.listen(Site(root))
    testCase.addCleanup(port.stopListening)
    url = f"https://127.0.0.1:{port.getHost().port}/{name}"
    document.body = json.dumps(
        {
            "client_id": url,
            "client_name": "smeldr e2e (CIMD)",
            "redirect_uris": list(redirectURIs),
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }
    ).encode("utf-8")
    return MetadataHost(url=url, caFile=caFile)


#: Where tests write the client matrix (client x transport x identity x case
#: -> status) that the docs are generated from; unset, nothing is written.
MATRIX_ENVIRONMENT = "SMELDR_MATRIX_DIR"

#: The matrix files this process has written: a test's first row replaces
#: what an earlier run left in its file, later rows are added to it.
_matrixFilesWritten: set[str] = set()


def recordMatrix(
    testCase: TestCase,
    client: str,
    version: str,
    transport: str,
    identity: str,
    case: str,
    status: str,
) -> None:
    """
    Add one row to the client matrix, if C{$SMELDR_MATRIX_DIR} is set: a JSON
    list of C{{client, version, transport, identity, case, status, test}}
    objects in C{<dir>/<test id>.json} (a test may add several rows; a new
    run of the test replaces the rows of the previous one).

    @param client: The client as a person knows it, e.g. C{"mcp (Python SDK)"}
        or C{"mcp-remote"}.
    @param version: The client's version that ran.
    @param transport: C{"streamable-http"} or C{"sse"}.
    @param identity: C{"dcr"} (dynamic registration) or C{"cimd"}.
    @param case: What was proven, e.g. C{"connect"}, C{"refresh"},
        C{"revoke-recover"}.
    @param status: C{"pass"}, C{"fail"} or C{"skip"}.
    """
    directory = os.environ.get(MATRIX_ENVIRONMENT)
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{testCase.id()}.json")
    rows: list[dict[str, str]] = []
    if path in _matrixFilesWritten and os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)
    _matrixFilesWritten.add(path)
    rows.append(
        {
            "client": client,
            "version": version,
            "transport": transport,
            "identity": identity,
            "case": case,
            "status": status,
            "test": testCase.id(),
        }
    )
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


async def matrixOutcome(
    testCase: TestCase,
    client: str,
    version: str,
    transport: str,
    identity: str,
    case: str,
    body: Callable[[], Awaitable[None]],
) -> None:
    """
    Run C{body} and record its outcome (C{"pass"}, or C{"fail"} when it
    raised, the error then passed on) as one matrix row: see L{recordMatrix}.
    """
    try:
        await body()
    except BaseException:
        recordMatrix(testCase, client, version, transport, identity, case, "fail")
        raise
    recordMatrix(testCase, client, version, transport, identity, case, "pass")


async def runDriverReport(
    reactor: Any,
    command: Sequence[str],
    timeout: float = 30.0,
    path: str | None = None,
) -> tuple[dict[str, Any] | None, str, str, int]:
    """
    Run a client driver (a program under C{tests/clients} or C{tests/node}
    that ends its output with a one-line JSON report).

    @return: Its report (the last stdout line that starts with C{{}, parsed;
        C{None} if there is none or it is no JSON), stdout, stderr and exit
        status.
    """
    out, err, code = await runProgram(reactor, command, timeout=timeout, path=path)
    report: dict[str, Any] | None = None
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if lines:
        try:
            report = json.loads(lines[-1])
        except ValueError:
            report = None
    return report, out, err, code


def checkDriver(
    testCase: TestCase,
    server: RunningServer,
    arguments: Sequence[str],
    report: dict[str, Any] | None,
    out: str,
    err: str,
    code: int,
) -> dict[str, Any]:
    """
    The report of a driver run by L{runDriverReport} with C{arguments};
    fail C{testCase} with everything known (its error, HTTP trace, output
    and the server's) unless it exited 0 reporting success.
    """
    if code != 0 or report is None or not report.get("ok"):
        trace = "\n".join(json.dumps(e) for e in (report or {}).get("http", []))
        testCase.fail(
            server.annotate(
                f"driver {' '.join(arguments)} exited {code}\n"
                f"error: {(report or {}).get('error')}\n"
                f"--- HTTP trace ---\n{trace}\n--- driver stderr ---\n{err}"
                f"--- driver stdout ---\n{out}"
            )
        )
    assert report is not None
    return report


def explainReport(report: dict[str, Any]) -> str:
    """
    A driver's report without its results, then its HTTP trace, one
    exchange a line: the message for a failed assertion about it.
    """
    summary = {k: v for k, v in report.items() if k != "http" and not k.endswith("result")}
    trace = "\n".join(json.dumps(e) for e in report.get("http", []))
    return f"\nreport: {json.dumps(summary)}\n--- HTTP trace ---\n{trace}"
