"""
Tests for L{smeldr_oauth.service.workers}: C{--workers N}.

The policy (what is restarted when, what stops the pool, how children are
stopped) on a fake process reactor and a L{Clock}; the mechanics on real
processes and real sockets: a L{Supervisor} in this process with tiny
workers (L{tests.workers_tiny}, wired like C{twist smeldr-oauth}'s), a
tiny pool as a process of its own to kill, and C{twist smeldr-oauth}
itself for its options.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import signal
import sys
from typing import Any, Optional

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError, ConnectionRefusedError, ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from smeldr_oauth.service import tap, workers
from smeldr_oauth.service.metrics import PoolMetrics
from smeldr_oauth.service.workers import READY, Supervisor, WorkerSpec
from tests import e2e, lifetime, workers_tiny
from tests.test_conformance import httpClient
from tests.test_lifetime import MARK, killMarked, marked, waitUntilGone
from tests.supervised import supervise, twist_workers
from tests.test_service_tap import parse, self_signed


class WorkerSpecTests(SynchronousTestCase):
    def test_slots(self) -> None:
        """
        Listening sockets from descriptor 3 on, in C{--listen} order, then
        the lifeline, then the status pipe.
        """
        self.assertEqual(
            WorkerSpec.for_slot(1, 2), WorkerSpec(index=1, listening=(3, 4), lifeline=5, status=6)
        )

    def test_roundTrip(self) -> None:
        spec = WorkerSpec.for_slot(3, 1)
        rest, parsed = workers.take_worker_argument(["--issuer", "https://a.example", spec.argument()])
        self.assertEqual((rest, parsed), (["--issuer", "https://a.example"], spec))
        self.assertEqual(workers.take_worker_argument(["--x"]), (["--x"], None))

    def test_malformed(self) -> None:
        for value in ("", "{}", "[]", '{"index":0,"listen":[-1],"lifeline":5,"status":6}',
                      '{"index":0,"listen":["3"],"lifeline":5,"status":6}'):
            with self.assertRaises(usage.UsageError):
                workers.take_worker_argument([f"{workers.WORKER_OPTION}={value}"])


class ListenerKindTests(SynchronousTestCase):
    def test_kinds(self) -> None:
        """
        An endpoint description is read as Twisted reads it; C{ssl:} gives
        the TLS context a worker wraps its adopted socket in.
        """
        self.assertEqual(workers.listener_kind("tcp:8080").kind, "tcp")  # type: ignore[union-attr]
        self.assertEqual(workers.listener_kind("tcp6:8080:interface=\\:\\:1").kind, "tcp")  # type: ignore[union-attr]
        self.assertEqual(workers.listener_kind("unix:/tmp/x.sock").kind, "unix")  # type: ignore[union-attr]
        tmp = self.mktemp()
        os.makedirs(tmp)
        key, cert = self_signed(tmp)
        kind = workers.listener_kind(f"ssl:8443:privateKey={key}:certKey={cert}")
        assert kind is not None
        self.assertEqual(kind.kind, "ssl")
        self.assertIsNotNone(kind.tls)
        self.assertIsNone(workers.listener_kind("nope:1"))


class OptionsTests(SynchronousTestCase):
    def assertExit2(self, *argv: str) -> str:
        """
        Parsing C{argv} exits with status 2 and one line on stderr.
        """
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as raised:
            parse(*argv)
        self.assertEqual((raised.exception.code, stderr.getvalue().count("\n")), (2, 1), stderr.getvalue())
        return stderr.getvalue()

    def test_default(self) -> None:
        """
        One process by default: C{makeService} builds today's service, with
        no supervisor.
        """
        tmp = self.mktemp()
        os.makedirs(tmp)
        options = parse(
            "--issuer", "http://127.0.0.1:1",
            "--oauth-db", os.path.join(tmp, "oauth.db"),
            "--site-db", os.path.join(tmp, "site.db"),
        )
        self.assertEqual((options["workers"], options["worker"]), (1, None))
        service = tap.makeService(options)
        self.assertFalse(any(isinstance(s, Supervisor) for s in service))  # type: ignore[attr-defined]
        app = next(s for s in service if hasattr(s, "store"))  # type: ignore[attr-defined]
        app.store.close()
        app.site_stores.close()

    def test_badCount(self) -> None:
        self.assertIn("--workers", self.assertExit2("--issuer", "https://a.example", "--workers", "0"))
        self.assertIn("--workers", self.assertExit2("--issuer", "https://a.example", "--workers", "two"))

    def test_unshareableListener(self) -> None:
        """
        A UNIX socket's file would be removed by the first worker that
        stops: refused in one line.
        """
        text = self.assertExit2(
            "--issuer", "https://a.example", "--database", "postgresql://smeldr@db.example/smeldr",
            "--workers", "2", "--listen", "unix:/tmp/x.sock",
        )
        self.assertIn("cannot be shared by --workers", text)

    def test_sqliteRefused(self) -> None:
        """
        Several workers on the SQLite files: one line, exit status 2.
        """
        text = self.assertExit2("--issuer", "https://a.example", "--workers", "2")
        self.assertIn("SQLite", text)
        self.assertIn("--workers", text)

    def test_child(self) -> None:
        """
        A worker is the same command line plus the hidden argument, which
        is neither an option in C{--help} nor part of the arguments its own
        children would get.
        """
        spec = WorkerSpec.for_slot(0, 1)
        options = parse("--issuer", "https://a.example", "--workers", "1", spec.argument())
        self.assertEqual(options["worker"], spec)
        self.assertEqual(options["argv"], ["--issuer", "https://a.example", "--workers", "1"])
        self.assertNotIn(workers.WORKER_OPTION, str(tap.Options()))

    def test_twistCommand(self) -> None:
        """
        A child runs C{twist} with the parent's C{twist} options and
        arguments, plus the spec: nothing else reaches its command line.
        """
        self.patch(sys, "argv", ["/venv/bin/twist", "--log-format=text", "smeldr-oauth", "--issuer", "x"])
        spec = WorkerSpec.for_slot(1, 1)
        self.assertEqual(
            workers.twist_command("smeldr-oauth", ["--issuer", "x"], spec),
            [sys.executable, "-m", "twisted", "--log-format=text", "smeldr-oauth", "--issuer", "x", spec.argument()],
        )


class FakeProcess:
    def __init__(self, reactor: "FakeReactor", protocol: ProcessProtocol, pid: int, status_fd: int) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.pid = pid
        self.status_fd = status_fd
        self.signals: list[str] = []
        self.alive = True

    def signalProcess(self, name: str) -> None:
        if not self.alive:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def ready(self) -> None:
        self.protocol.childDataReceived(self.status_fd, READY)

    def end(self, code: int = 0, sig: Optional[int] = None) -> None:
        self.alive = False
        reason = ProcessDone(0) if (code, sig) == (0, None) else ProcessTerminated(code, sig)
        self.protocol.processEnded(Failure(reason))


class FakeReactor(Clock):
    """
    A L{Clock} that starts fake processes and counts C{stop} calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[FakeProcess, list[str], dict[int, Any], dict[str, str]]] = []
        self.stops = 0

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None, childFDs: Any = None) -> FakeProcess:
        spec = WorkerSpec.parse(args[-1].split("=", 1)[1])
        process = FakeProcess(self, protocol, 1000 + len(self.spawned), spec.status)
        self.spawned.append((process, args, childFDs, env))
        return process

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        f(*args)

    def stop(self) -> None:
        self.stops += 1


