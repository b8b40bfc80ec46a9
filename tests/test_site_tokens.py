"""
Tests for L{smeldr_oauth.site.tokens}, on a SQLite file; the same tests run
on PostgreSQL and on the reactor thread from C{tests.test_site_db}.
"""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase

from smeldr_oauth.oauth.model import Approval
from smeldr_oauth.oauth.secrets import hash_secret
from smeldr_oauth.site.posts import ValidationError
from smeldr_oauth.site.stores import open_site
from smeldr_oauth.site.tokens import SCHEMA, SiteToken, TokenNotFound


class SiteTokenStoreTests(TestCase):
    threads = 1

    def location(self) -> str:
        return self.mktemp()

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.clock = Clock()
        self.clock.advance(500)
        self.where = self.location()
        self.site = open_site(self.where, reactor, clock=self.clock, threads=self.threads)
        self.addCleanup(self.site.close)
        self.tokens = self.site.tokens

    def calls(self, method: str) -> list:
        """
        From now on, the names of the functions given to the database's
        C{method} (C{"read"} or C{"write"}), in order.
        """
        db = self.tokens._db
        real = getattr(db, method)
        names: list = []

        def counted(*args, **kw):
            names.append(args[1].__name__)
            return real(*args, **kw)

        self.patch(db, method, counted)
        return names

    def elsewhere(self):  # type: ignore[no-untyped-def]
        """
        The same database's stores through another connection, as another
        process (C{smeldr-oauth-admin}, a second server) has them.
        """
        from twisted.internet import reactor

        other = open_site(self.where, reactor, clock=self.clock, threads=1)
        self.addCleanup(other.close)
        return other

    @inlineCallbacks
    def test_create_stores_only_hash(self):
        token_id, plaintext = yield self.tokens.create("  alice  ")
        self.assertTrue(plaintext.startswith("smeldr_"))
        self.assertEqual(len(plaintext), len("smeldr_") + 43)
        rows = yield self.site.db.read(
            SCHEMA, lambda txn: [tuple(row) for row in txn.execute("SELECT * FROM site_tokens")]
        )
        self.assertEqual(len(rows), 1)
        self.assertNotIn(plaintext, repr(rows))
        self.assertIn(hash_secret(plaintext), rows[0])
        listed = yield self.tokens.list()
        self.assertEqual(listed, [SiteToken(id=token_id, name="alice", created_at=500)])

    @inlineCallbacks
    def test_tokens_differ(self):
        a = yield self.tokens.create("a")
        b = yield self.tokens.create("a")
        self.assertNotEqual(a[0], b[0])
        self.assertNotEqual(a[1], b[1])

    @inlineCallbacks
    def test_bad_names(self):
        for bad in ["", "   ", "a\nb", "x" * 101, None, "nul\x00"]:
            yield self.assertFailure(self.tokens.create(bad), ValidationError)

    @inlineCallbacks
    def test_verify(self):
        token_id, plaintext = yield self.tokens.create("alice")
        self.clock.advance(10)
        with capturedLogs() as events:
            approval = yield self.tokens.verify_bearer(plaintext)
        self.assertEqual(approval, Approval(subject="alice", site_token_id=token_id))
        self.assertNotIn(plaintext, repr(events))
        (record,) = yield self.tokens.list()
        self.assertEqual(record.last_used_at, 510)

    @inlineCallbacks
    def test_accepted_event_only_for_a_listener(self):
        """
        The debug event of an accepted paste is built only when an observer
        may keep it (L{smeldr_oauth.oauth.routine.RoutineEvents.quiet}): at
        the default level nobody does, and the consent form's
        C{grant_approved} records the acceptance anyway.  A refusal is
        logged either way.
        """
        from smeldr_oauth.site import tokens as module

        class Quiet:
            def __init__(self, answer):
                self.answer = answer
                self.asked = []

            def quiet(self, namespace):
                self.asked.append(namespace)
                return self.answer

        token_id, plaintext = yield self.tokens.create("alice")
        for answer, expected in ((True, []), (False, ["debug"])):
            quiet = Quiet(answer)
            self.patch(module, "routine", quiet)
            with capturedLogs() as events:
                approval = yield self.tokens.verify(plaintext)
                refused = yield self.tokens.verify(plaintext + "x")
            self.assertEqual(approval, Approval(subject="alice", site_token_id=token_id))
            self.assertIsNone(refused)
            accepted = [e["log_level"].name for e in events if "accepted" in e.get("log_format", "")]
            self.assertEqual(accepted, expected)
            self.assertEqual(quiet.asked, [module.log.namespace])
            self.assertEqual(len([e for e in events if "rejected" in e.get("log_format", "")]), 1)

    @inlineCallbacks
    def test_verify_records_use_once_a_minute(self):
        """
        C{last_used_at} is written at most once a minute per token: a
        paste checked within the minute is a read only (no write
        transaction), and acceptance is a debug event.
        """
        token_id, plaintext = yield self.tokens.create("alice")
        writes = self.calls("write")
        self.clock.advance(10)
        with capturedLogs() as events:
            approval = yield self.tokens.verify(plaintext)
        self.assertEqual(approval.site_token_id, token_id)
        self.assertEqual([e["log_level"].name for e in events if "accepted" in e.get("log_format", "")], ["debug"])
        self.assertEqual(writes, ["touch"])
        for step, recorded in ((30, 510), (29, 510), (1, 570), (59, 570), (1, 630)):
            self.clock.advance(step)
            approval = yield self.tokens.verify(plaintext)
            self.assertEqual(approval.site_token_id, token_id)
            (record,) = yield self.tokens.list()
            self.assertEqual(record.last_used_at, recorded, step)
        self.assertEqual(writes, ["touch"] * 3)
        # A clock that went back is no reason to skip the record.
        self.clock.advance(-100)
        yield self.tokens.verify(plaintext)
        (record,) = yield self.tokens.list()
        self.assertEqual(record.last_used_at, 530)

    @inlineCallbacks
    def test_verify_rejects(self):
        _, plaintext = yield self.tokens.create("alice")
        for bad in [
            plaintext[:-1],
            plaintext + "x",
            "x" + plaintext,
            plaintext[7:],
            "",
            "smeldr_" + "a" * 500,
            None,
            7,
        ]:
            result = yield self.tokens.verify(bad)
            self.assertIsNone(result, bad)
        (record,) = yield self.tokens.list()
        self.assertIsNone(record.last_used_at)

    @inlineCallbacks
    def test_revoke(self):
        token_id, plaintext = yield self.tokens.create("alice")
        other_id, other = yield self.tokens.create("bob")
        self.clock.advance(1)
        with capturedLogs() as events:
            changed = yield self.tokens.revoke(token_id)
            self.assertTrue(changed)
            result = yield self.tokens.verify(plaintext)
        self.assertIsNone(result)
        self.assertNotIn(plaintext, repr(events))
        changed = yield self.tokens.revoke(token_id)
        self.assertFalse(changed)
        approval = yield self.tokens.verify(other)
        self.assertEqual(approval.site_token_id, other_id)
        record = yield self.tokens.get(token_id)
        self.assertEqual(record.revoked_at, 501)
        self.assertFalse(record.active)
        yield self.assertFailure(self.tokens.revoke("nope"), TokenNotFound)


    @inlineCallbacks
    def test_kept_answer_reads_nothing(self):
        """
        Within the minute a live token's answer is kept: on SQLite with
        calls on the reactor thread a paste of it then reads no row (the
        change stamp, C{PRAGMA data_version}, is all it asks); elsewhere
        (a database thread, PostgreSQL) every paste reads.
        """
        token_id, plaintext = yield self.tokens.create("alice")
        other_id, other = yield self.tokens.create("bob")
        reads = self.calls("read")
        self.clock.advance(10)
        yield self.tokens.verify(plaintext)  # reads, records the use
        yield self.tokens.verify(other)
        yield self.tokens.verify(plaintext)  # reads again: the touch wrote
        yield self.tokens.verify(other)
        del reads[:]
        for _ in range(3):
            self.clock.advance(5)
            approval = yield self.tokens.verify(plaintext)
            self.assertEqual(approval, Approval(subject="alice", site_token_id=token_id))
            approval = yield self.tokens.verify(other)
            self.assertEqual(approval, Approval(subject="bob", site_token_id=other_id))
        kept = self.threads == 0 and not self.where.startswith("postgresql")
        self.assertEqual(reads, [] if kept else ["verify_token"] * 6)
        # Past the minute the paste reads and records the use again.
        self.clock.advance(60)
        yield self.tokens.verify(plaintext)
        record = yield self.tokens.get(token_id)
        self.assertEqual(record.last_used_at, 585)
        # Unknown and malformed pastes are never kept.
        del reads[:]
        for _ in range(2):
            result = yield self.tokens.verify(plaintext + "x")
            self.assertIsNone(result)
        self.assertEqual(reads, ["verify_token"] * 2)

    @inlineCallbacks
    def test_revoked_here_refused_at_once(self):
        """
        A token revoked by this process is refused by the next paste, with
        no time passing, whether the revocation went through L{revoke} or
        through any other write to the table.
        """
        token_id, plaintext = yield self.tokens.create("alice")
        other_id, other = yield self.tokens.create("bob")
        self.clock.advance(10)
        for _ in range(3):
            approval = yield self.tokens.verify(plaintext)
            self.assertEqual(approval.site_token_id, token_id)
            yield self.tokens.verify(other)
        yield self.tokens.revoke(token_id)
        self.assertIsNone((yield self.tokens.verify(plaintext)))
        self.assertEqual((yield self.tokens.verify(other)).site_token_id, other_id)
        yield self.site.db.write(
            SCHEMA, lambda txn: txn.execute("UPDATE site_tokens SET revoked_at = 1 WHERE id = ?", (other_id,))
        )
        self.assertIsNone((yield self.tokens.verify(other)))

    @inlineCallbacks
    def test_revoked_elsewhere_refused_at_once(self):
        """
        A token revoked through another connection (another process:
        C{smeldr-oauth-admin tokens revoke}, a second server) is refused by
        this process's next paste, with no time passing; so is one deleted
        there.
        """
        token_id, plaintext = yield self.tokens.create("alice")
        other_id, other = yield self.tokens.create("bob")
        self.clock.advance(10)
        for _ in range(3):
            approval = yield self.tokens.verify(plaintext)
            self.assertEqual(approval.site_token_id, token_id)
            yield self.tokens.verify(other)
        there = self.elsewhere()
        changed = yield there.tokens.revoke(token_id)
        self.assertTrue(changed)
        self.assertIsNone((yield self.tokens.verify(plaintext)))
        self.assertEqual((yield self.tokens.verify(other)).site_token_id, other_id)
        yield there.db.write(SCHEMA, lambda txn: txn.execute("DELETE FROM site_tokens WHERE id = ?", (other_id,)))
        self.assertIsNone((yield self.tokens.verify(other)))


