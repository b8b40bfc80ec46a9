"""
A multi-process HTTP/1.1 load generator for the flows C{wrk} cannot express:
refresh-token rotation chains, the whole OAuth flow, MCP sessions over
Streamable HTTP and over HTTP+SSE, and thousands of idle SSE streams.

Why not an HTTP library: the generator must cost far less CPU per request
than the server it measures, so each connection is a bare
L{asyncio.Protocol} with an incremental response parser (Content-Length and
chunked bodies, and chunked bodies delivered piecewise for event streams).
Every worker process runs many virtual users, each on its own keep-alive
connection, and reports its own CPU time over the measured window, so the
report can show the generator is not the bottleneck.

Nothing here imports Twisted: this is the client side.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import multiprocessing
import os
import resource
import secrets
import socket
import time
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlencode, urlsplit

from bench import lifeline

#: The MCP protocol versions the bench speaks.
SESSION_VERSION = "2025-11-25"
LEGACY_VERSION = "2024-11-05"
MODERN_VERSION = "2026-07-28"
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
    "io.modelcontextprotocol/clientCapabilities": {},
}

#: The tool every tools/call benchmark calls: read-only, one SQLite query.
TOOL = "list_posts"
TOOL_ARGUMENTS = {"limit": 1}


class HTTPError(Exception):
    """An unexpected status or a malformed response."""


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class Connection(asyncio.Protocol):
    """
    One keep-alive HTTP/1.1 connection.  L{request} sends one request and
    waits for its whole response; L{stream} sends one and hands every piece
    of its (endless) body to a callback.
    """

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self._buffer = bytearray()
        self._waiter: Optional[asyncio.Future] = None
        self._on_chunk: Optional[Callable[[bytes], None]] = None
        self._headers_seen: Optional[asyncio.Future] = None
        self._reset()
        self.lost: asyncio.Future = asyncio.get_event_loop().create_future()

    def _reset(self) -> None:
        self._status = 0
        self._resp_headers: dict[bytes, bytes] = {}
        self._length: Optional[int] = None
        self._chunked = False
        self._in_body = False
        self._chunks: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        for waiter in (self._waiter, self._headers_seen):
            if waiter is not None and not waiter.done():
                waiter.set_exception(HTTPError(f"connection lost: {exc}"))

    def request(self, data: bytes) -> "asyncio.Future[Response]":
        assert self.transport is not None
        self._waiter = asyncio.get_event_loop().create_future()
        self.transport.write(data)
        return self._waiter

    def stream(self, data: bytes, on_chunk: Callable[[bytes], None]) -> "asyncio.Future[Response]":
        """
        Send C{data}; the returned future fires with the status and headers
        as soon as they arrive, then C{on_chunk} gets each body piece.
        """
        assert self.transport is not None
        self._on_chunk = on_chunk
        self._headers_seen = asyncio.get_event_loop().create_future()
        self.transport.write(data)
        return self._headers_seen

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- parsing ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            while self._parse():
                pass
        except Exception as e:  # a malformed response ends the connection
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(HTTPError(str(e)))
            self.close()

    def _parse(self) -> bool:
        buf = self._buffer
        if not self._in_body:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(buf[:end])
            del buf[: end + 4]
            lines = head.split(b"\r\n")
            self._status = int(lines[0][9:12])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            self._resp_headers = headers
            self._in_body = True
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                self._chunked = True
            elif b"content-length" in headers:
                self._length = int(headers[b"content-length"])
            else:
                self._length = 0
            if self._headers_seen is not None and not self._headers_seen.done():
                self._headers_seen.set_result(Response(self._status, headers, b""))
        if not self._chunked:
            assert self._length is not None
            if len(buf) < self._length:
                return False
            body = bytes(buf[: self._length])
            del buf[: self._length]
            self._deliver(body)
            return True
        # chunked
        line_end = buf.find(b"\r\n")
        if line_end < 0:
            return False
        size = int(bytes(buf[:line_end]).split(b";")[0], 16)
        if size == 0:
            if len(buf) < line_end + 4:
                return False
            del buf[: line_end + 4]
            self._deliver(b"".join(self._chunks))
            return True
        if len(buf) < line_end + 2 + size + 2:
            return False
        chunk = bytes(buf[line_end + 2 : line_end + 2 + size])
        del buf[: line_end + 2 + size + 2]
        if self._on_chunk is not None:
            self._on_chunk(chunk)
        else:
            self._chunks.append(chunk)
        return True

    def _deliver(self, body: bytes) -> None:
        response = Response(self._status, self._resp_headers, body)
        self._reset()
        self._on_chunk = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)


#: From <linux/in.h>: bind() reserves no port; connect() picks one unique
#: for the whole 4-tuple, so each source address has the full ephemeral
#: range towards each server port.
IP_BIND_ADDRESS_NO_PORT = 24


async def connect(host: str, port: int, source: Optional[str] = None) -> Connection:
    """
    One connection; from the loopback address C{source} when given (bound
    before connecting), so that many connections to one server port are not
    limited to one address pair's ephemeral ports.
    """
    loop = asyncio.get_event_loop()
    if source is None:
        _, protocol = await loop.create_connection(Connection, host, port)
        return protocol
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setblocking(False)
        sock.bind((source, 0))
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    _, protocol = await loop.create_connection(Connection, sock=sock)
    return protocol


def build(
    method: str,
    path: str,
    host: str,
    headers: Optional[dict[str, str]] = None,
    body: bytes = b"",
) -> bytes:
    """One serialised request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def form(**fields: str) -> bytes:
    return urlencode(fields).encode("ascii")


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()
    )
    return verifier, challenge


