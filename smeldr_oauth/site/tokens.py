# -*- test-case-name: tests.test_site_tokens -*-
"""
Site tokens: what the site's owner pastes into the OAuth consent form to
prove that they may let an app in.

A token is C{"smeldr_"} plus 256 random bits.  The database keeps only its
SHA-256 (L{smeldr_oauth.oauth.secrets.hash_secret}): look-up is an index
probe on the hash, which reveals nothing useful through timing because the
attacker does not control the hash's bytes; the found row's hash is then
compared again in constant time so that the decision never rests on SQL
string comparison alone.

Each token has a name (the C{subject} of the grants approved with it) and an
id (recorded on those grants, so that revoking the token can revoke them:
see L{smeldr_oauth.site.admin}).
"""

from __future__ import annotations

import secrets
from typing import Any, Hashable

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from smeldr_oauth.oauth.model import Approval
from smeldr_oauth.oauth.routine import routine
from smeldr_oauth.oauth.secrets import constant_time_equal, hash_secret, new_id
from smeldr_oauth.db.database import Database, Transaction
from smeldr_oauth.db.migrations import Migration, Schema
from smeldr_oauth.db.rows import from_row
from smeldr_oauth.site.db import SecondsClock, wall_clock
from smeldr_oauth.site.posts import SiteError, ValidationError, one_line

log = Logger()

PREFIX = "smeldr_"
MAX_NAME = 100
# "smeldr_" + 43 characters; anything much longer is not ours.
MAX_TOKEN = 128
#: Seconds between two records of the same token's use (C{last_used_at}):
#: a paste checked within a minute of the last recorded one is a read only.
TOUCH_INTERVAL = 60.0
#: Live answers kept at most by L{SiteTokenStore.verify} (the dict is
#: emptied when full): a site has a few tokens, pasted again and again.
MAX_KEPT = 64


class TokenNotFound(SiteError):
    def __init__(self, token_id: str) -> None:
        super().__init__(f"no site token with id {token_id!r}")
        self.token_id = token_id


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class SiteToken:
    """
    A site token as listed: everything but the secret (which is not stored)
    and its hash (which is nobody's business).
    """

    id: str
    name: str
    created_at: float
    last_used_at: float | None = None
    revoked_at: float | None = None
    admin: bool = False

    @property
    def active(self) -> bool:
        return self.revoked_at is None


SCHEMA = Schema(
    "site_tokens",
    (
        Migration(
            1,
            (
                """
                CREATE TABLE site_tokens (
                    id TEXT PRIMARY KEY,
                    name TEXT NOT NULL,
                    token_hash TEXT NOT NULL UNIQUE,
                    created_at DOUBLE PRECISION NOT NULL,
                    last_used_at DOUBLE PRECISION,
                    revoked_at DOUBLE PRECISION
                )
                """,
            ),
        ),
        # An admin token also opens the operator's pages (the flow
        # timeline, smeldr_oauth.flows.page); any token approves apps.
        Migration(2, ("ALTER TABLE site_tokens ADD COLUMN admin INTEGER NOT NULL DEFAULT 0",)),
    ),
    tables=("site_tokens",),
)


def validate_name(value: object) -> str:
    return one_line(value, "name", MAX_NAME, tab=False)


def new_site_token() -> str:
    """
    A fresh site token: the prefix makes it recognisable (to people, and
    to secret scanners), the rest is 256 bits from L{secrets}.
    """
    return PREFIX + secrets.token_urlsafe(32)


def _record(row: Any) -> SiteToken:
    return from_row(SiteToken, row, admin=bool(row["admin"]))


