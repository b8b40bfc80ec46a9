"""
The HTTP edge: everything between a socket and the protocol code.

Layers (imports only point down):

  - L{smeldr_oauth.web.site}: the L{SmeldrSite} and its request, which cap
    the request body and refuse unroutable request lines before routing,
    and find the client's address behind trusted proxies.
  - L{smeldr_oauth.web.routes}: the one routing idiom (below).
  - L{smeldr_oauth.web.errors}: every error status the site answers, and
    the one error path (Klein's C{handle_errors}) that writes them.
  - L{smeldr_oauth.web.headers}, L{smeldr_oauth.web.body}: reading
    headers and bodies without trusting their bytes or their size.
  - L{smeldr_oauth.web.responses}, L{smeldr_oauth.web.pages}: JSON
    answers, redirects, and the HTML pages (L{twisted.web.template}).
  - the endpoints built with them: the authorization server's
    (L{smeldr_oauth.web.oauth}, L{smeldr_oauth.web.authorize}), the
    connected-apps page (L{smeldr_oauth.web.grants}), the landing page
    (L{smeldr_oauth.web.landing}) and the health check
    (L{smeldr_oauth.web.health}).

The routing idiom
=================

Every path on the site is a L{Route <smeldr_oauth.web.routes.Route>}: the
path, one handler per method, the route's error format (its L{Dialect
<smeldr_oauth.web.errors.Dialect>}: JSON, an HTML page, or JSON-RPC), its
CORS policy, the headers every answer carries, and an optional check run
before any handler.  A module that serves HTTP exposes a C{routes()}
method returning its list, and L{mount_routes
<smeldr_oauth.web.routes.mount_routes>} puts them on the Klein app.

Handlers take the request and return the body (bytes, a Deferred or a
coroutine).  They never write an error: they raise, either an
L{HTTPError <smeldr_oauth.web.errors.HTTPError>} (the helpers here raise
those: L{read_body <smeldr_oauth.web.body.read_body>} 413/415,
L{header <smeldr_oauth.web.headers.header>} 400) or a protocol's own
error (L{OAuthError <smeldr_oauth.oauth.errors.OAuthError>}, ...), and
L{smeldr_oauth.web.errors} writes the answer in the route's format.  The
same error path answers unknown paths (404) and methods (405, sorted
C{Allow}) when the app is the whole site, so there is no Werkzeug page
anywhere: a newcomer finds every error status in that one file.  A route,
then, looks like this::

    def routes(self) -> list[Route]:
        return [
            Route(path="/oauth/token", methods={"POST": self.token}, dialect=errors.JSON, cors=CORS_ANY),
        ]

    async def token(self, request):
        params = read_form(request)            # 413 / 415 / 400 raised for us
        return json_response(request, await self.server.token(params))
"""

from smeldr_oauth.web.body import read_body, read_form, read_json, read_query
from smeldr_oauth.web.errors import HTTPError, install_error_handlers
from smeldr_oauth.web.headers import header, media_type
from smeldr_oauth.web.responses import json_response, see_other
from smeldr_oauth.web.routes import CORS, Route, mount_routes
from smeldr_oauth.web.site import SmeldrRequest, SmeldrSite, TrustedProxies

__all__ = [
    "CORS",
    "HTTPError",
    "Route",
    "SmeldrRequest",
    "SmeldrSite",
    "TrustedProxies",
    "header",
    "install_error_handlers",
    "json_response",
    "media_type",
    "mount_routes",
    "read_body",
    "read_form",
    "read_json",
    "read_query",
    "see_other",
]
