"""
Tests for L{smeldr_oauth.site.admin}: commands run in-process against real
SQLite files, and the console script run as a subprocess.
"""

from __future__ import annotations

import io
import os
import sqlite3
import sys

import attr
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.oauth.model import Grant
from smeldr_oauth.site import admin
from smeldr_oauth.site.admin import common
from smeldr_oauth.site.admin import UsageError, parse, run
from smeldr_oauth.site.stores import open_site
from tests import postgres
from tests.lifetime import bound

try:
    from smeldr_oauth.store.sqlite import SQLiteStore
except ImportError:
    SQLiteStore = None


class ParseTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = parse(["token", "revoke", "abc"])
        self.assertEqual(
            (
                options.kind,
                options.command,
                options.token_id,
                options.site_db,
                options.oauth_db,
            ),
            ("token", "revoke", "abc", "./site.db", "./oauth.db"),
        )

    def test_errors(self) -> None:
        for argv in [
            [],
            ["token"],
            ["token", "create"],
            ["tokens", "list"],
            ["grants", "revoke"],
            ["token", "list", "--bogus"],
            ["token", "create", "a", "b"],
        ]:
            with self.assertRaises(UsageError) as caught:
                parse(argv)
            self.assertNotIn("\n", str(caught.exception))

    def test_database(self) -> None:
        """
        C{--database} names one PostgreSQL database for both; it cannot be
        mixed with the SQLite paths, nor be a path itself.
        """
        url = "postgresql://u@/db?host=/tmp/x"
        options = parse(["token", "revoke", "abc", "--database", url])
        self.assertEqual((options.database, options.site_db, options.oauth_db), (url, "./site.db", "./oauth.db"))
        for argv in [
            ["token", "list", "--database", url, "--site-db", "x.db"],
            ["grants", "list", "--database", url, "--oauth-db", "x.db"],
            ["token", "list", "--database", "./site.db"],
            ["migrate", "--from-sqlite", "a.db", "b.db"],
            ["migrate", "--from-sqlite", "a.db", "--database", url],
            ["migrate", "--from-sqlite", "a.db", "b.db", "--database", "c.db"],
        ]:
            with self.assertRaises(UsageError) as caught:
                parse(argv)
            self.assertNotIn("\n", str(caught.exception))
        options = parse(["migrate", "--from-sqlite", "a.db", "b.db", "--database", url])
        self.assertEqual((options.from_sqlite, options.database), (["a.db", "b.db"], url))

    def test_main_usage_error_exit_2(self) -> None:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as caught:
            admin.main(["token", "frobnicate"])
        self.assertEqual(caught.exception.code, 2)
        self.assertEqual(err.getvalue().count("\n"), 1)
        self.assertIn("smeldr-oauth-admin", err.getvalue())


@attr.s(auto_attribs=True)
class FakeOAuthStore:
    """
    The part of L{smeldr_oauth.oauth.interfaces.IOAuthStore} the CLI uses.
    """

    grants: list[Grant] = attr.ib(factory=list)
    closed: bool = False

    def live(self):
        return [g for g in self.grants if g.revoked_at is None]

    def _end(self, grant, now):
        self.grants[self.grants.index(grant)] = attr.evolve(grant, revoked_at=now)

    def list_grants(self, subject=None, site_token_id=None):
        return succeed(
            [
                g
                for g in self.live()
                if (subject is None or g.subject == subject)
                and (site_token_id is None or g.site_token_id == site_token_id)
            ]
        )

    def revoke_grant(self, grant_id, now):
        for g in self.live():
            if g.grant_id == grant_id:
                self._end(g, now)
                return succeed(True)
        return succeed(False)

    def revoke_grants_of_site_token(self, site_token_id, now):
        ended = []
        for g in self.live():
            if g.site_token_id == site_token_id:
                self._end(g, now)
                ended.append(g.grant_id)
        return succeed(ended)

    def close(self):
        self.closed = True


def grant(grant_id, client_id="c1", site_token_id=None, subject="alice"):
    return Grant(
        grant_id=grant_id,
        client_id=client_id,
        subject=subject,
        scopes=("read",),
        resource="https://x/mcp",
        created_at=1.0,
        site_token_id=site_token_id,
    )


