"""
Tests for L{smeldr_oauth.store.sqlite} and L{smeldr_oauth.store.sql} on
SQLite.

Most tests run real SQLite inside a L{SynchronousTestCase}: the store's
connection pool gets a thread-less thread pool and a reactor whose
C{callFromThread} calls at once (the trick of synapse's C{tests/server.py}),
so every Deferred has fired by the time the call returns.  One
L{TestCase} runs the store on real threads against the real reactor.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Callable, Optional

import attr
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.db import open_database
from smeldr_oauth.db.database import NoThreads
from smeldr_oauth.db.errors import SchemaTooNew, StoreConflict
from smeldr_oauth.db.migrations import Migration, Schema
from smeldr_oauth.store import refresh_facts
from smeldr_oauth.store import sql as sql_module
from smeldr_oauth.store.hashkeys import key_for
from smeldr_oauth.store.schema import OAUTH_SCHEMA
from smeldr_oauth.store.transactions import _insert_grant
from smeldr_oauth.store.sqlite import SQLiteStore
from tests.test_store_memory import (
    ACCESS_TTL,
    T0,
    StoreBehaviourMixin,
    access,
    h,
    make_code,
    make_grant,
    refresh,
)


class InlineReactor(Clock):
    """
    Just enough reactor for an adbapi pool whose work runs inline:
    C{callFromThread} calls at once, and the pool starts at once.
    """

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def callWhenRunning(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def addSystemEventTrigger(self, *args: Any, **kwargs: Any) -> object:
        return object()

    def removeSystemEventTrigger(self, triggerID: object) -> None:
        pass


#: A thread pool without threads: work runs on the caller's thread, but
#: through the thread-pool path (C{callInThreadWithCallback}, then the
#: reactor's C{callFromThread}) that C{threads=1} takes, which the
#: production C{threads=0} mode skips.
InlineThreadPool = NoThreads


def inline_store(testcase: SynchronousTestCase, path: str, **kwargs: Any) -> SQLiteStore:
    """
    A migrated L{SQLiteStore} at C{path} whose Deferreds fire synchronously.
    """
    store = SQLiteStore(path, InlineReactor(), threadpool=InlineThreadPool(), **kwargs)
    testcase.addCleanup(store.close)
    testcase.assertIs(testcase.successResultOf(store.ready), store)
    return store


class SQLiteStoreBehaviourTests(StoreBehaviourMixin, SynchronousTestCase):
    """
    The shared store contract, on a real SQLite file.
    """

    def make_store(self) -> SQLiteStore:
        return inline_store(self, self.mktemp() + ".db")


#: The OAuth schema before migration 4 (access tokens with the index on
#: grant_id and the foreign key to grants).
OAUTH_SCHEMA_3 = attr.evolve(OAUTH_SCHEMA, migrations=OAUTH_SCHEMA.migrations[:3])


class AccessTokensMigrationMixin:
    """
    Migration 4 (access tokens without their index on C{grant_id} and
    their foreign key) on a database made by migration 3: every token is
    kept, and each is as live, revoked or expired as before.
    """

    def open_store(self, schema: Schema) -> Any:
        """A store on this test's database (the same one each call)."""
        raise NotImplementedError()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """The rows of C{sql} through a connection of the test's own."""
        raise NotImplementedError()

    def grant_id_index_and_key(self) -> tuple[set[str], int]:
        """The indexes of C{access_tokens}, and its number of foreign keys."""
        raise NotImplementedError()

    assertEqual: Callable[..., None]
    assertIsNotNone: Callable[..., None]
    assertIsNone: Callable[..., None]
    assertTrue: Callable[..., None]

    def test_migration_4_keeps_tokens(self) -> None:
        ok: Callable[[Any], Any] = self.successResultOf  # type: ignore[attr-defined]
        store = self.open_store(OAUTH_SCHEMA_3)
        self.assertEqual(self.grant_id_index_and_key(), ({"access_tokens_grant_id", "access_tokens_expires_at"}, 1))
        # g1 live, g2's access token revoked, g3's grant revoked, g4's
        # access token expired.
        for grant_id in ("g1", "g2", "g3", "g4"):
            now = T0 - ACCESS_TTL if grant_id == "g4" else T0
            ok(store.create_grant(make_grant(grant_id, created_at=now), make_code(grant_id + "-code", grant_id, now)))
            ok(store.add_tokens(grant_id, access(grant_id + "-a0", now), refresh(grant_id + "-r0", now)))
        ok(store.revoke_token(h("g2-a0"), T0 + 1))
        ok(store.revoke_grant("g3", T0 + 1))
        names = ["g1-a0", "g2-a0", "g3-a0", "g4-a0"]

        def answers(store: Any) -> list[Any]:
            return [ok(store.lookup_access_token(h(name), T0 + 2)) for name in names]

        before = answers(store)
        self.assertEqual([answer is not None for answer in before], [True, False, False, False])
        rows = self.query("SELECT * FROM access_tokens ORDER BY token_hash")
        store.close()
        store = self.open_store(OAUTH_SCHEMA)
        self.assertEqual(self.query("SELECT * FROM access_tokens ORDER BY token_hash"), rows)
        self.assertEqual(answers(store), before)
        self.assertEqual(self.grant_id_index_and_key(), ({"access_tokens_expires_at"}, 0))
        # The migrated tables work as before: the live chain rotates and the
        # new access token is looked up through its grant.
        self.assertEqual(
            ok(store.redeem_refresh_token(h("g1-r0"), T0 + 3, 10.0, None, access("n-a", T0 + 3), refresh("n", T0 + 3))).status,
            "rotated",
        )
        self.assertIsNotNone(ok(store.lookup_access_token(h("n-a"), T0 + 4)))
        self.assertTrue(ok(store.revoke_grant("g1", T0 + 5)))
        self.assertIsNone(ok(store.lookup_access_token(h("n-a"), T0 + 6)))