class AdminFlagTests(TestCase):
    """
    The admin flag (migration 2): set at creation, read by the operator's
    pages, off for tokens made before it existed.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.path = self.mktemp()

    def open(self):  # type: ignore[no-untyped-def]
        site = open_site(self.path, self.reactor, clock=Clock(), threads=0)
        self.addCleanup(site.close)
        return site

    @inlineCallbacks
    def test_admin_tokens(self):
        tokens = self.open().tokens
        plain_id, _ = yield tokens.create("alice")
        admin_id, _ = yield tokens.create("operator", admin=True)
        self.assertEqual((yield tokens.is_admin(admin_id)), True)
        self.assertEqual((yield tokens.is_admin(plain_id)), False)
        self.assertEqual((yield tokens.is_admin("nope")), False)
        self.assertEqual((yield tokens.is_admin(None)), False)
        self.assertEqual(sorted((t.name, t.admin) for t in (yield tokens.list())), [("alice", False), ("operator", True)])
        yield tokens.revoke(admin_id)
        self.assertEqual((yield tokens.is_admin(admin_id)), False)

    @inlineCallbacks
    def test_tokens_from_before_the_flag_are_not_admin(self):
        import sqlite3

        from smeldr_oauth.db.migrations import MIGRATIONS_TABLE

        with sqlite3.connect(self.path) as db:
            db.execute(MIGRATIONS_TABLE)
            for statement in SCHEMA.migrations[0].statements:
                db.execute(statement)
            db.execute("INSERT INTO schema_migrations VALUES ('site_tokens', 1, 0)")
            db.execute("INSERT INTO site_tokens (id, name, token_hash, created_at) VALUES ('old', 'bob', 'h', 1)")
        tokens = self.open().tokens
        self.assertEqual([(t.id, t.admin) for t in (yield tokens.list())], [("old", False)])
        self.assertEqual((yield tokens.is_admin("old")), False)
