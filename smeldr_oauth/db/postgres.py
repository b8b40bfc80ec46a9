# -*- test-case-name: tests.test_db_database -*-
"""
The PostgreSQL engine, with psycopg 3.

Connections are in autocommit mode: a read is one statement, one round
trip.  A write transaction is an explicit C{BEGIN} at C{READ COMMITTED};
a read-decide-write sequence takes row locks (C{SELECT ... FOR UPDATE},
L{PostgresEngine.for_update}) or decides with a conditional C{UPDATE}
whose row count says who won, so concurrent processes get exactly the
outcomes they would get one after another.  Deadlocks and serialisation
failures are run again (L{smeldr_oauth.db.database.MAX_RETRIES}).

Announcements between processes are C{NOTIFY}s sent inside the writing
transaction (delivered only if it commits); watchers share one dedicated
C{LISTEN} connection per database: see L{smeldr_oauth.db.notify}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from smeldr_oauth.db.engine import (
    CONFLICT,
    RETRY,
    UNAVAILABLE,
    IDatabaseEngine,
    IWatch,
    question_marks_to_format,
)
from smeldr_oauth.db.notify import NOTIFICATIONS_SCHEMA, Listener, publish

if TYPE_CHECKING:
    from smeldr_oauth.db.database import Database, Transaction

#: The C{--database} URL schemes that select this engine.
SCHEMES = ("postgresql://", "postgres://")

#: Any statement running longer than this is a bug or a stuck lock:
#: cancel it (and the call fails as StoreUnavailable) rather than hold a
#: connection for ever.
STATEMENT_TIMEOUT = 30.0
#: A transaction left open without work (a crashed caller) is ended.
IDLE_IN_TRANSACTION_TIMEOUT = 60.0
CONNECT_TIMEOUT = 5

#: The advisory lock that serialises migrations of one database.
_SCHEMA_LOCK = 0x736D656C  # "smel"

#: SQLSTATE classes that mean "not now": connection exceptions (08),
#: operator intervention (57: shutdown, cancel, statement timeout),
#: insufficient resources (53: too many connections).
_UNAVAILABLE_CLASSES = ("08", "57", "53")
#: Lock not available (lock_timeout).
_UNAVAILABLE_STATES = ("55P03",)
#: Deadlock detected, serialisation failure.
_RETRY_STATES = ("40P01", "40001")

#: The oldest server with generated columns (the posts' search vector).
MIN_SERVER_VERSION = 120000

#: PostgreSQL text cannot hold NUL; U+FFFD, the character made for
#: unrepresentable input, stands in for it.
_NUL = "\x00"
_REPLACEMENT = "\ufffd"


def scrub(value: Any) -> Any:
    """
    C{value} as PostgreSQL can store it: a text's NULs as U+FFFD, anything
    else as it is.  The one rule for every text parameter, array elements
    included (L{smeldr_oauth.db.arrays}).
    """
    if value.__class__ is str and _NUL in value:
        return value.replace(_NUL, _REPLACEMENT)
    return value


_cursor_class: Any = None


def _cursor_factory() -> Any:
    """
    A psycopg cursor that stores U+FFFD for each NUL in a text parameter,
    where PostgreSQL would refuse the statement: bad input (a client id
    with a NUL in it, which SQLite would merely fail to find) must not
    become an error.  Stored rows never contain NUL, so a look-up with one
    still finds nothing.
    """
    global _cursor_class
    if _cursor_class is None:
        import psycopg

        class Cursor(psycopg.Cursor):  # type: ignore[type-arg]
            def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
                if params:
                    params = [scrub(value) for value in params]
                return super().execute(query, params, **kwargs)

            def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> Any:
                scrubbed = [[scrub(value) for value in params] for params in params_seq]
                return super().executemany(query, scrubbed, **kwargs)

        _cursor_class = Cursor
    return _cursor_class


_quoting_class: Any = None


def _quoting_dumper_class() -> Any:
    """
    psycopg's text dumper for the simple cursor (L{PostgresEngine.simple_cursor}),
    quoting a text into the statement's text by doubling its quotes, where
    the server takes a backslash as it is (C{standard_conforming_strings},
    on by default since PostgreSQL 9.1).

    Why: psycopg quotes with libpq's C{PQescapeLiteral}, which looks at
    each character and writes a text holding a backslash as C{E'...'}
    with every backslash doubled; a batch's JSON rows hold one before each
    nested quote (the scopes' JSON inside the JSON), so the server then
    read an escape string too.  It was 4% of the client's instructions a
    refresh (C{docs/performance.md}, "Round fourteen: the worker's CPU a
    refresh on PostgreSQL").  The byte C{'} is never part of a multibyte
    character in a client encoding PostgreSQL offers, so doubling it is
    safe in each.  A text with a NUL (refused, as before), or a session
    where backslashes escape, is quoted by psycopg as before.
    """
    global _quoting_class
    if _quoting_class is None:
        from psycopg.types.string import StrDumperUnknown

        class QuotingStrDumper(StrDumperUnknown):
            def quote(self, obj: Any) -> Any:
                connection = self.connection
                if (
                    connection is None
                    or _NUL in obj
                    or connection.pgconn.parameter_status(b"standard_conforming_strings") != b"on"
                ):
                    return super().quote(obj)
                return b"'" + obj.encode(self._encoding).replace(b"'", b"''") + b"'"

        _quoting_class = QuotingStrDumper
    return _quoting_class


_simple_class: Any = None


def _simple_cursor_class() -> Any:
    """
    psycopg's C{ClientCursor}, keeping the results of a query string's
    statements that ran before the one that failed (and saying how many:
    C{ran}): psycopg raises the error and drops them, and the rows of a
    carried statement, committed before the failing one
    (L{Transaction.carry}), are still needed then.  (Over
    C{_check_results}, which psycopg 3.1 to 3.3 call on every query's
    results before keeping them; a psycopg that stopped doing so fails
    C{tests.test_store_ratelimits}' facts-failure test.)
    """
    global _simple_class
    if _simple_class is None:
        import psycopg
        from psycopg.generators import execute

        kept = (psycopg.pq.ExecStatus.TUPLES_OK, psycopg.pq.ExecStatus.COMMAND_OK)

        class SimpleCursor(psycopg.ClientCursor):  # type: ignore[type-arg]
            ran = 0

            def execute(self, *args: Any, **kwargs: Any) -> Any:
                self.ran = 0
                return super().execute(*args, **kwargs)

            def _check_results(self, results: Any) -> None:
                try:
                    super()._check_results(results)
                except psycopg.Error:
                    done = []
                    for result in results:
                        if result.status not in kept:
                            break
                        done.append(result)
                    self.ran = len(done)
                    if done:
                        self._set_results(done)
                    raise

            def _maybe_prepare_gen(self, pgq: Any, *, prepare: Any = None, binary: Any = None) -> Any:
                # Never prepared (its parameters are in its text): sent
                # without psycopg's count of the statements to prepare,
                # which hashed each batch's whole text (values included)
                # as a key, kept it up to a hundred texts when it was one
                # statement, and dropped it when several (docs/performance.md,
                # "Round fourteen: the worker's CPU a refresh on PostgreSQL").
                if self._conn._pipeline:
                    return (yield from super()._maybe_prepare_gen(pgq, prepare=prepare, binary=binary))
                self._execute_send(pgq, binary=binary)
                results = yield from execute(self._pgconn)
                self._check_results(results)
                self._set_results(results)

        _simple_class = SimpleCursor
    return _simple_class


def is_postgres_url(location: object) -> bool:
    """
    Whether a C{--database} value names a PostgreSQL database.
    """
    return isinstance(location, str) and location.startswith(SCHEMES)


class Row(tuple):  # type: ignore[type-arg]
    """
    A result row readable by position and by column name, as
    C{sqlite3.Row} is, so that one store reads rows of either engine.
    """

    __slots__ = ()
    _columns: dict[str, int] = {}

    def __getitem__(self, key: Any) -> Any:
        if key.__class__ is str:
            return tuple.__getitem__(self, self._columns[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._columns)


_row_classes: dict[tuple[bytes, ...], type[Row]] = {}


def row_factory(cursor: Any) -> Callable[[Any], Any]:
    """
    A psycopg row factory making L{Row}s (one class per column list).  It
    reads the column names off the result itself: C{cursor.description}
    would build column objects on every statement.
    """
    result = cursor.pgresult
    if result is None or not result.nfields:
        return tuple
    names = tuple(result.fname(index) for index in range(result.nfields))
    cls = _row_classes.get(names)
    if cls is None:
        columns = {name.decode("utf-8"): index for index, name in enumerate(names)}
        cls = _row_classes[names] = type("Row", (Row,), {"__slots__": (), "_columns": columns})
    return cls


@implementer(IDatabaseEngine)
class PostgresEngine:
    """
    A PostgreSQL database named by a libpq URL (C{postgresql://user:pass@host:port/dbname},
    or C{postgresql:///dbname?host=/run/postgresql} for a Unix socket).

    @ivar schemas: the schemas every PostgreSQL database carries besides
        the stores' own (the table of large announcement payloads).
    """

    name = "postgresql"
    dbapi_name = "psycopg"
    single_writer = False
    for_update = " FOR UPDATE"
    schemas = (NOTIFICATIONS_SCHEMA,)

    def __init__(self, url: str, *, statement_timeout: float = STATEMENT_TIMEOUT) -> None:
        import psycopg.conninfo

        self.url = url
        self.statement_timeout = statement_timeout
        self._params = psycopg.conninfo.conninfo_to_dict(url)
        self._listener: Optional[Listener] = None

    def connect_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs: dict[str, Any] = dict(
            autocommit=True, row_factory=row_factory, cursor_factory=_cursor_factory()
        )
        if "connect_timeout" not in self._params:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT
        if "application_name" not in self._params:
            kwargs["application_name"] = "smeldr-oauth"
        return (self.url,), kwargs

    def conninfo(self) -> str:
        """
        The connection string of the dedicated C{LISTEN} connection.
        """
        import psycopg.conninfo

        _, kwargs = self.connect_arguments()
        extra = {k: v for k, v in kwargs.items() if k in ("connect_timeout", "application_name")}
        # Notice a silently dropped TCP peer (no effect on Unix sockets).
        for key, value in (("keepalives", 1), ("keepalives_idle", 30), ("keepalives_interval", 10), ("keepalives_count", 3)):
            if key not in self._params:
                extra[key] = value
        return str(psycopg.conninfo.make_conninfo(self.url, **extra))

    def prepare(self, connection: Any) -> None:
        if connection.info.server_version < MIN_SERVER_VERSION:
            raise RuntimeError(
                f"PostgreSQL {connection.info.server_version // 10000} is too old; 12 or later is needed"
            )
        connection.execute(f"SET statement_timeout = {int(self.statement_timeout * 1000)}")
        connection.execute(
            f"SET idle_in_transaction_session_timeout = {int(IDLE_IN_TRANSACTION_TIMEOUT * 1000)}"
        )

    def begin(self, transaction: "Transaction") -> None:
        transaction.execute("BEGIN")

    def begin_later(self, transaction: "Transaction") -> None:
        """
        A batch's C{BEGIN}, sent with its first statement that can take it
        (L{Transaction.begin_later}).
        """
        transaction.begin_later("BEGIN")

    def simple_cursor(self, cursor: Any) -> Any:
        """
        A cursor on C{cursor}'s connection that binds parameters into the
        statement's text and sends it in the simple query protocol, where
        one message may hold several statements (L{Transaction.execute}'s
        C{simple}).
        """
        simple = _simple_cursor_class()(cursor.connection)
        simple.adapters.register_dumper(str, _quoting_dumper_class())
        return simple

    def spoken(self, connection: Any) -> bool:
        """
        Whether the server has sent something to this idle connection
        since its last answer (without waiting: one C{poll}, no round
        trip; not C{select}, which refuses descriptors past 1,023, and a
        server holding many streams has them).  An idle connection is sent nothing but its end (a server
        that restarted or ended the session says so, then closes): a batch
        does not carry its reads on it (L{Transaction.carry}), since a
        connection lost in that round trip fails the batch, and goes the
        older way, where a connection that died idle is replaced without
        failing a call.
        """
        import select

        try:
            poller = select.poll()
            poller.register(connection.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    @property
    def carries(self) -> bool:
        """
        Whether a batch may carry its reads in its C{BEGIN}'s round trip
        (L{Transaction.carry}): only where the simple cursor keeps the
        results of the statements before a failing one (psycopg's
        C{_check_results}, 3.1 to 3.3; see L{_simple_cursor_class}).
        Without them a failure after the reads' C{COMMIT} would look like
        the reads' own, and they would run, and spend, a second time: a
        psycopg without that method gets the older way, one round trip
        more.
        """
        import psycopg

        return hasattr(psycopg.ClientCursor, "_check_results")

    def ran(self, cursor: Any) -> int:
        """
        After C{cursor} (a L{simple_cursor}) raised for a query string: how
        many of its statements had run before the one that failed (their
        results then read from the first, C{nextset} to the next): 0 for a
        connection lost (L{Transaction.carry}).
        """
        return int(cursor.ran)

    def combine(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[tuple[str, Sequence[Any]]]:
        if len(statements) < 2:
            return list(statements)
        *first, (last, last_params) = statements
        clauses = ", ".join(f"_{index} AS ({sql})" for index, (sql, _) in enumerate(first))
        params = [value for _, values in first for value in values]
        return [(f"WITH {clauses} {last}", (*params, *last_params))]

    def convert(self, sql: str) -> str:
        return question_marks_to_format(sql)

    def classify(self, error: BaseException) -> Optional[str]:
        import psycopg

        if isinstance(error, psycopg.IntegrityError):
            return CONFLICT
        state = getattr(error, "sqlstate", None)
        if state in _RETRY_STATES:
            return RETRY
        if isinstance(error, psycopg.OperationalError) or isinstance(error, psycopg.InterfaceError):
            if state is None or state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_STATES:
                return UNAVAILABLE
        return None

    def broken(self, connection: Any) -> bool:
        return bool(connection.closed or connection.broken)

    def lock_schema(self, transaction: "Transaction") -> None:
        transaction.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))

    def notify(self, transaction: "Transaction", channel: str, payload: str) -> None:
        publish(transaction, channel, payload)

    def watch(
        self,
        database: "Database",
        channel: str,
        callback: Callable[[Optional[str]], None],
        clock: IReactorTime,
        interval: float,
    ) -> IWatch:
        return self.listener(database).listen(channel, callback, resync=lambda: callback(None))

    def listener(self, database: "Database") -> Listener:
        """
        The database's one C{LISTEN} connection, started on first use.
        """
        if self._listener is None:
            self._listener = Listener(database, self.conninfo())
            self._listener.start()
        return self._listener

    def listener_connected(self) -> Optional[bool]:
        """
        Whether the C{LISTEN} connection is up (for the metrics); C{None}
        when nothing listens.
        """
        return None if self._listener is None else self._listener.connected

    def closing(self, database: "Database") -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def change_stamp(self, connection: Any) -> None:
        # Only the server knows, and asking it is a round trip: a
        # revocation by another process would be heard of (LISTEN) only
        # after it committed, so nothing is kept on a stamp here.
        return None

    def describe(self) -> str:
        params = self._params
        host = params.get("host") or "localhost"
        port = params.get("port") or "5432"
        return f"postgresql database {params.get('dbname') or params.get('user') or '?'} on {host}:{port}"