class SQLiteAccessTokensMigrationTests(AccessTokensMigrationMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp() + ".db"

    def open_store(self, schema: Schema) -> Any:
        return inline_store(self, self.path, schema=schema)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        connection = raw(self.path)
        try:
            return connection.execute(sql).fetchall()
        finally:
            connection.close()

    def grant_id_index_and_key(self) -> tuple[set[str], int]:
        indexes = self.query(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'access_tokens'"
            " AND name NOT LIKE 'sqlite_autoindex_%'"
        )
        return {name for (name,) in indexes}, len(self.query("PRAGMA foreign_key_list(access_tokens)"))


#: The OAuth schema before migration 9 (hashes as hex text on SQLite).
OAUTH_SCHEMA_8 = attr.evolve(OAUTH_SCHEMA, migrations=OAUTH_SCHEMA.migrations[:8])

#: The hash-keyed tables and their key columns.
HASH_KEYED = (("codes", "code_hash"), ("access_tokens", "token_hash"), ("refresh_tokens", "token_hash"))


class HashKeysTests(SynchronousTestCase):
    """
    On SQLite the hashes of codes and tokens are stored as their 32 bytes
    (L{smeldr_oauth.store.hashkeys}, OAuth migration 9), and a file whose
    rows were written as hex by the releases before is converted: every
    code and token answers as it did.
    """

    def setUp(self) -> None:
        self.path = self.mktemp() + ".db"

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        connection = raw(self.path)
        try:
            return connection.execute(sql).fetchall()
        finally:
            connection.close()

    def stored(self) -> dict[str, list[tuple[Any, ...]]]:
        """Each hash-keyed table's keys: their type, length and hex (a text's own)."""
        value = "CASE typeof({0}) WHEN 'blob' THEN lower(hex({0})) ELSE {0} END"
        return {
            table: sorted(self.query(f"SELECT typeof({key}), length({key}), {value.format(key)} FROM {table}"))
            for table, key in HASH_KEYED
        }

    def test_blob_keys(self) -> None:
        """
        A new file stores a code's and its tokens' hashes as 32 bytes in
        C{BLOB} columns, and reads them back as the hex everything else has.
        """
        from smeldr_oauth.oauth.secrets import hash_secret, new_secrets

        store = inline_store(self, self.path)
        ok = self.successResultOf
        ok(store.create_grant(make_grant("g1"), make_code("c1", "g1")))
        ok(store.add_tokens("g1", access("a1"), refresh("r1")))
        # A stamped secret's hash (its time stamp, then its SHA-256): 38 bytes.
        stamped_access, stamped_refresh = (hash_secret(secret) for secret in new_secrets(2))
        ok(store.add_tokens("g1", attr.evolve(access("x"), token_hash=stamped_access), attr.evolve(refresh("x"), token_hash=stamped_refresh)))
        self.assertEqual(
            self.stored(),
            {
                "codes": [("blob", 32, h("c1"))],
                "access_tokens": sorted([("blob", 32, h("a1")), ("blob", 38, stamped_access)]),
                "refresh_tokens": sorted([("blob", 32, h("r1")), ("blob", 38, stamped_refresh)]),
            },
        )
        for table, key in HASH_KEYED:
            columns = {row[1]: row[2] for row in self.query(f"PRAGMA table_info({table})")}
            self.assertEqual(columns[key], "BLOB")
        self.assertEqual(ok(store.consume_code(h("c1"), T0 + 1)).code.code_hash, h("c1"))
        redemption = ok(store.redeem_refresh_token(h("r1"), T0 + 2, 10.0, None, access("a2"), refresh("r2")))
        self.assertEqual(redemption.status, "rotated")

    def scenario(self, store: Any) -> list[Any]:
        """
        Codes and tokens in every state, written at T0: g1 a live chain
        rotated once (g1-r0 spent) with an unused code, g2 its access
        token revoked, g3 revoked, g4 a spent code.
        """
        ok = self.successResultOf
        for grant_id in ("g1", "g2", "g3", "g4"):
            ok(store.create_grant(make_grant(grant_id), make_code(grant_id + "-code", grant_id)))
            ok(store.add_tokens(grant_id, access(grant_id + "-a0"), refresh(grant_id + "-r0")))
        outcomes = [
            ok(store.redeem_refresh_token(h("g1-r0"), T0 + 1, 10.0, None, access("g1-a1", T0 + 1), refresh("g1-r1", T0 + 1))).status,
            ok(store.revoke_token(h("g2-a0"), T0 + 1)),
            ok(store.revoke_grant("g3", T0 + 1)),
            ok(store.consume_code(h("g4-code"), T0 + 1)).status,
        ]
        return outcomes

    def answers(self, store: Any) -> list[Any]:
        """What each code and token answers after the scenario, in order."""
        ok = self.successResultOf
        looked = [ok(store.lookup_access_token(h(name), T0 + 100)) for name in ("g1-a0", "g1-a1", "g2-a0", "g3-a0", "g4-a0")]
        codes = [ok(store.consume_code(h(name), T0 + 30)).status for name in ("g1-code", "g4-code")]
        rotated = ok(store.redeem_refresh_token(h("g1-r1"), T0 + 200, 10.0, None, access("n-a", T0 + 200), refresh("n", T0 + 200)))
        fresh = ok(store.lookup_access_token(h("n-a"), T0 + 201))
        # g4-code's replay revoked g4; g2's chain is revoked by its refresh token.
        revoked = ok(store.revoke_token(h("g2-r0"), T0 + 202))
        # g1-r0, spent at T0 + 1, presented again: reuse, the grant ends.
        reused = ok(store.redeem_refresh_token(h("g1-r0"), T0 + 300, 10.0, None, access("x-a", T0 + 300), refresh("x", T0 + 300)))
        after = [ok(store.lookup_access_token(h(name), T0 + 301)) for name in ("g1-a1", "n-a")]
        return [looked, codes, rotated.status, fresh, revoked, reused.status, after]

    def test_migration_9_converts_hex_rows(self) -> None:
        """
        A file made before migration 9, its hashes written as hex text (the
        store of that release, here: the SQLite rule switched off), is
        converted, each value to its bytes, and every code and token
        answers as on a file made now.
        """
        from smeldr_oauth.store import hashkeys, transactions

        hex_keys = hashkeys.key_for("postgresql")
        original = transactions.key_for
        transactions.key_for = lambda name: hex_keys
        try:
            store = inline_store(self, self.path, schema=OAUTH_SCHEMA_8)
            outcomes = self.scenario(store)
            store.close()
        finally:
            transactions.key_for = original
        before = self.stored()
        self.assertEqual({kind for rows in before.values() for kind, _, _ in rows}, {"text"})
        store = inline_store(self, self.path)
        after = self.stored()
        self.assertEqual(
            {table: [("blob", 32, value) for _, _, value in rows] for table, rows in before.items()}, after
        )
        answers = self.answers(store)
        store.close()
        # The same scenario on a file made now.
        self.path = self.mktemp() + ".db"
        control = inline_store(self, self.path)
        self.assertEqual(self.scenario(control), outcomes)
        self.assertEqual(self.answers(control), answers)
        self.assertEqual(outcomes, ["rotated", None, True, "ok"])
        self.assertEqual(
            [[info is not None for info in answers[0]], answers[1], answers[2], answers[3] is not None, answers[4], answers[5]],
            [[True, True, False, False, True], ["ok", "replayed"], "rotated", True, "g2", "reused"],
        )
        self.assertEqual(answers[6], [None, None])

    def test_migration_9_leaves_other_text(self) -> None:
        """
        A key that is not a hash's hex (none was ever written but by hand)
        is left as it is by the migration, not made C{NULL} or dropped.
        """
        store = inline_store(self, self.path, schema=OAUTH_SCHEMA_8)
        self.successResultOf(store.create_grant(make_grant("g1"), make_code("c1", "g1")))
        store.close()
        connection = raw(self.path)
        connection.execute("UPDATE codes SET code_hash = 'by-hand'")
        connection.close()
        inline_store(self, self.path).close()
        self.assertEqual(self.query("SELECT typeof(code_hash), code_hash FROM codes"), [("text", "by-hand")])


class NoCallFromThreadReactor(InlineReactor):
    """
    A reactor that fails the test if anything hands a result back through
    C{callFromThread}: with C{threads=0} nothing should.
    """

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        raise AssertionError("callFromThread used on the reactor thread")


class ReactorThreadBehaviourTests(StoreBehaviourMixin, SynchronousTestCase):
    """
    The shared store contract with C{--db-threads 0}: no thread, no
    C{callFromThread}.
    """

    def make_store(self) -> SQLiteStore:
        store = SQLiteStore(self.mktemp() + ".db", NoCallFromThreadReactor(), threads=0)
        self.addCleanup(store.close)
        self.assertIs(self.successResultOf(store.ready), store)
        self.assertTrue(store.database.inline)
        return store

    def test_rollback_on_error(self) -> None:
        """
        An interaction that raises still rolls back, and the failure reaches
        the caller's Deferred.
        """
        store = self.make_store()

        def half(txn: Any) -> None:
            _insert_grant(txn, make_grant())
            raise ValueError("stop")

        self.failureResultOf(store._write(half), ValueError)
        self.assertEqual(self.successResultOf(store.list_grants()), [])


class MemoryDatabaseTests(StoreBehaviourMixin, SynchronousTestCase):
    """
    The shared store contract, on C{":memory:"} (the pool's single
    connection keeps it alive).
    """

    def make_store(self) -> SQLiteStore:
        return inline_store(self, ":memory:")


def raw(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None)
    return connection


#: The OAuth schema as the first releases created it, with their own
#: version table: what an existing oauth.db looks like.
LEGACY_SCRIPT = """
CREATE TABLE schema_version (lock INTEGER PRIMARY KEY CHECK (lock = 0), version INTEGER NOT NULL);
INSERT INTO schema_version (lock, version) VALUES (0, 1);
""" + "".join(statement + ";\n" for statement in OAUTH_SCHEMA.migrations[0].statements).replace(
    "DOUBLE PRECISION", "REAL"
)


def _outcome(d: "Deferred[Any]") -> Any:
    """A fired store call's outcome as the group-commit tests compare it."""
    box: list[Any] = []
    d.addBoth(box.append)
    if isinstance(box[0], Failure):
        return box[0].type
    if box[0] is None:
        return None
    return (box[0].status, box[0].grant)


def _refresh_scenario(
    store: Any, finish: Callable[[], None], settle: Callable[[], None] = lambda: None
) -> tuple[list[Any], list[Any]]:
    """
    Set up two grants (then C{settle()}: a grouped consent commits at the
    end of its turn), then make seven refreshes at once: a rotation, a
    replay of the token it just spent (grace), a rotation of the new
    token, an unknown token, one whose new access token's hash is already
    stored (a conflict: it fails), the same token again (rotated: the
    failure left nothing behind), and the first token once more after its
    successor rotated (reuse: the grant is revoked).  Then C{finish()};
    the outcomes, and every row of the tokens and grants tables.
    """
    from smeldr_oauth.store.sql import SQLStore

    assert isinstance(store, SQLStore)
    for grant in ("g1", "g2"):
        store.create_grant(make_grant(grant), make_code(f"{grant}-code", grant_id=grant))
    settle()
    for grant in ("g1", "g2"):
        store.add_tokens(grant, access(f"{grant}-a0"), refresh(f"{grant}-r0"))

    def redeem(presented: str, new: str, new_access: str, now: float) -> Any:
        return store.redeem_refresh_token(
            h(presented), now, 10.0, None, access(new_access, now), refresh(new, now)
        )

    calls = [
        redeem("g1-r0", "r1", "a1", T0 + 100),
        redeem("g1-r0", "r1b", "a1b", T0 + 101),
        redeem("r1", "r2", "a2", T0 + 102),
        redeem("unknown", "x", "ax", T0 + 103),
        redeem("g2-r0", "s1", "a1", T0 + 104),
        redeem("g2-r0", "s1", "s1-a", T0 + 105),
        redeem("g1-r0", "r9", "a9", T0 + 106),
    ]
    finish()
    outcomes = [_outcome(d) for d in calls]

    def dump(txn: Any) -> list[Any]:
        return [
            tuple(row)
            for table in ("grants", "access_tokens", "refresh_tokens")
            for row in txn.execute(f"SELECT * FROM {table} ORDER BY 1")
        ]

    rows: list[Any] = []
    store.database.read(OAUTH_SCHEMA, dump).addCallback(rows.extend)
    return outcomes, rows


def _flow_scenario(
    store: Any, finish: Callable[[], None], settle: Callable[[], None] = lambda: None
) -> tuple[list[Any], list[Any]]:
    """
    Consent to four grants (then C{settle()}), then make, at once, two
    more consents and eight code exchanges: a fresh code, the same code
    again (a replay: its grant is revoked), an unknown code, a code whose
    check refuses it (spent all the same), one whose access token's hash
    is already stored (a conflict: nothing of it kept), the same code
    again (exchanged: the failure left it unspent), an expired code; a new
    grant, the same grant again (a conflict), and the new grant's code.
    Then C{finish()}; the outcomes, and every row of the grants, codes and
    tokens tables.
    """
    from smeldr_oauth.store.sql import SQLStore

    assert isinstance(store, SQLStore)
    for grant in ("g1", "g2", "g3", "g4"):
        store.create_grant(make_grant(grant), make_code(f"{grant}-code", grant_id=grant))
    settle()

    def accept(code: Any) -> None:
        pass

    def refuse(code: Any) -> None:
        raise ValueError("PKCE verifier does not match")

    def exchange(code: str, token: str, now: float = T0 + 1, check: Callable[[Any], None] = accept) -> Any:
        return store.exchange_code(h(code), now, check, access(token, now), refresh(f"{token}-r", now))

    calls = [
        exchange("g1-code", "a1"),
        exchange("g1-code", "a1b"),
        exchange("unknown", "ax"),
        exchange("g2-code", "a2", check=refuse),
        exchange("g3-code", "a1"),
        exchange("g3-code", "a3"),
        exchange("g4-code", "a4", now=T0 + 3600),
        store.create_grant(make_grant("g5"), make_code("g5-code", grant_id="g5")),
        store.create_grant(make_grant("g5"), make_code("g5-other", grant_id="g5")),
        exchange("g5-code", "a5"),
    ]
    finish()
    outcomes = [_outcome(d) for d in calls]

    def dump(txn: Any) -> list[Any]:
        return [
            tuple(row)
            for table in ("grants", "codes", "access_tokens", "refresh_tokens")
            for row in txn.execute(f"SELECT * FROM {table} ORDER BY 1")
        ]

    rows: list[Any] = []
    store.database.read(OAUTH_SCHEMA, dump).addCallback(rows.extend)
    return outcomes, rows


class GroupCommitTests(SynchronousTestCase):
    """
    Refreshes made in one reactor turn share one transaction (group
    commit), each outcome exactly what it is alone.
    """

    def store(self, reactor: Optional[InlineReactor] = None, **options: Any) -> "sql_module.SQLStore":
        """A store on a new SQLite file, closed at the test's end."""
        database = open_database(self.mktemp() + ".db", reactor or InlineReactor(), threads=0, **options)
        store = sql_module.SQLStore(database)
        self.addCleanup(store.close)
        return store

    def grouped(self) -> "tuple[InlineReactor, sql_module.SQLStore, list[None]]":
        """
        A store with group commit, its reactor (a turn ends at
        C{advance(0)}), and a list that grows by one at each transaction
        begun.
        """
        reactor = InlineReactor()
        store = self.store(reactor, group_commit=True)
        begins: list[None] = []
        begin = store.database.engine.begin
        self.patch(store.database.engine, "begin", lambda txn: (begins.append(None), begin(txn)))
        return reactor, store, begins

    def test_as_alone(self) -> None:
        expected = _refresh_scenario(self.store(), lambda: None)
        reactor, grouped, begins = self.grouped()

        def finish() -> None:
            before = len(begins)
            reactor.advance(0)
            # The seven refreshes in one transaction, without a savepoint
            # each: the conflict abandons it, and each runs again alone.
            self.assertEqual(len(begins), before + 1 + 7)

        got = _refresh_scenario(grouped, finish, lambda: reactor.advance(0))
        self.assertEqual(
            [o if isinstance(o, type) else o[0] for o in expected[0]],
            ["rotated", "grace", "rotated", "unknown", StoreConflict, "rotated", "reused"],
        )
        self.assertEqual(got, expected)

    def test_refreshes_without_savepoints(self) -> None:
        """
        A turn's refreshes run one after another in one transaction without
        a savepoint each (they are given a C{together}: an error abandons
        the batch instead, as L{test_as_alone} shows), and rotate as alone.
        """
        reactor, store, begins = self.grouped()
        statements: list[str] = []
        for grant in ("g1", "g2"):
            store.create_grant(make_grant(grant), make_code(f"{grant}-code", grant_id=grant))
        reactor.advance(0)
        for grant in ("g1", "g2"):
            store.add_tokens(grant, access(f"{grant}-a0"), refresh(f"{grant}-r0"))
        reactor.advance(0)
        store.database.pool.connect().set_trace_callback(statements.append)
        before = len(begins)
        calls = [
            store.redeem_refresh_token(h(f"{grant}-r0"), T0 + 100, 10.0, None, access(f"{new}-a"), refresh(new))
            for grant, new in (("g1", "r1"), ("g2", "s1"), ("g1", "r1b"))
        ]
        reactor.advance(0)
        self.assertEqual([self.successResultOf(d).status for d in calls], ["rotated", "rotated", "grace"])
        self.assertEqual(len(begins), before + 1)
        self.assertEqual([s for s in statements if s.split()[0] in ("SAVEPOINT", "RELEASE", "ROLLBACK")], [])

    def facts(self, row_factory: Any = sqlite3.Row) -> "tuple[sqlite3.Connection, sql_module.SQLStore]":
        """
        A store with grant g1 and its first tokens, and a second connection
        to its file whose rows are made by C{row_factory}.
        """
        reactor, store, _ = self.grouped()
        store.create_grant(make_grant("g1"), make_code("g1-code", grant_id="g1"))
        reactor.advance(0)
        store.add_tokens("g1", access("g1-a0"), refresh("g1-r0"))
        reactor.advance(0)
        other = sqlite3.connect(store.database.engine.path)
        self.addCleanup(other.close)
        other.row_factory = row_factory
        return other, store

    def test_facts_read_by_position(self) -> None:
        """
        A refresh's facts, a C{sqlite3.Row}, are read by position: never by
        name (a C{sqlite3.Row} compares a name with every column's in
        turn), nor made a dict first (round nine's way, through C{keys}),
        and decided on as before.
        """
        from smeldr_oauth.store import transactions

        by_name: list[str] = []

        class Counting(sqlite3.Row):
            def __getitem__(self, key: Any) -> Any:
                if isinstance(key, str):
                    by_name.append(key)
                return super().__getitem__(key)

            def keys(self) -> list[str]:
                by_name.append("keys()")
                return super().keys()

        other, _ = self.facts(Counting)
        presented = bytes.fromhex(h("g1-r0"))
        row = other.execute(refresh_facts.REFRESH_FACTS, (presented, presented)).fetchone()
        decision, token, grant = transactions._decide(row, T0 + 100, 10.0, None)
        self.assertEqual(by_name, [])
        self.assertEqual((decision.status, token.token_hash, grant.grant_id), ("rotated", h("g1-r0"), "g1"))
        self.assertEqual(grant, make_grant("g1"))
        self.assertEqual(token, attr.evolve(refresh("g1-r0"), grant_id="g1"))

    def test_facts_columns(self) -> None:
        """
        The facts statement's columns are, in order, the ones L{_decide}
        reads by position, and by those names from PostgreSQL.
        """
        other, _ = self.facts()
        presented = bytes.fromhex(h("g1-r0"))
        cursor = other.execute(refresh_facts.REFRESH_FACTS, (presented, presented))
        self.assertEqual(tuple(d[0] for d in cursor.description), refresh_facts.FACTS_COLUMNS)
        self.assertEqual(
            dict(zip(refresh_facts.FACTS_COLUMNS, cursor.fetchone()))["live_generation"], refresh("g1-r0").generation
        )

    def test_facts_live_generation_not_materialised(self) -> None:
        """
        The live generation's subquery runs as a co-routine: it is not
        materialised into an ephemeral table at every refresh.
        """
        other, _ = self.facts()
        plan = [row[3] for row in other.execute("EXPLAIN QUERY PLAN " + refresh_facts.REFRESH_FACTS, ("x", "x"))]
        self.assertIn("CO-ROUTINE live", plan)
        self.assertEqual([step for step in plan if "MATERIALIZE" in step], [])
        opcodes = [row[1] for row in other.execute("EXPLAIN " + refresh_facts.REFRESH_FACTS, ("x", "x"))]
        self.assertNotIn("OpenEphemeral", opcodes)

    def test_consents_and_exchanges_as_alone(self) -> None:
        """
        Consents and code exchanges made in one reactor turn share one
        transaction too, each outcome (a replay's revocation, a refused
        check's spend, a conflict's rollback) exactly what it is alone.
        """
        expected = _flow_scenario(self.store(), lambda: None)
        reactor, grouped, begins = self.grouped()

        def settle() -> None:
            # The four consents: nothing committed (nothing answered)
            # before the turn ends, then one transaction.
            self.assertEqual(begins, [])
            reactor.advance(0)
            self.assertEqual(len(begins), 1)

        def finish() -> None:
            reactor.advance(0)
            # The ten calls in one transaction.
            self.assertEqual(len(begins), 2)

        got = _flow_scenario(grouped, finish, settle)
        self.assertEqual(
            [o if isinstance(o, type) or o is None else o[0] for o in expected[0]],
            [
                "ok",
                "replayed",
                "unknown",
                ValueError,
                StoreConflict,
                "ok",
                "expired",
                None,
                StoreConflict,
                "ok",
            ],
        )
        self.assertEqual(got, expected)


class TokenRowsTests(SynchronousTestCase):
    """
    The rows of new tokens, written out for speed, are the ones the
    generic L{to_row} makes: the same statement, the same values.
    """

    def test_access_row(self) -> None:
        from smeldr_oauth.db.rows import to_row
        from smeldr_oauth.store import transactions

        record = access("a1")
        self.assertEqual(
            transactions._access_row(record, "g1", ("b", "a"), "https://r", key_for("sqlite")),
            to_row(
                "access_tokens",
                record,
                token_hash=bytes.fromhex(record.token_hash),
                grant_id="g1",
                scopes='["b", "a"]',
                resource="https://r",
            ),
        )

    def test_refresh_row(self) -> None:
        from smeldr_oauth.db.rows import to_row
        from smeldr_oauth.store import transactions

        record = attr.evolve(refresh("r1"), used_at=T0 + 1)
        self.assertEqual(
            transactions._refresh_row(record, "g1", ["b", "a"], 7, key_for("postgresql")),
            to_row("refresh_tokens", record, grant_id="g1", scopes='["b", "a"]', generation=7, used_at=None),
        )


class SQLiteStoreTests(SynchronousTestCase):
    """
    What is particular to SQLite: files, pragmas, migrations, bytes at rest.
    """

    def setUp(self) -> None:
        self.path = self.mktemp() + ".db"

    def test_purge_in_batches(self) -> None:
        """
        A large backlog is purged in several transactions, with a turn of
        the reactor between them, so that the reactor thread is never held
        for the whole purge.
        """
        self.patch(sql_module, "PURGE_BATCH", 2)
        store = inline_store(self, self.path)
        for n in range(5):
            self.successResultOf(store.create_grant(make_grant(f"g{n}"), make_code(f"c{n}", f"g{n}")))
        d = store.purge_expired(T0 + 10_000)
        # A full batch of codes, then a yield to the reactor: nothing more
        # happens until the reactor turns.
        self.assertNoResult(d)
        store._clock.advance(0)  # type: ignore[attr-defined]
        self.assertEqual(self.successResultOf(d), 5)
        self.assertEqual(self.successResultOf(store.purge_expired(T0 + 10_000)), 0)

    def test_purge_clients_in_batches(self) -> None:
        """
        Idle registered clients are purged in batches too.
        """
        from smeldr_oauth.oauth.model import Client
        from smeldr_oauth.store.common import CLIENT_RETENTION

        self.patch(sql_module, "PURGE_BATCH", 2)
        store = inline_store(self, self.path)
        for n in range(5):
            client = Client(client_id=f"c{n}", client_name=None, redirect_uris=("https://a.example/cb",), created_at=T0)
            self.successResultOf(store.save_client(client))
        d = store.purge_expired(T0 + CLIENT_RETENTION)
        self.assertNoResult(d)
        store._clock.advance(0)  # type: ignore[attr-defined]
        store._clock.advance(0)  # type: ignore[attr-defined]
        self.assertEqual(self.successResultOf(d), 5)
        self.assertEqual(self.successResultOf(store.count_clients()), 0)

    def test_pragmas(self) -> None:
        store = inline_store(self, self.path)

        def pragmas(connection: Any) -> tuple[Any, ...]:
            return tuple(
                connection.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "foreign_keys", "synchronous", "busy_timeout")
            )

        self.assertEqual(
            self.successResultOf(store.database.with_connection(pragmas)), ("wal", 1, 1, 5000)
        )

    def test_reopen(self) -> None:
        """
        Reopening a file keeps its rows and reapplies no migration.
        """
        store = inline_store(self, self.path)
        self.successResultOf(store.create_grant(make_grant(), make_code("code")))
        store.close()
        store = inline_store(self, self.path)
        self.assertEqual(len(self.successResultOf(store.list_grants())), 1)
        self.assertEqual(self.successResultOf(store.consume_code(h("code"), T0)).status, "ok")
        store.close()
        connection = raw(self.path)
        self.addCleanup(connection.close)
        self.assertEqual(
            connection.execute("SELECT component, version FROM schema_migrations").fetchall(),
            [("oauth", version) for version in range(1, 14)],
        )

    def test_legacy_file_adopted(self) -> None:
        """
        A file made by the first releases (its version in
        C{schema_version}) joins the one migration scheme: its version is
        recorded as applied, nothing is run again, every row stays, and the
        old table goes.
        """
        connection = raw(self.path)
        connection.executescript(LEGACY_SCRIPT)
        connection.close()
        # A grant written the old way.
        connection = raw(self.path)
        _insert_grant(connection.cursor(), make_grant())  # type: ignore[arg-type]
        connection.close()
        store = inline_store(self, self.path)
        self.assertEqual([g.grant_id for g in self.successResultOf(store.list_grants())], ["g1"])
        store.close()
        connection = raw(self.path)
        self.addCleanup(connection.close)
        self.assertEqual(
            connection.execute("SELECT component, version FROM schema_migrations").fetchall(),
            [("oauth", version) for version in range(1, 14)],
        )
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        self.assertNotIn("schema_version", tables)

    def test_open(self) -> None:
        d = SQLiteStore.open(self.path, InlineReactor(), threadpool=InlineThreadPool())
        store = self.successResultOf(d)
        self.addCleanup(store.close)
        self.assertEqual(self.successResultOf(store.count_clients()), 0)

    def test_failed_migration_fails_ready(self) -> None:
        """
        A migration that fails leaves the file as it was, fails C{ready}
        (logged once), and the next call tries again.
        """
        broken = Schema(
            "oauth",
            OAUTH_SCHEMA.migrations + (Migration(OAUTH_SCHEMA.version + 1, ("INSERT INTO nowhere VALUES (1)",)),),
        )
        store = SQLiteStore(self.path, InlineReactor(), threadpool=InlineThreadPool(), schema=broken)
        self.addCleanup(store.close)
        self.failureResultOf(store.ready, sqlite3.OperationalError)
        self.failureResultOf(store.ready, sqlite3.OperationalError)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.failureResultOf(store.count_clients(), sqlite3.OperationalError)
        connection = raw(self.path)
        self.addCleanup(connection.close)
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        self.assertNotIn("grants", tables)

    def test_newer_database_refused(self) -> None:
        inline_store(self, self.path).close()
        store = SQLiteStore(
            self.path, InlineReactor(), threadpool=InlineThreadPool(), schema=Schema("oauth", ())
        )
        self.addCleanup(store.close)
        self.failureResultOf(store.ready, SchemaTooNew)
        self.flushLoggedErrors(SchemaTooNew)

    def test_ready_many_times(self) -> None:
        """
        Every access to C{ready} gets its own result, before and after the
        migrations ran.
        """
        threadpool = InlineThreadPool()
        calls: list[Any] = []
        original = threadpool.callInThreadWithCallback

        def later(*args: Any, **kwargs: Any) -> None:
            calls.append((args, kwargs))

        threadpool.callInThreadWithCallback = later  # type: ignore[method-assign]
        store = SQLiteStore(self.path, InlineReactor(), threadpool=threadpool)
        self.addCleanup(store.close)
        early = [store.ready, store.ready]
        for d in early:
            self.assertNoResult(d)
        [(args, kwargs)] = calls
        original(*args, **kwargs)
        for d in early + [store.ready]:
            self.assertIs(self.successResultOf(d), store)

    def test_close_twice(self) -> None:
        store = inline_store(self, self.path)
        store.close()
        store.close()

    def test_threads(self) -> None:
        """
        One writer: SQLite runs on the reactor thread or on one thread.
        """
        self.assertRaises(ValueError, SQLiteStore, self.path, InlineReactor(), threads=2)