class SSEReader:
    """
    Splits an event stream's body into events; keeps what the benchmarks
    look at (the C{endpoint} event, messages, keepalive arrival times).
    """

    def __init__(self) -> None:
        self._pending = b""
        self.endpoint: Optional[str] = None
        self.opened: asyncio.Future = asyncio.get_event_loop().create_future()
        self.messages: asyncio.Queue = asyncio.Queue()
        self.keepalives: list[float] = []

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk
        while True:
            end = self._pending.find(b"\n\n")
            if end < 0:
                return
            frame, self._pending = self._pending[:end], self._pending[end + 2 :]
            self._frame(frame)

    def _frame(self, frame: bytes) -> None:
        if frame.startswith(b":"):
            if b"keepalive" in frame:
                self.keepalives.append(time.monotonic())
            if not self.opened.done():
                self.opened.set_result(None)
            return
        event = b"message"
        data = []
        for line in frame.split(b"\n"):
            if line.startswith(b"event:"):
                event = line[6:].strip()
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
        payload = b"\n".join(data)
        if event == b"endpoint":
            self.endpoint = payload.decode("ascii")
            if not self.opened.done():
                self.opened.set_result(None)
        else:
            self.messages.put_nowait(payload)


# -- scenarios: each is one virtual user's loop ---------------------------------


class Recorder:
    """Latencies of operations that completed inside the measured window."""

    def __init__(self, start: float, end: float) -> None:
        self.start = start
        self.end = end
        self.latencies: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []

    def done(self, began: float) -> bool:
        """Record an operation begun at C{began}; say whether to keep going."""
        now = time.monotonic()
        if began >= self.start and now <= self.end:
            self.latencies.append(now - began)
        return now < self.end

    def error(self, why: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 3:
            self.error_samples.append(why[:300])

    @property
    def running(self) -> bool:
        return time.monotonic() < self.end


def _ok(response: Response, *statuses: int) -> Response:
    if response.status not in statuses:
        raise HTTPError(f"status {response.status}: {response.body[:200]!r}")
    return response


async def user_fixed(target: dict[str, Any], state: Any, rec: Recorder) -> None:
    """The same GET (or any fixed request) over and over."""
    conn = await connect(target["host"], target["port"])
    data = build("GET", state["path"], target["hostport"], state.get("headers"))
    try:
        while True:
            began = time.monotonic()
            _ok(await conn.request(data), 200)
            if not rec.done(began):
                break
    finally:
        conn.close()


async def user_refresh(target: dict[str, Any], state: Any, rec: Recorder) -> None:
    """One rotation chain: each refresh uses the token the previous one returned."""
    conn = await connect(target["host"], target["port"])
    token = state["refresh_token"]
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    try:
        while True:
            body = form(grant_type="refresh_token", refresh_token=token, client_id=state["client_id"])
            began = time.monotonic()
            response = _ok(
                await conn.request(build("POST", "/oauth/token", target["hostport"], headers, body)), 200
            )
            token = response.json()["refresh_token"]
            if not rec.done(began):
                break
    finally:
        conn.close()


def tools_call_body(request_id: int, modern: bool = False) -> bytes:
    params: dict[str, Any] = {"name": TOOL, "arguments": TOOL_ARGUMENTS}
    if modern:
        params["_meta"] = MODERN_META
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}).encode()


