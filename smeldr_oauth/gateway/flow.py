# -*- test-case-name: tests.test_gateway_flow -*-
"""
The policy for what an upstream pushes without being asked: notifications
pass at a bounded rate, and nothing waits in an unbounded queue.

An upstream can send notifications faster than any client reads them (a
chatty logger, a bug, a hostile server).  Each upstream instance has a
token bucket (C{notification_rate} per second, C{notification_burst} at
once).  Within budget, a notification is handed on at once.  Over budget:

  - a notification that only says "this changed" is I{coalesced}: it is
    kept under a key (the list kind; the resource URI; the progress token,
    latest value wins; the elicitation id) and sent when the bucket refills.
    A client never misses that a list or a resource changed, and a progress
    bar shows the latest value;
  - anything else (log messages, unknown notifications) is I{dropped} and
    counted: a log line lost under a flood is the lesser harm;
  - at most C{max_pending} keys wait; past that, coalescable ones are
    dropped too.

So the memory an upstream can make the gateway hold for its notifications
is bounded by C{max_pending} entries, whatever it sends.  Delivery itself
writes into the downstream transport; a client that does not read is the
HTTP front's to disconnect.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from smeldr_oauth.mcp.jsonrpc import Notification


class TokenBucket:
    """
    C{rate} tokens per second, at most C{burst} saved, on an injected clock.
    """

    def __init__(self, clock: IReactorTime, rate: float, burst: int) -> None:
        self.clock = clock
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self._last = clock.seconds()

    def _refill(self) -> None:
        now = self.clock.seconds()
        if now > self._last:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self) -> bool:
        """Spend a token if there is one."""
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1.0 - self.tokens) / self.rate)


def coalesce_key(notification: Notification) -> Optional[tuple[Any, ...]]:
    """
    The key under which a notification replaces an earlier one of the same
    key, or C{None} when it cannot be coalesced (only dropped).
    """
    method, params = notification.method, notification.params
    if method.endswith("/list_changed"):
        return (method,)
    if method == "notifications/resources/updated":
        uri = params.get("uri")
        return (method, uri) if isinstance(uri, str) else None
    if method == "notifications/progress":
        token = params.get("progressToken")
        return (method, token) if isinstance(token, (str, int)) else None
    if method == "notifications/elicitation/complete":
        ident = params.get("elicitationId")
        return (method, ident) if isinstance(ident, str) else None
    return None


class NotificationGate:
    """
    Rate-limit one upstream instance's notifications (see the module
    docstring for the policy).

    @ivar dropped: notifications dropped so far.
    @ivar coalesced: notifications replaced by a later one of the same key.
    """

    def __init__(
        self,
        clock: IReactorTime,
        rate: float,
        burst: int,
        deliver: Callable[[Notification, Any], None],
        max_pending: int = 1024,
        on_drop: Optional[Callable[[Notification], None]] = None,
    ) -> None:
        self.clock = clock
        self.bucket = TokenBucket(clock, rate, burst)
        self.deliver = deliver
        self.max_pending = max_pending
        self.on_drop = on_drop
        self.dropped = 0
        self.coalesced = 0
        self._pending: dict[tuple[Any, ...], tuple[Notification, Any]] = {}
        self._timer: Optional[IDelayedCall] = None
        self._closed = False

    @property
    def pending(self) -> int:
        """How many coalesced notifications wait for the bucket."""
        return len(self._pending)

    def offer(self, notification: Notification, context: Any = None) -> None:
        """A notification arrived from the upstream."""
        if self._closed:
            return
        if self._pending:
            # Whatever waits goes first, so order holds within the budget.
            self._drain()
        if not self._pending and self.bucket.take():
            self.deliver(notification, context)
            return
        key = coalesce_key(notification)
        if key is not None and (key in self._pending or len(self._pending) < self.max_pending):
            if key in self._pending:
                self.coalesced += 1
            # The newest value, in the place of the first: kept in order of first arrival.
            self._pending[key] = (notification, context)
            self._schedule()
            return
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop(notification)

    def _schedule(self) -> None:
        if self._timer is None or not self._timer.active():
            self._timer = self.clock.callLater(self.bucket.wait(), self._flush)

    def _drain(self) -> None:
        while self._pending and not self._closed and self.bucket.take():
            key = next(iter(self._pending))
            notification, context = self._pending.pop(key)
            self.deliver(notification, context)

    def _flush(self) -> None:
        self._timer = None
        self._drain()
        if self._pending and not self._closed:
            self._schedule()

    def close(self) -> None:
        """Forget what waits; deliver nothing more."""
        self._closed = True
        self._pending.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
