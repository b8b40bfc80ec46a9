# -*- test-case-name: tests.test_doctor_proxy -*-
"""
A real load balancer for the tests: a private Debian C{haproxy} in front of
real servers, round-robin over them with no stickiness, optionally
terminating TLS with a certificate from a CA made in the test, and with
knobs for the broken setups the doctor must recognise.

Use::

    frontend = reserveFrontend(self)             # the public port, known now
    ca = makeTestCA(self)                        # only when tls: a CA and its file
    servers = [await startServer(self, reactor, ["--issuer", frontend.url("https")])
               for _ in range(3)]
    proxy = await startHAProxy(self, reactor, [s.port for s in servers],
                               frontend=frontend, tls=ca.serverPEM, caFile=ca.caFile)
    proxy.url      # https://127.0.0.1:PORT
    httpClient(reactor, proxy.caFile)   # a treq client that trusts it

Life cycle:

  - the public socket is bound and listening in the test process before
    anything starts (L{reserveFrontend}), handed to haproxy as an inherited
    descriptor (C{bind fd@3}): no port race, and the port is known in time
    to be the servers' C{--issuer};
  - haproxy runs in the foreground (C{-db}), one process, under a tiny
    guard that asks the kernel to kill it when the test process dies
    (C{PR_SET_PDEATHSIG}), so it never outlives trial, even on C{kill -9};
  - it is stopped at the test's cleanup; what it printed (haproxy logs
    every request to stderr) is written beside its config under
    C{_trial_temp} (C{haproxy.cfg.log}), and L{RunningProxy.annotate} adds
    the config and the log to a failure message.

Without haproxy installed, L{requireHAProxy} fails (under the README's test
command) or skips, naming C{bash scripts/setup-haproxy.sh}.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any, Optional, Union

import attr
import treq
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from tests import certificates
from tests.e2e import ServerFailed, _OutputCollector, subprocessEnvironment
from tests.prerequisites import require

#: Where Debian installs it (C{/usr/sbin} is not on every user's PATH).
HAPROXY_CANDIDATES = ("haproxy", "/usr/sbin/haproxy")

#: A backend as a port on 127.0.0.1, or (host, port).
Backend = Union[int, tuple[str, int]]

#: Run argv[2:] once the kernel is told to SIGKILL it when its parent (the
#: test process, argv[1]) dies; exit at once if that already happened.
#: PR_SET_PDEATHSIG (1) survives the exec of a non-setuid program.
_GUARD = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(70)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def findProgram(candidates: Sequence[str]) -> Optional[str]:
    """
    The first of C{candidates} found on C{PATH} or as an executable path.
    """
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
        if os.path.isabs(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def requireProgram(candidates: Sequence[str], install: str) -> str:
    """
    The first of C{candidates} that is installed; stop the test (fail
    under the README's test command, skip elsewhere) when none is,
    naming C{install}.
    """
    found = findProgram(candidates)
    require(None if found else f"{candidates[0]} is not installed", install)
    assert found is not None
    return found


def requireHAProxy() -> str:
    """
    The haproxy program (see L{requireProgram}).
    """
    return requireProgram(HAPROXY_CANDIDATES, "bash scripts/setup-haproxy.sh")


def guardedArgv(argv: Sequence[str]) -> list[str]:
    """
    C{argv} run under the parent-death guard: the child is killed by the
    kernel when this process dies, however it dies.
    """
    return [sys.executable, "-c", _GUARD, str(os.getpid()), *argv]


# -- a CA for the test -------------------------------------------------------------


@attr.s(auto_attribs=True, frozen=True)
class TestCA:
    """
    A certificate authority made for one test, and a server certificate
    it issued.

    @ivar caFile: the CA certificate (PEM): what clients must trust
        (C{smeldr-oauth-admin doctor --ca-file}).
    @ivar serverPEM: the server certificate, its key and the CA
        certificate in one PEM file, as HAProxy's C{crt} and nginx's
        C{ssl_certificate}/C{ssl_certificate_key} take it.
    @ivar notAfter: when the server certificate expires.
    """

    caFile: str
    serverPEM: str
    notAfter: datetime.datetime


def makeTestCA(
    testCase: TestCase,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    validFor: datetime.timedelta = datetime.timedelta(days=90),
    caValidFor: datetime.timedelta = datetime.timedelta(days=365),
) -> TestCA:
    """
    Make a CA and a server certificate for C{hosts} (IP addresses and DNS
    names) valid for C{validFor} from now, in a new temporary directory.

    @param validFor: a short one (or a negative one) makes the doctor's
        expiry checks fail.
    """
    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    caKey, ca = certificates.make_ca(caValidFor)
    notAfter = datetime.datetime.now(datetime.timezone.utc) + validFor
    serverKey, server = certificates.make_server(caKey, ca, hosts, notAfter)
    caPEM = certificates.cert_pem(ca)
    caFile = os.path.join(directory, "ca.pem")
    with open(caFile, "wb") as f:
        f.write(caPEM)
    serverPEM = os.path.join(directory, "server.pem")
    with open(serverPEM, "wb") as f:
        f.write(certificates.cert_pem(server) + certificates.key_pem(serverKey) + caPEM)
    return TestCA(caFile=caFile, serverPEM=serverPEM, notAfter=notAfter)


def httpClient(reactor: Any, caFile: Optional[str] = None) -> treq.client.HTTPClient:
    """
    A treq client that trusts C{caFile} (for https through a proxy with a
    L{TestCA} certificate) and keeps no connection open afterwards.
    """
    trust = None
    if caFile is not None:
        with open(caFile, "rb") as f:
            trust = Certificate.loadPEM(f.read())
    agent = Agent(
        reactor,
        contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust),
        pool=HTTPConnectionPool(reactor, persistent=False),
        connectTimeout=5,
    )
    return treq.client.HTTPClient(agent)


# -- the public socket ------------------------------------------------------------------


@attr.s(auto_attribs=True)
class Frontend:
    """
    The proxy's public address, bound and listening in the test process
    until the proxy inherits it.

    @ivar host: C{127.0.0.1}.
    @ivar port: the port, known before any server starts.
    """

    host: str
    port: int
    socket: Optional[socket.socket] = attr.ib(repr=False)

    def url(self, scheme: str = "http") -> str:
        """
        The public base URL (what the servers' C{--issuer} must be).
        """
        return f"{scheme}://{self.host}:{self.port}"

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None


def reserveFrontend(testCase: TestCase, host: str = "127.0.0.1") -> Frontend:
    """
    Bind and listen on an ephemeral port now (connections wait in its
    backlog until the proxy accepts them); closed at cleanup if no proxy
    took it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(128)
    frontend = Frontend(host=host, port=sock.getsockname()[1], socket=sock)
    testCase.addCleanup(frontend.close)
    return frontend


# -- the running proxy ---------------------------------------------------------------------


@attr.s(auto_attribs=True)
class RunningProxy:
    """
    A proxy process (haproxy, or nginx from L{tests.nginx}) and how to
    reach it.

    @ivar url: the public base URL, C{http(s)://127.0.0.1:PORT}.
    @ivar port: the public port.
    @ivar configFile: the configuration it runs with.
    @ivar caFile: the CA to trust for its https, or C{None}.
    """

    reactor: Any
    name: str
    url: str
    port: int
    configFile: str
    caFile: Optional[str]
    argv: list[str]
    _process: Any
    _collector: _OutputCollector

    def log(self) -> str:
        """
        What the proxy printed so far.
        """
        return self._collector.output()

    def isRunning(self) -> bool:
        return self._collector.reason is None

    def annotate(self, message: str) -> str:
        """
        C{message}, then the proxy's configuration and log.
        """
        with open(self.configFile) as f:
            config = f.read()
        return (
            f"{message}\n--- {self.name}: {' '.join(self.argv)}\n--- {self.name} config ---\n{config}"
            f"--- {self.name} log ---\n{self.log()}--- end of {self.name} log ---"
        )

    async def stop(self, timeout: float = 5.0) -> None:
        """
        SIGTERM (both stop at once on it in the foreground), SIGKILL after
        C{timeout} seconds; then write the log beside the config.
        """
        if self.isRunning():
            self._signal(signal.SIGTERM)
            killer = self.reactor.callLater(timeout, self._signal, signal.SIGKILL)
            await self._collector.ended
            if killer.active():
                killer.cancel()
        with open(self.configFile + ".log", "w") as f:
            f.write(self.log())

    def _signal(self, number: int) -> None:
        try:
            self._process.signalProcess(number)
        except error.ProcessExitedAlready:
            pass

    @property
    def pid(self) -> int:
        return int(self._process.pid)


async def waitForProxy(
    reactor: Any, proxy: RunningProxy, path: str, timeout: float = 15.0, interval: float = 0.05
) -> None:
    """
    GET C{path} through the proxy (a URL the proxy answers itself) until it
    answers 200.

    @raise ServerFailed: the proxy died or did not answer in time; the
        message has its config and log.
    """
    client = httpClient(reactor, proxy.caFile)
    deadline = reactor.seconds() + timeout
    last = "no answer"
    while True:
        if not proxy.isRunning():
            raise ServerFailed(proxy.annotate(f"{proxy.name} exited before answering"))
        attempt = client.get(proxy.url + path)
        attempt.addTimeout(1.0, reactor)
        try:
            response = await attempt
            await response.content()
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = f"{type(e).__name__}: {e}"
        else:
            if response.code == 200:
                return
            last = f"status {response.code}"
        if reactor.seconds() > deadline:
            raise ServerFailed(proxy.annotate(f"{proxy.name} did not answer {path} within {timeout}s: {last}"))
        await deferLater(reactor, interval, lambda: None)


def spawnProxy(
    testCase: TestCase,
    reactor: Any,
    name: str,
    argv: list[str],
    configFile: str,
    url: str,
    port: int,
    caFile: Optional[str],
    inherit: Optional[socket.socket] = None,
    env: Optional[dict[str, str]] = None,
) -> RunningProxy:
    """
    Start C{argv} under the parent-death guard, stdout and stderr kept,
    C{inherit} passed as its descriptor 3; stopped at the test's cleanup.
    """
    collector = _OutputCollector()
    childFDs: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
    if inherit is not None:
        childFDs[3] = inherit.fileno()
    full = guardedArgv(argv)
    process = reactor.spawnProcess(
        collector,
        sys.executable,
        full,
        env=env if env is not None else subprocessEnvironment(),
        path=os.path.dirname(configFile),
        childFDs=childFDs,
    )
    proxy = RunningProxy(
        reactor=reactor,
        name=name,
        url=url,
        port=port,
        configFile=configFile,
        caFile=caFile,
        argv=argv,
        process=process,
        collector=collector,
    )
    testCase.addCleanup(lambda: Deferred.fromCoroutine(proxy.stop()))
    return proxy


def _backends(backends: Sequence[Backend]) -> list[tuple[str, int]]:
    return [(b if isinstance(b, tuple) else ("127.0.0.1", b)) for b in backends]


def _ms(seconds: float) -> str:
    return f"{max(1, int(seconds * 1000))}ms"


#: The path haproxy answers itself (C{monitor-uri}) to say it is up.
READY_PATH = "/__haproxy_ready"


def haproxyConfig(
    backends: Sequence[Backend],
    *,
    tls: Optional[str] = None,
    timeoutConnect: float = 5.0,
    timeoutClient: float = 3600.0,
    timeoutServer: float = 3600.0,
    forwardedFor: bool = True,
    forwardedProto: bool = True,
    routedPaths: Optional[Sequence[str]] = None,
    healthCheck: Optional[str] = None,
    checkInterval: float = 0.5,
    timeoutCheck: float = 1.0,
    redispatch: bool = True,
    extraFrontend: Sequence[str] = (),
    extraBackend: Sequence[str] = (),
) -> str:
    """
    The configuration L{startHAProxy} runs: one frontend on the inherited
    descriptor 3, an C{app} backend (round-robin over C{backends}, no
    stickiness), and a C{website} backend that answers 404 itself.

    @param tls: a PEM with certificate and key: terminate TLS.
    @param timeoutConnect: C{timeout connect}, seconds.
    @param timeoutClient: C{timeout client}, seconds.
    @param timeoutServer: C{timeout server}, seconds: a value under the
        servers' C{--keepalive} cuts every event stream after it.
    @param forwardedFor: C{option forwardfor} (the client address in
        C{X-Forwarded-For}).
    @param forwardedProto: set C{X-Forwarded-Proto} (overwriting a
        client's); C{False} leaves whatever the client sent.
    @param routedPaths: when given, only paths starting with one of these
        reach the servers; the proxy answers every other path itself with
        an HTML 404 (a website in front of the app: the "well-known path
        not forwarded" setup).
    @param healthCheck: a path (e.g. C{/healthz}) haproxy GETs on every
        server each C{checkInterval} seconds, taking a server that fails
        two checks out of the rotation until it passes two (for tests that
        kill a server); none by default.
    @param timeoutCheck: C{timeout check}, seconds: how long a health
        check waits for its answer once connected.  Without it haproxy
        gives a check C{checkInterval} in all, and a live server on a
        loaded machine (its reactor busy past 0.1 s) failed two checks
        in a row and left the rotation: with the other one killed, every
        request was a 503.  A killed server still fails at once (its
        connection is refused).
    @param redispatch: a request whose connection to a server fails (a
        killed process) is retried on another one (C{option redispatch},
        C{retries 2}); a request the server accepted is never retried.
    @param extraFrontend: more lines for the frontend section.
    @param extraBackend: more lines for the app backend section.
    """
    check = f" check inter {_ms(checkInterval)} fall 2 rise 2" if healthCheck else ""
    servers = "\n".join(
        f"    server s{n} {host}:{port}{check}" for n, (host, port) in enumerate(_backends(backends))
    )
    bind = "    bind fd@3" + (f" ssl crt {tls}" if tls else "")
    frontend = [bind, f"    monitor-uri {READY_PATH}"]
    if forwardedFor:
        frontend.append("    option forwardfor")
    if forwardedProto:
        frontend.append("    http-request set-header X-Forwarded-Proto https if { ssl_fc }")
        frontend.append("    http-request set-header X-Forwarded-Proto http if !{ ssl_fc }")
    if routedPaths is not None:
        frontend.append("    acl app_path path_beg " + " ".join(routedPaths))
        frontend.append("    use_backend app if app_path")
        frontend.append("    default_backend website")
    else:
        frontend.append("    default_backend app")
    frontend.extend(f"    {line}" for line in extraFrontend)
    backend = ["    balance roundrobin"]
    if healthCheck:
        backend.append(f"    option httpchk GET {healthCheck}")
    if redispatch:
        backend += ["    option redispatch", "    retries 2"]
    backend.extend(f"    {line}" for line in extraBackend)
    return (
        "global\n"
        "    nbthread 1\n"
        "    log stderr format raw local0 info\n"
        "defaults\n"
        "    mode http\n"
        "    log global\n"
        "    option httplog\n"
        f"    timeout connect {_ms(timeoutConnect)}\n"
        f"    timeout client {_ms(timeoutClient)}\n"
        f"    timeout server {_ms(timeoutServer)}\n"
        f"    timeout check {_ms(timeoutCheck)}\n"
        "frontend public\n" + "\n".join(frontend) + "\n"
        "backend app\n" + "\n".join(backend) + "\n" + servers + "\n"
        "backend website\n"
        '    http-request return status 404 content-type text/html string "<html><body><h1>Not found</h1></body></html>"\n'
    )


async def startHAProxy(
    testCase: TestCase,
    reactor: Any,
    backends: Sequence[Backend],
    *,
    frontend: Optional[Frontend] = None,
    tls: Optional[str] = None,
    caFile: Optional[str] = None,
    timeout: float = 15.0,
    **config: Any,
) -> RunningProxy:
    """
    Start haproxy in front of C{backends}: every request (not every
    connection) goes to the next backend in turn, with no stickiness of
    any kind, and wait until it answers.

    @param backends: ports on 127.0.0.1, or (host, port) pairs.
    @param frontend: the public socket (from L{reserveFrontend}); a new
        one when not given.
    @param tls: a PEM with certificate and key (L{TestCA.serverPEM}):
        terminate TLS at haproxy; the URL is then https.
    @param caFile: the CA that issued C{tls}, for clients
        (L{TestCA.caFile}).
    @param timeout: seconds to wait for it to answer.
    @param config: the knobs of L{haproxyConfig} (timeouts, forwarded
        headers, routed paths, extra lines).
    @raise ServerFailed: haproxy refused the config, died, or never
        answered; the message has its config and log.
    """
    program = requireHAProxy()
    if frontend is None:
        frontend = reserveFrontend(testCase)
    if tls is not None and caFile is None:
        raise ValueError("tls needs the caFile clients should trust")
    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    configFile = os.path.join(directory, "haproxy.cfg")
    with open(configFile, "w") as f:
        f.write(haproxyConfig(backends, tls=tls, **config))
    argv = [program, "-db", "-f", configFile]
    proxy = spawnProxy(
        testCase,
        reactor,
        "haproxy",
        argv,
        configFile,
        frontend.url("https" if tls else "http"),
        frontend.port,
        caFile,
        inherit=frontend.socket,
    )
    # haproxy has its own copy now; ours would keep accepting into a
    # backlog nobody reads after haproxy stops.
    frontend.close()
    await waitForProxy(reactor, proxy, READY_PATH, timeout=timeout)
    return proxy
