# -*- test-case-name: tests.test_web_landing -*-
"""
The landing page at C{/}: what this server is, the MCP URL to paste into
ChatGPT or Claude.ai, and where to go next (the connected-apps page, the
documentation, the metadata documents for developers).  The authorization
server metadata's C{service_documentation} points here.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.web.iweb import IRequest
from twisted.web.template import tags

from smeldr_oauth.oauth.config import Config
from smeldr_oauth.web import errors, pages
from smeldr_oauth.web.oauth import AS_METADATA, PR_METADATA, hsts, issuer_path
from smeldr_oauth.web.routes import Route


def landing_page(config: Config, docs_url: Optional[str] = None) -> pages.Page:
    name = config.service_name
    links: list[Any] = [
        tags.li(tags.a("Connected apps", href=config.endpoint("/oauth/grants")), ": see and disconnect them"),
    ]
    if docs_url:
        links.append(tags.li(tags.a("Documentation", href=docs_url)))
    links.append(
        tags.li(
            "For developers: the ",
            tags.a("authorization server metadata", href=config.issuer_origin + AS_METADATA + issuer_path(config.issuer)),
            " and the ",
            tags.a("protected resource metadata", href=config.issuer_origin + PR_METADATA),
        )
    )
    body = [
        tags.h1(name),
        tags.p(
            f"This server lets AI assistants such as ChatGPT and Claude use {name}'s tools "
            "with your permission: an MCP server with its own OAuth 2.1 authorization server."
        ),
        tags.h2("Connect an assistant"),
        tags.p("Paste this MCP server URL where the assistant asks for one:"),
        tags.p(tags.code(config.resource or "", id="mcp-url")),
        tags.ul(class_="scopes")(
            tags.li("ChatGPT: add a connector with this URL and OAuth authentication."),
            tags.li("Claude.ai: Settings, Connectors, Add custom connector, with this URL."),
        ),
        tags.p(
            "The assistant then opens a page of this site asking for your approval; "
            "approve by pasting a site token. Leave client ids and secrets empty.",
            class_="muted",
        ),
        tags.h2("Manage"),
        tags.ul(class_="scopes")(links),
    ]
    return pages.Page(name, body)


class Landing:
    """
    The landing page, at C{/} and (for an issuer with a path) at the
    issuer's own C{/}, where C{service_documentation} points.
    """

    def __init__(self, config: Config, docs_url: Optional[str] = None) -> None:
        self.page = landing_page(config, docs_url)
        prefix = issuer_path(config.issuer)
        self.paths = list(dict.fromkeys(["/", prefix + "/"]))
        self.hsts = hsts(config.issuer)

    def routes(self) -> list[Route]:
        return [
            Route(path=path, methods={"GET": self.show}, dialect=errors.PAGE, headers=self.hsts, name=f"smeldr_landing:{path}")
            for path in self.paths
        ]

    def show(self, request: IRequest) -> bytes:
        return pages.respond(request, 200, self.page)
