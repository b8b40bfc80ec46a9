"""
MCP session state that outlives one request, behind the seams a second
backend implements: session records (L{ISessionStore}), delivery to the
process holding a session's stream and of the client's replies
(L{ISessionDelivery}), and the Streamable HTTP resumption log
(L{IEventLog}).

The in-process implementations in L{smeldr_oauth.mcp.state.memory} keep
everything in this process; a shared backend (PostgreSQL, issue 9)
implements the same interfaces so that any process can serve any session.
The live objects (a L{smeldr_oauth.mcp.session.ServerSession} with its
calls in flight, open SSE streams, POST exchanges) always stay in the
process that made them.
"""

from smeldr_oauth.mcp.state.interfaces import IEventLog, ISessionDelivery, ISessionSink, ISessionStore
from smeldr_oauth.mcp.state.records import LEGACY, STREAMABLE, SessionLimitReached, SessionLimits, SessionRecord

__all__ = [
    "IEventLog",
    "ISessionDelivery",
    "ISessionSink",
    "ISessionStore",
    "LEGACY",
    "STREAMABLE",
    "SessionLimitReached",
    "SessionLimits",
    "SessionRecord",
]