def _check_tool_result(payload: bytes) -> None:
    message = json.loads(payload)
    if "result" not in message or message["result"].get("isError"):
        raise HTTPError(f"tools/call failed: {payload[:200]!r}")


async def full_flow(conn: Connection, target: dict[str, Any], state: Any) -> None:
    """
    authorize POST (consent approved with the site token) + code exchange +
    the first tools/call (stateless, 2026-07-28 envelope: no initialize).
    """
    hostport = target["hostport"]
    verifier, challenge = pkce_pair()
    body = form(
        response_type="code",
        client_id=state["client_id"],
        redirect_uri=state["redirect_uri"],
        scope="read write offline_access",
        state=secrets.token_urlsafe(8),
        code_challenge=challenge,
        code_challenge_method="S256",
        resource=target["resource"],
        decision="approve",
        site_token=state["site_token"],
    )
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    response = _ok(await conn.request(build("POST", "/oauth/authorize", hostport, headers, body)), 303)
    location = response.headers[b"location"].decode("ascii")
    code = parse_qs(urlsplit(location).query)["code"][0]
    body = form(
        grant_type="authorization_code",
        code=code,
        code_verifier=verifier,
        client_id=state["client_id"],
        redirect_uri=state["redirect_uri"],
        resource=target["resource"],
    )
    response = _ok(await conn.request(build("POST", "/oauth/token", hostport, headers, body)), 200)
    access = response.json()["access_token"]
    mcp_headers = {
        "Authorization": f"Bearer {access}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN_VERSION,
        "Mcp-Method": "tools/call",
        "Mcp-Name": TOOL,
    }
    response = _ok(
        await conn.request(build("POST", "/mcp", hostport, mcp_headers, tools_call_body(1, True))), 200
    )
    _check_tool_result(response.body)


async def user_flow(target: dict[str, Any], state: Any, rec: Recorder) -> None:
    conn = await connect(target["host"], target["port"])
    try:
        while True:
            began = time.monotonic()
            await full_flow(conn, target, state)
            if not rec.done(began):
                break
    finally:
        conn.close()


def _mcp_headers(token: str, session_id: Optional[str] = None) -> dict[str, str]:
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
    }
    if session_id is not None:
        headers["Mcp-Session-Id"] = session_id
        headers["MCP-Protocol-Version"] = SESSION_VERSION
    return headers


async def user_streamable(target: dict[str, Any], state: Any, rec: Recorder) -> None:
    """A Streamable HTTP session: initialize, then tools/call round trips."""
    conn = await connect(target["host"], target["port"])
    hostport, token = target["hostport"], state["access_token"]
    try:
        session_id = await _initialize(conn, hostport, token)
        headers = _mcp_headers(token, session_id)
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        _ok(await conn.request(build("POST", "/mcp", hostport, headers, note)), 202)
        request_id = 1
        while True:
            began = time.monotonic()
            response = _ok(
                await conn.request(build("POST", "/mcp", hostport, headers, tools_call_body(request_id))), 200
            )
            _check_tool_result(response.body)
            request_id += 1
            if not rec.done(began):
                break
        _ok(await conn.request(build("DELETE", "/mcp", hostport, headers)), 204)
    finally:
        conn.close()


async def open_legacy_stream(
    target: dict[str, Any], token: str, source: Optional[str] = None
) -> tuple[Connection, SSEReader]:
    """GET /mcp without a session: the 2024-11-05 stream, whose first event names the POST endpoint."""
    conn = await connect(target["host"], target["port"], source)
    reader = SSEReader()
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    head = await conn.stream(build("GET", "/mcp", target["hostport"], headers), reader.feed)
    _ok(head, 200)
    await reader.opened
    return conn, reader


