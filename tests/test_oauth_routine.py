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
