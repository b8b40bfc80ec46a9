# -*- test-case-name: tests.test_flows_cli -*-
"""
C{smeldr-oauth-admin flows}: the timeline of the clients the server saw,
read from the store the server writes it to.
"""

from __future__ import annotations

import argparse
import json
from typing import IO, Any

from smeldr_oauth.db import open_database
from smeldr_oauth.flows import render
from smeldr_oauth.flows.patterns import NEVER_USED_AFTER, Context, recognise
from smeldr_oauth.flows.store import FlowStore
from smeldr_oauth.oauth.numbers import count, seconds


def add_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add C{flows} to the admin CLI's subparsers."""
    flows: argparse.ArgumentParser = commands.add_parser(
        "flows",
        parents=parents,
        help="what each client did (OAuth and MCP steps), with the step that did not happen",
    )
    flows.add_argument("--client", metavar="ID", default=None, help="one client's timeline")
    flows.add_argument("--grant", metavar="ID", default=None, help="one grant's timeline")
    flows.add_argument("--last", metavar="N", type=count, default=50, help="the newest N steps (default 50)")
    flows.add_argument("--resource", metavar="URL", default=None, help="the server's resource, to name mismatches")
    flows.add_argument(
        "--access-ttl", metavar="SECONDS", type=seconds, default=3600.0, help="access token lifetime (default 3600)"
    )
    flows.add_argument(
        "--grace",
        metavar="SECONDS",
        type=seconds,
        default=NEVER_USED_AFTER,
        help=f"a token unused this long after its issue is 'never used' (default {NEVER_USED_AFTER:g})",
    )
    flows.add_argument("--json", action="store_true", help="print one JSON document")
    flows.set_defaults(command="show")
    return flows


async def show(reactor: Any, options: argparse.Namespace, location: str, out: IO[str]) -> int:
    """Print the timeline C{options} ask for."""
    store = FlowStore(open_database(location, reactor), reactor)
    try:
        if options.client is None and options.grant is None:
            clients = await store.clients(options.last)
            steps = await store.timeline(last=options.last)
            groups = [(c.client_id, await store.timeline(client_id=c.client_id, last=options.last)) for c in clients]
            # Requests that named no client (discovery, 401s), by address.
            for address in sorted({s.address or "" for s in steps if s.client_id is None}):
                groups.append((address, [s for s in steps if s.client_id is None and (s.address or "") == address]))
        else:
            steps = await store.timeline(client_id=options.client, grant_id=options.grant, last=options.last)
            groups = [(options.client or options.grant, steps)]
    finally:
        store.close()
    context = Context(
        now=float(reactor.seconds()), resource=options.resource, access_ttl=options.access_ttl, grace=options.grace
    )
    findings = [f for _, group in groups for f in recognise(group, context)]
    if options.json:
        out.write(json.dumps(render.document(steps, findings), indent=2) + "\n")
    else:
        for line in render.table(steps, findings):
            out.write(line + "\n")
    return 0
