"""
Every site store test on every engine and in every thread mode: SQLite on
the reactor thread (C{--db-threads 0}), and PostgreSQL (a fresh database
of L{tests.postgres} per test) on a database thread and on the reactor
thread.  (The SQLite-on-a-thread runs are the tests' own modules.)
"""

from __future__ import annotations

from tests import postgres, test_site_posts, test_site_tokens


class ReactorThreadPostStoreTests(test_site_posts.PostStoreTests):
    threads = 0

    def test_inline(self) -> None:
        self.assertTrue(self.db.inline)


class ReactorThreadSiteTokenStoreTests(test_site_tokens.SiteTokenStoreTests):
    threads = 0

    def test_inline(self) -> None:
        self.assertTrue(self.site.db.inline)


class PostgresPostStoreTests(test_site_posts.PostStoreTests):
    def location(self) -> str:
        return postgres.database_url(self)


class PostgresReactorThreadPostStoreTests(PostgresPostStoreTests):
    threads = 0


class PostgresSiteTokenStoreTests(test_site_tokens.SiteTokenStoreTests):
    def location(self) -> str:
        return postgres.database_url(self)


class PostgresReactorThreadSiteTokenStoreTests(PostgresSiteTokenStoreTests):
    threads = 0


class PostgresSearchPropertyTests(test_site_posts.SearchPropertyTests):
    def location(self) -> str:
        return postgres.database_url(self)
