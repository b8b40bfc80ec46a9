"""
The framework ceiling: one bare Klein route returning a small JSON body,
with nothing of smeldr-oauth in the way.  Served by
C{twist web --class bench.bare.resource}, so it sits behind the same
twisted.web C{Site} and access log as the server under test.
"""

from __future__ import annotations

from klein import Klein
from twisted.web.resource import IResource

app = Klein()

BODY = b'{"ok":true,"service":"smeldr-bench"}'


@app.route("/bare", methods=["GET"])
def bare(request):  # type: ignore[no-untyped-def]
    request.setHeader(b"Content-Type", b"application/json")
    return BODY


def resource() -> IResource:
    """What C{twist web --class} instantiates."""
    return app.resource()
