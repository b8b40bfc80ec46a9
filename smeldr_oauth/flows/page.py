# -*- test-case-name: tests.test_flows_page -*-
"""
The operator's page at C{/oauth/flows}: the flow timeline
(L{smeldr_oauth.flows}) of the clients the server saw, each with the
known failure it shows, and one client's steps.

It opens to an admin site token only (C{smeldr-oauth-admin token create
NAME --admin}), not to the people who approve apps: it shows every
client's steps.  Sign-in, the session cookie, CSRF tokens, the paste rate
limit and the page headers (CSP with a nonce, no framing, no caching) are
the connected-apps page's (L{smeldr_oauth.web.grants}), reused by
subclassing; only the admin check, the actions and the content differ.
"""

from __future__ import annotations

from typing import Any, Callable, Optional
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.template import Tag, tags

from smeldr_oauth.flows import render
from smeldr_oauth.flows.model import LABELS, MAX_FIELD, Step
from smeldr_oauth.flows.patterns import Context, Finding, recognise
from smeldr_oauth.flows.store import IFlowStore
from smeldr_oauth.oauth.model import Approval
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.web import pages
from smeldr_oauth.web.grants import GrantsPage, PageSession, signin_page, signout_form
from smeldr_oauth.web.oauth import issuer_path

TITLE = "Connection timelines"
#: Clients listed, and steps shown of one client.
LAST_CLIENTS = 50
LAST_STEPS = 100


def _finding(finding: Finding, docs_url: Optional[str]) -> Tag:
    target = f"troubleshooting.md#{finding.name}"
    link: Any = (
        tags.a(finding.name, href=docs_url.rstrip("/") + "/" + target)
        if docs_url
        else tags.code("docs/" + target)
    )
    return tags.li(class_="finding")(tags.strong("✗ "), finding.message, " — see ", link)


def clients_page(
    action: str, rows: list[tuple[str, float, int, list[Finding]]], csrf: str, docs_url: Optional[str]
) -> pages.Page:
    body: list[Any] = [tags.h1(TITLE)]
    if not rows:
        body.append(tags.p("No client has been seen yet."))
    else:
        items = []
        for client_id, last_at, count, findings in rows:
            items.append(
                tags.tr(
                    tags.td(tags.a(client_id, href="?client=" + quote(client_id, safe="")), class_="wrap"),
                    tags.td(render.when(last_at)),
                    tags.td(str(count)),
                    tags.td(findings[0].name if findings else "—", class_="pattern"),
                )
            )
        body.append(
            tags.div(class_="scroll")(
                tags.table(class_="clients")(
                    tags.thead(
                        tags.tr(tags.th("Client"), tags.th("Last step (UTC)"), tags.th("Steps"), tags.th("Pattern"))
                    ),
                    tags.tbody(items),
                )
            )
        )
    body.append(signout_form(action, csrf))
    return pages.Page(TITLE, body)


def timeline_page(
    action: str, client_id: str, steps: list[Step], findings: list[Finding], csrf: str, docs_url: Optional[str]
) -> pages.Page:
    body: list[Any] = [tags.h1(TITLE), tags.p(tags.a("All clients", href="?")), tags.h2(client_id)]
    if findings:
        body.append(tags.ul(class_="findings")([_finding(f, docs_url) for f in findings]))
    if not steps:
        body.append(tags.p("No step recorded for this client."))
    else:
        rows = [
            tags.tr(
                tags.td(render.when(s.at)),
                tags.td(LABELS.get(s.kind, s.kind)),
                tags.td(s.outcome),
                # The end of the id: a grant's id starts with its creation
                # time (secrets.new_ordered_id), the same for a minute.
                tags.td(tags.span("…" + s.grant_id[-8:], title=s.grant_id) if s.grant_id else "—"),
                tags.td(render.detail_text(s), class_="wrap"),
            )
            for s in steps
        ]
        body.append(
            tags.div(class_="scroll")(
                tags.table(class_="timeline")(
                    tags.thead(
                        tags.tr(
                            tags.th("Time (UTC)"), tags.th("Step"), tags.th("Outcome"), tags.th("Grant"), tags.th("Detail")
                        )
                    ),
                    tags.tbody(rows),
                )
            )
        )
    body.append(signout_form(action, csrf))
    return pages.Page(TITLE, body)


class FlowsPage(GrantsPage):
    """
    The operator's page of one L{OAuthServer}.

    @param flows: the timeline.
    @param is_admin: whether a site token id is a live admin token
        (L{smeldr_oauth.site.tokens.SiteTokenStore.is_admin}).
    @param docs_url: where the documentation is published, for the
        findings' links (otherwise their path in the source is shown).
    """

    def __init__(
        self,
        server: OAuthServer,
        clock: IReactorTime,
        flows: IFlowStore,
        is_admin: Callable[[Optional[str]], "Deferred[bool]"],
        docs_url: Optional[str] = None,
    ) -> None:
        super().__init__(server, clock)
        self.flows = flows
        self.is_admin = is_admin
        self.docs_url = docs_url
        self.path = issuer_path(server.config.issuer) + "/oauth/flows"
        self.cookie_name = b"__Host-smeldr_flows" if self.secure else b"smeldr_flows"
        self.route_name = "smeldr_flows"

    @property
    def action(self) -> str:
        return self.server.config.endpoint("/oauth/flows")

    def _context(self) -> Context:
        config = self.server.config
        return Context(now=self.clock.seconds(), resource=config.resource, access_ttl=config.access_token_ttl)

    async def _admit(self, approval: Approval) -> Optional[str]:
        """
        Only a live admin token opens this page: asked once per request
        (at sign-in, and by L{GrantsPage} before every view or action of a
        session, which then ends if the token was revoked or is no longer
        an admin's).
        """
        if await self.is_admin(approval.site_token_id):
            return None
        return "That site token is not an admin token."

    def _signin(self, request: IRequest, error: Optional[str] = None, status: int = 200) -> bytes:
        page = signin_page(
            self.action,
            error,
            title=TITLE,
            intro="Paste an admin site token to see what each client did.",
            button="Show timelines",
        )
        return pages.respond(request, status, page)

    async def _show(
        self, request: IRequest, session: PageSession, notice: Optional[str] = None, status: int = 200
    ) -> bytes:
        asked = (request.args or {}).get(b"client", []) if request.method == b"GET" else []
        context = self._context()
        if len(asked) == 1:
            client_id = asked[0].decode("utf-8", "replace")[:MAX_FIELD]
            steps = await self.flows.timeline(client_id=client_id, last=LAST_STEPS)
            page = timeline_page(
                self.action, client_id, steps, recognise(steps, context), session.csrf, self.docs_url
            )
            return pages.respond(request, status, page)
        rows = []
        for summary in await self.flows.clients(LAST_CLIENTS):
            steps = await self.flows.timeline(client_id=summary.client_id, last=LAST_STEPS)
            rows.append((summary.client_id, summary.last_at, summary.steps, recognise(steps, context)))
        return pages.respond(request, status, clients_page(self.action, rows, session.csrf, self.docs_url))

    async def _act(
        self, request: IRequest, key: str, session: PageSession, action: list[str], form: dict[str, list[str]]
    ) -> bytes:
        if action == ["signout"]:
            return await super()._act(request, key, session, action, form)
        return await self._show(request, session, None, 400)