class SiteTokenStore:
    """
    Site tokens in a L{Database} (SQLite or PostgreSQL).  Every method
    returns a L{Deferred}.
    """

    schema = SCHEMA

    def __init__(self, db: Database, clock: SecondsClock | None = None) -> None:
        self._db = db
        self._clock = clock if clock is not None else wall_clock()
        #: token hash -> (approval, token id, last_used_at) of live tokens,
        #: read while the database's change stamp was L{_kept_stamp}.
        self._kept: dict[str, tuple[Approval, str, float]] = {}
        self._kept_stamp: Hashable | None = None

    def create(self, name: str, admin: bool = False) -> Deferred[tuple[str, str]]:
        """
        Make a token called C{name}.

        @param admin: the token also opens the operator's pages.

        @return: C{(token_id, plaintext)}.  The plaintext is not kept: this
            is the only time anyone sees it.
        """
        try:
            name = validate_name(name)
        except ValidationError as e:
            return fail(e)
        token_id = new_id()
        plaintext = new_site_token()
        now = self._clock.seconds()

        def create_token(txn: Transaction) -> tuple[str, str]:
            txn.execute(
                "INSERT INTO site_tokens (id, name, token_hash, created_at, admin) VALUES (?, ?, ?, ?, ?)",
                (token_id, name, hash_secret(plaintext), now, 1 if admin else 0),
            )
            return token_id, plaintext

        d = self._db.write(SCHEMA, create_token)

        def logged(result: tuple[str, str]) -> tuple[str, str]:
            log.info(
                "site token {token_id} created for {name}{admin}",
                token_id=token_id,
                name=name,
                admin=" (admin)" if admin else "",
            )
            return result

        return d.addCallback(logged)

    def list(self) -> Deferred[list[SiteToken]]:
        """
        Every token, revoked ones included, oldest first.
        """

        def list_tokens(txn: Transaction) -> list[SiteToken]:
            rows = txn.execute(
                "SELECT id, name, created_at, last_used_at, revoked_at, admin FROM site_tokens"
                " ORDER BY created_at, id"
            )
            return [_record(r) for r in rows]

        return self._db.read(SCHEMA, list_tokens)

    def get(self, token_id: str) -> Deferred[SiteToken | None]:
        """
        The token with this id, or C{None}.
        """

        def get_token(txn: Transaction) -> SiteToken | None:
            row = txn.execute(
                "SELECT id, name, created_at, last_used_at, revoked_at, admin FROM site_tokens WHERE id = ?",
                (token_id,),
            ).fetchone()
            return None if row is None else _record(row)

        return self._db.read(SCHEMA, get_token)

    def revoke(self, token_id: str) -> Deferred[bool]:
        """
        Stop a token from approving anything from now on.  (Grants it
        already approved live in the OAuth store: the caller revokes those
        too, see L{smeldr_oauth.site.admin}.)

        @return: C{True} if it was live, C{False} if it was already revoked.
        @raise TokenNotFound: (in the Deferred) no such token.
        """
        if not isinstance(token_id, str):
            return fail(TokenNotFound(repr(token_id)))
        now = self._clock.seconds()

        def revoke_token(txn: Transaction) -> bool:
            row = txn.execute(
                "SELECT revoked_at FROM site_tokens WHERE id = ?", (token_id,)
            ).fetchone()
            if row is None:
                raise TokenNotFound(token_id)
            if row["revoked_at"] is not None:
                return False
            txn.execute("UPDATE site_tokens SET revoked_at = ? WHERE id = ?", (now, token_id))
            return True

        d = self._db.write(SCHEMA, revoke_token)

        def logged(changed: bool) -> bool:
            if changed:
                log.info("site token {token_id} revoked", token_id=token_id)
            return changed

        return d.addCallback(logged)

    def verify(self, plaintext: str) -> Deferred[Approval | None]:
        """
        Who a pasted token stands for, or C{None} if it is not a live site
        token.  A successful check records C{last_used_at}, at most once
        per L{TOUCH_INTERVAL}: the check itself is a read, and the write (a
        transaction and a commit, half of a paste's cost on SQLite) only
        happens when the recorded use is older.

        Acceptance is a debug event: the consent form's C{grant_approved}
        and a page's sign-in (connected apps, flow timeline) record it at info, with the
        token's id (L{smeldr_oauth.oauth.authorization}).

        A live token's answer is kept while the database's change stamp
        (L{Database.change_stamp}) stays what it was before the read: on
        SQLite with calls on the reactor thread, the rows this process
        changed and C{PRAGMA data_version} (commits by any other
        connection), taken again at every paste, so a revocation by this
        process or by C{smeldr-oauth-admin} in another one is seen by the
        next paste.  Where no stamp can be had without a round trip
        (PostgreSQL, database threads) every paste reads.  A kept answer
        is used only within L{TOUCH_INTERVAL} of its recorded use, then the
        paste reads and records the use again (docs/performance.md, round
        seven: the read was about 3% of a full flow).
        """
        if (
            not isinstance(plaintext, str)
            or not plaintext.startswith(PREFIX)
            or len(plaintext) > MAX_TOKEN
        ):
            log.info("site token rejected: malformed")
            return succeed(None)
        presented = hash_secret(plaintext)
        now = self._clock.seconds()
        # Taken before the read: a change made after it, even one the read
        # itself saw, makes the next paste read again.
        stamp = self._db.change_stamp()

        def verify_token(txn: Transaction) -> tuple[Approval | None, str | None, bool, float | None]:
            row = txn.execute(
                "SELECT id, name, token_hash, revoked_at, last_used_at FROM site_tokens WHERE token_hash = ?",
                (presented,),
            ).fetchone()
            if row is None or not constant_time_equal(row["token_hash"], presented):
                return None, None, False, None
            if row["revoked_at"] is not None:
                return None, row["id"], False, None
            used = row["last_used_at"]
            stale = used is None or not (0 <= now - used < TOUCH_INTERVAL)
            return Approval(subject=row["name"], site_token_id=row["id"]), row["id"], stale, used

        def touch(txn: Transaction, token_id: str) -> None:
            txn.execute("UPDATE site_tokens SET last_used_at = ? WHERE id = ?", (now, token_id))

        def decided(result: tuple[Approval | None, str | None, bool, float | None]) -> Any:
            # One callback for the usual answer (a live token whose use was
            # recorded less than a minute ago): the read's Deferred has
            # fired on SQLite, and each callback added to it is run there
            # and then (docs/performance.md, round six).
            approval, token_id, stale, used = result
            if approval is not None and stale:
                assert token_id is not None
                return self._db.write(SCHEMA, touch, token_id).addCallback(lambda _: logged(result))
            if approval is not None and stamp is not None and stamp == self._kept_stamp:
                # (The touch's write changes the stamp: that answer is not kept.)
                assert token_id is not None and used is not None
                if len(self._kept) >= MAX_KEPT:
                    self._kept.clear()
                self._kept[presented] = (approval, token_id, used)
            return logged(result)

        def logged(
            result: tuple[Approval | None, str | None, bool, float | None],
        ) -> Approval | None:
            approval, token_id, _, _ = result
            if approval is not None:
                # A debug event nobody keeps at the default level: built
                # only when an observer might (routine.quiet).
                if not routine.quiet(log.namespace):
                    log.debug(
                        "site token {token_id} accepted for {subject}",
                        token_id=token_id,
                        subject=approval.subject,
                    )
            elif token_id is not None:
                log.warn(  # noqa: G010 - twisted.logger.Logger has warn, not warning
                    "site token {token_id} rejected: revoked", token_id=token_id
                )
            else:
                log.info("site token rejected: unknown")
            return approval

        if stamp is not None:
            if stamp != self._kept_stamp:
                self._kept.clear()
                self._kept_stamp = stamp
            # (Found by the hash's value, as the index probe finds it: the
            # presenter does not choose the hash's bytes.)
            kept = self._kept.get(presented)
            if kept is not None and 0 <= now - kept[2] < TOUCH_INTERVAL:
                return succeed(logged((kept[0], kept[1], False, kept[2])))
        return self._db.read(SCHEMA, verify_token).addCallback(decided)

    def is_admin(self, token_id: str | None) -> Deferred[bool]:
        """
        Whether C{token_id} is a live admin token (the operator's pages
        ask this after the paste was verified).
        """
        if token_id is None:
            return succeed(False)

        def admin_token(txn: Transaction) -> bool:
            row = txn.execute(
                "SELECT admin, revoked_at FROM site_tokens WHERE id = ?", (token_id,)
            ).fetchone()
            return row is not None and bool(row["admin"]) and row["revoked_at"] is None

        return self._db.read(SCHEMA, admin_token)

    def is_live(self, token_id: str) -> Deferred[bool]:
        """
        Whether C{token_id} names a token not revoked (the connected-apps
        page asks this at each request of a session it opened).
        """
        return self.get(token_id).addCallback(lambda token: token is not None and token.active)

    def verify_bearer(self, token: str) -> Deferred[Approval | None]:
        """
        L{verify} under the name the OAuth configuration expects: pass
        C{store.verify_bearer} as its C{verify_bearer}.
        """
        return self.verify(token)