class RealThreadTests(TestCase):
    """
    The store on the real reactor and real threads.
    """

    @inlineCallbacks
    def test_concurrent_code_exchange(self) -> Any:
        """
        Several exchanges of one code, through two stores (two connections,
        two threads) on one file, started at once: exactly one wins.
        """
        path = self.mktemp() + ".db"
        first = yield SQLiteStore.open(path, global_reactor)
        self.addCleanup(first.close)
        second = yield SQLiteStore.open(path, global_reactor)
        self.addCleanup(second.close)
        yield first.create_grant(make_grant(), make_code("code"))
        attempts = [
            store.consume_code(h("code"), T0 + 1) for _ in range(4) for store in (first, second)
        ]
        results = yield DeferredList(attempts, fireOnOneErrback=True, consumeErrors=True)
        statuses = sorted(result.status for _, result in results)
        self.assertEqual(statuses, ["ok"] + ["replayed"] * 7)
        grants = yield second.list_grants()
        self.assertEqual(grants, [])

    @inlineCallbacks
    def test_refresh_on_threads(self) -> Any:
        store = yield SQLiteStore.open(self.mktemp() + ".db", global_reactor)
        self.addCleanup(store.close)
        yield store.create_grant(make_grant(), make_code("code"))
        yield store.add_tokens("g1", access("a0"), refresh("r0"))
        result = yield store.redeem_refresh_token(
            h("r0"), T0 + 5, 10.0, None, access("a1", T0 + 5), refresh("r1", T0 + 5)
        )
        self.assertEqual(result.status, "rotated")
        info = yield store.lookup_access_token(h("a1"), T0 + 6)
        self.assertEqual(info.grant_id, "g1")