async def _initialize(conn: Connection, hostport: str, token: str) -> str:
    """A Streamable HTTP C{initialize}; the new session's id."""
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": SESSION_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"},
        },
    }
    response = _ok(
        await conn.request(build("POST", "/mcp", hostport, _mcp_headers(token), json.dumps(init).encode())),
        200,
    )
    return response.headers[b"mcp-session-id"].decode("ascii")


async def open_streamable_stream(
    target: dict[str, Any], token: str, source: Optional[str] = None
) -> tuple[Connection, SSEReader]:
    """
    A Streamable HTTP session's own stream: C{initialize}, then C{GET /mcp}
    with its C{Mcp-Session-Id} on the same keep-alive connection.
    """
    conn = await connect(target["host"], target["port"], source)
    try:
        hostport = target["hostport"]
        session_id = await _initialize(conn, hostport, token)
        headers = _mcp_headers(token, session_id)
        del headers["Content-Type"]
        headers["Accept"] = "text/event-stream"
        reader = SSEReader()
        _ok(await conn.stream(build("GET", "/mcp", hostport, headers), reader.feed), 200)
        await reader.opened
    except BaseException:
        conn.close()
        raise
    return conn, reader


#: How the idle-stream benchmarks open a stream, by transport.
STREAM_OPENERS: dict[str, Callable[..., Any]] = {
    "legacy": open_legacy_stream,
    "streamable": open_streamable_stream,
}


async def user_legacy(target: dict[str, Any], state: Any, rec: Recorder) -> None:
    """
    An HTTP+SSE session: the stream on one connection, the POSTs on another;
    the round trip is from sending the POST to the answer arriving on the
    stream.
    """
    hostport, token = target["hostport"], state["access_token"]
    stream_conn, reader = await open_legacy_stream(target, token)
    post = await connect(target["host"], target["port"])
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    assert reader.endpoint is not None
    path = reader.endpoint
    try:
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": LEGACY_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"},
            },
        }
        _ok(await post.request(build("POST", path, hostport, headers, json.dumps(init).encode())), 202)
        await reader.messages.get()
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        _ok(await post.request(build("POST", path, hostport, headers, note)), 202)
        request_id = 1
        while True:
            began = time.monotonic()
            _ok(await post.request(build("POST", path, hostport, headers, tools_call_body(request_id))), 202)
            _check_tool_result(await reader.messages.get())
            request_id += 1
            if not rec.done(began):
                break
    finally:
        post.close()
        stream_conn.close()


SCENARIOS: dict[str, Callable[..., Any]] = {
    "fixed": user_fixed,
    "refresh": user_refresh,
    "flow": user_flow,
    "streamable": user_streamable,
    "legacy": user_legacy,
}


# -- worker processes --------------------------------------------------------------


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """
    User + system CPU seconds of process C{pid} and its live children
    (from /proc): a C{--workers N} server's CPU is in its workers.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    children: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
        except OSError:
            continue
    own = (int(fields[11]) + int(fields[12])) / ticks
    return own + sum(_live_cpu(child) for child in children)


def database_cpu(pid: int) -> float:
    """
    User + system CPU seconds of a PostgreSQL server whose postmaster is
    C{pid}: its own, its live children's (the backends of the server's
    pool, the WAL writer, the checkpointer) and what its children that
    have exited used (an autovacuum worker, a backend of a short
    connection), which the kernel adds to the postmaster's C{cutime} and
    C{cstime} when it reaps them.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    reaped = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    return process_cpu(pid) + reaped


def _live_cpu(pid: int) -> float:
    try:
        return process_cpu(pid)
    except OSError:
        return 0.0


