"""
Tests for L{smeldr_oauth.store.memory}, and the behaviour every
L{IOAuthStore} must have (L{StoreBehaviourMixin}, also run against the SQL
store on SQLite by C{tests.test_store_sqlite} and on PostgreSQL by
C{tests.test_store_postgres}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import attr
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smeldr_oauth.oauth.model import (
    AccessInfo,
    AccessToken,
    AuthorizationCode,
    Client,
    Grant,
    RefreshToken,
)
from smeldr_oauth.oauth.secrets import hash_secret
from smeldr_oauth.oauth.interfaces import IOAuthStore
from smeldr_oauth.oauth.rotation import USE_RESOLUTION
from smeldr_oauth.db.errors import StoreUnavailable
from smeldr_oauth.store.common import CLIENT_RETENTION, GRANT_RETENTION, StoreConflict, start_purging
from smeldr_oauth.store.memory import MemoryStore

T0 = 1_700_000_000.0
CODE_TTL = 60.0
ACCESS_TTL = 3600.0
REFRESH_TTL = 30 * 86400.0
GRACE = 10.0
SCOPES = ("mcp:read", "mcp:write")
RESOURCE = "https://example.com/mcp"


def h(name: str) -> str:
    """
    A deterministic stand-in for a secret's hash.
    """
    return hash_secret("secret-" + name)


def access(name: str, now: float = T0, scopes: tuple[str, ...] = SCOPES) -> AccessToken:
    return AccessToken(
        token_hash=h(name),
        grant_id="placeholder",
        scopes=scopes,
        resource=RESOURCE,
        expires_at=now + ACCESS_TTL,
    )


def refresh(name: str, now: float = T0) -> RefreshToken:
    return RefreshToken(
        token_hash=h(name),
        grant_id="placeholder",
        scopes=SCOPES,
        generation=0,
        created_at=now,
        expires_at=now + REFRESH_TTL,
    )


def make_grant(
    grant_id: str = "g1",
    subject: str = "alice",
    site_token_id: Optional[str] = "site-token-1",
    created_at: float = T0,
) -> Grant:
    return Grant(
        grant_id=grant_id,
        client_id="client-1",
        subject=subject,
        scopes=SCOPES,
        resource=RESOURCE,
        created_at=created_at,
        site_token_id=site_token_id,
        client_name="Claude",
    )


def make_code(
    name: str, grant_id: str = "g1", now: float = T0, issue_refresh: bool = True
) -> AuthorizationCode:
    return AuthorizationCode(
        code_hash=h(name),
        grant_id=grant_id,
        client_id="client-1",
        redirect_uri="https://claude.ai/api/mcp/auth_callback",
        code_challenge="E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        scopes=SCOPES,
        resource=RESOURCE,
        expires_at=now + CODE_TTL,
        issue_refresh=issue_refresh,
    )


class Refused(Exception):
    """
    What a test's C{check} raises to refuse a code exchange.
    """


def accept(code: AuthorizationCode) -> None:
    """
    A C{check} that lets every code through.
    """


def refuse(code: AuthorizationCode) -> None:
    raise Refused(code.client_id)


if TYPE_CHECKING:
    _MixinBase = SynchronousTestCase
else:
    _MixinBase = object


class StoreBehaviourMixin(_MixinBase):
    """
    The contract of L{IOAuthStore}, for a L{SynchronousTestCase} whose
    C{make_store} returns a store whose Deferreds fire synchronously.
    """

    store: Any

    def make_store(self) -> Any:
        raise NotImplementedError()

    def setUp(self) -> None:
        self.store = self.make_store()

    # Helpers

    def ok(self, d: Any) -> Any:
        return self.successResultOf(d)

    def grant_with_tokens(
        self,
        grant_id: str = "g1",
        site_token_id: Optional[str] = "site-token-1",
        subject: str = "alice",
        now: float = T0,
    ) -> None:
        """
        Create a grant, exchange its code, and store access token
        C{grant_id + "-a0"} and refresh token C{grant_id + "-r0"}.
        """
        grant = make_grant(grant_id, subject=subject, site_token_id=site_token_id, created_at=now)
        self.ok(self.store.create_grant(grant, make_code(grant_id + "-code", grant_id, now)))
        result = self.ok(self.store.consume_code(h(grant_id + "-code"), now + 1))
        self.assertEqual(result.status, "ok")
        self.ok(
            self.store.add_tokens(grant_id, access(grant_id + "-a0", now), refresh(grant_id + "-r0", now))
        )

    def redeem(
        self,
        token: str,
        new: str,
        now: float,
        grace: float = GRACE,
        scopes: Optional[tuple[str, ...]] = None,
    ) -> Any:
        return self.ok(
            self.store.redeem_refresh_token(
                h(token), now, grace, scopes, access(new + "-a", now), refresh(new, now)
            )
        )

    def live(self, token: str, now: float = T0 + 2) -> Any:
        """
        The L{AccessInfo} of access token C{token} at C{now}, or C{None}.
        """
        return self.ok(self.store.lookup_access_token(h(token), now))

    # Interface

    def test_provides(self) -> None:
        self.assertTrue(verifyObject(IOAuthStore, self.store))

    # Clients

    def test_client_round_trip(self) -> None:
        client = Client(
            client_id="c1",
            client_name="ChatGPT",
            redirect_uris=("https://chatgpt.com/connector_platform_oauth_redirect",),
            scope="mcp:read",
            client_secret_hash=h("client"),
            created_at=T0,
            client_uri="https://openai.com",
        )
        self.assertEqual(self.ok(self.store.count_clients()), 0)
        self.ok(self.store.save_client(client))
        self.assertEqual(self.ok(self.store.get_client("c1")), client)
        self.assertIsNone(self.ok(self.store.get_client("c2")))
        self.assertEqual(self.ok(self.store.count_clients()), 1)

    def test_duplicate_client(self) -> None:
        client = Client(client_id="c1", client_name=None, redirect_uris=())
        self.ok(self.store.save_client(client))
        self.failureResultOf(
            self.store.save_client(Client(client_id="c1", client_name="evil", redirect_uris=())),
            StoreConflict,
        )
        self.assertEqual(self.ok(self.store.get_client("c1")), client)

    def test_nul_in_keys(self) -> None:
        """
        Look-ups with a NUL character in a key (bytes a client may send;
        PostgreSQL text cannot hold them) find nothing rather than fail.
        """
        self.grant_with_tokens()
        self.assertIsNone(self.ok(self.store.get_client("client-1\x00")))
        self.assertEqual(self.ok(self.store.list_grants(subject="alice\x00")), [])
        self.assertFalse(self.ok(self.store.revoke_grant("g1\x00", T0 + 2)))
        self.assertIsNone(self.ok(self.store.revoke_token("\x00", T0 + 2, client_id="\x00")))
        self.assertEqual(self.ok(self.store.consume_code("\x00", T0 + 2)).status, "unknown")
        self.assertIsNotNone(self.live("g1-a0"))

    # Grants and codes

    def test_consume_code_ok(self) -> None:
        grant = make_grant()
        code = make_code("code")
        self.ok(self.store.create_grant(grant, code))
        result = self.ok(self.store.consume_code(h("code"), T0 + 1))
        self.assertEqual((result.status, result.code, result.grant), ("ok", code, grant))

    def test_consume_code_unknown(self) -> None:
        result = self.ok(self.store.consume_code(h("nothing"), T0))
        self.assertEqual((result.status, result.code, result.grant), ("unknown", None, None))

    def test_consume_code_expired(self) -> None:
        self.ok(self.store.create_grant(make_grant(), make_code("code")))
        result = self.ok(self.store.consume_code(h("code"), T0 + CODE_TTL))
        self.assertEqual(result.status, "expired")

    def test_consume_code_replayed(self) -> None:
        """
        Spending a spent code revokes the grant and the tokens issued with
        the first exchange.  (The protocol layer logs the security
        event, once; the store only decides and applies.)
        """
        self.grant_with_tokens()
        self.assertIsNotNone(self.live("g1-a0"))
        result = self.ok(self.store.consume_code(h("g1-code"), T0 + 2))
        self.assertEqual(result.status, "replayed")
        self.assertEqual(result.grant.revoked_at, T0 + 2)
        self.assertIsNone(self.live("g1-a0"))
        self.assertEqual(self.redeem("g1-r0", "r1", T0 + 3).status, "revoked")
        self.assertEqual(self.ok(self.store.list_grants()), [])

    def test_consume_code_twice_concurrently(self) -> None:
        """
        Of two exchanges of one code started together, exactly one wins.
        """
        self.ok(self.store.create_grant(make_grant(), make_code("code")))
        first = self.store.consume_code(h("code"), T0 + 1)
        second = self.store.consume_code(h("code"), T0 + 1)
        statuses = sorted([self.ok(first).status, self.ok(second).status])
        self.assertEqual(statuses, ["ok", "replayed"])

    def test_consume_code_of_revoked_grant(self) -> None:
        self.ok(self.store.create_grant(make_grant(), make_code("code")))
        self.assertTrue(self.ok(self.store.revoke_grant("g1", T0 + 1)))
        self.assertEqual(self.ok(self.store.consume_code(h("code"), T0 + 2)).status, "revoked")

    def test_create_grant_code_mismatch(self) -> None:
        self.failureResultOf(
            self.store.create_grant(make_grant("g1"), make_code("code", grant_id="g2")), ValueError
        )
        self.assertEqual(self.ok(self.store.list_grants()), [])

    def test_create_grant_rolls_back(self) -> None:
        """
        A grant whose code cannot be stored is not stored either.
        """
        self.ok(self.store.create_grant(make_grant("g1"), make_code("code", "g1")))
        self.failureResultOf(
            self.store.create_grant(make_grant("g2"), make_code("code", "g2")), StoreConflict
        )
        self.assertEqual([g.grant_id for g in self.ok(self.store.list_grants())], ["g1"])

    # The code exchange in one transaction

    def exchange(self, code: str, name: str, now: float = T0 + 1, check: Any = accept) -> Any:
        """
        Exchange code C{code} for access token C{name + "-a"} and refresh
        token C{name + "-r"} (placeholder grant, scopes and resource).
        """
        placeholder = attr.evolve(access(name + "-a", now), scopes=("nothing",), resource="https://x/")
        return self.store.exchange_code(h(code), now, check, placeholder, refresh(name + "-r", now))

    def test_exchange_code(self) -> None:
        """
        A fresh code gives tokens for its grant, with the code's scopes and
        resource whatever the records said; the first refresh token is
        generation 1 and rotates.
        """
        grant = make_grant()
        code = make_code("code")
        self.ok(self.store.create_grant(grant, code))
        seen: list[AuthorizationCode] = []
        result = self.ok(self.exchange("code", "t1", check=seen.append))
        # The exchange is the grant's first use.
        used = attr.evolve(grant, last_used_at=T0 + 1)
        self.assertEqual((result.status, result.code, result.grant), ("ok", code, used))
        self.assertEqual(self.ok(self.store.list_grants()), [used])
        self.assertEqual(seen, [code])
        info = self.live("t1-a")
        self.assertEqual((info.grant_id, info.scopes, info.resource), ("g1", frozenset(SCOPES), RESOURCE))
        self.assertEqual(self.redeem("t1-r", "r2", T0 + 100).status, "rotated")
        self.assertEqual(self.live("r2-a", T0 + 100).scopes, frozenset(SCOPES))

    def test_exchange_code_without_refresh(self) -> None:
        """
        A code that does not issue a refresh token stores the access token
        only, whatever the caller passed.
        """
        self.ok(self.store.create_grant(make_grant(), make_code("code", issue_refresh=False)))
        self.assertEqual(self.ok(self.exchange("code", "t1")).status, "ok")
        self.assertIsNotNone(self.live("t1-a"))
        self.assertEqual(self.redeem("t1-r", "r2", T0 + 2).status, "unknown")
        self.ok(self.store.create_grant(make_grant("g2"), make_code("code2", "g2", issue_refresh=False)))
        d = self.store.exchange_code(h("code2"), T0 + 1, accept, access("t2-a"), None)
        self.assertEqual(self.ok(d).status, "ok")

    def test_exchange_code_refused(self) -> None:
        """
        When C{check} refuses, its exception comes out, no token is stored,
        and the code is spent all the same: presenting it again is a
        replay, which revokes the grant.
        """
        self.ok(self.store.create_grant(make_grant(), make_code("code")))
        failure = self.failureResultOf(self.exchange("code", "t1", check=refuse), Refused)
        self.assertEqual(failure.value.args, ("client-1",))
        self.assertIsNone(self.live("t1-a"))
        # Refused: not a use of the grant.
        self.assertEqual([g.last_used_at for g in self.ok(self.store.list_grants())], [None])
        self.assertEqual(self.redeem("t1-r", "r2", T0 + 2).status, "unknown")
        result = self.ok(self.exchange("code", "t2", now=T0 + 2))
        self.assertEqual(result.status, "replayed")
        self.assertIsNone(self.live("t2-a"))
        self.assertEqual(self.ok(self.store.list_grants()), [])

    def test_exchange_code_missing_refresh(self) -> None:
        """
        A code that issues a refresh token, exchanged without one, is a bug
        of the caller's: refused like a failed check (the code is spent).
        """
        self.ok(self.store.create_grant(make_grant(), make_code("code")))
        d = self.store.exchange_code(h("code"), T0 + 1, accept, access("t1-a"), None)
        self.failureResultOf(d, ValueError)
        self.assertIsNone(self.live("t1-a"))
        self.assertEqual(self.ok(self.exchange("code", "t2", now=T0 + 2)).status, "replayed")

    def test_exchange_code_replayed(self) -> None:
        """
        Exchanging a code twice revokes the grant and the tokens of the
        first exchange; C{check} is not asked the second time.
        """
        self.ok(self.store.create_grant(make_grant(), make_code("code")))
        self.assertEqual(self.ok(self.exchange("code", "t1")).status, "ok")
        seen: list[AuthorizationCode] = []
        result = self.ok(self.exchange("code", "t2", now=T0 + 2, check=seen.append))
        self.assertEqual(result.status, "replayed")
        self.assertEqual(result.grant.revoked_at, T0 + 2)
        self.assertEqual(seen, [])
        self.assertIsNone(self.live("t1-a"))
        self.assertIsNone(self.live("t2-a"))
        self.assertEqual(self.redeem("t1-r", "r2", T0 + 3).status, "revoked")

    def test_exchange_code_not_ok(self) -> None:
        """
        Unknown, expired and revoked codes give no token, and C{check} is
        not asked.
        """
        self.ok(self.store.create_grant(make_grant("g1"), make_code("old", "g1")))
        self.ok(self.store.create_grant(make_grant("g2"), make_code("ended", "g2")))
        self.ok(self.store.revoke_grant("g2", T0))
        seen: list[AuthorizationCode] = []
        for code, name, now, status in (
            ("nothing", "t0", T0 + 1, "unknown"),
            ("old", "t1", T0 + CODE_TTL, "expired"),
            ("ended", "t2", T0 + 1, "revoked"),
        ):
            result = self.ok(self.exchange(code, name, now=now, check=seen.append))
            self.assertEqual(result.status, status)
            self.assertIsNone(self.live(name + "-a", now))
        self.assertEqual(seen, [])

    def test_exchange_code_rolls_back(self) -> None:
        """
        A failure half-way (the refresh token's hash is already stored)
        keeps nothing: no access token, and the code is still unspent, so
        the client's retry succeeds.
        """
        self.grant_with_tokens("g0")
        self.ok(self.store.create_grant(make_grant(), make_code("code")))
        d = self.store.exchange_code(h("code"), T0 + 1, accept, access("t1-a"), refresh("g0-r0"))
        self.failureResultOf(d, StoreConflict)
        self.assertIsNone(self.live("t1-a"))
        self.assertEqual([g.last_used_at for g in self.ok(self.store.list_grants(subject="alice"))], [None, None])
        self.assertEqual(self.ok(self.exchange("code", "t2", now=T0 + 2)).status, "ok")
        self.assertIsNotNone(self.live("t2-a"))

    # Access tokens

    def test_lookup_access_token(self) -> None:
        self.grant_with_tokens()
        self.assertEqual(
            self.live("g1-a0"),
            AccessInfo(
                subject="alice",
                client_id="client-1",
                scopes=frozenset(SCOPES),
                resource=RESOURCE,
                grant_id="g1",
                expires_at=T0 + ACCESS_TTL,
            ),
        )

    def test_lookup_access_token_dead(self) -> None:
        self.grant_with_tokens()
        self.assertIsNone(self.live("g1-a0", T0 + ACCESS_TTL))
        self.assertIsNone(self.live("nothing"))
        self.assertIsNone(self.ok(self.store.revoke_token(h("g1-a0"), T0 + 2)))
        self.assertIsNone(self.live("g1-a0"))

    def test_add_tokens_unknown_grant(self) -> None:
        self.failureResultOf(
            self.store.add_tokens("nope", access("a"), refresh("r")), StoreConflict
        )
        self.assertEqual(self.redeem("r", "r1", T0 + 1).status, "unknown")

    def test_add_tokens_rolls_back(self) -> None:
        """
        When the access token cannot be stored, the refresh token is not.
        """
        self.grant_with_tokens()
        self.failureResultOf(
            self.store.add_tokens("g1", access("g1-a0"), refresh("other")), StoreConflict
        )
        self.assertEqual(self.redeem("other", "r1", T0 + 1).status, "unknown")

    def test_add_tokens_without_refresh(self) -> None:
        self.ok(self.store.create_grant(make_grant(), make_code("code")))
        self.ok(self.store.add_tokens("g1", access("a"), None))
        self.assertIsNotNone(self.live("a"))

    def test_new_refresh_token_is_unspent(self) -> None:
        """
        A refresh token is stored unspent whatever its record's C{used_at}
        says, by C{add_tokens} as by a rotation.
        """
        self.ok(self.store.create_grant(make_grant(), make_code("code")))
        spent = attr.evolve(refresh("r0"), used_at=T0)
        self.ok(self.store.add_tokens("g1", access("a"), spent))
        self.assertEqual(self.redeem("r0", "r1", T0 + 100).status, "rotated")
        now = T0 + 200
        result = self.store.redeem_refresh_token(
            h("r1"), now, GRACE, None, access("r2-a", now), attr.evolve(refresh("r2", now), used_at=now)
        )
        self.assertEqual(self.ok(result).status, "rotated")
        self.assertEqual(self.redeem("r2", "r3", now + 100).status, "rotated")

    # Refresh

    def test_refresh_rotated(self) -> None:
        self.grant_with_tokens()
        result = self.redeem("g1-r0", "r1", T0 + 100)
        self.assertEqual(result.status, "rotated")
        self.assertEqual(result.grant.grant_id, "g1")
        self.assertEqual(result.grant.last_used_at, T0 + 100)
        info = self.live("r1-a", T0 + 100)
        self.assertEqual((info.grant_id, info.scopes, info.subject), ("g1", frozenset(SCOPES), "alice"))
        self.assertEqual(self.redeem("r1", "r2", T0 + 200).status, "rotated")

    def test_refresh_records_use_once_a_minute(self) -> None:
        """
        A refresh records the grant's use (C{last_used_at}) unless the last
        recorded one is less than L{USE_RESOLUTION} seconds old: the grant
        the redemption returns and the stored one agree.
        """
        self.grant_with_tokens()
        steps = [
            ("g1-r0", "r1", T0 + 100, T0 + 100),
            ("r1", "r2", T0 + 100 + USE_RESOLUTION - 1, T0 + 100),
            ("r2", "r3", T0 + 100 + USE_RESOLUTION, T0 + 100 + USE_RESOLUTION),
        ]
        for token, new, now, recorded in steps:
            result = self.redeem(token, new, now)
            self.assertEqual((result.status, result.grant.last_used_at), ("rotated", recorded), now)
            [grant] = self.ok(self.store.list_grants())
            self.assertEqual(grant.last_used_at, recorded, now)

    def test_refresh_narrowed_scopes(self) -> None:
        """
        A narrowed refresh narrows the new access token only: the next
        refresh without C{scope} gets every scope of the grant back.
        """
        self.grant_with_tokens()
        result = self.redeem("g1-r0", "r1", T0 + 100, scopes=("mcp:read",))
        self.assertEqual(result.status, "rotated")
        self.assertEqual(self.live("r1-a", T0 + 100).scopes, frozenset({"mcp:read"}))
        self.assertEqual(self.redeem("r1", "r2", T0 + 200).status, "rotated")
        self.assertEqual(self.live("r2-a", T0 + 200).scopes, frozenset(SCOPES))

    def test_refresh_keeps_grant_resource(self) -> None:
        self.grant_with_tokens()
        other = attr.evolve(access("r1-a", T0 + 100), resource="https://evil.example/mcp")
        self.ok(
            self.store.redeem_refresh_token(h("g1-r0"), T0 + 100, GRACE, None, other, refresh("r1"))
        )
        self.assertEqual(self.live("r1-a", T0 + 100).resource, RESOURCE)

    def test_refresh_invalid_scope(self) -> None:
        """
        Asking for a scope the grant lacks changes nothing.
        """
        self.grant_with_tokens()
        result = self.redeem("g1-r0", "r1", T0 + 100, scopes=("mcp:read", "admin"))
        self.assertEqual(result.status, "invalid_scope")
        self.assertIsNone(self.live("r1-a", T0 + 100))
        self.assertEqual(self.redeem("r1", "r2", T0 + 100).status, "unknown")
        self.assertEqual(self.redeem("g1-r0", "r1", T0 + 100).status, "rotated")

    def test_refresh_expired(self) -> None:
        self.grant_with_tokens()
        self.assertEqual(self.redeem("g1-r0", "r1", T0 + REFRESH_TTL).status, "expired")
        self.assertIsNone(self.live("r1-a", T0 + REFRESH_TTL))

    def test_refresh_idle_expiry_moves(self) -> None:
        """
        Each rotation gives the new token its own idle lifetime.
        """
        self.grant_with_tokens()
        later = T0 + REFRESH_TTL - 1
        self.assertEqual(self.redeem("g1-r0", "r1", later).status, "rotated")
        self.assertEqual(self.redeem("r1", "r2", later + REFRESH_TTL - 1).status, "rotated")

    def test_refresh_unknown(self) -> None:
        self.assertEqual(self.redeem("nothing", "r1", T0).status, "unknown")

    def test_refresh_revoked(self) -> None:
        self.grant_with_tokens()
        self.ok(self.store.revoke_grant("g1", T0 + 1))
        result = self.redeem("g1-r0", "r1", T0 + 2)
        self.assertEqual(result.status, "revoked")
        self.assertIsNone(self.live("r1-a", T0 + 2))

    def test_refresh_reused(self) -> None:
        """
        A spent token presented after the grace window ends the grant,
        and the event is logged without secrets.
        """
        self.grant_with_tokens()
        self.assertEqual(self.redeem("g1-r0", "r1", T0 + 100).status, "rotated")
        result = self.redeem("g1-r0", "r1b", T0 + 100 + GRACE + 1)
        self.assertEqual(result.status, "reused")
        self.assertEqual(result.grant.revoked_at, T0 + 100 + GRACE + 1)
        self.assertIsNone(self.live("r1-a", T0 + 112))
        self.assertIsNone(self.live("r1b-a", T0 + 112))
        self.assertEqual(self.redeem("r1", "r2", T0 + 113).status, "revoked")

    def test_refresh_grace(self) -> None:
        """
        The loser of a parallel refresh gets a sibling of the winner's
        token; once one sibling is rotated, presenting the other is reuse
        (after the grace window of that rotation: see
        L{test_refresh_superseded_sibling} for inside it).
        """
        self.grant_with_tokens()
        self.assertEqual(self.redeem("g1-r0", "r1", T0 + 100).status, "rotated")
        result = self.redeem("g1-r0", "r1b", T0 + 100 + GRACE)
        self.assertEqual(result.status, "grace")
        self.assertIsNotNone(self.live("r1b-a", T0 + 110))
        self.assertIsNotNone(self.live("r1-a", T0 + 110))
        self.assertEqual(self.redeem("r1b", "r2", T0 + 200).status, "rotated")
        self.assertEqual(self.redeem("r1", "r2b", T0 + 200 + GRACE + 1).status, "reused")
        self.assertEqual(self.ok(self.store.list_grants()), [])

    def test_refresh_superseded_sibling(self) -> None:
        """
        The Claude.ai pattern: two parallel refreshes of r0 give r1 and r1b;
        rotating r1b revokes r1; r1 presented within the grace window of
        that revocation is refused, but the grant and the winning branch
        live on.  Nothing is stored for the refused request.
        """
        self.grant_with_tokens()
        self.redeem("g1-r0", "r1", T0 + 100)
        self.redeem("g1-r0", "r1b", T0 + 101)
        self.assertEqual(self.redeem("r1b", "r2", T0 + 102).status, "rotated")
        result = self.redeem("r1", "lost", T0 + 102 + GRACE)
        self.assertEqual(result.status, "superseded")
        self.assertIsNone(result.grant.revoked_at)
        self.assertIsNone(self.live("lost-a", T0 + 103))
        self.assertEqual([g.grant_id for g in self.ok(self.store.list_grants())], ["g1"])
        self.assertIsNotNone(self.live("r2-a", T0 + 103))
        # Again, still inside the window: still refused, still harmless.
        self.assertEqual(self.redeem("r1", "lost2", T0 + 103).status, "superseded")
        self.assertEqual(self.redeem("r2", "r3", T0 + 104).status, "rotated")

    def test_refresh_parallel_across_clocks(self) -> None:
        """
        A parallel refresh that took its time before the winner's (two
        workers: each request reads its clock when it starts, and the
        later one's batch may commit first) is the loser of the same race:
        a sibling, or refused as superseded, never the reuse that ended
        the grant (it did: 4 grants of 5 revoked by 30 parallel refreshes
        of one token across two workers on PostgreSQL, now - used_at -1
        to -5 ms).  Beyond the window either way it is still reuse.
        """
        self.grant_with_tokens()
        self.assertEqual(self.redeem("g1-r0", "r1", T0 + 100).status, "rotated")
        self.assertEqual(self.redeem("g1-r0", "r1b", T0 + 99.995).status, "grace")
        self.assertEqual(self.redeem("r1b", "r2", T0 + 102).status, "rotated")
        result = self.redeem("r1", "lost", T0 + 101.995)
        self.assertEqual(result.status, "superseded")
        self.assertIsNone(result.grant.revoked_at)
        self.assertEqual(self.redeem("r2", "r3", T0 + 103).status, "rotated")
        self.assertEqual(self.redeem("r2", "r3b", T0 + 103 - GRACE - 1).status, "reused")

    def test_refresh_superseded_sibling_late(self) -> None:
        """
        Outside the grace window of the revocation it is reuse again.
        """
        self.grant_with_tokens()
        self.redeem("g1-r0", "r1", T0 + 100)
        self.redeem("g1-r0", "r1b", T0 + 101)
        self.redeem("r1b", "r2", T0 + 102)
        result = self.redeem("r1", "lost", T0 + 102 + GRACE + 0.5)
        self.assertEqual(result.status, "reused")
        self.assertEqual(result.grant.revoked_at, T0 + 102 + GRACE + 0.5)

    def test_refresh_superseded_needs_grace(self) -> None:
        """
        With grace off there are no siblings to supersede: a revoked token
        is reuse, at once.
        """
        self.grant_with_tokens()
        self.redeem("g1-r0", "r1", T0 + 100)
        self.redeem("g1-r0", "r1b", T0 + 101)
        self.redeem("r1b", "r2", T0 + 102)
        self.assertEqual(self.redeem("r1", "lost", T0 + 102, grace=0).status, "reused")

    def test_refresh_grace_narrowed(self) -> None:
        self.grant_with_tokens()
        self.redeem("g1-r0", "r1", T0 + 100)
        result = self.redeem("g1-r0", "r1b", T0 + 101, scopes=("mcp:write",))
        self.assertEqual(result.status, "grace")
        self.assertEqual(self.live("r1b-a", T0 + 101).scopes, frozenset({"mcp:write"}))
        self.assertEqual(self.redeem("r1b", "r2", T0 + 102).status, "rotated")
        self.assertEqual(self.live("r2-a", T0 + 102).scopes, frozenset(SCOPES))

    def test_refresh_grace_sibling_cap(self) -> None:
        self.grant_with_tokens()
        self.redeem("g1-r0", "r1", T0 + 100)
        for n in range(3):
            self.assertEqual(self.redeem("g1-r0", f"s{n}", T0 + 101).status, "grace")
        # One replay too many inside the window is refused, but the grant
        # (and the tokens already handed out) live on.
        self.assertEqual(self.redeem("g1-r0", "s3", T0 + 101).status, "grace_exhausted")
        self.assertEqual(self.redeem("s2", "s4", T0 + 102).status, "rotated")

    def test_refresh_grace_disabled(self) -> None:
        self.grant_with_tokens()
        self.redeem("g1-r0", "r1", T0 + 100, grace=0)
        self.assertEqual(self.redeem("g1-r0", "r1b", T0 + 100, grace=0).status, "reused")

    def test_refresh_older_generation_reused(self) -> None:
        """
        Grace covers only the generation just before the live one.
        """
        self.grant_with_tokens()
        self.redeem("g1-r0", "r1", T0 + 100)
        self.redeem("r1", "r2", T0 + 101)
        self.assertEqual(self.redeem("g1-r0", "r1b", T0 + 102).status, "reused")

    def test_refresh_rolls_back(self) -> None:
        """
        A refresh that fails half-way (the new refresh token's hash is
        taken) leaves the presented token unspent and stores nothing.
        """
        self.grant_with_tokens()
        self.grant_with_tokens("g2")
        d = self.store.redeem_refresh_token(
            h("g1-r0"), T0 + 100, GRACE, None, access("r1-a", T0 + 100), refresh("g2-r0")
        )
        self.failureResultOf(d, StoreConflict)
        self.assertIsNone(self.live("r1-a", T0 + 100))
        grant = self.ok(self.store.list_grants(subject="alice"))[0]
        self.assertIsNone(grant.last_used_at)
        self.assertEqual(self.redeem("g1-r0", "r1", T0 + 100).status, "rotated")

    # Revocation

    def test_revoke_access_token(self) -> None:
        """
        Revoking an access token ends only that token.
        """
        self.grant_with_tokens()
        self.assertIsNone(self.ok(self.store.revoke_token(h("g1-a0"), T0 + 2)))
        self.assertIsNone(self.live("g1-a0"))
        self.assertEqual(len(self.ok(self.store.list_grants())), 1)
        self.assertEqual(self.redeem("g1-r0", "r1", T0 + 3).status, "rotated")

    def test_revoke_refresh_token(self) -> None:
        """
        Revoking a refresh token ends its grant (RFC 7009 section 2.1).
        """
        self.grant_with_tokens()
        self.assertEqual(self.ok(self.store.revoke_token(h("g1-r0"), T0 + 2)), "g1")
        self.assertIsNone(self.live("g1-a0"))
        self.assertEqual(self.ok(self.store.list_grants()), [])
        self.assertIsNone(self.ok(self.store.revoke_token(h("g1-r0"), T0 + 3)))

    def test_stamped_hashes(self) -> None:
        """
        Codes and tokens whose hashes carry their secrets' time stamps
        (L{hash_secret} of what L{new_secrets} makes: 76 hex digits) are
        stored, found, rotated and revoked like the plain ones.
        """
        from smeldr_oauth.oauth.secrets import new_secrets

        code, a0, r0, a1, r1 = (hash_secret(secret) for secret in new_secrets(5))
        self.assertEqual({len(hashed) for hashed in (code, a0, r0, a1, r1)}, {76})
        self.ok(self.store.create_grant(make_grant("g1"), attr.evolve(make_code("unused", "g1"), code_hash=code)))
        self.assertEqual(self.ok(self.store.consume_code(code, T0 + 1)).code.code_hash, code)
        self.ok(self.store.add_tokens("g1", attr.evolve(access("x"), token_hash=a0), attr.evolve(refresh("x"), token_hash=r0)))
        self.assertEqual(self.ok(self.store.lookup_access_token(a0, T0 + 2)).grant_id, "g1")
        redemption = self.ok(
            self.store.redeem_refresh_token(
                r0, T0 + 3, GRACE, None, attr.evolve(access("y"), token_hash=a1), attr.evolve(refresh("y"), token_hash=r1)
            )
        )
        self.assertEqual(redemption.status, "rotated")
        self.assertIsNotNone(self.ok(self.store.lookup_access_token(a1, T0 + 4)))
        self.assertIsNone(self.ok(self.store.lookup_access_token(a1.upper(), T0 + 4)))
        self.assertEqual(self.ok(self.store.revoke_token(r1, T0 + 5)), "g1")
        self.assertIsNone(self.ok(self.store.lookup_access_token(a1, T0 + 6)))

    def test_hash_spelled_otherwise(self) -> None:
        """
        A stored hash is found only as L{hash_secret} spells it (64
        lowercase hex digits): its capitals, its bytes as text, or text
        that is no hash at all find nothing and change nothing, on every
        store (SQLite keys hashes by their bytes: L{hashkeys}).
        """
        self.grant_with_tokens()
        for other in (h("g1-a0").upper(), h("g1-a0")[:-2], " " + h("g1-a0"), "not a hash", ""):
            self.assertIsNone(self.ok(self.store.lookup_access_token(other, T0 + 2)))
            self.assertIsNone(self.ok(self.store.revoke_token(other, T0 + 2)))
        for other in (h("g1-r0").upper(), "not a hash"):
            self.assertIsNone(self.ok(self.store.revoke_token(other, T0 + 2)))
            redemption = self.ok(
                self.store.redeem_refresh_token(other, T0 + 3, GRACE, None, access("n-a", T0 + 3), refresh("n", T0 + 3))
            )
            self.assertEqual(redemption.status, "unknown")
        self.assertEqual(self.ok(self.store.consume_code(h("g1-code").upper(), T0 + 3)).status, "unknown")
        self.assertIsNotNone(self.live("g1-a0"))
        self.assertEqual(self.redeem("g1-r0", "g1-r1", T0 + 4).status, "rotated")

    def test_revoke_unknown_token(self) -> None:
        self.assertIsNone(self.ok(self.store.revoke_token(h("nothing"), T0)))
        self.assertIsNone(self.ok(self.store.revoke_token(h("nothing"), T0, client_id="client-1")))

    def test_revoke_token_of_named_client(self) -> None:
        """
        A client naming itself revokes its own tokens as before.
        """
        self.grant_with_tokens()
        self.assertIsNone(self.ok(self.store.revoke_token(h("g1-a0"), T0 + 2, client_id="client-1")))
        self.assertIsNone(self.live("g1-a0"))
        self.assertEqual(self.ok(self.store.revoke_token(h("g1-r0"), T0 + 2, client_id="client-1")), "g1")
        self.assertEqual(self.ok(self.store.list_grants()), [])

    def test_revoke_token_of_another_client(self) -> None:
        """
        Another client's token, access or refresh, is left alone (RFC 7009
        section 2.1), and the answer looks like an unknown token's.
        """
        self.grant_with_tokens()
        self.assertIsNone(self.ok(self.store.revoke_token(h("g1-a0"), T0 + 2, client_id="other")))
        self.assertIsNone(self.ok(self.store.revoke_token(h("g1-r0"), T0 + 2, client_id="other")))
        self.assertIsNotNone(self.live("g1-a0"))
        self.assertEqual(len(self.ok(self.store.list_grants())), 1)
        self.assertEqual(self.redeem("g1-r0", "r1", T0 + 3).status, "rotated")

    def test_refresh_superseded_status_kept_by_store(self) -> None:
        """
        The superseded sibling's revocation time is what the store hands
        the decision: a revoked sibling of an earlier race is reuse once
        the window of its own revocation has passed, even if a later
        rotation happened recently.
        """
        self.grant_with_tokens()
        self.redeem("g1-r0", "r1", T0 + 100)
        self.redeem("g1-r0", "r1b", T0 + 101)
        self.redeem("r1b", "r2", T0 + 102)  # revokes r1 at T0 + 102
        self.redeem("r2", "r3", T0 + 102 + GRACE + 5)
        self.assertEqual(self.redeem("r1", "lost", T0 + 102 + GRACE + 6).status, "reused")

    def test_revoke_grant(self) -> None:
        self.grant_with_tokens()
        self.assertTrue(self.ok(self.store.revoke_grant("g1", T0 + 2)))
        self.assertFalse(self.ok(self.store.revoke_grant("g1", T0 + 3)))
        self.assertFalse(self.ok(self.store.revoke_grant("nope", T0 + 3)))
        self.assertIsNone(self.live("g1-a0"))

    def test_revoke_grants_of_site_token(self) -> None:
        self.grant_with_tokens("g1", site_token_id="s1")
        self.grant_with_tokens("g2", site_token_id="s1")
        self.grant_with_tokens("g3", site_token_id="s2")
        ended = self.ok(self.store.revoke_grants_of_site_token("s1", T0 + 5))
        self.assertEqual(sorted(ended), ["g1", "g2"])
        self.assertEqual(self.ok(self.store.revoke_grants_of_site_token("s1", T0 + 6)), [])
        self.assertEqual([g.grant_id for g in self.ok(self.store.list_grants())], ["g3"])
        self.assertIsNone(self.live("g1-a0"))
        self.assertIsNotNone(self.live("g3-a0"))

    def test_list_grants_filters(self) -> None:
        self.grant_with_tokens("g1", subject="alice", site_token_id="s1")
        self.grant_with_tokens("g2", subject="bob", site_token_id="s1", now=T0 + 1)
        self.grant_with_tokens("g3", subject="alice", site_token_id=None, now=T0 + 2)

        def ids(**kw: Any) -> list[str]:
            return [g.grant_id for g in self.ok(self.store.list_grants(**kw))]

        self.assertEqual(ids(), ["g1", "g2", "g3"])
        self.assertEqual(ids(subject="alice"), ["g1", "g3"])
        self.assertEqual(ids(site_token_id="s1"), ["g1", "g2"])
        self.assertEqual(ids(subject="bob", site_token_id="s1"), ["g2"])
        self.assertEqual(ids(subject="carol"), [])

    def test_touch_grant(self) -> None:
        self.grant_with_tokens()
        self.ok(self.store.touch_grant("g1", T0 + 50))
        [grant] = self.ok(self.store.list_grants())
        self.assertEqual(grant.last_used_at, T0 + 50)

    # Purge

    def test_purge_expired(self) -> None:
        self.grant_with_tokens("g1")
        self.ok(self.store.create_grant(make_grant("g2"), make_code("c2", "g2")))
        # Code, access token: gone; refresh token and both grants stay.
        self.assertEqual(self.ok(self.store.purge_expired(T0 + ACCESS_TTL)), 3)
        self.assertEqual(self.ok(self.store.purge_expired(T0 + ACCESS_TTL)), 0)
        self.assertEqual(len(self.ok(self.store.list_grants())), 2)
        self.assertEqual(self.redeem("g1-r0", "r1", T0 + ACCESS_TTL).status, "rotated")
        # The refreshed access token has expired by now; g2 never got a
        # token, so a week after its creation it goes.
        self.assertEqual(self.ok(self.store.purge_expired(T0 + GRANT_RETENTION)), 2)
        self.assertEqual([g.grant_id for g in self.ok(self.store.list_grants())], ["g1"])

    def test_purge_revoked_grant(self) -> None:
        """
        A revoked grant stays for the retention time, then goes with every
        row hanging from it.
        """
        self.grant_with_tokens()
        self.ok(self.store.revoke_grant("g1", T0 + 10))
        self.assertEqual(self.ok(self.store.purge_expired(T0 + 20)), 0)
        self.assertEqual(self.redeem("g1-r0", "r1", T0 + 21).status, "revoked")
        # code + access token + refresh token + grant
        self.assertEqual(self.ok(self.store.purge_expired(T0 + 10 + GRANT_RETENTION)), 4)
        self.assertEqual(self.redeem("g1-r0", "r1", T0 + 10 + GRANT_RETENTION).status, "unknown")

    def long_lived_access(self, grant_id: str, name: str, expires_at: float) -> None:
        """
        Store an access token of C{grant_id} (and no refresh token) that
        lives until C{expires_at}: longer than the grant itself, here.
        """
        self.ok(self.store.add_tokens(grant_id, attr.evolve(access(name), expires_at=expires_at), None))

    def test_access_token_of_revoked_grant(self) -> None:
        """
        A grant's revocation refuses its access tokens at once, although
        the store does not mark them one by one (the look-up reads the
        grant): every way of ending a grant, and a revocation by the token
        of another client changes nothing.
        """
        for grant_id in ("g1", "g2", "g3"):
            self.grant_with_tokens(grant_id, site_token_id="s-" + grant_id)
        self.assertTrue(self.ok(self.store.revoke_grant("g1", T0 + 2)))
        self.assertEqual(self.ok(self.store.revoke_token(h("g2-r0"), T0 + 2)), "g2")
        self.assertEqual(self.ok(self.store.revoke_grants_of_site_token("s-g3", T0 + 2)), ["g3"])
        for grant_id in ("g1", "g2", "g3"):
            self.assertIsNone(self.live(grant_id + "-a0", T0 + 2))
        # Revoking a refused token is harmless and still answers nothing.
        self.assertIsNone(self.ok(self.store.revoke_token(h("g1-a0"), T0 + 3, client_id="client-1")))
        self.assertIsNone(self.live("g1-a0", T0 + 3))

    def test_access_token_of_purged_grant(self) -> None:
        """
        A grant purged while one of its access tokens has not expired (a
        lifetime longer than the grant retention) takes that token's
        answers with it at once: the token is an orphan, refused by every
        look-up and unknown to revocation, until its own expiry purges it.
        Access tokens neither keep a grant from the purge nor go with it.
        """
        self.ok(self.store.create_grant(make_grant("g1"), make_code("g1-code", "g1")))
        self.assertEqual(self.ok(self.store.consume_code(h("g1-code"), T0 + 1)).status, "ok")
        expiry = T0 + 2 * GRANT_RETENTION
        self.long_lived_access("g1", "g1-long", expiry)
        self.assertIsNotNone(self.live("g1-long", T0 + GRANT_RETENTION - 1))
        # The code expired long ago, then the idle grant: 2 rows.
        self.assertEqual(self.ok(self.store.purge_expired(T0 + GRANT_RETENTION)), 2)
        self.assertEqual(self.ok(self.store.list_grants()), [])
        self.assertIsNone(self.live("g1-long", T0 + GRANT_RETENTION))
        self.assertIsNone(self.ok(self.store.revoke_token(h("g1-long"), T0 + GRANT_RETENTION)))
        self.assertIsNone(self.live("g1-long", T0 + GRANT_RETENTION + 1))
        # The orphan goes at its own expiry.
        self.assertEqual(self.ok(self.store.purge_expired(expiry - 1)), 0)
        self.assertEqual(self.ok(self.store.purge_expired(expiry)), 1)

    def test_access_token_of_purged_revoked_grant(self) -> None:
        """
        A revoked grant purged after the retention goes with its code and
        refresh token; a still unexpired access token of it stays refused
        until its expiry purges it.
        """
        self.grant_with_tokens()
        expiry = T0 + 2 * GRANT_RETENTION
        self.long_lived_access("g1", "g1-long", expiry)
        self.ok(self.store.revoke_grant("g1", T0 + 10))
        self.assertIsNone(self.live("g1-long", T0 + 11))
        # code + expired access token + refresh token + grant
        self.assertEqual(self.ok(self.store.purge_expired(T0 + 10 + GRANT_RETENTION)), 4)
        self.assertIsNone(self.live("g1-long", T0 + 10 + GRANT_RETENTION))
        self.assertEqual(self.ok(self.store.purge_expired(expiry)), 1)

    def registered(self, client_id: str, created_at: float) -> Client:
        client = Client(
            client_id=client_id,
            client_name=None,
            redirect_uris=("https://client.example/cb",),
            created_at=created_at,
        )
        self.ok(self.store.save_client(client))
        return client

    def test_purge_idle_clients(self) -> None:
        """
        A registered client older than the client retention with no grant
        left goes; a young one, or one a grant (even a revoked one) refers
        to, stays.
        """
        self.registered("old", T0)
        self.registered("young", T0 + 10)
        self.registered("client-1", T0)  # make_grant's client
        self.grant_with_tokens(now=T0 + CLIENT_RETENTION - 100)
        self.ok(self.store.revoke_grant("g1", T0 + CLIENT_RETENTION - 50))
        self.ok(self.store.purge_expired(T0 + CLIENT_RETENTION - 1))
        self.assertEqual(self.ok(self.store.count_clients()), 3)
        self.assertEqual(self.ok(self.store.purge_expired(T0 + CLIENT_RETENTION)), 1)
        self.assertIsNone(self.ok(self.store.get_client("old")))
        self.assertIsNotNone(self.ok(self.store.get_client("young")))
        self.assertIsNotNone(self.ok(self.store.get_client("client-1")))
        self.assertEqual(self.ok(self.store.count_clients()), 2)
        # Once the revoked grant itself is purged, its client goes too, in
        # the same purge.
        later = T0 + CLIENT_RETENTION - 50 + GRANT_RETENTION
        self.ok(self.store.purge_expired(later))
        self.assertEqual(self.ok(self.store.list_grants()), [])
        self.assertIsNone(self.ok(self.store.get_client("client-1")))
        self.assertEqual(self.ok(self.store.count_clients()), 0)

    def test_purge_keeps_spent_refresh_tokens(self) -> None:
        """
        Spent refresh tokens outlive a purge until they expire: reuse
        detection needs them.
        """
        self.grant_with_tokens()
        self.redeem("g1-r0", "r1", T0 + 100)
        self.ok(self.store.purge_expired(T0 + 200))
        self.assertEqual(self.redeem("g1-r0", "r1b", T0 + 300).status, "reused")

    def test_start_purging(self) -> None:
        clock = Clock()
        clock.advance(T0)
        self.grant_with_tokens()
        loop = self.store.start_purging(clock, interval=ACCESS_TTL)
        self.addCleanup(loop.stop)
        self.assertIsNotNone(self.live("g1-a0"))
        clock.advance(ACCESS_TTL)
        self.assertIsNone(self.live("g1-a0"))


class MemoryStoreTests(StoreBehaviourMixin, SynchronousTestCase):
    def test_watch_changes(self) -> None:
        """
        Nothing to hear from, but the same call as the SQL stores.
        """
        watch = self.store.watch_changes(lambda payload: None, Clock(), 1.0)
        self.assertTrue(watch.running)
        watch.stop()
        self.assertFalse(watch.running)

    def test_client_retention(self) -> None:
        store = MemoryStore(client_retention=10.0)
        self.ok(store.save_client(Client(client_id="c", client_name=None, redirect_uris=(), created_at=T0)))
        self.assertEqual(self.ok(store.purge_expired(T0 + 9)), 0)
        self.assertEqual(self.ok(store.purge_expired(T0 + 10)), 1)

    def make_store(self) -> MemoryStore:
        return MemoryStore()


class StartPurgingTests(SynchronousTestCase):
    """
    Tests for L{start_purging}.
    """

    def test_failure_does_not_stop(self) -> None:
        """
        A failing purge is logged and the loop goes on.
        """
        calls: list[float] = []

        class Failing:
            def purge_expired(self, now: float) -> Any:
                calls.append(now)
                return fail(RuntimeError("disk full"))

        clock = Clock()
        with capturedLogs() as events:
            loop = start_purging(Failing(), clock, 10)  # type: ignore[arg-type]
            clock.advance(10)
        loop.stop()
        self.assertEqual(calls, [0, 10])
        self.assertEqual(len([e for e in events if "log_failure" in e]), 2)
        self.flushLoggedErrors(RuntimeError)

    def test_outage_one_line(self) -> None:
        """
        A purge that meets a database out of reach (PostgreSQL restarting)
        logs one warning line with the reason, at every interval the outage
        lasts, not a critical traceback; the loop goes on.
        """

        class Unreachable:
            def purge_expired(self, now: float) -> Any:
                return fail(StoreUnavailable("cannot connect to the database"))

        clock = Clock()
        with capturedLogs() as events:
            loop = start_purging(Unreachable(), clock, 10, what="expired rows")  # type: ignore[arg-type]
            clock.advance(10)
        loop.stop()
        self.assertFalse([e for e in events if "log_failure" in e])
        said = [(e["log_level"], formatEvent(e)) for e in events]
        self.assertEqual(said, [(LogLevel.warn, "Purging expired rows failed: cannot connect to the database")] * 2)
        self.assertEqual(events[0]["log_namespace"], "smeldr_oauth.store.common")