class FakePort:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def stopListening(self) -> None:
        self.closed = True


class SupervisorPolicyTests(SynchronousTestCase):
    """
    What L{Supervisor} does when children start, get ready, die and are
    stopped.
    """

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.ports = [FakePort(10), FakePort(11)]
        self.failures = 0

        def failed() -> None:
            self.failures += 1

        self.supervisor = Supervisor(
            self.reactor,
            2,
            ["tcp:1", "tcp:2"],
            lambda spec: ["/bin/worker", spec.argument()],
            env={"A": "1"},
            on_failure=failed,
            listen=lambda r, d: list(self.ports),
        )

    def start(self) -> list[FakeProcess]:
        self.supervisor.startService()
        processes = [p for p, *_ in self.reactor.spawned]
        for p in processes:
            p.ready()
        return processes

    def test_children(self) -> None:
        """
        N children, each given the listening sockets from descriptor 3 on,
        a lifeline it reads and a status pipe it writes, and its spec.
        """
        self.supervisor.startService()
        self.assertEqual(len(self.reactor.spawned), 2)
        for index, (_, args, fds, env) in enumerate(self.reactor.spawned):
            self.assertEqual(fds, {0: 0, 1: 1, 2: 2, 3: 10, 4: 11, 5: "w", 6: "r"})
            self.assertEqual(args, ["/bin/worker", WorkerSpec.for_slot(index, 2).argument()])
            self.assertEqual(env, {"A": "1"})
        waiting = self.supervisor.ready()
        self.reactor.spawned[0][0].ready()
        self.assertNoResult(waiting)
        self.reactor.spawned[1][0].ready()
        self.successResultOf(waiting)
        self.assertEqual(self.supervisor.pids(), [1000, 1001])

    def test_startFailure(self) -> None:
        """
        A child that ends before it is ready stops the pool: no restart,
        C{on_failure} once, and a critical line that says so.
        """
        self.supervisor.startService()
        self.reactor.spawned[0][0].ready()
        with capturedLogs() as events:
            self.reactor.spawned[1][0].end(code=1)
        self.assertEqual(self.failures, 1)
        self.assertTrue(self.supervisor.failed)
        self.reactor.advance(3600)
        self.assertEqual(len(self.reactor.spawned), 2)
        [critical] = [e for e in events if e["log_level"].name == "critical"]
        self.assertIn("ended before it was ready (exit status 1)", critical["log_format"].format(**critical))
        # Stopping the pool stops the other child.
        self.supervisor.stopService()
        self.assertEqual(self.reactor.spawned[0][0].signals, ["TERM"])

    def test_restartWithBackoff(self) -> None:
        """
        A child that was ready and dies is restarted after L{min_delay};
        its replacements that die quickly wait twice as long each time, up
        to L{max_delay}; one that ran for L{stable_after} resets the delay.
        """
        first, other = self.start()
        first.end(sig=signal.SIGKILL)
        self.assertEqual(len(self.reactor.spawned), 2)
        delays = []
        for _ in range(7):
            before = len(self.reactor.spawned)
            waited = 0.0
            while len(self.reactor.spawned) == before and waited < 3600:
                self.reactor.advance(0.5)
                waited += 0.5
            delays.append(waited)
            newest = self.reactor.spawned[-1][0]
            newest.ready()
            self.reactor.advance(1)
            newest.end(sig=signal.SIGKILL)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
        self.reactor.advance(30)
        stable = self.reactor.spawned[-1][0]
        stable.ready()
        self.reactor.advance(Supervisor.stable_after)
        stable.end(code=0)
        spawned = len(self.reactor.spawned)
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.spawned), spawned + 1)
        self.assertEqual(self.failures, 0)
        # The other slot was never touched.
        self.assertEqual(other.signals, [])
        self.assertEqual(self.supervisor.pids()[1], other.pid)

    def test_restartBeforeReady(self) -> None:
        """
        After a slot's first child was ready, a replacement that cannot get
        ready (the database is restarting) is restarted too, not fatal.
        """
        first, _ = self.start()
        first.end(code=1)
        self.reactor.advance(1.0)
        self.reactor.spawned[-1][0].end(code=1)
        self.reactor.advance(2.0)
        self.assertEqual(len(self.reactor.spawned), 4)
        self.assertEqual(self.failures, 0)

    def test_stop(self) -> None:
        """
        Stopping sends SIGTERM to every child, SIGKILL to those still
        running after L{kill_after}, cancels pending restarts, and closes
        the sockets once all have ended.
        """
        first, second = self.start()
        first.end(sig=signal.SIGKILL)  # a restart is now pending
        restarted = len(self.reactor.spawned)
        stopped = self.supervisor.stopService()
        self.assertEqual(second.signals, ["TERM"])
        self.assertNoResult(stopped)
        self.reactor.advance(Supervisor.kill_after)
        self.assertEqual(second.signals, ["TERM", "KILL"])
        self.assertFalse(any(p.closed for p in self.ports))
        second.end(sig=signal.SIGKILL)
        self.successResultOf(stopped)
        self.assertTrue(all(p.closed for p in self.ports))
        self.reactor.advance(3600)
        self.assertEqual(len(self.reactor.spawned), restarted)

    def test_stopGently(self) -> None:
        """
        Children that end on SIGTERM are not killed.
        """
        processes = self.start()
        stopped = self.supervisor.stopService()
        for p in processes:
            p.end(sig=signal.SIGTERM)
        self.successResultOf(stopped)
        self.reactor.advance(Supervisor.kill_after)
        self.assertEqual([p.signals for p in processes], [["TERM"], ["TERM"]])

    def test_startTimeout(self) -> None:
        """
        A child not ready after L{start_timeout} is killed.
        """
        self.supervisor.startService()
        self.reactor.advance(Supervisor.start_timeout)
        self.assertEqual([p.signals for p, *_ in self.reactor.spawned], [["KILL"], ["KILL"]])

    def test_cannotListen(self) -> None:
        """
        A port that cannot be opened: one critical line, the pool fails.
        """

        def refuse(r: Any, d: Any) -> Any:
            raise CannotListenError("127.0.0.1", 1, "in use")

        supervisor = Supervisor(self.reactor, 1, ["tcp:1"], lambda spec: ["x"], listen=refuse, on_failure=lambda: None)
        with capturedLogs() as events:
            supervisor.startService()
        self.assertTrue(supervisor.failed)
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual([e["log_level"].name for e in events], ["critical"])