async def _worker_main(
    scenario: str,
    target: dict[str, Any],
    states: list[Any],
    start: float,
    end: float,
    server_pid: Optional[int],
    database_pid: Optional[int] = None,
) -> dict[str, Any]:
    rec = Recorder(start, end)
    loop = asyncio.get_event_loop()
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name + "_cpu"] = _cpu_seconds()
        if server_pid is not None:
            marks[name + "_server"] = process_cpu(server_pid)
        if database_pid is not None:
            marks[name + "_database"] = database_cpu(database_pid)

    loop.call_later(max(0.0, start - time.monotonic()), mark, "start")
    loop.call_later(max(0.0, end - time.monotonic()), mark, "end")
    user = SCENARIOS[scenario]

    async def one(state: Any) -> None:
        try:
            await user(target, state, rec)
        except Exception as e:
            rec.error(f"{type(e).__name__}: {e}")

    await asyncio.gather(*(one(s) for s in states))
    if "end" not in marks:
        await asyncio.sleep(max(0.0, end - time.monotonic()) + 0.01)
    result: dict[str, Any] = {
        "latencies": rec.latencies,
        "errors": rec.errors,
        "error_samples": rec.error_samples,
        "cpu": marks.get("end_cpu", _cpu_seconds()) - marks.get("start_cpu", 0.0),
    }
    if server_pid is not None and "start_server" in marks:
        result["server_cpu"] = marks["end_server"] - marks["start_server"]
    if database_pid is not None and "start_database" in marks:
        result["database_cpu"] = marks["end_database"] - marks["start_database"]
    return result


def _worker(
    conn: Any,
    parent_pid: int,
    scenario: str,
    target: dict[str, Any],
    states: list[Any],
    start: float,
    end: float,
    server_pid: Optional[int],
    database_pid: Optional[int] = None,
) -> None:
    lifeline.die_with_parent(parent_pid)
    try:
        result = asyncio.run(_worker_main(scenario, target, states, start, end, server_pid, database_pid))
    except Exception as e:  # report, never hang the parent
        result = {"latencies": [], "errors": len(states), "error_samples": [repr(e)], "cpu": 0.0}
    conn.send(result)
    conn.close()


def percentile(values: list[float], fraction: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(fraction * (len(ordered) - 1)))))
    return ordered[index]


def run_load(
    scenario: str,
    target: dict[str, Any],
    states: list[Any],
    *,
    duration: float,
    warmup: float,
    processes: int,
    server_pid: Optional[int] = None,
    database_pid: Optional[int] = None,
) -> dict[str, Any]:
    """
    Run C{len(states)} virtual users of C{scenario} in C{processes} worker
    processes for C{warmup + duration} seconds; measure only the last
    C{duration}.

    @param database_pid: the postmaster of the PostgreSQL server the
        server uses, when it runs on this machine: its CPU (L{database_cpu})
        is measured over the same window.
    @return: ops/s, p50/p99 (ms), errors, generator CPU and server CPU (and
        the database's, with C{database_pid}) as a fraction of the
        measured window (1.0 = one core busy).
    """
    processes = max(1, min(processes, len(states)))
    context = multiprocessing.get_context("fork")
    # Users connect during the first part of the warmup; everyone measures the same window.
    start = time.monotonic() + 0.2 + warmup
    end = start + duration
    pipes, workers = [], []
    for index in range(processes):
        mine = states[index::processes]
        parent, child = context.Pipe(duplex=False)
        p = context.Process(
            target=_worker,
            args=(
                child,
                os.getpid(),
                scenario,
                target,
                mine,
                start,
                end,
                server_pid if index == 0 else None,
                database_pid if index == 0 else None,
            ),
            daemon=True,
        )
        p.start()
        child.close()
        pipes.append(parent)
        workers.append(p)
    results = []
    for pipe, p in zip(pipes, workers):
        try:
            results.append(pipe.recv())
        except EOFError:
            results.append({"latencies": [], "errors": 1, "error_samples": ["worker died"], "cpu": 0.0})
        p.join()
    latencies = [x for r in results for x in r["latencies"]]
    errors = sum(r["errors"] for r in results)
    samples = [s for r in results for s in r["error_samples"]][:3]
    server_cpu = next((r["server_cpu"] for r in results if "server_cpu" in r), None)
    database_cpu = next((r["database_cpu"] for r in results if "database_cpu" in r), None)
    p50 = percentile(latencies, 0.50)
    p99 = percentile(latencies, 0.99)
    return {
        "generator": "python",
        "connections": len(states),
        "processes": processes,
        "ops": len(latencies),
        "ops_per_s": len(latencies) / duration,
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
        "errors": errors,
        "error_samples": samples,
        "client_cpu": sum(r["cpu"] for r in results) / duration,
        "server_cpu": None if server_cpu is None else server_cpu / duration,
        **({} if database_cpu is None else {"database_cpu": database_cpu / duration}),
    }