class CommandTests(TestCase):
    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        base = self.mktemp()
        os.makedirs(base)
        self.site_db = os.path.join(base, "site.db")
        self.oauth_db = os.path.join(base, "oauth.db")
        self.fake = FakeOAuthStore()
        self.opened = []

        def open_fake(path, reactor):
            self.opened.append(path)
            return self.fake

        self.patch(common, "open_oauth_store", open_fake)

    @inlineCallbacks
    def admin(self, *argv):
        argv = list(argv)
        if argv[0] == "token":
            argv += ["--site-db", self.site_db]
        if argv[0] == "grants" or argv[1] == "revoke":
            argv += ["--oauth-db", self.oauth_db]
        out, err = io.StringIO(), io.StringIO()
        status = yield run(self.reactor, parse(argv), out, err)
        return status, out.getvalue(), err.getvalue()

    @inlineCallbacks
    def test_token_create_list_verify(self):
        status, out, err = yield self.admin("token", "create", "alice")
        self.assertEqual(status, 0)
        # Only the token on stdout; the warning on stderr.
        plaintext = out.strip()
        self.assertEqual(out, plaintext + "\n")
        self.assertTrue(plaintext.startswith("smeldr_"))
        self.assertIn("will not be shown again", err)
        self.assertNotIn(plaintext, err)
        status, out, err = yield self.admin("token", "list")
        self.assertEqual(status, 0)
        self.assertIn("alice", out)
        self.assertIn("active", out)
        self.assertNotIn(plaintext, out)
        site = open_site(self.site_db, self.reactor)
        self.addCleanup(site.close)
        approval = yield site.tokens.verify(plaintext)
        self.assertEqual(approval.subject, "alice")

    @inlineCallbacks
    def test_token_create_admin(self):
        status, _, err = yield self.admin("token", "create", "operator", "--admin")
        self.assertEqual(status, 0)
        self.assertIn("(admin)", err)
        status, out, _ = yield self.admin("token", "list")
        self.assertRegex(out, r"\badmin\b.*operator")

    @inlineCallbacks
    def test_token_create_bad_name(self):
        status, out, err = yield self.admin("token", "create", " ")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("name", err)

    @inlineCallbacks
    def test_token_list_missing_db(self):
        status, out, err = yield self.admin("token", "list")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("no site database", err)
        self.assertFalse(os.path.exists(self.site_db))

    @inlineCallbacks
    def test_token_revoke_revokes_grants(self):
        _, out, _ = yield self.admin("token", "create", "alice")
        plaintext = out.strip()
        site = open_site(self.site_db, self.reactor)
        self.addCleanup(site.close)
        (token,) = yield site.tokens.list()
        self.fake.grants += [
            grant("g1", site_token_id=token.id),
            grant("g2", site_token_id="other"),
            grant("g3", client_id="c2", site_token_id=token.id),
        ]
        open(self.oauth_db, "w").close()
        status, out, err = yield self.admin("token", "revoke", token.id)
        self.assertEqual((status, err), (0, ""))
        self.assertIn("Revoked 2 grant(s)", out)
        self.assertEqual([g.grant_id for g in self.fake.live()], ["g2"])
        self.assertTrue(self.fake.closed)
        approval = yield site.tokens.verify(plaintext)
        self.assertIsNone(approval)
        # Again: already revoked, grants step runs again (idempotent).
        status, out, err = yield self.admin("token", "revoke", token.id)
        self.assertEqual(status, 0)
        self.assertIn("already revoked", out)
        self.assertIn("Revoked 0 grant(s)", out)

    @inlineCallbacks
    def test_token_revoke_unknown(self):
        yield self.admin("token", "create", "alice")
        status, out, err = yield self.admin("token", "revoke", "nope")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("no site token", err)
        self.assertEqual(self.opened, [])

    @inlineCallbacks
    def test_token_revoke_without_oauth_db_warns(self):
        yield self.admin("token", "create", "alice")
        site = open_site(self.site_db, self.reactor)
        self.addCleanup(site.close)
        (token,) = yield site.tokens.list()
        status, out, err = yield self.admin("token", "revoke", token.id)
        self.assertEqual(status, 0)
        self.assertIn(f"Site token {token.id} revoked.", out)
        self.assertIn("warning: no OAuth database", err)
        self.assertEqual(self.opened, [])

    @inlineCallbacks
    def test_grants(self):
        open(self.oauth_db, "w").close()
        self.fake.grants += [
            grant("g1"),
            grant("g2", client_id="c2", subject="bob"),
            grant("g3"),
        ]
        status, out, err = yield self.admin("grants", "list")
        self.assertEqual(status, 0)
        self.assertEqual(len(out.splitlines()), 4)
        status, out, err = yield self.admin("grants", "list", "--subject", "bob")
        self.assertEqual(len(out.splitlines()), 2)
        status, out, err = yield self.admin("grants", "revoke", "g2")
        self.assertEqual((status, err), (0, ""))
        status, out, err = yield self.admin("grants", "revoke", "g2")
        self.assertEqual(status, 1)
        self.assertIn("no live grant g2", err)
        status, out, err = yield self.admin("grants", "revoke-client", "c1")
        self.assertEqual(status, 0)
        self.assertIn("Revoked 2 grant(s) of client c1", out)
        self.assertEqual(self.fake.live(), [])
        status, out, err = yield self.admin("grants", "list")
        self.assertIn("No live grants", out)

    @inlineCallbacks
    def test_grants_list_neutralises_client_names(self):
        """
        Client names come from whoever registered the client: escape
        sequences must not reach the operator's terminal.
        """
        open(self.oauth_db, "w").close()
        self.fake.grants.append(
            attr.evolve(
                grant("g1"), client_name="Evil\x1b]0;pwned\x07\x1b[2J" + "x" * 500
            )
        )
        status, out, _err = yield self.admin("grants", "list")
        self.assertEqual(status, 0)
        self.assertNotIn("\x1b", out)
        self.assertNotIn("\x07", out)
        self.assertIn("Evil?]0;pwned??[2J", out)
        self.assertLess(max(len(line) for line in out.splitlines()), 300)

    @inlineCallbacks
    def test_grants_missing_db(self):
        status, out, err = yield self.admin("grants", "list")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("no oauth database", err)
        self.assertEqual(self.opened, [])