def get(reactor: Any, url: str, **kw: Any) -> Deferred[Any]:
    """
    One request on a new connection: which worker accepts it is the
    kernel's choice.
    """
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    return Deferred.fromCoroutine(_get(treq.client.HTTPClient(Agent(reactor, pool=pool, **kw)), url))


async def _get(client: Any, url: str) -> str:
    response = await client.get(url)
    body = await response.content()
    assert response.code == 200, (response.code, body)
    return body.decode()


def resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except OSError:
        pass


class TinyPoolTests(TestCase):
    """
    A L{Supervisor} in this process with real worker processes on a real
    socket.
    """

    timeout = 180

    async def startPool(self, descriptions: list[str], count: int = 2, metrics: bool = False, fail: bool = False) -> Supervisor:
        env = e2e.subprocessEnvironment()
        self.metricsDirectory = None
        if metrics:
            self.metricsDirectory = os.path.abspath(self.mktemp())
            os.makedirs(self.metricsDirectory)
            env["PROMETHEUS_MULTIPROC_DIR"] = self.metricsDirectory
        self.failures: list[None] = []
        supervised = supervise(
            self, count, descriptions, workers_tiny.command(descriptions, fail=fail), env, lambda: self.failures.append(None)
        )
        self.workerLog = supervised.log_path
        return supervised.supervisor

    def base(self, supervisor: Supervisor, scheme: str = "http") -> str:
        port = supervisor.listeners[0].getHost().port  # type: ignore[attr-defined]
        return f"{scheme}://127.0.0.1:{port}/"

    async def servedBy(self, supervisor: Supervisor, times: int = 5) -> set[str]:
        return {await get(reactor, self.base(supervisor)) for _ in range(times)}

    async def scrape(self, url: str) -> str:
        response = await httpClient(self).get(url)
        return (await response.content()).decode()

    async def test_sharedSocketRestartAndMetrics(self) -> None:
        """
        Both workers accept on the one socket (each serves alone while the
        other is stopped); a worker killed with SIGKILL is replaced while
        the other keeps answering; the parent's metrics add up the
        workers, per worker, and forget a dead worker's gauges.
        """
        supervisor = await self.startPool(["tcp:0:interface=127.0.0.1"], metrics=True)
        await supervisor.ready().addTimeout(90, reactor)
        a, b = supervisor.pids()
        assert a is not None and b is not None
        self.addCleanup(resume, a)
        self.addCleanup(resume, b)

        os.kill(a, signal.SIGSTOP)
        self.assertEqual(await self.servedBy(supervisor), {str(b)})
        os.kill(a, signal.SIGCONT)
        os.kill(b, signal.SIGSTOP)
        self.assertEqual(await self.servedBy(supervisor), {str(a)})
        os.kill(b, signal.SIGCONT)

        assert self.metricsDirectory is not None
        pool = PoolMetrics(self.metricsDirectory, running=lambda: float(supervisor.running_children()))
        observer = pool.observe_log()
        observer.startService()
        self.addCleanup(observer.stopService)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(pool.resource()))
        self.addCleanup(port.stopListening)
        metricsURL = f"http://127.0.0.1:{port.getHost().port}/"
        text = await self.scrape(metricsURL)
        # A worker writes its gauges before it says it is ready.
        self.assertIn("smeldr_mcp_open_streams 2.0", text)
        self.assertIn('smeldr_worker_http_requests_total{worker="0"} 5.0', text)
        self.assertIn('smeldr_worker_http_requests_total{worker="1"} 5.0', text)
        self.assertIn('smeldr_http_request_duration_seconds_count{method="GET",route="other",status="2xx"} 10.0', text)
        self.assertIn("smeldr_workers 2.0", text)

        with capturedLogs() as events:
            os.kill(a, signal.SIGKILL)
            # The other worker answers while the first is replaced.
            self.assertEqual(await self.servedBy(supervisor, 3), {str(b)})
            # ready() fires at once while the supervisor has not yet seen
            # the death (SIGCHLD comes when it comes): wait until it has.
            await waitFor(lambda: supervisor.pids()[0] != a, "the supervisor to see the killed worker")
            await supervisor.ready().addTimeout(90, reactor)
        [replacement, same] = supervisor.pids()
        self.assertEqual(same, b)
        self.assertNotIn(replacement, (a, b))
        self.assertEqual(
            [(e["index"], e["pid"], e["delay"]) for e in events if e.get("smeldr_event") == "worker_exited"],
            [(0, a, 1.0)],
        )
        assert replacement is not None
        os.kill(b, signal.SIGSTOP)
        self.assertEqual(await self.servedBy(supervisor, 2), {str(replacement)})
        os.kill(b, signal.SIGCONT)

        text = await self.scrape(metricsURL)
        # The dead worker's requests still count; its open streams do not.
        self.assertIn("smeldr_mcp_open_streams 2.0", text)
        self.assertIn('smeldr_worker_http_requests_total{worker="0"} 7.0', text)
        self.assertIn('smeldr_worker_http_requests_total{worker="1"} 8.0', text)
        self.assertIn("smeldr_worker_restarts_total 1.0", text)

        url = self.base(supervisor)
        await supervisor.stopService()
        self.assertEqual(supervisor.pids(), [None, None])
        for pid in (replacement, b):
            self.assertFalse(os.path.exists(f"/proc/{pid}"), f"worker {pid} still running")
        with self.assertRaises(ConnectionRefusedError):
            await get(reactor, url)

    async def test_tls(self) -> None:
        """
        An C{ssl:} listener: the parent listens, each worker speaks TLS
        with the listener's certificate on the socket it adopts.
        """
        from twisted.internet.ssl import Certificate
        from twisted.web.client import BrowserLikePolicyForHTTPS

        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        key, cert = self_signed(tmp)
        with open(cert, "rb") as f:
            trust = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(f.read()))
        supervisor = await self.startPool([f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"])
        await supervisor.ready().addTimeout(90, reactor)
        a, b = supervisor.pids()
        assert a is not None and b is not None
        self.addCleanup(resume, a)
        os.kill(a, signal.SIGSTOP)
        self.assertEqual(await get(reactor, self.base(supervisor, "https"), contextFactory=trust), str(b))
        os.kill(a, signal.SIGCONT)

    async def test_startFailure(self) -> None:
        """
        Workers that end before they are ready: the pool fails once and
        restarts nothing.
        """
        with capturedLogs() as events:
            supervisor = await self.startPool(["tcp:0:interface=127.0.0.1"], fail=True)
            failed = supervisor.ready()
            with self.assertRaises(RuntimeError):
                await failed
            self.assertEqual(self.failures, [None])
            # Let the other one end too.
            while supervisor.running_children():
                await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(self.failures, [None])
        critical = [e for e in events if e["log_level"].name == "critical"]
        self.assertEqual(len(critical), 1, critical)
        self.assertEqual(
            [e["index"] for e in events if e.get("smeldr_event") == "worker_exited" and e.get("restarting")], []
        )


class _Pool(ProcessProtocol):
    """
    The tiny pool as a process of its own: fires L{up} with what it prints
    once its workers are ready.
    """

    def __init__(self) -> None:
        self.output = b""
        self.up: Deferred[dict[str, Any]] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.reason: Optional[Failure] = None

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data
        match = re.search(rb"POOL (\{.*\})\n", self.output)
        if match and not self.up.called:
            self.up.callback(json.loads(match.group(1)))

    def processEnded(self, reason: Failure) -> None:
        if not self.up.called:
            self.up.errback(AssertionError(self.output.decode("utf-8", "replace")))
        self.reason = reason
        self.ended.callback(None)


class ParentProcessTests(TestCase):
    """
    The parent's end: a SIGTERM stops everything; a SIGKILL leaves no
    worker behind.
    """

    timeout = 120

    async def startPool(self) -> tuple[Any, _Pool, dict[str, Any], str]:
        mark = secrets.token_hex(8)
        self.addCleanup(killMarked, mark)
        env = e2e.subprocessEnvironment()
        env[MARK] = mark
        watcher = _Pool()
        process = lifetime.spawnBound(
            reactor,
            watcher,
            [sys.executable, workers_tiny.__file__, "pool", "2", "tcp:0:interface=127.0.0.1"],
            env=env,
        )
        pool = await watcher.up
        self.assertEqual(len(marked(mark)), 3)
        return process, watcher, pool, mark

    async def test_sigterm(self) -> None:
        process, watcher, pool, mark = await self.startPool()
        process.signalProcess("TERM")
        await watcher.ended
        self.assertEqual(await waitUntilGone(mark), {})
        assert watcher.reason is not None
        self.assertIsInstance(watcher.reason.value, ProcessDone, watcher.output)
        self.assertIn(b"worker 0 (pid", watcher.output)
        self.assertNotIn(b"Traceback", watcher.output)

    async def test_sigkill(self) -> None:
        """
        The workers see their lifeline end and stop.
        """
        process, watcher, pool, mark = await self.startPool()
        process.signalProcess("KILL")
        self.assertEqual(await waitUntilGone(mark, timeout=60), {})
        # The workers held the parent's pipes: the reactor sees them close
        # (and the parent reaped) a moment after the last one is gone.
        await watcher.ended


class TwistTests(TestCase):
    timeout = 60

    async def test_sqliteRefused(self) -> None:
        """
        C{twist smeldr-oauth --workers 2} on SQLite: one line, exit 2.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        out, err, code = await e2e.runProgram(
            reactor,
            [sys.executable, "-m", "twisted", "smeldr-oauth", "--issuer", "https://a.example", "--workers", "2"],
            path=directory,
        )
        self.assertEqual(code, 2, err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("SQLite", err)
        self.assertEqual(os.listdir(directory), [])


class SmeldrWorkerTests(TestCase):
    """
    A real C{twist smeldr-oauth} worker (the hidden argument, one worker
    so that it may own its SQLite files), under a L{Supervisor} here.
    """

    timeout = 120

    async def test_twistWorker(self) -> None:
        """
        It adopts the socket, says it is ready once its store is, answers
        C{/healthz}, records its metrics for the parent (not on a listener
        of its own), and stops on SIGTERM without a traceback.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        metricsDirectory = os.path.join(directory, "metrics")
        os.makedirs(metricsDirectory)
        env = e2e.subprocessEnvironment()
        env["PROMETHEUS_MULTIPROC_DIR"] = metricsDirectory
        supervised = await twist_workers(
            self,
            1,
            [
                "--issuer", "http://127.0.0.1:1",
                "--oauth-db", os.path.join(directory, "oauth.db"),
                "--site-db", os.path.join(directory, "site.db"),
                "--metrics-listen", "tcp:0:interface=127.0.0.1",
            ],
            env,
        )
        supervisor = supervised.supervisor
        # The parent only holds the socket: it does not accept.
        self.assertNotIn(supervisor.listeners[0], reactor.getReaders())
        response = await httpClient(self).get(f"http://127.0.0.1:{supervised.port()}/healthz")
        self.assertEqual(json.loads(await response.content()), {"status": "ok"}, supervised.log())

        pool = PoolMetrics(metricsDirectory, running=lambda: float(supervisor.running_children()))
        text = _render(pool)
        self.assertIn(
            'smeldr_http_request_duration_seconds_count{method="GET",route="/healthz",status="2xx"} 1.0', text
        )
        self.assertIn('smeldr_worker_http_requests_total{worker="0"} 1.0', text)
        self.assertIn("smeldr_mcp_open_streams 0.0", text)
        self.assertIn("smeldr_workers 1.0", text)

        await supervisor.stopService()
        text = supervised.log()
        self.assertIn("worker 0 serving", text)
        self.assertNotIn("Traceback", text)
        # Its metrics are the parent's to serve: no listener of its own.
        self.assertNotRegex(text, r"\bSite starting on")


def _render(pool: PoolMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(pool.registry).decode()


class StopSignalsTests(SynchronousTestCase):
    def test_once(self) -> None:
        """
        A worker's SIGTERM and SIGINT handlers run for the first of them;
        later ones (the parent's SIGTERM after a Ctrl-C that reached the
        whole group) are ignored rather than stopping a stopped reactor.
        """
        received: list[int] = []
        for number in (signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, number, signal.getsignal(number))
            signal.signal(number, lambda n, frame: received.append(n))
        workers.ignore_repeated_stop_signals()
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        self.assertEqual(received, [signal.SIGINT])


class AcceptTests(TestCase):
    def test_oneAtATime(self) -> None:
        """
        A worker's port accepts one waiting connection each time it is
        readable, leaving the others to the other workers woken with it.
        """
        import socket

        from twisted.internet.protocol import Factory, Protocol

        built: list[Protocol] = []

        class Count(Factory):
            def buildProtocol(self, addr: Any) -> Protocol:
                built.append(Protocol())
                return built[-1]

        port = reactor.listenTCP(0, Count(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        workers.accept_one_at_a_time(port)
        clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(3)]
        for client in clients:
            self.addCleanup(client.close)
        port.doRead()
        self.assertEqual(len(built), 1)
        port.doRead()
        self.assertEqual(len(built), 2)
        for protocol in built:
            protocol.transport.loseConnection()


async def waitFor(condition: Any, what: str, timeout: float = 90.0) -> None:
    """
    Poll C{condition} on the reactor until it holds.
    """
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await deferLater(reactor, 0.1, lambda: None)


def startedWorkers(log: str) -> dict[int, int]:
    """
    The pid of the latest worker started in each slot, from the parent's log.
    """
    return {int(i): int(pid) for i, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", log)}


def readyPids(log: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"worker \d+ ready \(pid (\d+)\)", log)}


class TwistWorkersTests(TestCase):
    """
    C{twist smeldr-oauth --workers 2 --database postgresql://...}, the
    whole command, on a private PostgreSQL.
    """

    timeout = 240

    async def startPool(self, *extra: str) -> tuple[e2e.RunningServer, str, str]:
        from tests import postgres

        url = postgres.database_url(self)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port, metricsPort = e2e.freePort(), e2e.freePort()
        issuer = f"http://127.0.0.1:{port}"
        mark = secrets.token_hex(8)
        self.addCleanup(killMarked, mark)
        env = e2e.subprocessEnvironment()
        env[MARK] = mark
        argv = [
            sys.executable, "-m", "twisted", "--log-format=text", "smeldr-oauth",
            "--issuer", issuer,
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--database", url,
            "--workers", "2",
            "--metrics-listen", f"tcp:{metricsPort}:interface=127.0.0.1",
            *extra,
        ]
        server = await e2e.launchServer(self, reactor, argv, port, issuer, directory, env=env)
        # Before the server's own clean-up, which waits for its output to
        # end: workers left behind by a failure would hold it open.
        self.addCleanup(killMarked, mark)
        await waitFor(
            lambda: len(readyPids(server.log())) == 2 or not server.isRunning(),
            "two workers ready",
        )
        self.assertTrue(server.isRunning(), server.annotate("the pool stopped"))
        return server, f"http://127.0.0.1:{metricsPort}/", mark

    async def healthy(self, server: e2e.RunningServer, times: int = 1) -> None:
        for _ in range(times):
            body = await get(reactor, server.issuer + "/healthz")
            self.assertEqual(json.loads(body), {"status": "ok"}, server.annotate("/healthz"))

    async def scrape(self, url: str) -> str:
        response = await httpClient(self).get(url)
        return (await response.content()).decode()

    async def test_pool(self) -> None:
        """
        Both workers serve the one port; a worker killed with SIGKILL is
        replaced while the other answers; the metrics on the parent's
        listener count both; SIGTERM to C{twist} stops everything.
        """
        server, metricsURL, mark = await self.startPool()
        self.assertEqual(len(marked(mark)), 3, marked(mark))
        first = startedWorkers(server.log())
        for pid in first.values():
            self.addCleanup(resume, pid)
        for stopped in (0, 1):
            os.kill(first[stopped], signal.SIGSTOP)
            await self.healthy(server, 3)
            os.kill(first[stopped], signal.SIGCONT)
        text = await self.scrape(metricsURL)
        self.assertIn('smeldr_worker_http_requests_total{worker="0"} 3.0', text)
        self.assertIn('smeldr_worker_http_requests_total{worker="1"} 3.0', text)
        self.assertIn(
            'smeldr_http_request_duration_seconds_count{method="GET",route="/healthz",status="2xx"} 6.0', text
        )
        self.assertIn("smeldr_workers 2.0", text)

        os.kill(first[0], signal.SIGKILL)
        await self.healthy(server, 2)
        await waitFor(
            lambda: startedWorkers(server.log())[0] in readyPids(server.log()) - set(first.values()),
            "worker 0 replaced",
        )
        replacement = startedWorkers(server.log())[0]
        self.assertIn(f"worker 0 (pid {first[0]}) ended (signal 9 (SIGKILL)); restarting it in 1s", server.log())
        os.kill(first[1], signal.SIGSTOP)
        await self.healthy(server)
        os.kill(first[1], signal.SIGCONT)
        text = await self.scrape(metricsURL)
        self.assertIn('smeldr_worker_http_requests_total{worker="0"} 4.0', text)
        self.assertIn('smeldr_worker_http_requests_total{worker="1"} 5.0', text)
        self.assertIn("smeldr_worker_restarts_total 1.0", text)

        await server.stop(timeout=30)
        self.assertEqual(server._collector.status(), -signal.SIGTERM, server.annotate("exit status"))
        self.assertEqual(await waitUntilGone(mark), {})
        log = server.log()
        self.assertIn(f"worker 0 (pid {replacement}) stopped", log)
        self.assertIn(f"worker 1 (pid {first[1]}) stopped", log)
        self.assertNotIn("Traceback", log, server.annotate("traceback"))
        self.assertNotIn("SIGKILL", log.split("stopping 2 workers")[1], server.annotate("killed at stop"))

    async def test_parentKilled(self) -> None:
        """
        C{kill -9} of C{twist}: its workers see their lifeline end and
        stop; none is left holding the port.
        """
        server, _, mark = await self.startPool()
        server._kill()
        # (Not the process's end: Twisted reports it once its output pipes
        # close, which the workers hold while they run.)
        self.assertEqual(await waitUntilGone(mark, timeout=60), {}, server.annotate("workers left"))
        self.assertIn("the parent process is gone; stopping", server.log())

    async def test_cannotStart(self) -> None:
        """
        A database the workers cannot reach: C{twist} exits with status 1
        and one critical line, at once, instead of restarting workers that
        cannot start.
        """
        from tests import postgres

        server = postgres.cluster()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = e2e.freePort()
        nowhere = server.url("no_such_database")
        out, err, code = await e2e.runProgram(
            reactor,
            [
                sys.executable, "-m", "twisted", "--log-format=text", "smeldr-oauth",
                "--issuer", f"http://127.0.0.1:{port}",
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--database", nowhere,
                "--workers", "2",
            ],
            timeout=120,
            path=directory,
        )
        log = out + err
        self.assertEqual(code, 1, log)
        self.assertEqual(len(re.findall(r"ended before it was ready", log)), 1, log)
        self.assertNotIn("restarting it in", log)
        self.assertEqual(len(startedWorkers(log)), 2, log)
