# -*- test-case-name: tests.test_gateway_link -*-
"""
One upstream instance serving the downstream sessions of one isolation key,
and everything that must survive that instance: restarts, subscriptions,
the log level, the routing of what the upstream says unasked.

The isolation key decides who shares an instance: per user (the default:
all the sessions of one subject share a process; one user's traffic never
reaches another user's process), per downstream session, or shared by all.

Routing what the upstream sends on its own:

  - progress goes to the request whose token it carries (exact: tokens are
    remapped per connection);
  - a log message, or a server-to-client request, that came on the HTTP
    response stream of a request belongs to that request (exact);
  - otherwise, when the instance serves one user (C{user} and C{session}
    isolation), a server-to-client request goes to the most recent request
    in flight whose client declared the capability, then to the most
    recently attached session that did; a log message goes to every
    session, filtered by each one's level;
  - under C{shared} isolation nothing is guessed: an unattributed log
    message is dropped and an unattributed server-to-client request fails,
    so that one user's data never reaches another user's client;
  - C{list_changed} goes to every session; C{resources/updated} to the
    sessions subscribed to that URI.

Restarts: an instance that ends without being asked fails its calls in
flight (L{smeldr_oauth.gateway.client}), each attached session gets an
C{error} log message saying so, and the next call starts a fresh one.
Crashing again soon after a start adds a backoff (C{restart_backoff},
doubling up to C{restart_backoff_max}); during it calls fail at once with
C{reason: restarting} rather than wait.  An instance holding resource
subscriptions is restarted eagerly when its backoff ends, and its
subscriptions and log level are set again.

Why one module over 500 lines: the lifecycle above (start, crash, backoff,
idle stop) and the routing share one instance's state and must change
together: a restart re-sends the subscriptions and the level the routing
keeps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from smeldr_oauth.gateway import errors
from smeldr_oauth.gateway.client import ServerInfo, UpstreamClient
from smeldr_oauth.gateway.flow import NotificationGate
from smeldr_oauth.gateway.interfaces import IDownstream, IUpstreamHandler
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.context import LOG_LEVELS
from smeldr_oauth.mcp.jsonrpc import JSONRPCError, Notification, Request

if TYPE_CHECKING:  # pragma: no cover
    from smeldr_oauth.gateway.pool import Pool

log = Logger()

#: The capability a server-to-client request needs from the client.
REQUEST_CAPABILITIES = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}

#: An instance that ran this long before crashing starts again without delay.
STABLE_AFTER = 30.0


@attr.s(auto_attribs=True, eq=False)
class CallContext:
    """
    One downstream request in flight upstream: where messages that belong
    to it go.

    @ivar log_level: the level for log messages that belong to this request
        (C{"session"}: the session's; C{None}: send none).
    """

    session: Any
    outlet: Any
    principal: Any
    log_level: Optional[str] = "session"
    done: bool = False


def level_passes(level: Any, threshold: Optional[str]) -> bool:
    """Whether a message at C{level} reaches a client that chose C{threshold} (C{None}: all)."""
    if threshold is None:
        return True
    if level not in LOG_LEVELS:
        return True
    return LOG_LEVELS.index(level) >= LOG_LEVELS.index(threshold)


@implementer(IUpstreamHandler)
class Link:
    """
    The instance (process or HTTP session) of one isolation key.

    @ivar state: C{idle} (no instance), C{starting}, C{ready} or C{stopping}.
    @ivar owner: the principal the instance belongs to (subject only), or
        C{None} under C{shared} isolation.
    @ivar sessions: attached downstream sessions, oldest first.
    @ivar subscriptions: resource URI to the sessions subscribed to it.
    """

    def __init__(self, pool: "Pool", key: tuple[Any, ...], owner: Any) -> None:
        self.pool = pool
        self.key = key
        self.owner = owner
        self.config = pool.config
        self.clock = pool.clock
        self.state = "idle"
        self.client: Optional[UpstreamClient] = None
        self.gate: Optional[NotificationGate] = None
        self.sessions: dict[Any, None] = {}
        self.subscriptions: dict[str, set[Any]] = {}
        self.level: Optional[str] = None
        self.calls: dict[CallContext, None] = {}
        self.last_active = self.clock.seconds()
        self.crashes = 0
        self.not_before = 0.0
        self.started_at: Optional[float] = None
        self.pid: Optional[int] = None
        self._waiters: list[Deferred] = []
        self._timer: Optional[IDelayedCall] = None

    @property
    def shared(self) -> bool:
        return self.config.isolation == "shared"

    @property
    def live(self) -> bool:
        return self.state in ("starting", "ready")

    @property
    def evictable(self) -> bool:
        """Ready and doing nothing anyone would miss (sessions reattach lazily)."""
        c = self.client
        return self.state == "ready" and c is not None and not c.in_flight and not c.serving and not self.subscriptions

    @property
    def forgettable(self) -> bool:
        """
        No instance, no session, no subscription and no restart or idle
        check scheduled: nothing would be lost if the pool dropped this link.
        """
        return self.state == "idle" and not self.sessions and not self.subscriptions and self._timer is None

    # -- what sessions call ------------------------------------------------------

    def attach(self, session: IDownstream) -> None:
        self.sessions[session] = None

    def detach(self, session: IDownstream) -> None:
        """A downstream session ended: drop its subscriptions and its level."""
        self.sessions.pop(session, None)
        for uri in [u for u, holders in self.subscriptions.items() if session in holders]:
            self._release(uri, session)
        self._update_level()
        if not self.sessions and self.config.isolation == "session" and self.state in ("ready", "starting"):
            self.stop("session ended")
        self.pool.forget(self)

    def ensure(self) -> Deferred:
        """
        The running instance, started if needed.

        @return: a L{Deferred} with the L{UpstreamClient}; it fails with an
            C{UPSTREAM_UNAVAILABLE} error (never waits past the startup
            timeout).
        """
        self.last_active = self.clock.seconds()
        if self.state == "ready" and self.client is not None:
            return succeed(self.client)
        if self.state == "stopping":
            return fail(errors.unavailable(self.config.name, "stopped", "it is stopping"))
        start = self.state == "idle"
        if start:
            wait = self.not_before - self.clock.seconds()
            if wait > 0:
                return fail(
                    errors.unavailable(self.config.name, "restarting", f"it is restarting; retry in {wait:.0f}s")
                )
            try:
                self.pool.reserve(self)
            except JSONRPCError as e:
                return fail(e)
        d: Deferred = Deferred(lambda waiter: self._waiters.remove(waiter) if waiter in self._waiters else None)
        self._waiters.append(d)
        if start:
            # May finish at once (and fire the waiter) with an in-process channel.
            self._start()
        return d

    def server_info(self) -> Deferred:
        """The upstream's handshake answer (starting it if needed)."""
        return self.ensure().addCallback(lambda client: client.server)

    def call(self, method: str, params: dict[str, Any], context: CallContext) -> Deferred:
        """
        Forward a request; C{context} routes what belongs to it.

        @return: a cancellable L{Deferred} with the upstream's result.
        """
        self.calls[context] = None

        def send(client: UpstreamClient) -> Deferred:
            return client.request(method, params, context=context, identity=context.principal)

        def done(result: Any) -> Any:
            context.done = True
            self.calls.pop(context, None)
            self.last_active = self.clock.seconds()
            return result

        client = self.client
        if self.state == "ready" and client is not None:
            # The instance runs (every call after the first): the request
            # goes to it now, without a Deferred of the instance to wait
            # on and the result chained through it (what L{ensure} gives).
            self.last_active = self.clock.seconds()
            try:
                sent = send(client)
            except Exception:
                sent = fail()
            return sent.addBoth(done)
        return self.ensure().addCallback(send).addBoth(done)

    def notify(self, method: str, params: dict[str, Any], principal: Any) -> None:
        """Forward a client notification (dropped when no instance runs)."""
        if self.state == "ready" and self.client is not None:
            self.client.notify(method, params, principal)

    def subscribe(self, session: IDownstream, uri: str, principal: Any) -> Deferred:
        """
        Subscribe C{session} to C{uri}: the first subscriber of a URI
        subscribes upstream; later ones only join.
        """
        holders = self.subscriptions.get(uri)
        if holders:
            holders.add(session)
            return succeed({})
        context = CallContext(session, None, principal)

        def joined(result: Any) -> Any:
            self.subscriptions.setdefault(uri, set()).add(session)
            return result

        return self.call("resources/subscribe", {"uri": uri}, context).addCallback(joined)

    def unsubscribe(self, session: IDownstream, uri: str, principal: Any) -> Deferred:
        """The last subscriber of a URI leaving unsubscribes upstream."""
        if session in self.subscriptions.get(uri, ()):
            self._release(uri, session)
        return succeed({})

    def _release(self, uri: str, session: Any) -> None:
        holders = self.subscriptions.get(uri)
        if holders is None:
            return
        holders.discard(session)
        if not holders:
            del self.subscriptions[uri]
            self._background("resources/unsubscribe", {"uri": uri})

    def set_level(self) -> Deferred:
        """
        A session changed its level: the upstream's level is the most
        verbose any attached session chose (each session then filters).
        """
        return self._update_level(wait=True)

    def _update_level(self, wait: bool = False) -> Deferred:
        chosen = [s.log_level for s in self.sessions if s.log_level in LOG_LEVELS]
        level = min(chosen, key=LOG_LEVELS.index) if chosen else None
        if level is None or level == self.level:
            return succeed({})
        self.level = level
        if not wait:
            self._background("logging/setLevel", {"level": level})
            return succeed({})
        return self.ensure().addCallback(
            lambda client: client.request("logging/setLevel", {"level": level}, identity=self.owner)
        )

    def _background(self, method: str, params: dict[str, Any]) -> None:
        # Housekeeping requests: nobody waits for them, failures are logged.
        if self.state != "ready" or self.client is None:
            return

        def failed(failure: Failure) -> None:
            log.info(
                "Upstream {upstream}: {method} failed: {error}",
                upstream=self.config.name,
                method=method,
                error=getattr(failure.value, "message", type(failure.value).__name__),
            )

        self.client.request(method, params, identity=self.owner).addErrback(failed)

    def _event(self, level: LogLevel, text: str, event: str, **fields: Any) -> None:
        errors.instance_event(log, level, text, upstream=self.config.name, pid=self.pid, event=event, **fields)

    def stop(self, why: str) -> Deferred:
        """Stop the instance (idle, evicted, shutdown, session ended)."""
        if self.state not in ("ready", "starting") or self.client is None:
            return succeed(None)
        self._event(LogLevel.info, "stopped: {why}", "gateway_instance_stopped", why=why)
        self.state = "stopping"
        client = self.client
        return client.close()

    # -- lifecycle ---------------------------------------------------------------

    def _start(self) -> None:
        restart = self.crashes > 0
        self.state = "starting"
        channel = self.pool.connector(self.owner)
        client = UpstreamClient(
            channel, self.clock, self, upstream=self.config.name, limits=self.config.limits, identity=self.owner
        )
        self.client = client
        self.pool.metrics.started += 1
        if restart:
            self.pool.metrics.restarts += 1
        client.start(self.config.protocol_version).addCallbacks(
            self._ready, self._failed, callbackArgs=(client,), errbackArgs=(client,)
        )

    def _ready(self, info: ServerInfo, client: UpstreamClient) -> None:
        if client is not self.client:
            return
        self.state = "ready"
        self.started_at = self.last_active = self.clock.seconds()
        self.pid = getattr(client.channel, "pid", None)
        limits = self.config.limits
        self.gate = NotificationGate(
            self.clock, limits.notification_rate, limits.notification_burst, self._route, on_drop=self._dropped
        )
        self._event(LogLevel.info, "ready at {version}", "gateway_instance_started", version=info.protocol_version)
        self._schedule_idle()
        if self.level is not None:
            self._background("logging/setLevel", {"level": self.level})
        for uri in list(self.subscriptions):
            self._background("resources/subscribe", {"uri": uri})
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(client)

    def _failed(self, failure: Failure, client: UpstreamClient) -> None:
        if client is not self.client:
            return
        error = failure.value if failure.check(JSONRPCError) else errors.unavailable(
            self.config.name, "start_failed", "it failed to start"
        )
        log.warn(
            "Upstream {upstream} failed to start: {error}",
            upstream=self.config.name,
            error=error.message,
            smeldr_event="gateway_start_failed",
        )
        self._ended(crashed=True, error=error)

    def _ended(self, crashed: bool, error: Optional[JSONRPCError] = None) -> None:
        self.client = None
        self.pid = None
        if self.gate is not None:
            self.gate.close()
            self.gate = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.state = "idle"
        now = self.clock.seconds()
        if crashed:
            if self.started_at is not None and now - self.started_at >= STABLE_AFTER:
                self.crashes = 0
            self.crashes += 1
            limits = self.config.limits
            delay = 0.0 if self.crashes == 1 else min(
                limits.restart_backoff_max, limits.restart_backoff * 2 ** (self.crashes - 2)
            )
            self.not_before = now + delay
        self.started_at = None
        self.pool.released(self)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(error or errors.unavailable(self.config.name, "stopped", "it was stopped"))

    def upstreamLost(self, reason: str, detail: str) -> None:
        stopped = self.state == "stopping" or reason == "stopped"
        if self.state in ("idle",):
            return
        if self.state == "starting":
            # client.start() fails its own Deferred; _failed does the rest.
            return
        if not stopped:
            self.pool.metrics.crashes += 1
            self._event(LogLevel.warn, "ended: {detail}", "gateway_instance_crashed", detail=detail)
        self._ended(crashed=not stopped)
        if stopped:
            self.pool.forget(self)
            return
        notice = Notification(
            "notifications/message",
            {
                "level": "error",
                "logger": "smeldr-gateway",
                "data": {"upstream": self.config.name, "error": f"The upstream ended: {detail}; it will be restarted"},
            },
        )
        for session in list(self.sessions):
            if level_passes("error", session.log_level):
                session.deliver(notice, None)
        if self.subscriptions:
            self._timer = self.clock.callLater(max(0.0, self.not_before - self.clock.seconds()), self._restart)

    def _restart(self) -> None:
        self._timer = None
        if self.state == "idle" and (self.subscriptions or self.sessions):
            d = self.ensure()
            d.addErrback(lambda f: None)

    def _schedule_idle(self) -> None:
        timeout = self.config.limits.idle_timeout
        due = self.last_active + timeout - self.clock.seconds()
        self._timer = self.clock.callLater(max(0.0, due), self._idle_check)

    def _idle_check(self) -> None:
        self._timer = None
        if self.state != "ready":
            return
        idle_for = self.clock.seconds() - self.last_active
        if self.evictable and not self.calls and idle_for >= self.config.limits.idle_timeout:
            self.stop(f"idle for {idle_for:.0f}s")
            return
        if not self.evictable:
            self.last_active = self.clock.seconds()
        self._schedule_idle()

    # -- what the upstream says unasked (IUpstreamHandler) ------------------------

    def upstreamNotification(self, notification: Notification, context: Optional[CallContext]) -> None:
        self.last_active = self.clock.seconds()
        if self.gate is not None:
            self.gate.offer(notification, context)
        else:
            self._route(notification, context)

    def _dropped(self, notification: Notification) -> None:
        self.pool.metrics.dropped_notifications += 1
        if self.pool.metrics.dropped_notifications % 1000 == 1:
            log.info(
                "Upstream {upstream} sends notifications faster than {rate}/s; dropping ({count} so far)",
                upstream=self.config.name,
                rate=self.config.limits.notification_rate,
                count=self.pool.metrics.dropped_notifications,
                smeldr_event="gateway_notifications_dropped",
            )

    def _route(self, notification: Notification, context: Optional[CallContext]) -> None:
        method, params = notification.method, notification.params
        if method == "notifications/progress":
            if context is not None and not context.done:
                context.session.deliver(notification, context.outlet)
            return
        if method == "notifications/resources/updated":
            uri = params.get("uri")
            for session in list(self.subscriptions.get(uri, ())) if isinstance(uri, str) else ():
                session.deliver(notification, None)
            return
        if method.endswith("/list_changed"):
            for session in list(self.sessions):
                if session.initialized:
                    session.deliver(notification, None)
            return
        if context is not None and not context.done:
            threshold = context.session.log_level if context.log_level == "session" else context.log_level
            if method == "notifications/message" and (
                context.log_level is None or not level_passes(params.get("level"), threshold)
            ):
                return
            context.session.deliver(notification, context.outlet)
            return
        if self.shared:
            self._dropped(notification)
            return
        for session in list(self.sessions):
            if method != "notifications/message" or level_passes(params.get("level"), session.log_level):
                session.deliver(notification, None)

    def upstreamRequest(self, request: Request, context: Optional[CallContext]) -> Deferred:
        self.last_active = self.clock.seconds()
        capability = REQUEST_CAPABILITIES.get(request.method)
        if capability is None:
            return fail(jsonrpc.method_not_found(request.method))
        candidates: list[tuple[Any, Any]] = []
        if context is not None and not context.done:
            candidates.append((context.session, context.outlet))
        elif not self.shared:
            candidates.extend((c.session, c.outlet) for c in reversed(list(self.calls)) if not c.done)
            candidates.extend((s, None) for s in reversed(list(self.sessions)))
        for session, outlet in candidates:
            if session.can_answer(capability, request.params):
                return session.client_request(request.method, request.params, outlet)
        return fail(errors.missing_capability(capability))
