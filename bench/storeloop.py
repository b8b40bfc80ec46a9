"""
The refresh grant's database work alone: the store-only loop that rounds
three to six of C{docs/performance.md} quote.

    python -m bench.storeloop                       # 50 chains, batches of 25
    python -m bench.storeloop --batch 1,5,25,50     # the cost of small batches
    python -m bench.storeloop --drop-index access_tokens_expires_at

C{--chains} refresh chains, each over its own grant, on a fresh SQLite file
through the real L{SQLStore} with group commit on the calling thread (as
the server runs it): each round, C{--batch} refreshes (the chains in turn)
are asked for in one reactor turn, then the turn ends and they commit as
one transaction.  Printed per batch size: the process's CPU per refresh
(C{time.process_time} around the calls and the commit, nothing else) and
the WAL frames (pages) written per refresh, read from the growth of the
C{-wal} file.  The WAL is checkpointed (and truncated) every
C{--checkpoint-every} refreshes, outside the measured time, as the
server's checkpointer does once a second (2,000 refreshes: about a
second of a busy server).

Why a loop of its own: under the HTTP bench the database's share moves
with the batch sizes the load happens to make, and the box's noise hides
a few microseconds; here one store change can be measured alone, and
alternated with C{main} in a second checkout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

from smeldr_oauth.db import open_database
from smeldr_oauth.oauth import model
from smeldr_oauth.oauth.secrets import hash_secret, new_secrets
from smeldr_oauth.store.sql import SQLStore
# The suite's reactor for a store on the calling thread (the bench runs from
# the checkout, as bench.crossprocess does with tests.postgres).
from tests.test_store_sqlite import InlineReactor as _Reactor

#: The grants' scopes and resource (the server's defaults' shape).
SCOPES = ("mcp",)
RESOURCE = "http://127.0.0.1/mcp"
#: A WAL frame: its header and one page (the default page size).
FRAME = 24 + 4096


def _settled(reactor: _Reactor, d: Any) -> Any:
    """End the turn (a group commit runs then) and return C{d}'s result."""
    reactor.advance(0)
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("the store did not answer")
    return results[0]


def run(
    chains: int,
    batch: int,
    refreshes: int,
    drop: Sequence[str] = (),
    directory: Optional[str] = None,
    checkpoint_every: int = 2000,
) -> dict[str, float]:
    """
    One loop on a fresh file; its CPU per refresh (microseconds) and WAL
    frames per refresh.

    @param drop: indexes to drop before the loop (a what-if: the server
        needs them for the purge and for revocation).
    """
    workdir = tempfile.mkdtemp(dir=directory)
    try:
        return _run(os.path.join(workdir, "oauth.db"), chains, batch, refreshes, drop, checkpoint_every)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(
    path: str, chains: int, batch: int, refreshes: int, drop: Sequence[str], checkpoint_every: int
) -> dict[str, float]:
    reactor = _Reactor()
    now = 1_000_000.0
    reactor.advance(now)
    store = SQLStore(open_database(path, reactor, threads=0, group_commit=True))
    try:
        _settled(reactor, store.ready)
        client = model.Client(
            client_id="bench-client",
            client_name="bench",
            redirect_uris=("http://127.0.0.1/callback",),
            grant_types=("authorization_code", "refresh_token"),
            created_at=now,
        )
        _settled(reactor, store.save_client(client))
        heads = [_grant(reactor, store, client, i, now) for i in range(chains)]
        side = sqlite3.connect(path, isolation_level=None)
        side.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for index in drop:
            side.execute(f"DROP INDEX {index}")
        store.database.pool.connect().execute("PRAGMA wal_autocheckpoint=0")
        cpu = 0.0
        frames = 0.0
        done = 0
        since = 0
        while done < refreshes:
            pending = []
            for k in range(batch):
                chain = (done + k) % chains
                now += 0.001
                access, refresh = new_secrets(2)
                new_access = model.AccessToken(token_hash=hash_secret(access), grant_id="", scopes=(), resource="", expires_at=now + 3600)
                new_refresh = model.RefreshToken(
                    token_hash=hash_secret(refresh), grant_id="", scopes=(), generation=0, created_at=now, expires_at=now + 86400
                )
                started = time.process_time()
                d = store.redeem_refresh_token(heads[chain], now, 2.0, None, new_access, new_refresh)
                cpu += time.process_time() - started
                pending.append((chain, new_refresh.token_hash, d))
            before = _size(path + "-wal")
            started = time.process_time()
            reactor.advance(0)
            cpu += time.process_time() - started
            frames += max(0, _size(path + "-wal") - before) / FRAME
            for chain, token_hash, d in pending:
                outcome: list[Any] = []
                d.addBoth(outcome.append)
                status = getattr(outcome[0], "status", outcome[0]) if outcome else None
                if status != "rotated":
                    raise RuntimeError(f"a refresh was not rotated: {status!r}")
                heads[chain] = token_hash
            done += batch
            since += batch
            if since >= checkpoint_every:
                since = 0
                side.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        side.close()
        return {"cpu_us_per_refresh": cpu / done * 1e6, "wal_frames_per_refresh": frames / done, "refreshes": float(done)}
    finally:
        store.close()


def _grant(reactor: _Reactor, store: SQLStore, client: model.Client, i: int, now: float) -> str:
    """A grant with its first tokens; the refresh token's hash."""
    grant = model.Grant(
        grant_id=f"bench-grant-{i:06d}",
        client_id=client.client_id,
        subject="bench",
        scopes=SCOPES,
        resource=RESOURCE,
        created_at=now,
    )
    code = model.AuthorizationCode(
        code_hash=hash_secret(f"code-{i}"),
        grant_id=grant.grant_id,
        client_id=client.client_id,
        redirect_uri=client.redirect_uris[0],
        code_challenge="x",
        scopes=SCOPES,
        resource=RESOURCE,
        expires_at=now + 60,
        issue_refresh=True,
    )
    _settled(reactor, store.create_grant(grant, code))
    access, refresh = new_secrets(2)
    first = model.RefreshToken(
        token_hash=hash_secret(refresh), grant_id=grant.grant_id, scopes=SCOPES, generation=1, created_at=now, expires_at=now + 86400
    )
    _settled(
        reactor,
        store.add_tokens(
            grant.grant_id,
            model.AccessToken(token_hash=hash_secret(access), grant_id=grant.grant_id, scopes=SCOPES, resource=RESOURCE, expires_at=now + 3600),
            first,
        ),
    )
    return first.token_hash


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storeloop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=50, help="refresh chains (grants) [50]")
    parser.add_argument("--batch", default="25", help="refreshes per group commit, comma-separated [25]")
    parser.add_argument("--refreshes", type=int, default=15000, help="refreshes per loop [15000]")
    parser.add_argument("--drop-index", action="append", default=[], help="drop this index first (a what-if)")
    parser.add_argument("--checkpoint-every", type=int, default=2000, help="refreshes between checkpoints [2000]")
    options = parser.parse_args(argv)
    for size in (int(b) for b in options.batch.split(",")):
        result = run(options.chains, size, options.refreshes, options.drop_index, checkpoint_every=options.checkpoint_every)
        print(
            f"batch {size:3d}: {result['cpu_us_per_refresh']:7.1f} us CPU a refresh,"
            f" {result['wal_frames_per_refresh']:5.2f} WAL frames a refresh ({int(result['refreshes'])} refreshes)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