class RealOAuthStoreTests(TestCase):
    """
    The CLI against the real L{SQLiteStore}.
    """

    if SQLiteStore is None:
        skip = "smeldr_oauth.store.sqlite is not available"

    @inlineCallbacks
    def test_revoke_token_revokes_real_grants(self):
        from twisted.internet import reactor

        from smeldr_oauth.oauth.model import AuthorizationCode

        base = self.mktemp()
        os.makedirs(base)
        site_db, oauth_db = (
            os.path.join(base, "site.db"),
            os.path.join(base, "oauth.db"),
        )
        site = open_site(site_db, reactor)
        self.addCleanup(site.close)
        token_id, _ = yield site.tokens.create("alice")
        store = SQLiteStore(oauth_db, reactor)
        self.addCleanup(store.close)
        for gid, tid in [("g1", token_id), ("g2", "other")]:
            g = grant(gid, site_token_id=tid)
            code = AuthorizationCode(
                code_hash="h" + gid,
                grant_id=gid,
                client_id="c1",
                redirect_uri="https://x/cb",
                code_challenge="x" * 43,
                scopes=("read",),
                resource="https://x/mcp",
                expires_at=reactor.seconds() + 60,
                issue_refresh=True,
            )
            yield store.create_grant(g, code)
        out, err = io.StringIO(), io.StringIO()
        status = yield run(
            reactor,
            parse(
                [
                    "token",
                    "revoke",
                    token_id,
                    "--site-db",
                    site_db,
                    "--oauth-db",
                    oauth_db,
                ]
            ),
            out,
            err,
        )
        self.assertEqual((status, err.getvalue()), (0, ""))
        live = yield store.list_grants()
        self.assertEqual([g.grant_id for g in live], ["g2"])


