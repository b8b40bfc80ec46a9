"""
Tests for L{smeldr_oauth.oauth.routine}: routine events reach their direct
observers once, and the log whenever another observer may keep them.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
)
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth import routine as routine_module
from smeldr_oauth.oauth.routine import RoutineEvents


class RoutineEventsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.publisher = LogPublisher()
        self.events = RoutineEvents(self.publisher)
        self.logger = Logger(namespace="smeldr_oauth.oauth.tokens", observer=self.publisher)
        self.direct: list[dict[str, Any]] = []
        self.written: list[dict[str, Any]] = []
        self.predicate = LogLevelFilterPredicate(LogLevel.info)
        # What twist installs: a file observer behind a level filter.
        self.publisher.addObserver(FilteringLogObserver(self.written.append, [self.predicate]))
        self.events.observe(self.direct.append)

    def emit(self, level: Any = LogLevel.debug) -> None:
        self.events.emit(self.logger, level, "issued {grant_type}", grant_type="refresh_token", smeldr_event="token_issued")

    def test_direct_when_filtered(self) -> None:
        """
        With every other observer dropping debug events of the namespace,
        the event goes to the direct observers alone, with the fields
        L{Logger.emit} gives an event.
        """
        self.emit()
        self.assertEqual(self.written, [])
        [event] = self.direct
        self.assertEqual(event["smeldr_event"], "token_issued")
        self.assertEqual(event["grant_type"], "refresh_token")
        self.assertIs(event["log_level"], LogLevel.debug)
        self.assertEqual(event["log_namespace"], "smeldr_oauth.oauth.tokens")
        self.assertEqual(event["log_format"], "issued {grant_type}")
        self.assertIsInstance(event["log_time"], float)
        self.assertTrue(self.events.quiet("smeldr_oauth.oauth.tokens"))

    def test_logged_when_debug_is_on(self) -> None:
        """
        When the file observer keeps debug events (C{--log-level debug}, or
        the namespace set to debug), the event goes through the log, and
        each observer sees it once.
        """
        self.predicate.setLogLevelForNamespace("smeldr_oauth.oauth", LogLevel.debug)
        self.events._seen = None  # (a level changed in place: see RECHECK)
        self.emit()
        self.assertEqual(len(self.written), 1)
        self.assertEqual(len(self.direct), 1)
        self.assertIs(self.written[0], self.direct[0])

    def test_level_followed(self) -> None:
        """
        A level changed in place is followed within L{RECHECK} events.
        """
        self.emit()
        self.predicate.setLogLevelForNamespace("", LogLevel.debug)
        for _ in range(routine_module.RECHECK):
            self.emit()
        self.assertTrue(self.written)
        self.assertEqual(len(self.direct), routine_module.RECHECK + 1)

    def test_logged_for_another_observer(self) -> None:
        """
        An observer this module cannot read (a capture, a test's list, a
        filter with other predicates) may keep the event: it goes through
        the log, and is not delivered twice.
        """
        captured: list[dict[str, Any]] = []
        self.publisher.addObserver(captured.append)
        self.emit()
        self.assertEqual(len(captured), 1)
        self.assertEqual(len(self.direct), 1)
        self.publisher.removeObserver(captured.append)
        self.emit()
        self.assertEqual(len(captured), 1)
        self.assertEqual(len(self.direct), 2)

    def test_other_filter(self) -> None:
        """
        A filter with a predicate that is not a level filter may keep it.
        """
        self.publisher.addObserver(FilteringLogObserver(lambda e: None, [lambda e: None]))
        self.assertFalse(self.events.quiet("smeldr_oauth.oauth.tokens"))

    def test_other_logger(self) -> None:
        """
        A logger with an observer of its own logs as before.
        """
        own: list[dict[str, Any]] = []
        self.events.emit(Logger(observer=own.append), LogLevel.debug, "x", smeldr_event="mcp_call")
        self.assertEqual(len(own), 1)
        self.assertEqual(self.direct, [])

    def test_info_logged(self) -> None:
        """
        An event above debug always goes through the log.
        """
        self.emit(LogLevel.info)
        self.assertEqual(len(self.written), 1)
        self.assertEqual(len(self.direct), 1)

    def test_unobserve(self) -> None:
        """
        An observer that left receives nothing, directly or not.
        """
        self.events.unobserve(self.direct.append)
        self.emit()
        self.assertEqual(self.direct, [])
        self.assertEqual(self.written, [])

    def test_failing_observer(self) -> None:
        """
        A direct observer that raises is logged; the others still receive
        the event and the emitter goes on.
        """

        def broken(event: dict[str, Any]) -> None:
            raise RuntimeError("observer bug")

        self.events.observe(broken)
        self.events.observe(self.written.append)
        # (the list's append, already observed through the filter, is now
        # also a direct observer: every observer is known to drop or take.)
        self.emit()
        self.assertEqual(len(self.direct), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class TwistedInternalsTests(SynchronousTestCase):
    """
    What L{smeldr_oauth.oauth.routine} reads of Twisted's private
    attributes, pinned: if a Twisted release changes them, these fail
    (and routine events fall back to the log, as the next tests show).
    """

    def test_filter(self) -> None:
        from twisted.logger._filter import PredicateResult, shouldLogEvent
        from twisted.logger._observer import bitbucketLogObserver

        predicate = LogLevelFilterPredicate(LogLevel.info)
        observer = FilteringLogObserver(lambda e: None, [predicate])
        self.assertIs(observer._shouldLogEvent.func, shouldLogEvent)  # type: ignore[attr-defined]
        self.assertEqual(observer._shouldLogEvent.args, ([predicate],))  # type: ignore[attr-defined]
        self.assertIs(observer._negativeObserver, bitbucketLogObserver)
        # A level filter says no below its level, else maybe; the filter
        # drops an event when any predicate says no.
        debug = {"log_level": LogLevel.debug, "log_namespace": "smeldr_oauth.oauth.tokens"}
        self.assertIs(predicate(debug), PredicateResult.no)
        self.assertIs(predicate(dict(debug, log_level=LogLevel.info)), PredicateResult.maybe)
        self.assertFalse(shouldLogEvent([LogLevelFilterPredicate(LogLevel.debug), predicate], debug))

    def test_publisher(self) -> None:
        publisher = LogPublisher()
        observer = FilteringLogObserver(lambda e: None, [])
        publisher.addObserver(observer)
        self.assertEqual(list(publisher._observers), [observer])


class FallbackTests(SynchronousTestCase):
    """
    When an observer or the publisher is not what this module can read,
    the routine event goes through the log: no observer loses it.
    """

    def setUp(self) -> None:
        self.direct: list[dict[str, Any]] = []

    def emit(self, events: RoutineEvents, publisher: Any) -> None:
        logger = Logger(namespace="smeldr_oauth.oauth.tokens", observer=publisher)
        events.emit(logger, LogLevel.debug, "issued", smeldr_event="token_issued")

    def test_negative_observer(self) -> None:
        """
        A level filter that hands what it drops to another observer may
        keep the event (there).
        """
        publisher = LogPublisher()
        events = RoutineEvents(publisher)
        dropped: list[dict[str, Any]] = []
        publisher.addObserver(
            FilteringLogObserver(lambda e: None, [LogLevelFilterPredicate(LogLevel.info)], negativeObserver=dropped.append)
        )
        events.observe(self.direct.append)
        self.emit(events, publisher)
        self.assertEqual(len(dropped), 1)
        self.assertEqual(len(self.direct), 1)

    def test_filter_internals_changed(self) -> None:
        """
        Without the Twisted function this module recognises, a level
        filter is not known to drop anything.
        """
        publisher = LogPublisher()
        events = RoutineEvents(publisher)
        written: list[dict[str, Any]] = []
        publisher.addObserver(FilteringLogObserver(written.append, [LogLevelFilterPredicate(LogLevel.info)]))
        events.observe(self.direct.append)
        self.patch(routine_module, "_should_log_event", None)
        self.assertFalse(events.quiet("smeldr_oauth.oauth.tokens"))
        self.emit(events, publisher)
        self.assertEqual(len(self.direct), 1)

    def test_publisher_unreadable(self) -> None:
        """
        A publisher whose observers cannot be read: every routine event
        goes through it.
        """

        class Publisher(LogPublisher):
            _observers = property(lambda self: 1 / 0)  # type: ignore[assignment]

            def __init__(self) -> None:
                self.seen: list[Any] = []

            def addObserver(self, observer: Any) -> None:
                self.seen.append(observer)

            def removeObserver(self, observer: Any) -> None:
                self.seen.remove(observer)

            def __call__(self, event: Any) -> None:
                for observer in self.seen:
                    observer(event)

        publisher = Publisher()
        events = RoutineEvents(publisher)
        events.observe(self.direct.append)
        self.emit(events, publisher)
        self.assertEqual(len(self.direct), 1)
        self.assertFalse(events.quiet("smeldr_oauth.oauth.tokens"))
