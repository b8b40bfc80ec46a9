# -*- test-case-name: tests.test_oauth_routine -*-
"""
Routine events: the debug events published once per request on the hot
paths (a token issued, a tool call that went well), which the metrics and
the flow timeline count and record.

Through L{Logger.emit} each one cost a publisher's walk over every
observer, the C{twist} file observer's namespace level filter (which drops
it: the default level is info) and the event's fields built for all of
them: about 4% of a C{tools/call} and 14 microseconds of a refresh
(docs/performance.md, round four).  L{RoutineEvents.emit} hands the event
to the observers that asked for it directly (L{RoutineEvents.observe}: the
metrics, the timeline) with a plain call, and sends it through the log as
before whenever any I{other} observer may keep a debug event of that
namespace: an operator who runs with C{--log-level debug}, a test that
captures the log, any observer this module cannot prove would drop it.
Either way each observer sees the event once, with the fields
L{Logger.emit} would have given it.

Which observers would drop it is worked out from the publisher's observers
and remembered until they change (or for L{RECHECK} events, so that a
level changed in place is followed soon).
"""

from __future__ import annotations

from time import time
from typing import Any, Optional

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    globalLogPublisher,
)

try:
    # Private to Twisted, and read only to prove an observer would drop an
    # event: if they move, every observer may keep it, and every routine
    # event goes through the log as before (tests.test_oauth_routine pins
    # what this module relies on).
    from twisted.logger._filter import shouldLogEvent as _should_log_event
    from twisted.logger._observer import bitbucketLogObserver as _bitbucket
except ImportError:  # pragma: no cover (a Twisted without them)
    _should_log_event = _bitbucket = None  # type: ignore[assignment]

log = Logger()

#: Events between two checks of the levels, when the observers stay the same.
#: A level changed in place (L{LogLevelFilterPredicate.setLogLevelForNamespace}
#: on a filter already observing) is followed after at most this many routine
#: events: until then debug lines of those events alone may be missing from
#: the file (the metrics and the timeline still see every one).  Nothing in
#: this project changes a level in place (C{twist} sets it once, before the
#: first event), so that is left as it is, not checked on every event.
RECHECK = 1000


def _drops_debug(observer: Any, namespace: str) -> bool:
    """
    Whether C{observer} is known to drop a debug event of C{namespace}: a
    L{FilteringLogObserver} whose predicates are all level filters, one of
    which wants more than debug there (C{twist}'s file observer), and that
    hands what it drops to nobody (no C{negativeObserver}).  Anything else
    may keep it: so does a filter whose Twisted internals are not the ones
    read here.
    """
    if not isinstance(observer, FilteringLogObserver) or _should_log_event is None:
        return False
    if getattr(observer, "_negativeObserver", None) is not _bitbucket:
        return False
    should = getattr(observer, "_shouldLogEvent", None)
    if getattr(should, "func", None) is not _should_log_event or getattr(should, "keywords", None):
        return False
    predicates = getattr(should, "args", None)
    if not predicates or not isinstance(predicates[0], list) or not predicates[0]:
        return False
    levels = predicates[0]
    if not all(type(p) is LogLevelFilterPredicate for p in levels):
        return False
    return any(LogLevel.debug < p.logLevelForNamespace(namespace) for p in levels)


class RoutineEvents:
    """
    The observers that take routine events directly, and the way each such
    event goes: to them alone, or through the log.

    @param publisher: the publisher the observers are added to, and that
        loggers of routine events log to.
    """

    def __init__(self, publisher: LogPublisher = globalLogPublisher) -> None:
        self.publisher = publisher
        self._direct: list[ILogObserver] = []
        self._seen: Optional[tuple[Any, ...]] = None
        self._quiet: dict[str, bool] = {}
        self._countdown = RECHECK

    def observe(self, observer: ILogObserver) -> None:
        """
        Give C{observer} every event of the publisher, and routine events
        directly.
        """
        self.publisher.addObserver(observer)
        if observer not in self._direct:
            self._direct.append(observer)

    def unobserve(self, observer: ILogObserver) -> None:
        """Undo L{observe}."""
        self.publisher.removeObserver(observer)
        if observer in self._direct:
            self._direct.remove(observer)

    def quiet(self, namespace: str) -> bool:
        """
        Whether no observer but the direct ones would keep a debug event
        of C{namespace}.
        """
        try:
            observers: tuple[Any, ...] = tuple(self.publisher._observers)
        except Exception:
            # Not a publisher whose observers can be read: anyone may
            # keep the event (None is known to nobody).
            observers = (None,)
        self._countdown -= 1
        if observers != self._seen or self._countdown <= 0:
            self._seen, self._quiet, self._countdown = observers, {}, RECHECK
        known = self._quiet.get(namespace)
        if known is None:
            direct = self._direct
            known = self._quiet[namespace] = all(
                o in direct or _drops_debug(o, namespace) for o in observers
            )
        return known

    def emit(self, logger: Logger, level: LogLevel, format: str, **fields: Any) -> None:
        """
        C{logger.emit(level, format, **fields)}; a debug event goes to the
        direct observers alone when nobody else would keep it.
        """
        if level is not LogLevel.debug or logger.observer is not self.publisher or not self.quiet(logger.namespace):
            logger.emit(level, format, **fields)
            return
        fields.update(
            log_logger=logger,
            log_level=LogLevel.debug,
            log_namespace=logger.namespace,
            log_source=logger.source,
            log_format=format,
            log_time=time(),
        )
        for observer in self._direct:
            try:
                observer(fields)
            except Exception:
                # As the publisher does: an observer's bug is logged, and
                # the request that published the event goes on.
                log.failure("routine event observer {observer!r} failed", observer=observer)


#: The process's routine events, on the global log publisher.
routine = RoutineEvents()