class PostgresCommandTests(TestCase):
    """
    Every command against one real PostgreSQL database (C{--database}),
    with the real stores.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.url = postgres.database_url(self)

    @inlineCallbacks
    def admin(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        status = yield run(self.reactor, parse([*argv, "--database", self.url]), out, err)
        return status, out.getvalue(), err.getvalue()

    @inlineCallbacks
    def grants(self, token_id):
        from smeldr_oauth.oauth.model import Client
        from smeldr_oauth.store import open_store
        from tests.test_store_memory import make_code

        store = open_store(self.url, self.reactor)
        self.addCleanup(store.close)
        yield store.save_client(Client(client_id="c1", client_name="Claude", redirect_uris=()))
        for gid, tid, client_id in [("g1", token_id, "c1"), ("g2", "other", "c1"), ("g3", "other", "c2")]:
            yield store.create_grant(
                grant(gid, client_id=client_id, site_token_id=tid), attr.evolve(make_code(gid, gid), client_id=client_id)
            )
        return store

    @inlineCallbacks
    def test_tokens_and_grants(self):
        status, out, err = yield self.admin("token", "create", "alice")
        self.assertEqual(status, 0, err)
        plaintext = out.strip()
        status, out, err = yield self.admin("token", "list")
        self.assertIn("alice", out)
        self.assertIn("active", out)
        site = open_site(self.url, self.reactor)
        self.addCleanup(site.close)
        (token,) = yield site.tokens.list()
        store = yield self.grants(token.id)
        status, out, err = yield self.admin("grants", "list", "--subject", "alice")
        self.assertEqual((status, len(out.splitlines())), (0, 4), out)
        status, out, err = yield self.admin("token", "revoke", token.id)
        self.assertEqual((status, err), (0, ""))
        self.assertIn("Revoked 1 grant(s)", out)
        approval = yield site.tokens.verify(plaintext)
        self.assertIsNone(approval)
        status, out, err = yield self.admin("grants", "revoke", "g2")
        self.assertEqual((status, err), (0, ""))
        status, out, err = yield self.admin("grants", "revoke", "g2")
        self.assertEqual(status, 1)
        status, out, err = yield self.admin("grants", "revoke-client", "c2")
        self.assertIn("Revoked 1 grant(s) of client c2", out)
        live = yield store.list_grants()
        self.assertEqual(live, [])

    @inlineCallbacks
    def test_unreachable(self):
        """
        A database that cannot be reached: one line, exit status 1.
        """
        self.url = "postgresql://u:secret@/db?host=/nonexistent&port=1"
        status, out, err = yield self.admin("token", "list")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("StoreUnavailable", err)
        self.assertNotIn("secret", err)


class MigrateCommandTests(TestCase):
    """
    C{migrate --from-sqlite}: an installation's files, used for real, copied
    into PostgreSQL without losing a grant: every row is there, and every
    secret the clients hold goes on working there exactly as it did.
    """

    @inlineCallbacks
    def test_migrate(self):
        from twisted.internet import reactor

        from smeldr_oauth.oauth.secrets import hash_secret
        from smeldr_oauth.store import open_store
        from tests.test_db_copy import TABLES
        from tests.test_store_memory import T0, access, refresh
        from tests.test_store_postgres import issue_secrets

        base = self.mktemp()
        os.makedirs(base)
        oauth_db, site_db = os.path.join(base, "oauth.db"), os.path.join(base, "site.db")
        # On the reactor thread: issue_secrets expects answers at once.
        store = open_store(oauth_db, reactor, threads=0)
        yield store.ready
        secrets = issue_secrets(self, store, site_db)
        site = open_site(site_db, reactor)
        yield site.posts.create("Migrated post", body="sourdough starter", tags=["bread"])
        yield site.posts.create("Second", status="published")
        revoked_id, _ = yield site.tokens.create("bob")
        yield site.tokens.revoke(revoked_id)
        site.close()
        store.close()
        sqlite_counts = {}
        for path in (oauth_db, site_db):
            connection = sqlite3.connect(path)
            for table in TABLES:
                try:
                    sqlite_counts[table] = connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                except sqlite3.OperationalError:
                    continue
            connection.close()

        url = postgres.database_url(self)
        out, err = io.StringIO(), io.StringIO()
        argv = ["migrate", "--from-sqlite", oauth_db, site_db, "--database", url]
        status = yield run(reactor, parse(argv), out, err)
        self.assertEqual((status, err.getvalue()), (0, ""))
        self.assertIn(f"Copied {sum(sqlite_counts.values())} row(s)", out.getvalue())

        store = open_store(url, reactor)
        self.addCleanup(store.close)
        site = open_site(url, reactor)
        self.addCleanup(site.close)
        pg_counts = yield store.database.read(
            store._schema,
            lambda txn: {t: txn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES},
        )
        self.assertEqual(pg_counts, sqlite_counts)
        site_token, client_secret, code, access1, refresh1, access2, refresh2 = secrets
        approval = yield site.tokens.verify(site_token)
        self.assertEqual(approval.subject, "alice")
        client = yield store.get_client((yield store.list_grants())[0].client_id)
        self.assertEqual(client.client_secret_hash, hash_secret(client_secret))
        info = yield store.lookup_access_token(hash_secret(access2), T0 + 10)
        self.assertEqual(info.subject, "alice")
        hits = yield site.posts.search("sourdough")
        self.assertEqual([h.post.slug for h in hits], ["migrated-post"])
        new = yield site.posts.create("After the move")
        self.assertGreater(new.id, max(h.post.id for h in hits))
        # Rotation goes on from where it was, and reuse detection too.
        result = yield store.redeem_refresh_token(
            hash_secret(refresh2), T0 + 100, 10.0, None, access("after-a", T0 + 100), refresh("after-r", T0 + 100)
        )
        self.assertEqual(result.status, "rotated")
        result = yield store.redeem_refresh_token(
            hash_secret(refresh1), T0 + 1000, 10.0, None, access("late-a", T0 + 1000), refresh("late-r", T0 + 1000)
        )
        self.assertEqual(result.status, "reused")
        # Once is enough: a second run is refused and changes nothing.
        out, err = io.StringIO(), io.StringIO()
        status = yield run(reactor, parse(argv), out, err)
        self.assertEqual(status, 1)
        self.assertIn("already holds data", err.getvalue())
        self.assertEqual(err.getvalue().count("\n"), 1)

    @inlineCallbacks
    def test_swapped(self):
        """
        The two files in the wrong order: exit status 1 with the reason in
        one line (not reported as a failure of the command), nothing copied.
        """
        from twisted.internet import reactor

        from smeldr_oauth.store import open_store

        base = self.mktemp()
        os.makedirs(base)
        oauth_db, site_db = os.path.join(base, "oauth.db"), os.path.join(base, "site.db")
        store = open_store(oauth_db, reactor, threads=0)
        yield store.ready
        store.close()
        site = open_site(site_db, reactor)
        yield site.tokens.create("alice")
        site.close()
        out, err = io.StringIO(), io.StringIO()
        argv = ["migrate", "--from-sqlite", site_db, oauth_db, "--database", postgres.database_url(self)]
        status = yield run(reactor, parse(argv), out, err)
        self.assertEqual((status, out.getvalue()), (1, ""))
        self.assertEqual(err.getvalue().count("\n"), 1)
        self.assertTrue(err.getvalue().startswith(f"smeldr-oauth-admin: {site_db} holds none of the tables"), err.getvalue())


class ScriptTests(TestCase):
    """
    The console script's entry point in a real process.
    """

    def script(self, *argv):
        env = dict(os.environ)
        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [checkout, env.get("PYTHONPATH")])
        )
        command = bound([sys.executable, "-c", "from smeldr_oauth.site.admin import main; main()", *argv])
        return getProcessOutputAndValue(command[0], command[1:], env=env)

    @inlineCallbacks
    def test_bad_arguments(self):
        out, err, code = yield self.script("token", "nope")
        self.assertEqual(code, 2)
        self.assertEqual(out, b"")
        self.assertEqual(err.count(b"\n"), 1)
        self.assertNotIn(b"Traceback", err)

    @inlineCallbacks
    def test_not_a_database(self):
        """
        A database file that is not one: exit status 1 and one line naming
        the file and why (a traceback came first).
        """
        junk = os.path.abspath(self.mktemp())
        with open(junk, "wb") as f:
            f.write(b"not a database " * 500)
        for argv in (("grants", "list", "--oauth-db", junk), ("token", "list", "--site-db", junk)):
            out, err, code = yield self.script(*argv)
            self.assertEqual(code, 1, err)
            self.assertNotIn(b"Traceback", err)
            self.assertEqual(err.count(b"\n"), 1, err)
            self.assertIn(junk.encode() + b": file is not a database", err)

    @inlineCallbacks
    def test_create_then_list(self):
        base = self.mktemp()
        os.makedirs(base)
        db = os.path.join(base, "site.db")
        out, err, code = yield self.script("token", "create", "laptop", "--site-db", db)
        self.assertEqual(code, 0)
        self.assertIn(b"will not be shown again", err)
        plaintext = out.strip()
        self.assertEqual(out.split(), [plaintext])
        self.assertTrue(plaintext.startswith(b"smeldr_"))
        out, err, code = yield self.script("token", "list", "--site-db", db)
        self.assertEqual((code, err), (0, b""))
        self.assertIn(b"laptop", out)
        self.assertNotIn(plaintext, out)
        out, err, code = yield self.script("token", "revoke", "nope", "--site-db", db)
        self.assertEqual(code, 1)
        self.assertNotIn(b"Traceback", err)