class ReactorThreadRealReactorTests(TestCase):
    """
    C{--db-threads 0} on the real reactor: every interaction runs on the
    reactor's thread and its Deferred has fired when the call returns.
    """

    def test_inline_on_reactor_thread(self) -> None:
        import threading

        store = SQLiteStore(self.mktemp() + ".db", global_reactor, threads=0)
        self.addCleanup(store.close)
        self.assertIs(self.successResultOf(store.ready), store)
        threads: list[int] = []

        def where(txn: Any) -> int:
            threads.append(threading.get_ident())
            return int(txn.execute("SELECT 1").fetchone()[0])

        self.assertEqual(self.successResultOf(store._read(where)), 1)
        self.successResultOf(store.create_grant(make_grant(), make_code("code")))
        self.assertEqual(self.successResultOf(store.consume_code(h("code"), T0 + 1)).status, "ok")
        self.assertEqual(threads, [threading.get_ident()])


class HashesOnlyTests(SynchronousTestCase):
    """
    Secrets at rest, stored through the real paths (the OAuth server's
    registration, consent, code exchange and refresh; the site token
    store), read back as the raw bytes of both files.
    """

    def test_hashes_only(self) -> None:
        from smeldr_oauth.oauth.secrets import hash_secret
        from tests.test_store_postgres import issue_secrets

        path = self.mktemp() + ".db"
        site_path = self.mktemp() + "-site.db"
        store = inline_store(self, path)
        secrets = issue_secrets(self, store, site_path)
        store.close()
        data = b""
        for base in (path, site_path):
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(base + suffix):
                    with open(base + suffix, "rb") as f:
                        data += f.read()
        for secret in secrets:
            self.assertNotIn(secret.encode("ascii"), data)
            # The site file has the hex; the OAuth file, since its
            # migration 9, the hash's bytes (smeldr_oauth.store.hashkeys).
            hashed = hash_secret(secret)
            self.assertTrue(hashed.encode("ascii") in data or bytes.fromhex(hashed) in data)
