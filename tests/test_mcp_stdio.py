"""
Tests for L{smeldr_oauth.mcp.stdio}: the newline-delimited JSON transport, in
memory and as the real console command over pipes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.mcp import Context, MCPApp
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.app import AppLoadError, load_app
from smeldr_oauth.mcp.stdio import StdioMCP, main

app = MCPApp(name="stdio-test")


@app.tool(scopes=("write",))
def whoami(ctx: Context) -> str:
    return f"{ctx.subject} {sorted(ctx.scopes)}"


@app.tool(scopes=())
def later(ctx: Context) -> Deferred:
    """Answers only when the test fires it."""
    return PENDING.pop()


PENDING: list = []


def factory() -> MCPApp:
    return app


SEEN: list = []


def with_site(site_db: str, reactor: object) -> MCPApp:
    SEEN.append((site_db, reactor))
    return app


async def later_app() -> MCPApp:
    return app


def not_an_app_factory() -> object:
    return object()


class Holder:
    app = app


class StdioTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.transport = StringTransport()
        self.protocol = StdioMCP(app, Clock(), max_line=200)
        self.protocol.makeConnection(self.transport)

    def lines(self) -> list:
        out = [json.loads(line) for line in self.transport.value().splitlines() if line]
        self.transport.clear()
        return out

    def init(self, version: str = "2025-06-18") -> None:
        self.protocol.dataReceived(
            json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": version, "capabilities": {}}}).encode()
            + b"\n"
        )
        self.assertEqual(self.lines()[0]["result"]["protocolVersion"], version)

    def test_local_operator_has_every_scope(self) -> None:
        self.init()
        self.protocol.dataReceived(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"whoami"}}\r\n')
        self.assertEqual(self.lines()[0]["result"]["content"][0]["text"], "local ['write']")

    def test_answer_that_cannot_be_sent(self) -> None:
        """
        When an answer cannot be encoded (a bug), the caller still gets an
        internal error for its request, alone or in a batch, and the
        failure is logged at once; before, the callback failed unseen.
        """
        encode = jsonrpc.encode

        def broken(message: Any) -> bytes:
            if "local [" in json.dumps(message):
                raise RuntimeError("cannot encode")
            return encode(message)

        self.init("2025-03-26")
        self.patch(jsonrpc, "encode", broken)
        self.protocol.dataReceived(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"whoami"}}\n')
        self.assertEqual(self.lines(), [{"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "Internal error"}}])
        self.protocol.dataReceived(
            b'[{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"whoami"}},{"jsonrpc":"2.0","id":3,"method":"ping"}]\n'
        )
        [answer] = self.lines()
        self.assertEqual((answer["id"], answer["error"]["code"]), (3, -32603))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_split_and_joined_lines(self) -> None:
        self.init()
        self.protocol.dataReceived(b'{"jsonrpc":"2.0","id":1,"meth')
        self.protocol.dataReceived(b'od":"ping"}\n{"jsonrpc":"2.0","id":2,"method":"ping"}\n\n')
        self.assertEqual([r["id"] for r in self.lines()], [1, 2])

    def test_errors(self) -> None:
        self.protocol.dataReceived(b"{bad\n")
        self.assertEqual(self.lines()[0]["error"]["code"], -32700)
        self.protocol.dataReceived(b"x" * 300 + b"\n")
        self.assertEqual(self.lines()[0]["error"]["code"], -32600)
        self.protocol.dataReceived(b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]\n')
        self.assertEqual(self.lines()[0]["error"]["code"], -32600)

    def test_batch_in_2025_03_26(self) -> None:
        self.init("2025-03-26")
        self.protocol.dataReceived(b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/x"}]\n')
        [batch] = self.lines()
        self.assertEqual([r["id"] for r in batch], [1])

    def test_stdin_closed_answers_in_flight_first(self) -> None:
        """
        When stdin ends, a request still running is answered before stdout
        closes (a client that pipes its requests then closes its end).
        """
        self.init()
        slow: Deferred = Deferred()
        PENDING.append(slow)
        self.protocol.dataReceived(b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"later"}}\n')
        self.protocol.readConnectionLost()
        self.assertFalse(self.transport.disconnecting)
        slow.callback("done")
        self.assertEqual(self.lines()[0]["result"]["content"][0]["text"], "done")
        self.assertTrue(self.transport.disconnecting)

    def test_stdin_closed_when_idle(self) -> None:
        self.init()
        self.protocol.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)

    def test_connection_lost_closes_session(self) -> None:
        self.init()
        self.protocol.connectionLost(None)
        self.assertEqual(self.protocol.session.state, "closed")
        self.assertIsNone(self.successResultOf(self.protocol.finished))


class LoadAppTests(SynchronousTestCase):
    """L{load_app}, as both console commands use it."""

    def test_instance_and_factory(self) -> None:
        self.assertIs(self.successResultOf(load_app("tests.test_mcp_stdio:app")), app)
        self.assertIs(self.successResultOf(load_app("tests.test_mcp_stdio:factory")), app)

    def test_factory_gets_the_arguments(self) -> None:
        clock = Clock()
        self.assertIs(self.successResultOf(load_app("tests.test_mcp_stdio:with_site", "site.db", clock)), app)
        self.assertEqual(SEEN.pop(), ("site.db", clock))

    def test_asynchronous_factory(self) -> None:
        self.assertIs(self.successResultOf(load_app("tests.test_mcp_stdio:later_app")), app)

    def test_dotted_attribute(self) -> None:
        self.assertIs(self.successResultOf(load_app("tests.test_mcp_stdio:Holder.app")), app)

    def test_refusals(self) -> None:
        for spec in ("nocolon", "tests.test_mcp_stdio:", "no_such_module_x:app", "tests.test_mcp_stdio:missing", "json:__doc__"):
            failure = self.failureResultOf(load_app(spec), AppLoadError)
            self.assertIn("--app", str(failure.value))
        self.failureResultOf(load_app("tests.test_mcp_stdio:not_an_app_factory"), AppLoadError)
        # A callable that is no factory of an app: its error, in one line.
        failure = self.failureResultOf(load_app("json:loads"), AppLoadError)
        self.assertIn("--app 'json:loads': TypeError", str(failure.value))

    def test_bad_line_length(self) -> None:
        for value in ("0", "-1", str(2**31), "many"):
            with self.assertRaises(SystemExit) as caught:
                main(["--site-db", "site.db", "--max-line", value])
            self.assertEqual(caught.exception.code, 2)

    def test_default_app_needs_site_db(self) -> None:
        self.assertRaises(SystemExit, main, [])


class _Pipes(ProcessProtocol):
    """stdout as JSON lines, stderr as bytes, the exit as a Deferred."""

    def __init__(self) -> None:
        self.buffer = b""
        self.lines: list[dict[str, Any]] = []
        self.stderr = b""
        self.ended: Deferred = Deferred()
        self._waiting: list[tuple[int, Deferred]] = []

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.lines.append(json.loads(line))
        for count, d in list(self._waiting):
            if len(self.lines) >= count:
                self._waiting.remove((count, d))
                d.callback(self.lines[count - 1])

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        for _, d in self._waiting:
            d.errback(AssertionError(f"the process ended first; stderr: {self.stderr!r}"))
        self._waiting = []
        self.ended.callback(reason.value)

    def line(self, number: int) -> Deferred:
        """The C{number}th line of stdout (1-based), when it comes."""
        if len(self.lines) >= number:
            return succeed(self.lines[number - 1])
        d: Deferred = Deferred()
        self._waiting.append((number, d))
        return d


class ConsoleCommandTests(TestCase):
    """
    The installed C{smeldr-oauth-stdio} console command, started as a real
    process (a real SQLite site database) and driven over its pipes, as
    Claude Desktop does.
    """

    timeout = 60

    def spawn(self, *args: str, path: Optional[str] = None) -> tuple[_Pipes, Any]:
        command = shutil.which("smeldr-oauth-stdio", path=os.path.dirname(sys.executable))
        if command is None:
            self.fail("smeldr-oauth-stdio is not installed next to this Python: pip install -e .")
        pipes = _Pipes()
        env = dict(os.environ)
        # The checkout first, so --app can name a test module.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
        transport = reactor.spawnProcess(pipes, command, [command, *args], env=env, path=path)  # type: ignore[attr-defined]

        def kill() -> Deferred:
            if not pipes.ended.called:
                transport.signalProcess("KILL")
            return pipes.ended

        self.addCleanup(kill)
        return pipes, transport

    def write(self, transport: Any, message: dict[str, Any]) -> None:
        transport.write(json.dumps(message).encode() + b"\n")

    async def test_initialize_list_call_then_clean_exit(self) -> None:
        site_db = os.path.abspath(self.mktemp()) + ".db"
        pipes, transport = self.spawn("--site-db", site_db)
        self.write(transport, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "pipes", "version": "1"}}})
        init = await pipes.line(1)
        self.assertEqual(init["result"]["protocolVersion"], "2025-06-18")
        self.assertEqual(init["result"]["serverInfo"]["name"], "smeldr-site")
        self.write(transport, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        self.write(transport, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        listed = await pipes.line(2)
        self.assertIn("create_post", [t["name"] for t in listed["result"]["tools"]])
        create = {"name": "create_post", "arguments": {"title": "Over pipes", "body": "hello"}}
        self.write(transport, {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": create})
        created = await pipes.line(3)
        self.assertEqual(created["result"]["structuredContent"]["slug"], "over-pipes")
        self.write(transport, {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "get_post", "arguments": {"slug": "over-pipes"}}})
        got = await pipes.line(4)
        self.assertEqual(got["result"]["structuredContent"]["body"], "hello")
        # stdin closes: the process finishes and exits by itself, cleanly.
        transport.closeStdin()
        ended = await pipes.ended
        self.assertIsInstance(ended, ProcessDone)
        self.assertEqual([line["id"] for line in pipes.lines], [0, 1, 2, 3])
        self.assertNotIn(b"Traceback", pipes.stderr)
        self.assertTrue(os.path.exists(site_db))

    async def test_database_is_a_postgresql_url(self) -> None:
        """
        C{--database} names a PostgreSQL database: anything else is a usage
        error (status 2, one line), as C{twist smeldr-oauth} and
        C{smeldr-oauth-admin} say, not a SQLite file of that name made in
        the working directory; with C{--site-db} as well it names two.
        """
        where = os.path.abspath(self.mktemp())
        os.mkdir(where)
        for args, said in (
            (("--database", "garbage"), b"--database must be a postgresql:// URL"),
            (("--database", "postgresql://nobody@127.0.0.1:1/x", "--site-db", "site.db"), b"not allowed with"),
        ):
            pipes, transport = self.spawn(*args, path=where)
            # Nothing to serve: a command that started would end here.
            transport.closeStdin()
            ended = await pipes.ended
            self.assertIsInstance(ended, ProcessTerminated)
            self.assertEqual(ended.exitCode, 2, pipes.stderr)
            self.assertIn(said, pipes.stderr)
            self.assertNotIn(b"Traceback", pipes.stderr)
        self.assertEqual(os.listdir(where), [])

    async def test_bad_app_is_one_line_and_a_failure_exit(self) -> None:
        pipes, transport = self.spawn("--app", "no_such_module_anywhere:app")
        ended = await pipes.ended
        self.assertIsInstance(ended, ProcessTerminated)
        self.assertEqual(ended.exitCode, 1)
        self.assertIn(b"no_such_module_anywhere", pipes.stderr)
        self.assertNotIn(b"Traceback", pipes.stderr)
        self.assertEqual(pipes.lines, [])

    async def test_factory_error_is_one_line_and_a_failure_exit(self) -> None:
        pipes, transport = self.spawn("--app", "json:loads")
        ended = await pipes.ended
        self.assertIsInstance(ended, ProcessTerminated)
        self.assertEqual(ended.exitCode, 1)
        self.assertIn(b"--app 'json:loads': TypeError", pipes.stderr)
        self.assertNotIn(b"Traceback", pipes.stderr)
