"""
A stdio MCP server that breaks the rules on request, for the gateway's
fault tests: it never answers, floods notifications, dies, sends a message
larger than any limit, prints junk on stdout.  The official SDKs do not let
a server misbehave like this, hence a hand-written one.

Tools (C{tools/call} name):
  - C{silent}: never answered;
  - C{cancelled}: answers with the request ids it received in
    C{notifications/cancelled};
  - C{flood} (C{count}): writes C{count} log notifications at once, then answers;
  - C{pid}: answers with its process id and C{SMELDR_SUBJECT};
  - C{crash}: exits with status 3 without answering;
  - C{big} (C{size}): answers with a line of about C{size} bytes;
  - C{junk}: prints a line that is not JSON, then answers.

With C{--stubborn} it ignores SIGTERM and outlives its stdin, so only
SIGKILL stops it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

CANCELLED: list = []


def send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def text(request_id: object, value: str) -> None:
    send({"jsonrpc": "2.0", "id": request_id, "result": {"content": [{"type": "text", "text": value}], "isError": False}})


def call(request_id: object, name: str, arguments: dict) -> None:
    if name == "silent":
        return
    if name == "cancelled":
        text(request_id, json.dumps(CANCELLED))
    elif name == "flood":
        line = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "flood"}}
        encoded = (json.dumps(line) + "\n") * int(arguments.get("count", 1000))
        sys.stdout.write(encoded)
        sys.stdout.flush()
        text(request_id, "flooded")
    elif name == "pid":
        text(request_id, json.dumps({"pid": os.getpid(), "subject": os.environ.get("SMELDR_SUBJECT")}))
    elif name == "crash":
        os._exit(3)
    elif name == "big":
        text(request_id, "x" * int(arguments.get("size", 1 << 20)))
    elif name == "junk":
        sys.stdout.write("this is not JSON\n")
        text(request_id, "after junk")
    else:
        send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32602, "message": f"Unknown tool: {name}"}})


def main() -> None:
    stubborn = "--stubborn" in sys.argv
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stderr.write("misbehaving upstream ready\n")
    sys.stderr.flush()
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        method, request_id, params = message.get("method"), message.get("id"), message.get("params") or {}
        if method == "initialize":
            send(
                {
                    "jsonrpc": "2.0",
                    "id": request_id,
                    "result": {
                        "protocolVersion": "2025-06-18",
                        "capabilities": {"tools": {}, "logging": {}},
                        "serverInfo": {"name": "misbehaving", "version": "0"},
                    },
                }
            )
        elif method == "notifications/cancelled":
            CANCELLED.append(params.get("requestId"))
        elif method == "tools/list":
            names = ["silent", "cancelled", "flood", "pid", "crash", "big", "junk"]
            send({"jsonrpc": "2.0", "id": request_id, "result": {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in names]}})
        elif method == "tools/call":
            call(request_id, params.get("name"), params.get("arguments") or {})
        elif method == "logging/setLevel" or method == "ping":
            send({"jsonrpc": "2.0", "id": request_id, "result": {}})
        elif request_id is not None and method is not None:
            send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "Method not found"}})
    while stubborn:
        time.sleep(3600)


if __name__ == "__main__":
    main()
