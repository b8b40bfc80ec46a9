"""
Tests for L{smeldr_oauth.gateway.stdio}: upstream MCP servers as child
processes, through the proxy core.

The upstreams are real: the official reference server
(C{@modelcontextprotocol/server-everything}, installed by
C{scripts/setup-upstreams.sh}) and, for the faults the SDKs never commit,
C{tests/upstreams/misbehaving.py}.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tracemalloc
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.gateway import errors
from smeldr_oauth.gateway.config import Limits, UpstreamConfig
from smeldr_oauth.gateway.proxy import Gateway
from smeldr_oauth.gateway.stdio import StderrLog
from smeldr_oauth.mcp import jsonrpc
from tests.gateway_fakes import RecordingOutlet
from tests.gateway_real import ALICE, BOB, MISBEHAVING, Downstream, Recorder, answered, everything, text, until


class StderrLogTests(SynchronousTestCase):
    def test_bounded_rate(self) -> None:
        clock = Clock()
        stderr = StderrLog(clock, "up", 2.0)
        with capturedLogs() as events:
            stderr.received(b"one\ntwo\r\nthr", 7)
            stderr.received(b"ee\n" + b"more\n" * 50, 7)
            clock.advance(10)
            stderr.received(b"late\x1b[31m\n", 7)
            stderr.flush(7)
        lines = [e.get("line") for e in events if "line" in e]
        self.assertEqual(lines[:3], ["one", "two", "three"])
        self.assertEqual(lines[-1], "late?[31m")
        (suppressed,) = [e["count"] for e in events if "count" in e]
        self.assertEqual(suppressed, 53 - 10)  # a burst of 5 seconds' worth
        self.assertEqual(stderr.suppressed, 0)

    def test_silent(self) -> None:
        stderr = StderrLog(Clock(), "up", 0)
        with capturedLogs() as events:
            stderr.received(b"x\n", 1)
        self.assertEqual([e for e in events if "line" in e], [])

    def test_endless_line_is_cut(self) -> None:
        stderr = StderrLog(Clock(), "up", 100)
        with capturedLogs() as events:
            stderr.received(b"y" * 5000, 1)
        (event,) = [e for e in events if "line" in e]
        self.assertEqual(len(event["line"]), 500)


def config(command: list[str], **kwargs: Any) -> UpstreamConfig:
    limits = kwargs.pop("limits", Limits(stop_grace=1))
    return UpstreamConfig(name="up", kind="stdio", command=tuple(command), limits=limits, **kwargs)


class RealUpstreamTestCase(TestCase):
    timeout = 120

    def gateway(self, upstream: UpstreamConfig, environ: Any = None) -> Gateway:
        gateway = Gateway(upstream, clock=reactor, reactor=reactor, environ=environ)
        self.addCleanup(gateway.stop)
        self.sent = Recorder(gateway).sent
        return gateway

    def pid(self, gateway: Gateway, subject: str = "alice") -> int:
        link = gateway.pool.links[("user", subject)]
        assert link.pid is not None
        return link.pid


class EverythingTests(RealUpstreamTestCase):
    """The official reference server, over stdio, through the proxy core."""

    async def test_passes_through(self) -> None:
        gateway = self.gateway(config(everything()))
        client = Downstream(gateway)
        result = await client.initialize("2024-11-05")
        self.assertEqual(result["protocolVersion"], "2024-11-05")
        self.assertEqual(result["serverInfo"]["name"], "mcp-servers/everything")
        self.assertNotIn("tasks", result["capabilities"])
        link = gateway.pool.links[("user", "alice")]
        self.assertEqual(link.client.server.protocol_version, "2025-11-25")  # type: ignore[union-attr]
        self.assertEqual(text(await client.tool("echo", {"message": "hello"})), "Echo: hello")
        tools = (await client.request("tools/list"))["result"]["tools"]
        names = {t["name"] for t in tools}
        # The conditional tools exist because the gateway declared what a client can do.
        self.assertTrue({"echo", "get-sum", "trigger-sampling-request", "trigger-elicitation-request"} <= names, names)
        resources = (await client.request("resources/list"))["result"]["resources"]
        uri = resources[0]["uri"]
        contents = (await client.request("resources/read", {"uri": uri}))["result"]["contents"]
        self.assertEqual(contents[0]["uri"], uri)
        templates = (await client.request("resources/templates/list"))["result"]["resourceTemplates"]
        self.assertTrue(templates)
        prompt = await client.request("prompts/get", {"name": "args-prompt", "arguments": {"city": "Paris"}})
        self.assertIn("Paris", json.dumps(prompt["result"]))
        completion = await client.request(
            "completion/complete",
            {"ref": {"type": "ref/prompt", "name": "completable-prompt"}, "argument": {"name": "department", "value": "E"}},
        )
        self.assertIn("Engineering", completion["result"]["completion"]["values"])
        self.assertEqual((await client.request("ping"))["result"], {})

    async def test_progress_and_cancellation(self) -> None:
        gateway = self.gateway(config(everything()))
        client = Downstream(gateway)
        await client.initialize()
        post = RecordingOutlet()
        answer = await client.request(
            "tools/call",
            {"name": "trigger-long-running-operation", "arguments": {"duration": 0.3, "steps": 3}, "_meta": {"progressToken": "bar"}},
            outlet=post,
        )
        self.assertIn("Long running operation completed", text(answer))
        progress = [m["params"] for m in post.messages if m.get("method") == "notifications/progress"]
        self.assertEqual([(p["progressToken"], p["progress"]) for p in progress], [("bar", 1), ("bar", 2), ("bar", 3)])
        # A cancellation from the client reaches the upstream under the upstream's id.
        d = client.send("tools/call", {"name": "trigger-long-running-operation", "arguments": {"duration": 60, "steps": 2}}, msg_id="long")
        await until(lambda: any(m.get("method") == "tools/call" and m["params"]["name"] == "trigger-long-running-operation" and m["params"]["arguments"]["duration"] == 60 for m in self.sent))
        upstream_id = [m for m in self.sent if m.get("method") == "tools/call"][-1]["id"]
        client.notify("notifications/cancelled", {"requestId": "long"})
        self.assertIsNone(await answered(d))
        self.assertEqual(self.sent[-1], jsonrpc.notification("notifications/cancelled", {"requestId": upstream_id, "reason": "Cancelled by the client"}))
        self.assertEqual(text(await client.tool("get-sum", {"a": 1, "b": 2})), "The sum of 1 and 2 is 3.")

    async def test_sampling_elicitation_roots(self) -> None:
        gateway = self.gateway(config(everything()))
        client = Downstream(gateway)
        await client.initialize()
        # server-everything asks for the roots soon after the handshake.
        roots = await client.client_request(client.outlet, "roots/list")
        client.respond(roots["id"], {"roots": [{"uri": "file:///work", "name": "work"}]})
        post = RecordingOutlet()
        d = client.send("tools/call", {"name": "trigger-sampling-request", "arguments": {"prompt": "6x7?"}}, outlet=post)
        sampling = await client.client_request(post, "sampling/createMessage")
        self.assertIn("6x7?", json.dumps(sampling["params"]))
        client.respond(sampling["id"], {"role": "assistant", "content": {"type": "text", "text": "forty-two"}, "model": "test-model"})
        self.assertIn("forty-two", text(await answered(d)))
        d = client.send("tools/call", {"name": "trigger-elicitation-request", "arguments": {}}, outlet=post)
        elicitation = await client.client_request(post, "elicitation/create")
        client.respond(elicitation["id"], {"action": "accept", "content": {"name": "Ada Lovelace"}})
        self.assertIn("Ada Lovelace", text(await answered(d)))
        self.assertIn("file:///work", text(await client.tool("get-roots-list")))

    async def test_notifications(self) -> None:
        gateway = self.gateway(config(everything()))
        client = Downstream(gateway)
        await client.initialize()
        # Tools registered after the handshake: the upstream says its list changed.
        await until(lambda: "notifications/tools/list_changed" in client.outlet.methods(), what="tools/list_changed")
        uri = "demo://resource/static/document/architecture.md"
        self.assertEqual((await client.request("resources/subscribe", {"uri": uri}))["result"], {})
        await client.tool("toggle-subscriber-updates")
        updated = await until(lambda: [m for m in client.outlet.messages if m.get("method") == "notifications/resources/updated"])
        self.assertEqual(updated[0]["params"]["uri"], uri)
        await client.tool("toggle-subscriber-updates")
        self.assertEqual((await client.request("logging/setLevel", {"level": "debug"}))["result"], {})
        await client.tool("toggle-simulated-logging")
        logged = await until(lambda: [m for m in client.outlet.messages if m.get("method") == "notifications/message"])
        self.assertIn(logged[0]["params"]["level"], ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"))
        await client.tool("toggle-simulated-logging")

    async def test_killed_mid_call(self) -> None:
        gateway = self.gateway(config(everything()))
        client = Downstream(gateway)
        await client.initialize()
        first = self.pid(gateway)
        d = client.send("tools/call", {"name": "trigger-long-running-operation", "arguments": {"duration": 60, "steps": 2}})
        await until(lambda: any(m.get("method") == "tools/call" for m in self.sent))
        os.kill(first, signal.SIGKILL)
        answer = await answered(d)
        self.assertEqual(answer["error"]["code"], errors.UPSTREAM_UNAVAILABLE)
        self.assertEqual(answer["error"]["data"], {"upstream": "up", "reason": "exited"})
        self.assertEqual(answer["error"]["message"], "Upstream unavailable: its process was killed by signal 9")
        notice = [m for m in client.outlet.messages if m.get("method") == "notifications/message"]
        self.assertIn("will be restarted", json.dumps(notice))
        # The next call works, on a fresh process.
        self.assertEqual(text(await client.tool("echo", {"message": "again"})), "Echo: again")
        self.assertNotEqual(self.pid(gateway), first)
        self.assertEqual((gateway.metrics.crashes, gateway.metrics.restarts, gateway.metrics.live()), (1, 1, 1))

    async def test_per_user_processes(self) -> None:
        """Two subjects, two processes; each sees only its own subject and no gateway secret."""
        environ = {**os.environ, "GATEWAY_DATABASE_PASSWORD": "hunter2"}
        gateway = self.gateway(config(everything(), subject_env="SMELDR_SUBJECT"), environ=environ)
        alice, bob = Downstream(gateway, ALICE), Downstream(gateway, BOB)
        await alice.initialize()
        await bob.initialize()
        self.assertNotEqual(self.pid(gateway, "alice"), self.pid(gateway, "bob"))
        alice_env = json.loads(text(await alice.tool("get-env")))
        bob_env = json.loads(text(await bob.tool("get-env")))
        self.assertEqual((alice_env["SMELDR_SUBJECT"], bob_env["SMELDR_SUBJECT"]), ("alice", "bob"))
        self.assertNotIn("GATEWAY_DATABASE_PASSWORD", alice_env)
        second = Downstream(gateway, ALICE)
        await second.initialize()
        self.assertEqual(gateway.metrics.live(), 2)


class FaultTests(RealUpstreamTestCase):
    """What a misbehaving upstream cannot do to the gateway."""

    def misbehaving(self, **limits: Any) -> Gateway:
        return self.gateway(config([sys.executable, MISBEHAVING], limits=Limits(stop_grace=1, **limits)))

    async def test_never_answers(self) -> None:
        gateway = self.misbehaving(request_timeout=0.5)
        client = Downstream(gateway)
        await client.initialize()
        answer = await client.tool("silent")
        self.assertEqual(answer["error"]["code"], jsonrpc.REQUEST_TIMEOUT)
        upstream_id = [m for m in self.sent if m.get("method") == "tools/call"][-1]["id"]
        self.assertEqual(json.loads(text(await client.tool("cancelled"))), [upstream_id])
        self.assertEqual(gateway.metrics.timeouts, 1)

    async def test_flood_is_bounded(self) -> None:
        gateway = self.misbehaving(notification_rate=0.1, notification_burst=50)
        client = Downstream(gateway)
        await client.initialize()
        await client.tool("pid")
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        started = reactor.seconds()
        answer = await client.tool("flood", {"count": 100_000}, timeout=90)
        elapsed = reactor.seconds() - started
        grown = tracemalloc.get_traced_memory()[0] - before
        self.assertEqual(text(answer), "flooded")
        logged = [m for m in client.outlet.messages if m.get("method") == "notifications/message"]
        self.assertLessEqual(len(logged), 50 + 0.1 * elapsed + 1)
        self.assertEqual(gateway.metrics.dropped_notifications, 100_000 - len(logged))
        # 100 000 parsed notifications held anywhere would be tens of megabytes.
        self.assertLess(grown, 2 * 1024 * 1024)

    async def test_oversized_message(self) -> None:
        gateway = self.misbehaving(max_message_bytes=65536)
        client = Downstream(gateway)
        await client.initialize()
        with capturedLogs() as events:
            answer = await client.tool("big", {"size": 200_000})
        self.assertEqual(answer["error"]["data"], {"upstream": "up", "reason": "protocol"})
        [event] = [e for e in events if e.get("smeldr_event") == "gateway_protocol_error"]
        self.assertEqual((event["upstream"], event["limit"]), ("up", 65536))
        self.assertIsInstance(event["pid"], int)
        self.assertIn("larger than 65536 bytes", answer["error"]["message"])
        self.assertEqual(text(await client.tool("big", {"size": 1000}))[:3], "xxx")

    async def test_crash_and_junk_and_stderr(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        gateway = self.misbehaving()
        client = Downstream(gateway)
        await client.initialize()
        self.assertEqual(text(await client.tool("junk")), "after junk")
        answer = await client.tool("crash")
        self.assertEqual(answer["error"]["message"], "Upstream unavailable: its process exited with status 3")
        self.assertIn("subject", text(await client.tool("pid")))
        lines = [e.get("line") for e in events if e.get("upstream") == "up" and "line" in e]
        self.assertIn("misbehaving upstream ready", lines)
        self.assertIn("(stdout, not JSON) this is not JSON", lines)

    async def test_idle_process_is_stopped(self) -> None:
        gateway = self.misbehaving(idle_timeout=1)
        client = Downstream(gateway)
        await client.initialize()
        pid = self.pid(gateway)
        await until(lambda: gateway.metrics.live() == 0, 15, "the idle stop")
        await until(lambda: _gone(pid), 15, "the process to exit")
        self.assertIn("pid", text(await client.tool("pid")))

    async def test_stop_escalates_to_kill(self) -> None:
        """An upstream that ignores its closed stdin and SIGTERM is killed after the grace periods."""
        gateway = self.gateway(config([sys.executable, MISBEHAVING, "--stubborn"], limits=Limits(stop_grace=0.3)))
        client = Downstream(gateway)
        await client.initialize()
        pid = self.pid(gateway)
        started = reactor.seconds()
        await gateway.stop()
        self.assertGreaterEqual(reactor.seconds() - started, 0.6)
        self.assertTrue(_gone(pid))

    async def test_missing_command(self) -> None:
        gateway = self.gateway(config(["/nonexistent/upstream-binary"]))
        answer = await Downstream(gateway).request("initialize", {"protocolVersion": "2025-11-25"})
        self.assertEqual(answer["error"]["data"], {"upstream": "up", "reason": "start_failed"})


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return True
    return False

