"""
The two references every figure is quoted against, each served by
C{twist web --class ...} so it sits behind the same twisted.web C{Site} and
access log as the server under test:

  - the I{floor}, L{floor}: a plain twisted.web C{Resource} whose
    C{render_GET} returns a small JSON body.  Nothing of Klein, Werkzeug or
    smeldr-oauth runs; this is what twisted.web itself costs per request;
  - the I{ceiling}, L{resource}: one bare Klein route returning the same
    body, so the difference between the two is the price of Klein's
    routing.
"""

from __future__ import annotations

from klein import Klein
from twisted.web.resource import IResource, Resource

app = Klein()

BODY = b'{"ok":true,"service":"smeldr-bench"}'


@app.route("/bare", methods=["GET"])
def bare(request):  # type: ignore[no-untyped-def]
    request.setHeader(b"Content-Type", b"application/json")
    return BODY


def resource() -> IResource:
    """The ceiling (C{GET /bare}): what C{twist web --class} instantiates."""
    return app.resource()


class _Floor(Resource):
    isLeaf = True

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        request.setHeader(b"Content-Type", b"application/json")
        return BODY


def floor() -> IResource:
    """The floor (C{GET /floor}): a bare twisted.web resource tree."""
    root = Resource()
    root.putChild(b"floor", _Floor())
    return root
