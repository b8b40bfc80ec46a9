# -*- test-case-name: tests.test_store_sqlite -*-
"""
L{IOAuthStore} on SQLite, through L{twisted.enterprise.adbapi}.

One connection on one thread (C{cp_min=cp_max=1}), or on the reactor thread
itself with a L{ReactorThreadPool} (C{--db-threads 0}): SQLite serialises writers
anyway, and a single writer never meets C{SQLITE_BUSY} from itself.  The
connection is in autocommit mode and every call that writes runs as one
C{BEGIN IMMEDIATE} transaction: the write lock is taken before the first
read, so a read-decide-write sequence (spending a code, rotating a refresh
token) cannot interleave with another process using the same file either.
adbapi commits when the interaction returns and rolls back when it raises,
which makes every call all-or-nothing.

Only hashes of secrets are stored: the interface never hands plaintext to a
store.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smeldr_oauth.oauth import rotation
from smeldr_oauth.oauth.model import (
    AccessInfo,
    AccessToken,
    AuthorizationCode,
    Client,
    Grant,
    RefreshToken,
)
from smeldr_oauth.store.common import (
    CLIENT_RETENTION,
    DEFAULT_PURGE_INTERVAL,
    GRANT_RETENTION,
    StoreConflict,
    start_purging,
)
from smeldr_oauth.store.interface import CodeRedemption, IOAuthStore, RefreshRedemption
from smeldr_oauth.store.migrations import MIGRATIONS, migrate

log = Logger()

T = TypeVar("T")

#: How long a writer waits for another process's lock before failing.
BUSY_TIMEOUT = 5.0


def _dump(values: Sequence[str]) -> str:
    return json.dumps(list(values))


def _load(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def _configure(connection: sqlite3.Connection) -> None:
    """
    Set up a fresh connection (adbapi's C{cp_openfun}).

    WAL lets readers run while the writer writes; C{synchronous=NORMAL} is
    durable across application crashes in WAL mode and much cheaper than
    C{FULL}; foreign keys are off by default in SQLite.
    """
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")


class ReactorThreadPool:
    """
    Stands in for an adbapi pool's L{ThreadPool}: each interaction runs at
    once, on the thread that asked for it (the reactor's).

    Why: a SQLite point read or a small WAL write with C{synchronous=NORMAL}
    takes tens of microseconds, while handing it to a database thread and
    back (a queue put, a condition notify, a reactor wake-up, two GIL
    hand-offs) costs several times that and, on a loaded machine, waits for
    the other thread to be scheduled.  The price is that the reactor waits
    for the database: see C{docs/performance.md} for the measured stalls
    (a WAL checkpoint, the hourly purge, another process holding the write
    lock for up to the busy timeout).
    """

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


def _now(f: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
    try:
        result = f(*args, **kwargs)
    except BaseException:
        return fail(Failure())
    return succeed(result)


class SQLiteConnectionPool(adbapi.ConnectionPool):
    """
    A L{ConnectionPool} that can run on a caller's thread pool, or on none.

    Tests pass a thread-less pool (the trick of synapse's C{tests/server.py})
    so that real SQLite runs inside a C{SynchronousTestCase}; the pool must
    be swapped before the real one starts a thread.

    With a L{ReactorThreadPool} the pool skips
    L{threads.deferToThreadPool} altogether: the interaction runs now and
    the L{Deferred} it returns has already fired, so no C{callFromThread}
    (and no write to the reactor's waker) is paid per call.  Interactions
    still commit on return and roll back on an exception, as adbapi does.
    """

    def __init__(self, *args: Any, threadpool: Any = None, **kwargs: Any) -> None:
        self._replacement_threadpool = threadpool
        super().__init__(*args, **kwargs)
        self._swap_threadpool()

    def _swap_threadpool(self) -> None:
        if self._replacement_threadpool is not None and not self.running:
            self.threadpool = self._replacement_threadpool
            self._replacement_threadpool = None

    @property
    def inline(self) -> bool:
        """C{True} when interactions run on the calling thread."""
        return isinstance(self.threadpool, ReactorThreadPool)

    def start(self) -> None:
        self._swap_threadpool()
        super().start()

    def runInteraction(self, interaction: Any, *args: Any, **kw: Any) -> Deferred:  # type: ignore[override]
        if self.inline:
            return _now(self._runInteraction, interaction, *args, **kw)
        return super().runInteraction(interaction, *args, **kw)

    def runWithConnection(self, func: Any, *args: Any, **kw: Any) -> Deferred:  # type: ignore[override]
        if self.inline:
            return _now(self._runWithConnection, func, *args, **kw)
        return super().runWithConnection(func, *args, **kw)


#: The old private name.
_ConnectionPool = SQLiteConnectionPool


def thread_pool_for(db_threads: int) -> Optional[ReactorThreadPool]:
    """
    The C{threadpool=} argument of a store for C{--db-threads}: 0 runs SQLite
    on the reactor thread, 1 on the pool's own single thread.
    """
    if db_threads == 0:
        return ReactorThreadPool()
    if db_threads == 1:
        return None
    raise ValueError(f"db_threads must be 0 or 1, not {db_threads!r}")


def _client(row: sqlite3.Row) -> Client:
    return Client(
        client_id=row["client_id"],
        client_name=row["client_name"],
        redirect_uris=_load(row["redirect_uris"]),
        token_endpoint_auth_method=row["token_endpoint_auth_method"],
        grant_types=_load(row["grant_types"]),
        scope=row["scope"],
        kind=row["kind"],
        client_secret_hash=row["client_secret_hash"],
        created_at=row["created_at"],
        client_uri=row["client_uri"],
        logo_uri=row["logo_uri"],
    )


def _grant(row: sqlite3.Row) -> Grant:
    return Grant(
        grant_id=row["grant_id"],
        client_id=row["client_id"],
        subject=row["subject"],
        scopes=_load(row["scopes"]),
        resource=row["resource"],
        created_at=row["created_at"],
        site_token_id=row["site_token_id"],
        client_name=row["client_name"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


def _code(row: sqlite3.Row) -> AuthorizationCode:
    return AuthorizationCode(
        code_hash=row["code_hash"],
        grant_id=row["grant_id"],
        client_id=row["client_id"],
        redirect_uri=row["redirect_uri"],
        code_challenge=row["code_challenge"],
        scopes=_load(row["scopes"]),
        resource=row["resource"],
        expires_at=row["expires_at"],
        issue_refresh=bool(row["issue_refresh"]),
    )


def _refresh(row: sqlite3.Row) -> RefreshToken:
    return RefreshToken(
        token_hash=row["token_hash"],
        grant_id=row["grant_id"],
        scopes=_load(row["scopes"]),
        generation=row["generation"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        used_at=row["used_at"],
    )


def _get_grant(txn: Any, grant_id: str) -> Optional[Grant]:
    txn.execute("SELECT * FROM grants WHERE grant_id = ?", (grant_id,))
    row = txn.fetchone()
    return None if row is None else _grant(row)


def _insert_grant(txn: Any, grant: Grant) -> None:
    txn.execute(
        "INSERT INTO grants (grant_id, client_id, subject, scopes, resource,"
        " created_at, site_token_id, client_name, last_used_at, revoked_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            grant.grant_id,
            grant.client_id,
            grant.subject,
            _dump(grant.scopes),
            grant.resource,
            grant.created_at,
            grant.site_token_id,
            grant.client_name,
            grant.last_used_at,
            grant.revoked_at,
        ),
    )


def _insert_access(
    txn: Any, access: AccessToken, grant_id: str, scopes: Sequence[str], resource: str
) -> None:
    txn.execute(
        "INSERT INTO access_tokens (token_hash, grant_id, scopes, resource, expires_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (access.token_hash, grant_id, _dump(scopes), resource, access.expires_at),
    )


def _insert_refresh(
    txn: Any, refresh: RefreshToken, grant_id: str, scopes: Sequence[str], generation: int
) -> None:
    txn.execute(
        "INSERT INTO refresh_tokens (token_hash, grant_id, scopes, generation,"
        " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
        (
            refresh.token_hash,
            grant_id,
            _dump(scopes),
            generation,
            refresh.created_at,
            refresh.expires_at,
        ),
    )


def _revoke_grant(txn: Any, grant_id: str, now: float) -> bool:
    """
    End a grant and mark every token of it revoked; C{True} if it was live.
    """
    txn.execute(
        "UPDATE grants SET revoked_at = ? WHERE grant_id = ? AND revoked_at IS NULL",
        (now, grant_id),
    )
    ended = bool(txn.rowcount == 1)
    for table in ("access_tokens", "refresh_tokens"):
        txn.execute(
            f"UPDATE {table} SET revoked_at = ? WHERE grant_id = ? AND revoked_at IS NULL",
            (now, grant_id),
        )
    return ended


def _immediate(txn: Any, interaction: Callable[..., T], *args: Any) -> T:
    """
    Run C{interaction} in one C{BEGIN IMMEDIATE} transaction; adbapi commits
    or rolls it back.  Constraint violations become L{StoreConflict}.
    """
    txn.execute("BEGIN IMMEDIATE")
    try:
        return interaction(txn, *args)
    except sqlite3.IntegrityError as e:
        # The message names the constraint ("UNIQUE constraint failed:
        # refresh_tokens.token_hash"), never a value.
        raise StoreConflict(str(e)) from e


def _snapshot(txn: Any, interaction: Callable[..., T], *args: Any) -> T:
    """
    Run a read-only C{interaction} in one deferred transaction, so that its
    reads see one consistent state.
    """
    txn.execute("BEGIN")
    return interaction(txn, *args)


@implementer(IOAuthStore)
class SQLiteStore:
    """
    The authorization server's store in one SQLite file.

    Construct it, then wait for L{ready} (or use L{open}) before relying on
    it; calls made earlier queue behind the migrations on the store's single
    thread, so they are safe, but a failed migration fails them too.
    """

    def __init__(
        self,
        path: str,
        reactor: Any = None,
        clock: Optional[IReactorTime] = None,
        *,
        threadpool: Any = None,
        migrations: Sequence[str] = MIGRATIONS,
        grant_retention: float = GRANT_RETENTION,
        client_retention: float = CLIENT_RETENTION,
    ) -> None:
        """
        @param path: the database file (C{":memory:"} works: the pool holds
            a single connection).
        @param reactor: provides threads and the shutdown trigger; adbapi
            falls back to the global reactor when it is C{None}.
        @param clock: the default clock of L{start_purging}.
        @param threadpool: a replacement for the pool's own thread pool
            (tests use a thread-less one; a L{ReactorThreadPool}, what
            C{--db-threads 0} passes, runs SQLite on the reactor thread).
        @param migrations: the schema scripts (tests use shorter lists).
        @param grant_retention: seconds a revoked or dead grant is kept.
        @param client_retention: seconds a registered client is kept when
            no grant refers to it.
        """
        self._clock = clock if clock is not None else reactor
        self._closed = False
        self._grant_retention = grant_retention
        self._client_retention = client_retention
        self._pool = SQLiteConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            isolation_level=None,
            timeout=BUSY_TIMEOUT,
            cp_min=1,
            cp_max=1,
            cp_openfun=_configure,
            cp_reactor=reactor,
            cp_noisy=False,
            threadpool=threadpool,
        )
        self._outcome: Optional[Union[SQLiteStore, Failure]] = None
        self._waiting: list[Deferred[SQLiteStore]] = []
        self._pool.runWithConnection(migrate, migrations).addBoth(self._migrated)

    def _migrated(self, result: object) -> None:
        if isinstance(result, Failure):
            log.failure("The OAuth database could not be migrated", result)
        self._outcome = result if isinstance(result, Failure) else self
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            self._fire(d)

    def _fire(self, d: "Deferred[SQLiteStore]") -> None:
        if isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(self)

    @property
    def ready(self) -> "Deferred[SQLiteStore]":
        """
        A new L{Deferred} on each access (so that several waiters cannot
        spoil each other's result) that fires with the store once its schema
        is current, or fails if it cannot be made current (for example a
        file written by a newer version).
        """
        d: Deferred[SQLiteStore] = Deferred()
        if self._outcome is None:
            self._waiting.append(d)
        else:
            self._fire(d)
        return d

    @classmethod
    def open(cls, path: str, reactor: Any = None, clock: Any = None, **kwargs: Any) -> "Deferred[SQLiteStore]":
        """
        Open (creating or migrating as needed) the store at C{path}.
        """
        return cls(path, reactor, clock, **kwargs).ready

    def close(self) -> None:
        """
        Close the connection and stop the thread.  Work already queued
        finishes first (the pool joins its thread).
        """
        if not self._closed:
            self._closed = True
            self._pool.close()

    def start_purging(
        self, clock: Optional[IReactorTime] = None, interval: float = DEFAULT_PURGE_INTERVAL
    ) -> LoopingCall:
        """
        Purge expired rows now and every C{interval} seconds: see
        L{smeldr_oauth.store.purge.start_purging}.
        """
        clock = clock if clock is not None else self._clock
        if clock is None:
            raise ValueError("start_purging needs a clock")
        return start_purging(self, clock, interval)

    def _write(self, interaction: Callable[..., T], *args: Any) -> "Deferred[T]":
        return self._pool.runInteraction(_immediate, interaction, *args)

    def _read(self, interaction: Callable[..., T], *args: Any) -> "Deferred[T]":
        return self._pool.runInteraction(_snapshot, interaction, *args)

    # Clients

    def save_client(self, client: Client) -> "Deferred[None]":
        def save(txn: Any) -> None:
            txn.execute(
                "INSERT INTO clients (client_id, client_name, redirect_uris,"
                " token_endpoint_auth_method, grant_types, scope, kind,"
                " client_secret_hash, created_at, client_uri, logo_uri)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    client.client_id,
                    client.client_name,
                    _dump(client.redirect_uris),
                    client.token_endpoint_auth_method,
                    _dump(client.grant_types),
                    client.scope,
                    client.kind,
                    client.client_secret_hash,
                    client.created_at,
                    client.client_uri,
                    client.logo_uri,
                ),
            )

        return self._write(save)

    def get_client(self, client_id: str) -> "Deferred[Optional[Client]]":
        def get(txn: Any) -> Optional[Client]:
            txn.execute("SELECT * FROM clients WHERE client_id = ?", (client_id,))
            row = txn.fetchone()
            return None if row is None else _client(row)

        return self._read(get)

    def count_clients(self) -> "Deferred[int]":
        def count(txn: Any) -> int:
            txn.execute("SELECT COUNT(*) FROM clients")
            return int(txn.fetchone()[0])

        return self._read(count)

    # Grants and codes

    def create_grant(self, grant: Grant, code: AuthorizationCode) -> "Deferred[None]":
        def create(txn: Any) -> None:
            if code.grant_id != grant.grant_id:
                raise ValueError("the code does not belong to the grant")
            _insert_grant(txn, grant)
            txn.execute(
                "INSERT INTO codes (code_hash, grant_id, client_id, redirect_uri,"
                " code_challenge, scopes, resource, expires_at, issue_refresh)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    code.code_hash,
                    grant.grant_id,
                    code.client_id,
                    code.redirect_uri,
                    code.code_challenge,
                    _dump(code.scopes),
                    code.resource,
                    code.expires_at,
                    int(code.issue_refresh),
                ),
            )

        return self._write(create)

    def consume_code(self, code_hash: str, now: float) -> "Deferred[CodeRedemption]":
        """
        Spend a code with one conditional C{UPDATE} whose row count says
        whether this call was the one that spent it: two concurrent
        exchanges cannot both see it fresh.  Statuses, checked in order:
        C{"unknown"}; C{"replayed"} (spent before: the grant is revoked
        now, whether or not the code has expired since); C{"revoked"} (the
        grant ended before the exchange, e.g. the user revoked it); C{"expired"};
        C{"ok"}.
        """

        def consume(txn: Any) -> CodeRedemption:
            txn.execute(
                "UPDATE codes SET used_at = ? WHERE code_hash = ? AND used_at IS NULL",
                (now, code_hash),
            )
            spent_now = txn.rowcount == 1
            txn.execute("SELECT * FROM codes WHERE code_hash = ?", (code_hash,))
            row = txn.fetchone()
            if row is None:
                return CodeRedemption(status="unknown")
            code = _code(row)
            if not spent_now:
                _revoke_grant(txn, code.grant_id, now)
                return CodeRedemption(
                    status="replayed", code=code, grant=_get_grant(txn, code.grant_id)
                )
            grant = _get_grant(txn, code.grant_id)
            if grant is None or grant.revoked_at is not None:
                return CodeRedemption(status="revoked", code=code, grant=grant)
            if now >= code.expires_at:
                return CodeRedemption(status="expired", code=code, grant=grant)
            return CodeRedemption(status="ok", code=code, grant=grant)

        return self._write(consume)

    def add_tokens(
        self, grant_id: str, access: AccessToken, refresh: Optional[RefreshToken]
    ) -> "Deferred[None]":
        """
        Store the tokens of a code exchange under C{grant_id} (the records'
        own C{grant_id} is ignored).  Fails with L{StoreConflict} if the
        grant does not exist or a hash is already stored.
        """

        def add(txn: Any) -> None:
            _insert_access(txn, access, grant_id, access.scopes, access.resource)
            if refresh is not None:
                _insert_refresh(txn, refresh, grant_id, refresh.scopes, refresh.generation)

        return self._write(add)

    def redeem_refresh_token(
        self,
        token_hash: str,
        now: float,
        grace: float,
        requested_scopes: Optional[tuple[str, ...]],
        new_access: AccessToken,
        new_refresh: RefreshToken,
    ) -> "Deferred[RefreshRedemption]":
        """
        Load the token, its grant and the grant's live generation, let
        L{rotation.decide} rule, and apply the ruling, all in one
        transaction.  The new access token takes the decided scopes and the
        grant's resource (a refresh cannot change the audience); the new
        refresh token the grant's scopes and the decided generation; both
        keep the caller's hashes and expiry times.  A successful refresh
        also sets the grant's C{last_used_at}.
        """

        def redeem(txn: Any) -> RefreshRedemption:
            txn.execute("SELECT * FROM refresh_tokens WHERE token_hash = ?", (token_hash,))
            row = txn.fetchone()
            token = None if row is None else _refresh(row)
            grant = None if token is None else _get_grant(txn, token.grant_id)
            live_generation = live_siblings = 0
            if token is not None:
                txn.execute(
                    "SELECT generation, COUNT(*) FROM refresh_tokens WHERE grant_id = ?"
                    " GROUP BY generation ORDER BY generation DESC LIMIT 1",
                    (token.grant_id,),
                )
                live_generation, live_siblings = txn.fetchone()
            decision = rotation.decide(
                token=token,
                token_revoked=row is not None and row["revoked_at"] is not None,
                token_revoked_at=None if row is None else row["revoked_at"],
                grant=grant,
                live_generation=live_generation,
                live_siblings=live_siblings,
                now=now,
                grace=grace,
                requested_scopes=requested_scopes,
            )
            if token is None or grant is None:
                return RefreshRedemption(status=decision.status)
            _apply(txn, decision, token, grant, now, new_access, new_refresh)
            return RefreshRedemption(status=decision.status, grant=_get_grant(txn, grant.grant_id))

        return self._write(redeem)

    def lookup_access_token(self, token_hash: str, now: float) -> "Deferred[Optional[AccessInfo]]":
        def lookup(txn: Any) -> Optional[AccessInfo]:
            txn.execute(
                "SELECT a.scopes, a.resource, a.grant_id, a.expires_at,"
                " g.subject, g.client_id"
                " FROM access_tokens a JOIN grants g ON g.grant_id = a.grant_id"
                " WHERE a.token_hash = ? AND a.revoked_at IS NULL"
                " AND g.revoked_at IS NULL AND a.expires_at > ?",
                (token_hash, now),
            )
            row = txn.fetchone()
            if row is None:
                return None
            return AccessInfo(
                subject=row["subject"],
                client_id=row["client_id"],
                scopes=frozenset(_load(row["scopes"])),
                resource=row["resource"],
                grant_id=row["grant_id"],
                expires_at=row["expires_at"],
            )

        return self._read(lookup)

    def revoke_token(
        self, token_hash: str, now: float, client_id: Optional[str] = None
    ) -> "Deferred[Optional[str]]":
        """
        Revoke an access token (just it) or a refresh token (its whole
        grant); with C{client_id}, only if the token's grant belongs to that
        client.  Returns the grant id when a grant ended.
        """

        def owned(txn: Any, grant_id: str) -> bool:
            if client_id is None:
                return True
            txn.execute("SELECT client_id FROM grants WHERE grant_id = ?", (grant_id,))
            row = txn.fetchone()
            return row is not None and row["client_id"] == client_id

        def revoke(txn: Any) -> Optional[str]:
            txn.execute("SELECT grant_id FROM access_tokens WHERE token_hash = ?", (token_hash,))
            row = txn.fetchone()
            if row is not None:
                if owned(txn, row["grant_id"]):
                    txn.execute(
                        "UPDATE access_tokens SET revoked_at = ?"
                        " WHERE token_hash = ? AND revoked_at IS NULL",
                        (now, token_hash),
                    )
                return None
            txn.execute("SELECT grant_id FROM refresh_tokens WHERE token_hash = ?", (token_hash,))
            row = txn.fetchone()
            if row is not None and owned(txn, row["grant_id"]) and _revoke_grant(txn, row["grant_id"], now):
                return str(row["grant_id"])
            return None

        return self._write(revoke)

    def revoke_grant(self, grant_id: str, now: float) -> "Deferred[bool]":
        return self._write(_revoke_grant, grant_id, now)

    def revoke_grants_of_site_token(self, site_token_id: str, now: float) -> "Deferred[list[str]]":
        def revoke(txn: Any) -> list[str]:
            txn.execute(
                "SELECT grant_id FROM grants WHERE site_token_id = ? AND revoked_at IS NULL"
                " ORDER BY created_at, grant_id",
                (site_token_id,),
            )
            ended = [str(row["grant_id"]) for row in txn.fetchall()]
            for grant_id in ended:
                _revoke_grant(txn, grant_id, now)
            return ended

        return self._write(revoke)

    def list_grants(
        self, subject: Optional[str] = None, site_token_id: Optional[str] = None
    ) -> "Deferred[list[Grant]]":
        def list_(txn: Any) -> list[Grant]:
            where = ["revoked_at IS NULL"]
            params: list[str] = []
            if subject is not None:
                where.append("subject = ?")
                params.append(subject)
            if site_token_id is not None:
                where.append("site_token_id = ?")
                params.append(site_token_id)
            txn.execute(
                "SELECT * FROM grants WHERE " + " AND ".join(where) + " ORDER BY created_at, grant_id",
                params,
            )
            return [_grant(row) for row in txn.fetchall()]

        return self._read(list_)

    def data_version(self) -> "Deferred[int]":
        """
        SQLite's C{PRAGMA data_version} on the store's connection: it
        changes when I{another} connection (another process, such as
        C{smeldr-oauth-admin}) commits to the file, and only then.  Polling
        it is how a running server learns of revocations made elsewhere.
        """

        def version(connection: Any) -> int:
            return int(connection.execute("PRAGMA data_version").fetchone()[0])

        return self._pool.runWithConnection(version)

    def touch_grant(self, grant_id: str, now: float) -> "Deferred[None]":
        def touch(txn: Any) -> None:
            txn.execute("UPDATE grants SET last_used_at = ? WHERE grant_id = ?", (now, grant_id))

        return self._write(touch)

    def purge_expired(self, now: float) -> "Deferred[int]":
        """
        Delete expired codes, access tokens and refresh tokens; then grants
        revoked more than C{grant_retention} seconds ago, and live grants
        that have no code or token left and no activity (creation, last use)
        for that long, with whatever still hangs from them.  Spent refresh
        tokens stay until they expire: they are what reuse detection reads.

        The work is done in transactions of at most L{PURGE_BATCH} rows,
        with a turn of the reactor between them, so that a large backlog
        does not stall the server when the database runs on the reactor
        thread (C{--db-threads 0}).
        """
        return Deferred.fromCoroutine(self._purge(now))

    async def _purge(self, now: float) -> int:
        cutoff = now - self._grant_retention
        removed = 0
        for table in ("codes", "access_tokens", "refresh_tokens"):
            while True:
                count = await self._write(_purge_expired_rows, table, now, PURGE_BATCH)
                removed += count
                if count < PURGE_BATCH:
                    break
                await self._yield()
        while True:
            count, grants = await self._write(_purge_dead_grants, cutoff, PURGE_BATCH)
            removed += count
            if grants < PURGE_BATCH:
                break
            await self._yield()
        while True:
            count = await self._write(_purge_idle_clients, now - self._client_retention, PURGE_BATCH)
            removed += count
            if count < PURGE_BATCH:
                break
            await self._yield()
        return removed

    def _yield(self) -> "Deferred[None]":
        if self._clock is None:
            return succeed(None)
        return deferLater(self._clock, 0, lambda: None)


#: Rows (or grants) removed per purge transaction.
PURGE_BATCH = 1000


def _purge_expired_rows(txn: Any, table: str, now: float, limit: int) -> int:
    assert table in ("codes", "access_tokens", "refresh_tokens")
    txn.execute(
        f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE expires_at <= ? LIMIT ?)",
        (now, limit),
    )
    return int(txn.rowcount)


def _purge_idle_clients(txn: Any, cutoff: float, limit: int) -> int:
    """
    Delete up to C{limit} clients created at or before C{cutoff} that no
    grant refers to.  (C{NOT IN} over a subquery: SQLite builds it once per
    statement, so no index on C{grants.client_id} is needed.)
    """
    txn.execute(
        "DELETE FROM clients WHERE rowid IN (SELECT rowid FROM clients"
        " WHERE created_at <= ? AND client_id NOT IN (SELECT client_id FROM grants) LIMIT ?)",
        (cutoff, limit),
    )
    return int(txn.rowcount)


def _purge_dead_grants(txn: Any, cutoff: float, limit: int) -> tuple[int, int]:
    txn.execute(
        "SELECT grant_id FROM grants g WHERE"
        " (revoked_at IS NOT NULL AND revoked_at <= ?)"
        " OR (revoked_at IS NULL"
        "  AND MAX(created_at, COALESCE(last_used_at, created_at)) <= ?"
        "  AND NOT EXISTS (SELECT 1 FROM codes c WHERE c.grant_id = g.grant_id)"
        "  AND NOT EXISTS (SELECT 1 FROM access_tokens a WHERE a.grant_id = g.grant_id)"
        "  AND NOT EXISTS (SELECT 1 FROM refresh_tokens r WHERE r.grant_id = g.grant_id))"
        " LIMIT ?",
        (cutoff, cutoff, limit),
    )
    grants = txn.fetchall()
    removed = 0
    for (grant_id,) in grants:
        for table in ("codes", "access_tokens", "refresh_tokens", "grants"):
            txn.execute(f"DELETE FROM {table} WHERE grant_id = ?", (grant_id,))
            removed += txn.rowcount
    return removed, len(grants)


def _apply(
    txn: Any,
    decision: rotation.RotationDecision,
    token: RefreshToken,
    grant: Grant,
    now: float,
    new_access: AccessToken,
    new_refresh: RefreshToken,
) -> None:
    """
    Carry out a L{rotation.RotationDecision} inside the current transaction.
    """
    if decision.revoke_grant:
        _revoke_grant(txn, grant.grant_id, now)
    if decision.mark_used:
        txn.execute(
            "UPDATE refresh_tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL",
            (now, token.token_hash),
        )
        if txn.rowcount != 1:
            # Impossible under BEGIN IMMEDIATE; refuse rather than fork the chain.
            raise RuntimeError("refresh token spent concurrently")
    if decision.revoke_unused_siblings:
        txn.execute(
            "UPDATE refresh_tokens SET revoked_at = ?"
            " WHERE grant_id = ? AND generation = ? AND token_hash != ?"
            " AND used_at IS NULL AND revoked_at IS NULL",
            (now, grant.grant_id, token.generation, token.token_hash),
        )
    if decision.new_generation is not None:
        _insert_access(txn, new_access, grant.grant_id, decision.access_scopes, grant.resource)
        _insert_refresh(
            txn, new_refresh, grant.grant_id, decision.refresh_scopes, decision.new_generation
        )
        txn.execute("UPDATE grants SET last_used_at = ? WHERE grant_id = ?", (now, grant.grant_id))
