# -*- test-case-name: tests.test_db_database -*-
"""
One database layer for every store, over L{twisted.enterprise.adbapi}.

A L{Database} pairs an adbapi L{ConnectionPool} (which opens connections
through the engine, keeps one per thread, owns the threads and closes
everything at shutdown) with an L{IDatabaseEngine} (what differs between
SQLite and PostgreSQL).  Stores hand it plain functions of a L{Transaction}:

    - L{Database.write} runs one in a write transaction (SQLite's C{BEGIN
      IMMEDIATE}, PostgreSQL's C{BEGIN} plus the row locks the function
      takes), committed when it returns and rolled back when it raises, so
      every call is all or nothing; a deadlock or serialisation failure runs
      it again from the start;
    - L{Database.read} runs one without a transaction (each statement is
      atomic on its own; no store reads across statements outside a write);

and both first make sure the store's L{Schema} is current (L{ensure}).

Errors come out engine-neutral: L{StoreConflict}, L{StoreUnavailable}, or
the engine's own exception for a bug.  A broken connection is dropped and
replaced; a call whose connection dies before it commits (most often a
pooled connection that died while idle, when PostgreSQL restarted) is run
once more on a fresh connection, which is safe because the server rolled
the first attempt back.  A connection lost during the commit itself is
L{StoreUnavailable}: the call may or may not have committed.

Threads: C{threads=0} runs every call at once on the calling thread (the
reactor's): for SQLite a point read or a small WAL write costs tens of
microseconds, less than handing it to a thread and back, and the returned
L{Deferred} has already fired.  C{threads=N} runs calls on adbapi's pool of
N threads (SQLite: 1, its one writer), each with its own connection.

Group commit (C{group_commit=True}; SQLite on the calling thread only):
writes asked for with C{group=True} wait for the end of the reactor turn
and then share one transaction (SQLite: one C{SAVEPOINT} each): see
L{_Batch}.  With pool threads (PostgreSQL) a batch is one call of one
thread, at most L{Database.batches_at_once} of them at a time; the writes
that arrive meanwhile gather into the next batch (at most
L{Database.batch_limit} calls a batch; more queue behind it as further
batches).  Likewise, with C{group_commit}, L{Database.read} calls given a
C{together} (a function that runs many of them as one statement, such as
the rate-limit spends of many token requests) gather and leave as one
call of it.  A grouped write may also carry such a read (L{Before}: a
refresh grant's rate-limit spend): the batch's carried reads run first, as
one call of their C{together}, on the thread that then runs the batch,
and each write only if its read lets it; one hand-off instead of two.  On
PostgreSQL they go in the round trip of the batch's C{BEGIN}, committed
before it (L{_Batch._carry}): one round trip fewer.

Why one module over 500 lines: L{Database} (pool, retries, error
translation, the schema gate) and L{_Batch} (group commit) run the same
connection, savepoint and commit steps, and a batch that fails falls back
to L{Database}'s own one-call path; the small L{Transaction} wrapper is
what both hand to the stores.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Hashable, Iterator, Optional, Sequence, TypeVar

import attr
from twisted.enterprise import adbapi
from twisted.internet import threads as _threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.db.engine import CONFLICT, RETRY, UNAVAILABLE, IDatabaseEngine, IWatch
from smeldr_oauth.db.errors import StoreConflict, StoreUnavailable
from smeldr_oauth.db.migrations import Schema, migrate

log = Logger()

T = TypeVar("T")

#: How often a transaction that met a deadlock or a serialisation failure
#: is run again before the error is given up on.
MAX_RETRIES = 5


class Transaction:
    """
    What a store's function receives: one cursor, C{?} placeholders on
    every engine, and the engine for the few engine-specific clauses.

    C{execute} returns the transaction itself, so that
    C{txn.execute(sql, params).fetchone()} reads naturally.  Rows can be
    read by position and by column name on both engines.

    @ivar engine: the L{IDatabaseEngine}.
    """

    __slots__ = ("_cursor", "_convert", "engine", "_pending", "_carried", "_simple", "_rows", "may_commit", "committing")

    def __init__(self, cursor: Any, engine: IDatabaseEngine, convert: Optional[Callable[[str], str]]):
        self._cursor = cursor
        self._convert = convert
        self.engine = engine
        # A statement without parameters (a batch's BEGIN) waiting to be
        # sent with the next statement that can take it (begin_later).
        self._pending: Optional[str] = None
        # A statement to commit before the pending BEGIN, in its round
        # trip, and what to call with its rows (carry).
        self._carried: Optional[tuple[str, Sequence[Any], Callable[[list[Any]], bool]]] = None
        # PostgreSQL: the client-side-binding cursor of simple=True.
        self._simple: Any = None
        # The cursor whose rows fetchone/fetchall read.
        self._rows: Any = cursor
        #: Set by the batch around its last call: that call's last
        #: statement may commit the transaction in its own round trip
        #: (execute(..., commit=True)).
        self.may_commit = False
        #: A COMMIT has been sent (with a statement): a connection lost
        #: now may or may not have committed.
        self.committing = False

    def begin_later(self, sql: str) -> None:
        """
        Send C{sql} (a statement without parameters: PostgreSQL's C{BEGIN})
        in the same round trip as the next statement run with
        C{simple=True}, or alone just before any other statement.  A
        batch's C{BEGIN} was a round trip of its own (C{docs/performance.md},
        round twelve).
        """
        self._pending = sql

    def carry(self, sql: str, params: Sequence[Any], received: Callable[[list[Any]], bool]) -> None:
        """
        PostgreSQL: send C{sql}, a transaction of its own, committed
        whatever this one then does, in the round trip of this
        transaction's pending C{BEGIN} (L{begin_later}), before it:
        C{BEGIN; sql; COMMIT; BEGIN; ...} in one simple query (a batch's
        carried rate-limit spends, L{Before}: a round trip of their own
        before, C{docs/performance.md}, round thirteen; the first C{BEGIN}
        makes the C{COMMIT} one of a transaction begun, not a warning in
        the server's log).  C{received(rows)} is called with its rows once
        the round trip is back, also when a statement after the second
        C{BEGIN} failed (the carried one had committed then); when it
        returns C{False} the transaction goes no further: L{CarriedRefused}
        is raised, and the caller rolls it back.  When the carried
        statement itself fails, the string stops there, before its
        C{COMMIT}: nothing of it stands, C{received} is not called and the
        error is raised.  A connection lost in that round trip
        (L{committing}) may or may not have committed the carried
        statement.
        """
        if self._convert is not None:
            sql = self._convert(sql)
        self._carried = (sql, params, received)

    def execute(
        self,
        sql: str,
        params: Sequence[Any] = (),
        prepare: Optional[bool] = None,
        simple: bool = False,
        commit: bool = False,
    ) -> "Transaction":
        """
        @param prepare: PostgreSQL: C{False} never makes the statement a
            prepared one (psycopg prepares a statement from its fifth run
            on), so that it is planned afresh for each run, with the
            tables as they are then (see
            L{smeldr_oauth.store.refresh_batch}); C{None}, the default.
        @param simple: PostgreSQL: send the statement in the simple query
            protocol, its parameters bound by psycopg into the text
            (C{psycopg.ClientCursor}; never prepared, planned with the
            values as C{prepare=False}), together with a statement waiting
            from L{begin_later}: one round trip for both.  Only for
            statements whose parameters psycopg writes as literals
            faithfully (text, numbers, lists of them, no NUL).
        @param commit: with C{simple}, and only when L{may_commit}: send
            C{COMMIT} after the statement, in the same round trip.  The
            statement must then raise, in the database, whatever would
            make its caller abandon the transaction: its rows come back
            after the commit.
        """
        if self._convert is not None:
            sql = self._convert(sql)
        if simple:
            return self._execute_simple(sql, params, commit)
        if commit:
            raise ValueError("commit=True needs simple=True")
        self._send_pending()
        self._rows = self._cursor
        if prepare is None:
            self._cursor.execute(sql, params)
        else:
            self._cursor.execute(sql, params, prepare=prepare)
        return self

    def _send_pending(self) -> None:
        if self._carried is not None:
            # A carried statement needs the simple protocol: it goes with
            # the BEGIN alone, before a statement that cannot take them.
            self._execute_simple("", (), False)
        elif self._pending is not None:
            pending, self._pending = self._pending, None
            self._cursor.execute(pending)

    def close(self) -> None:
        """
        Close the cursors (quietly: the connection may be gone).
        """
        _close_quietly(self._cursor)
        if self._simple is not None:
            _close_quietly(self._simple)

    def _execute_simple(self, sql: str, params: Sequence[Any], commit: bool) -> "Transaction":
        if commit and not self.may_commit:
            raise ValueError("this statement is not the transaction's last")
        cursor = self._simple
        if cursor is None:
            cursor = self._simple = self.engine.simple_cursor(self._cursor)  # type: ignore[attr-defined]
        pending, self._pending = self._pending, None
        carried, self._carried = self._carried, None
        parts = [part for part in (pending, sql) if part]
        if carried is not None:
            assert pending is not None, "a carried statement goes before a BEGIN"
            parts.insert(0, f"BEGIN; {carried[0]}; COMMIT")
            params = [*carried[1], *params]
            # Not with a carried statement: its verdict may stop the
            # transaction first (the COMMIT then goes alone).
            commit = False
            self.committing = True
        if commit:
            parts.append("COMMIT")
            self.committing = True
        self._rows = cursor
        try:
            cursor.execute("; ".join(parts), params)
        except BaseException:
            # (BEGIN, the carried statement, COMMIT, BEGIN: 4.)
            if carried is not None and self.engine.ran(cursor) >= 4:  # type: ignore[attr-defined]
                # A statement after the second BEGIN failed: the carried
                # one had committed, and its rows are known.
                self.committing = False
                cursor.nextset()
                carried[2](cursor.fetchall())
            raise
        proceed = True
        if carried is not None:
            self.committing = False
            cursor.nextset()
            proceed = carried[2](cursor.fetchall())
            # Past the carried statement's rows and its COMMIT.
            cursor.nextset()
            cursor.nextset()
        if pending is not None and sql:
            # The rows are the statement's, after the pending one's result.
            cursor.nextset()
        if not proceed:
            raise CarriedRefused()
        return self

    def execute_together(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> "Transaction":
        """
        Run statements that do not depend on each other's effects, in as
        few round trips as the engine allows (see
        L{IDatabaseEngine.combine}); the last one's rows can be fetched.
        """
        for sql, params in self.engine.combine(statements):
            self.execute(sql, params)
        return self

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> "Transaction":
        if self._convert is not None:
            sql = self._convert(sql)
        self._send_pending()
        self._rows = self._cursor
        self._cursor.executemany(sql, params)
        return self

    def fetchone(self) -> Any:
        return self._rows.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._rows.fetchall())

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self._rows.rowcount)

    def notify(self, channel: str, payload: str) -> None:
        """
        Announce C{payload} on C{channel} when this transaction commits: see
        L{IDatabaseEngine.notify}.
        """
        self.engine.notify(self, channel, payload)


class CarriedRefused(Exception):
    """
    A carried statement's rows said that the transaction must go no
    further (L{Transaction.carry}).
    """


class NoThreads:
    """
    Stands in for an adbapi pool's L{ThreadPool} when calls run on the
    calling thread (C{threads=0}): the pool then starts no thread.
    """

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class _Pool(adbapi.ConnectionPool):
    """
    An adbapi pool whose thread pool may be replaced (by L{NoThreads}, or
    by a test's thread-less pool) before it starts: with a reactor that
    is already running, the pool starts inside its own constructor.  Only
    the public C{start} is extended.
    """

    def __init__(self, *args: Any, replacement: Any = None, **kwargs: Any) -> None:
        self._replacement = replacement
        super().__init__(*args, **kwargs)
        self._replace()

    def _replace(self) -> None:
        if self._replacement is not None and not self.running:
            self.threadpool = self._replacement
            self._replacement = None

    def start(self) -> None:
        self._replace()
        super().start()


@attr.s(auto_attribs=True)
class TransactionStats:
    """
    Counters for one transaction name (the store method's name).

    @ivar count: calls finished.
    @ivar errors: calls that raised.
    @ivar retries: runs repeated after a deadlock or serialisation failure.
    @ivar seconds: time spent inside the database, waits for locks included.
    """

    count: int = 0
    errors: int = 0
    retries: int = 0
    seconds: float = 0.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Before:
    """
    A read that a grouped write carries (L{Database.write}'s C{before}):
    run without a transaction on the pool thread that then runs the write,
    just before the write's batch begins, the reads of a batch's calls
    gathered into one call of C{together}; the write runs only when
    C{proceed} says so of the read's result.

    Why: a token request's rate-limit spend (one statement) and then its
    refresh were two batches, two wake-ups of a pool thread and two
    results handed back to the reactor, a Deferred round each; the spend
    carried by the refresh's batch is one (C{docs/performance.md}, round
    eleven).  The read is what it is alone: the same statement, in
    autocommit as before, committed whatever the write then does.

    @ivar schema: the read's schema (made current before the write is).
    @ivar func: C{func(transaction, *args)}, the read alone.
    @ivar args: its arguments.
    @ivar together: C{together(transaction, [args, ...])}, many reads at
        once, with the results they would have one after another.
    @ivar name: what L{Database.transaction_stats} counts it under (once
        a batch, as L{Database.read}'s gathered calls).
    @ivar proceed: C{proceed(result)}, on the pool thread: whether the
        write runs.
    @ivar statement: C{statement([args, ...])}, C{None} or the one
        statement (C{(sql, params)}, parameters that the simple protocol
        takes: see L{Transaction.execute}'s C{simple}) that C{together}
        sends for those calls on PostgreSQL, and C{results(rows)} its rows'
        results: then a batch of more than one call sends it in the round
        trip of its C{BEGIN} (L{Transaction.carry}; L{_Batch._carry}).
    @ivar results: see C{statement}.
    """

    schema: Schema
    func: Callable[..., Any]
    args: tuple[Any, ...]
    together: Callable[[Transaction, list[tuple[Any, ...]]], list[Any]]
    name: str
    proceed: Callable[[Any], bool]
    statement: Optional[Callable[[list[tuple[Any, ...]]], tuple[str, Sequence[Any]]]] = None
    results: Optional[Callable[[list[Any]], list[Any]]] = None


def _now(f: Callable[..., T], *args: Any) -> "Deferred[T]":
    try:
        return succeed(f(*args))
    except BaseException:
        return fail(Failure())


class Database:
    """
    A database (a SQLite file, or a PostgreSQL database) behind an adbapi
    pool and an engine.

    @ivar engine: the L{IDatabaseEngine}.
    @ivar pool: the adbapi L{ConnectionPool}; closed by L{close}.
    @ivar threads: 0 when calls run on the calling thread, else the pool's
        thread count.
    @ivar reactor: the reactor the pool reports to (and a notification
        listener watches sockets with).
    """

    #: With threads: how many grouped batches may run at once, each on a
    #: pool thread of its own; the calls of the reactor turns in between
    #: wait and gather into the next batch.
    batches_at_once = 2

    #: The most calls in one grouped batch of writes.  Once a batch holds
    #: that many, the next call starts another, which queues behind it:
    #: without a cap, everything that arrived while the batch threads were
    #: stalled left as one batch, whose refreshes' writes (about 20 bind
    #: parameters each, in one statement) overflowed libpq's 65,535 from
    #: about 3,300 refreshes on; the batch was abandoned and every call
    #: run again alone, the slowest recovery when it mattered most.  256
    #: keeps a statement near 5,000 parameters and a transaction's locks
    #: short, and is still far more than a busy turn brings.
    batch_limit = 256

    def __init__(
        self,
        engine: IDatabaseEngine,
        reactor: Any = None,
        *,
        threads: int = 1,
        threadpool: Any = None,
        clock: Optional[IReactorTime] = None,
        group_commit: bool = False,
    ) -> None:
        """
        @param reactor: runs the pool's threads and its shutdown trigger;
            the global reactor when C{None} (adbapi's own fallback: leave
            that to the service-wiring layer).
        @param threads: 0 runs every call on the calling thread; N runs
            them on N pool threads (each with its own connection).
        @param threadpool: a replacement for the pool's thread pool (tests
            use a thread-less one with a synchronous reactor).
        @param clock: the time source of C{applied_at} in migrations;
            C{reactor} when C{None}, else the wall clock.
        @param group_commit: let C{write(..., group=True)} calls made in
            one reactor turn (with threads: while the batch threads are
            busy) share a transaction (see L{_Batch}); ignored for a
            single-writer engine (SQLite) with threads.
        """
        if threads < 0 or (engine.single_writer and threads > 1):
            raise ValueError(f"threads must be 0 or 1 for {engine.name}, not {threads!r}")
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.engine = engine
        self.threads = threads
        self.reactor = reactor
        self._clock = clock if clock is not None else reactor
        args, kwargs = engine.connect_arguments()
        self.pool = _Pool(
            engine.dbapi_name,
            *args,
            cp_min=1,
            cp_max=max(threads, 1),
            cp_openfun=engine.prepare,
            cp_reactor=reactor,
            cp_noisy=False,
            replacement=NoThreads() if threads == 0 else threadpool,
            **kwargs,
        )
        self._convert = None if engine.convert("?") == "?" else _cached(engine.convert)
        self._stats: dict[str, TransactionStats] = {}
        self._stats_lock = threading.Lock()
        self._current: set[str] = set()
        self._migrating: dict[str, list[Deferred[int]]] = {}
        self._in_flight = 0
        self._closed = False
        # SQLite: on the calling thread only (its one writer is then that
        # thread).  PostgreSQL: on either path; with threads, a batch is
        # one call of one pool thread.
        self.group_commit = group_commit and (threads == 0 or not engine.single_writer)
        self._batch: Optional[_Batch] = None
        # Batches that reached batch_limit, oldest first, waiting for a
        # batch thread (self._batch is the one still gathering).
        self._full: list[_Batch] = []
        self._holds = 0
        self._batches_running = 0
        self._reads: dict[Any, _ReadBatch] = {}
        self._reads_running = 0

    @property
    def inline(self) -> bool:
        """
        C{True} when calls run on the calling thread (C{threads=0}).
        """
        return self.threads == 0

    def change_stamp(self) -> Optional[Hashable]:
        """
        L{IDatabaseEngine.change_stamp} of this thread's connection, here
        and now: a value that differs from every earlier one once anything
        may have been committed to the database, by this process or
        another.  Only when calls run on the calling thread (C{threads=0}:
        the stamp is then that of the connection every call uses); C{None}
        otherwise, when the engine cannot tell without a round trip
        (PostgreSQL), or when the connection cannot be had (the next call
        says why).  A caller keeps an answer read after taking a stamp only
        while the stamp stays the same.
        """
        if self.threads != 0 or self._closed:
            return None
        try:
            return self.engine.change_stamp(self._connect())
        except Exception:
            return None

    def describe(self) -> str:
        """
        Where the database is, without secrets.
        """
        return str(self.engine.describe())

    # Running calls

    def read(
        self,
        schema: Schema,
        func: Callable[..., T],
        *args: Any,
        name: Optional[str] = None,
        together: Optional[Callable[[Transaction, list[tuple[Any, ...]]], list[Any]]] = None,
    ) -> "Deferred[T]":
        """
        Run C{func(transaction, *args)} without a transaction, once
        C{schema} is current.

        @param name: what L{transaction_stats} counts the call under;
            C{component.function} by default.
        @param together: with L{group_commit}: a function that runs many
            calls of C{func} as one statement, atomic on its own,
            C{together(transaction, [args, ...])}, with the results they
            would have one after another.  The calls of C{func} that
            arrive while C{batches_at_once} of them run gather and leave
            as one call of C{together} (one thread hand-off, one round
            trip; counted once, under C{name}); its failure is every
            call's.
        """
        name = name or _name(schema, func)
        if together is not None and self.group_commit and schema.component in self._current:
            batch = self._reads.get(together)
            if batch is None:
                batch = self._reads[together] = _ReadBatch(name)
                self.reactor.callLater(0, self._send_reads, together)
            d: Deferred[T] = Deferred()
            batch.calls.append((args, d))
            return d
        return self._call(schema, False, name, func, args)

    def _send_reads(self, together: Callable[..., list[Any]], closing: bool = False) -> None:
        batch = self._reads.get(together)
        if batch is None or (self._reads_running >= self.batches_at_once and not closing):
            # Busy: the batch goes on gathering (see _reads_done).
            return
        del self._reads[together]
        self._reads_running += 1
        calls = batch.calls
        self._dispatch(self._interact, False, batch.name, together, ([args for args, _ in calls],)).addBoth(
            self._reads_done, together, calls
        )

    def _reads_done(self, results: Any, together: Callable[..., list[Any]], calls: list[Any]) -> None:
        # The running count is shared by every together function: the
        # slot this batch frees may be another function's turn (sending
        # only this function's next batch left the others gathering, with
        # nothing left to send them).
        self._reads_running -= 1
        if not isinstance(results, Failure) and len(results) != len(calls):
            results = Failure(RuntimeError("a together function returned the wrong number of results"))
        for index, (_, d) in enumerate(calls):
            if isinstance(results, Failure):
                d.errback(results)
            else:
                d.callback(results[index])
        for waiting in list(self._reads):
            self._send_reads(waiting)

    def write(
        self,
        schema: Schema,
        func: Callable[..., T],
        *args: Any,
        name: Optional[str] = None,
        group: bool = False,
        together: Optional[Callable[[Transaction, list[tuple[Any, ...]]], list[Any]]] = None,
        before: Optional[Before] = None,
    ) -> "Deferred[Any]":
        """
        Run C{func(transaction, *args)} in one write transaction, once
        C{schema} is current: committed if it returns, rolled back if it
        raises.

        @param group: with L{group_commit}, the call may share a
            transaction with the other grouped writes of this reactor turn,
            its outcome exactly what it would be alone (L{_Batch}); the
            result comes after the commit, at the end of the turn.
        @param together: with C{group}: a function that runs the batch's
            consecutive calls of C{func} at once, C{together(transaction,
            [args, ...])}, with the results they would have one after
            another (fewer round trips on PostgreSQL); a batch of one call
            runs C{func}.  On SQLite such calls run without a savepoint
            each: an error of theirs abandons the batch, and every call
            runs again alone (see L{_Batch}).
        @param before: a read to run first, in the same hand-off to a pool
            thread (L{Before}); the write runs only if C{before.proceed}
            says so.  The L{Deferred} then fires with C{(read, written)}:
            the read's result or its L{Failure}, and the write's result,
            its L{Failure}, or C{None} when it did not run; a batch that
            has to run its calls again alone does not run the reads again.
        """
        name = name or _name(schema, func)
        if before is not None and not (before.schema.component in self._current and schema.component in self._current):
            # Both schemas current first: the read and the write then leave in one hand-off.
            return (
                self.ensure(before.schema)
                .addCallback(lambda _: self.ensure(schema))
                .addCallback(
                    lambda _: self.write(schema, func, *args, name=name, group=group, together=together, before=before)
                )
            )
        if group and self.group_commit and schema.component in self._current:
            batch = self._batch
            if batch is None or len(batch) >= self.batch_limit:
                if batch is not None:
                    self._full.append(batch)
                batch = self._batch = _Batch(self)
                if not self._holds:
                    self.reactor.callLater(0, self._commit_batch)
            return batch.add(name, func, args, together, before)
        if before is not None:
            return self._dispatch(self._before_then, before, func, args, name)
        return self._call(schema, True, name, func, args)

    def _before_then(self, before: Before, func: Callable[..., Any], args: tuple[Any, ...], name: str) -> Any:
        """
        A write with its L{Before} outside a batch: the read, then, if it
        proceeds, the write, on one pool thread.
        """
        read = _outcome(self._interact, False, before.name, before.func, before.args)
        if isinstance(read, Failure) or not before.proceed(read):
            return (read, None)
        return (read, _outcome(self._interact, True, name, func, args))

    def hold_batches(self) -> Callable[[], None]:
        """
        Keep grouped writes from committing until the returned function is
        called (once; later calls do nothing): they gather in one batch,
        which commits on the turn after the last hold ends.  For
        L{smeldr_oauth.db.sqlite.Checkpointer}, which needs a moment with
        no commit to let SQLite restart the WAL; the reactor goes on
        meanwhile, only the grouped writes' answers wait.
        """
        self._holds += 1
        released: list[bool] = []

        def release() -> None:
            if released:
                return
            released.append(True)
            self._holds -= 1
            if not self._holds and self._batch is not None:
                self.reactor.callLater(0, self._commit_batch)

        return release

    def _commit_batch(self, closing: bool = False) -> None:
        if self._holds and not closing:
            return  # the last release schedules it again
        if self.threads == 0:
            # Every batch gathered so far, oldest first.
            batches = self._full
            if self._batch is not None:
                batches.append(self._batch)
            self._full, self._batch = [], None
            for batch in batches:
                batch.run()
            return
        while self._full or self._batch is not None:
            if self._batches_running >= self.batches_at_once and not closing:
                # Every batch thread is busy: the last batch goes on
                # gathering calls, and the batches leave in order as
                # threads are done (_batch_done).
                return
            if self._full:
                batch = self._full.pop(0)
            else:
                assert self._batch is not None
                batch, self._batch = self._batch, None
            self._batches_running += 1
            self._dispatch(batch.outcomes).addBoth(self._batch_done, batch)

    def _batch_done(self, outcomes: Any, batch: "_Batch") -> None:
        self._batches_running -= 1
        batch.deliver(outcomes)
        if self._full or self._batch is not None:
            self._commit_batch()

    def with_connection(self, func: Callable[..., T], *args: Any) -> "Deferred[T]":
        """
        Run C{func(connection, *args)} with a raw DB-API connection (for an
        engine-specific question such as SQLite's C{PRAGMA data_version}).
        """

        def run() -> T:
            return func(self.pool.connect(), *args)

        return self._dispatch(run)

    def _call(
        self, schema: Schema, write: bool, name: str, func: Callable[..., T], args: tuple[Any, ...]
    ) -> "Deferred[T]":
        if schema.component in self._current:
            return self._dispatch(self._interact, write, name, func, args)
        return self.ensure(schema).addCallback(
            lambda _: self._dispatch(self._interact, write, name, func, args)
        )

    def _dispatch(self, f: Callable[..., T], *args: Any) -> "Deferred[T]":
        if self.threads == 0:
            return _now(f, *args)
        self._in_flight += 1
        d: Deferred[T] = _threads.deferToThreadPool(self.reactor, self.pool.threadpool, f, *args)

        def done(result: Any) -> Any:
            self._in_flight -= 1
            return result

        return d.addBoth(done)

    def _connect(self) -> Any:
        try:
            connection = self.pool.connect()
        except Exception as e:
            if self.engine.classify(e) == UNAVAILABLE:
                raise StoreUnavailable(f"cannot connect to {self.describe()}: {_first_line(e)}") from e
            raise
        if self.engine.broken(connection):
            self._drop(connection)
            return self._connect()
        return connection

    def _drop(self, connection: Any) -> None:
        """
        Forget a dead connection so that the next call on this thread
        opens a new one.
        """
        try:
            self.pool.disconnect(connection)
        except Exception:
            log.failure("could not close a broken database connection")

    def _interact(self, write: bool, name: str, func: Callable[..., T], args: tuple[Any, ...]) -> T:
        """
        Run one call on this thread: see the module docstring.
        """
        engine = self.engine
        started = time.perf_counter()
        retries = 0
        failed = True
        fresh_attempt = False
        try:
            while True:
                connection = self._connect()
                cursor = connection.cursor()
                committing = False
                try:
                    txn = Transaction(cursor, engine, self._convert)
                    if write:
                        engine.begin(txn)
                    result = func(txn, *args)
                    if write:
                        committing = True
                        _commit(connection)
                    failed = False
                    return result
                except BaseException as error:
                    kind = engine.classify(error)
                    self._rollback(connection)
                    if kind == RETRY and retries < MAX_RETRIES:
                        retries += 1
                        continue
                    if kind in (UNAVAILABLE, RETRY):
                        # (A deadlock that keeps coming back is a database
                        # too busy to answer now.)
                        dead = engine.broken(connection)
                        if dead:
                            self._drop(connection)
                        if dead and not committing and not fresh_attempt:
                            # The connection died before the commit (most
                            # often: a pooled connection that died while
                            # idle, when the server restarted), so the
                            # server rolled everything back: try once more
                            # on a fresh one.
                            fresh_attempt = True
                            continue
                        raise StoreUnavailable(f"{self.describe()}: {_first_line(error)}") from error
                    if kind == CONFLICT:
                        # The message names the constraint, never a value.
                        raise StoreConflict(_first_line(error)) from error
                    raise
                finally:
                    _close_quietly(cursor)
        finally:
            self._count(name, started, retries, failed)

    def _rollback(self, connection: Any) -> None:
        try:
            connection.rollback()
        except Exception:
            # The connection is gone; classify() saw why.
            if not self.engine.broken(connection):
                log.failure("rollback failed")

    def _count(
        self, name: str, started: float, retries: int, failed: bool, elapsed: Optional[float] = None
    ) -> None:
        if elapsed is None:
            elapsed = time.perf_counter() - started
        with self._stats_lock:
            stats = self._stats.get(name)
            if stats is None:
                stats = self._stats[name] = TransactionStats()
            stats.count += 1
            stats.retries += retries
            stats.seconds += elapsed
            if failed:
                stats.errors += 1

    # Schemas

    def ensure(self, schema: Schema) -> "Deferred[int]":
        """
        Bring C{schema} (and the schemas the engine itself needs) up to
        date, once per database object; calls made meanwhile wait.  A
        failure (the database is down, or newer than this code) fails those
        calls, and the next call tries again.

        @return: a L{Deferred} firing with the component's version.
        """
        if schema.component in self._current:
            return succeed(schema.version)
        waiters = self._migrating.get(schema.component)
        d: Deferred[int] = Deferred()
        if waiters is not None:
            waiters.append(d)
            return d
        self._migrating[schema.component] = [d]
        now = self._clock.seconds()

        def apply(txn: Transaction) -> int:
            for needed in getattr(self.engine, "schemas", ()):
                migrate(txn, needed, now)
            return migrate(txn, schema, now)

        def done(result: Any) -> None:
            waiting = self._migrating.pop(schema.component)
            if not isinstance(result, Failure):
                self._current.add(schema.component)
                log.info(
                    "database {database} component {component} at schema version {version}",
                    database=self.describe(),
                    component=schema.component,
                    version=result,
                )
            for waiter in waiting:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        self._dispatch(self._interact, True, "migrate", apply, ()).addBoth(done)
        return d

    # Changes made by other processes

    def watch(
        self,
        channel: str,
        callback: Callable[[Optional[str]], None],
        clock: Optional[IReactorTime] = None,
        interval: float = 1.0,
    ) -> IWatch:
        """
        Hear of changes announced on C{channel} by any process: see
        L{IDatabaseEngine.watch}.
        """
        return self.engine.watch(self, channel, callback, clock or self._clock, interval)

    # Figures and shutting down

    def transaction_stats(self) -> dict[str, TransactionStats]:
        """
        A copy of the counters per transaction name.
        """
        with self._stats_lock:
            return {name: attr.evolve(stats) for name, stats in self._stats.items()}

    def pool_stats(self) -> dict[str, int]:
        """
        C{connections} open, C{threads} configured (0: on the reactor
        thread), C{in_flight} calls handed to the threads and not yet back.
        """
        return {
            "connections": len(self.pool.connections),
            "threads": self.threads,
            "in_flight": self._in_flight,
        }

    def close(self) -> None:
        """
        Close every connection and stop the threads; work already queued
        finishes first (the pool joins its threads; grouped writes waiting
        for the end of the reactor turn are run and committed now).
        """
        if not self._closed:
            self._commit_batch(closing=True)
            for together in list(self._reads):
                self._send_reads(together, closing=True)
            self._closed = True
            closing = getattr(self.engine, "closing", None)
            if closing is not None:
                closing(self)
            self.pool.close()


class _Batch:
    """
    Grouped writes of one reactor turn (L{Database.write} with C{group}),
    run in one transaction with one C{COMMIT}: on a busy server many
    refreshes arrive in one turn, and each paid for its own C{BEGIN
    IMMEDIATE}, C{COMMIT} and WAL frames for pages its neighbours wrote
    too.  On PostgreSQL each paid for a hand-off to a pool thread, C{BEGIN}
    and C{COMMIT} round trips and a WAL flush of its own.

    Each call's outcome is exactly what it would be alone:

      - the calls run one after another in the order they were made, each
        inside its own C{SAVEPOINT}, so each sees what the calls before it
        did, as it would had they committed first;
      - SQLite: a call that raises is rolled back to its savepoint, alone,
        and fails as it would alone (L{StoreConflict} for a constraint, the
        error itself for a bug); the others go on.  PostgreSQL: no
        savepoints (two round trips a call); any error ends the transaction
        there, so a call that raises abandons the batch (below).  Calls
        given a C{together} (the refreshes) run without a savepoint on
        SQLite too, and an error of theirs abandons the batch as on
        PostgreSQL (L{_run_together});
      - an error that may have ended the transaction itself (SQLite rolls
        the whole transaction back on some I/O, busy or full-disk errors:
        L{StoreUnavailable} kinds), or a failing C{BEGIN} or C{COMMIT},
        abandons the batch: it is rolled back and every call is run again
        alone, one transaction each, as without grouping (nothing of the
        batch was committed, so nothing runs twice);
      - a connection lost during the C{COMMIT} (which may or may not have
        committed) fails every call with L{StoreUnavailable}, as alone,
        and runs none again;
      - no call's result is given out before the C{COMMIT} that makes it
        durable returns, so an answer never tells of a write that a crash
        could still undo.

    Locks: a batch's refreshes lock their grants in C{grant_id} order
    (L{smeldr_oauth.store.refresh_batch}), so two processes' batches of
    refreshes cannot deadlock on them; other grouped calls lock rows in the
    order of the calls.  Should two batches still lock rows in opposite
    orders, PostgreSQL reports the deadlock to one of them (after its
    C{deadlock_timeout}, 1 s by default), which then runs its calls alone.
    """

    def __init__(self, database: Database) -> None:
        self._database = database
        self._committing = False
        self._calls: list[tuple[str, Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self._togethers: list[Any] = []
        # The calls' Befores (None for most).
        self._befores: list[Optional[Before]] = []

    def __len__(self) -> int:
        return len(self._calls)

    def add(
        self, name: str, func: Callable[..., T], args: tuple[Any, ...], together: Any = None, before: Optional[Before] = None
    ) -> "Deferred[Any]":
        d: Deferred[Any] = Deferred()
        self._calls.append((name, func, args, d))
        self._togethers.append(together)
        self._befores.append(before)
        return d

    def run(self) -> None:
        self.deliver(self.outcomes())

    def outcomes(self) -> list[Any]:
        """
        Run the calls (on a pool thread, with threads): each one's result,
        or a L{Failure}.
        """
        if not any(self._befores):
            return self._writes(self._calls, self._togethers)
        carried = self._carry()
        if carried is not None:
            return carried
        # The reads the calls carry first (each gathered function's calls
        # as one call of its together, in autocommit, as Database.read
        # would), then the writes of the calls they let proceed; a call
        # that carries a read gets (read, written).
        reads = self._reads()
        going = [index for index, read in enumerate(reads) if read is None or read[0]]
        written = self._writes([self._calls[i] for i in going], [self._togethers[i] for i in going])
        return self._with_reads(reads, going, written)

    def _with_reads(self, reads: list[Any], going: list[int], written: list[Any]) -> list[Any]:
        """
        The calls' outcomes: C{written[k]} the write's of C{going[k]}; a
        call that carries a read gets C{(read, written)}.
        """
        outcomes: list[Any] = [None] * len(self._calls)
        for index, outcome in zip(going, written):
            outcomes[index] = outcome
        for index, read in enumerate(reads):
            if read is not None:
                # A write its read stopped has no outcome: (read, None).
                outcomes[index] = (read[1], outcomes[index])
        return outcomes

    def _carry(self) -> Optional[list[Any]]:
        """
        PostgreSQL, a batch of more than one call whose reads are of one
        kind and have a L{Before.statement}: the reads' statement in the
        round trip of the batch's C{BEGIN} and its first statement
        (L{Transaction.carry}: C{BEGIN; reads; COMMIT; BEGIN; facts}), one round
        trip fewer than reads then writes.  The outcomes, or C{None} when
        nothing of that round trip stands (a batch of one call, SQLite,
        other reads, or the reads' statement failed: the string stopped
        there, before its C{COMMIT}): then the batch goes as before, the reads
        first, alone, as L{Database.read} runs them (a deadlock run again,
        the error theirs).

        The verdicts (C{proceed}) come back only with the first
        statement's answer, so that statement (the refreshes' facts) is
        asked for every call of the batch, those whose read will refuse
        them too.  When one is refused, the transaction goes no further
        (L{CarriedRefused}): it is rolled back, nothing of it written (a
        refused grant was locked for that round trip, no longer), and the
        calls that may proceed run as a batch of their own, as they would
        have after the reads.  Refusals (a 429) are the rare case and
        cost a round trip more than before; the writes' functions know
        nothing of the reads, and the rule stays in C{proceed}.  (The
        verdict computed inside the first statement would need each
        read's rule in SQL too.)

        The reads committed whatever the writes do: a failure after the
        second C{BEGIN} (say the facts') abandons the batch as before, its calls
        run again alone, the reads not.  A connection lost in that round
        trip leaves the reads' commit unknown: every call of the batch is
        L{StoreUnavailable} and none runs again, as for a connection lost
        in a batch's C{COMMIT} (the reads then are at most spent once,
        never twice); so the reads are not carried on a connection the
        server has ended while it was idle, a restart (the engine's
        C{spoken}): the older way replaces it without failing a call.
        """
        database = self._database
        present = [before for before in self._befores if before is not None]
        first = present[0]
        if (
            len(self._calls) < 2
            or database.engine.single_writer
            or not database.engine.carries  # type: ignore[attr-defined]
            or first.statement is None
            or first.results is None
            or any(before.together is not first.together for before in present)
        ):
            return None
        try:
            if database.engine.spoken(database._connect()):  # type: ignore[attr-defined]
                return None
        except BaseException:
            return None
        results = first.results
        sql, params = first.statement([before.args for before in present])
        reads: list[Any] = []
        started = time.perf_counter()

        def received(rows: list[Any]) -> bool:
            answers: list[Any]
            try:
                answers = results(rows)
                if len(answers) != len(present):
                    raise RuntimeError("a statement's results were the wrong number")
            except BaseException:
                # (Only a bug: the reads stand, their results are this.)
                answers = [Failure()] * len(present)
            database._count(first.name, started, 0, isinstance(answers[0], Failure))
            given = iter(answers)
            for before in self._befores:
                if before is None:
                    reads.append(None)
                else:
                    answer = next(given)
                    reads.append((not isinstance(answer, Failure) and before.proceed(answer), answer))
            return all(read is None or read[0] for read in reads)

        written = self._together(self._calls, self._togethers, (sql, params, received))
        if not reads:
            if written is None:
                return None
            # The connection was lost: each call is StoreUnavailable.
            return [written[i] if before is None else (written[i], None) for i, before in enumerate(self._befores)]
        going = [index for index, read in enumerate(reads) if read is None or read[0]]
        if written is None:
            calls = [self._calls[i] for i in going]
            if len(going) < len(reads):
                # Refused: the others as a batch of their own.
                written = self._writes(calls, [self._togethers[i] for i in going])
            else:
                # Abandoned after the reads: each call alone, as before.
                written = [self._alone(name, func, args) for name, func, args, _ in calls]
        return self._with_reads(reads, going, written)

    def _reads(self) -> list[Any]:
        """
        Run the reads the calls carry (L{Before}): for each call C{None}
        (it carries none) or C{(proceeds, outcome)}: whether its write
        runs (its read did not fail and C{proceed} said so), and the read's
        result or L{Failure}.
        """
        database = self._database
        reads: list[Optional[tuple[bool, Any]]] = [None] * len(self._calls)
        groups: dict[Any, list[int]] = {}
        for index, before in enumerate(self._befores):
            if before is not None:
                groups.setdefault(before.together, []).append(index)
        for together, indexes in groups.items():
            first = self._befores[indexes[0]]
            assert first is not None
            results: Any
            try:
                results = database._interact(
                    False, first.name, together, ([self._befores[i].args for i in indexes],)  # type: ignore[union-attr]
                )
                if len(results) != len(indexes):
                    raise RuntimeError("a together function returned the wrong number of results")
            except BaseException:
                results = [Failure()] * len(indexes)
            for index, result in zip(indexes, results):
                before = self._befores[index]
                assert before is not None
                reads[index] = (not isinstance(result, Failure) and before.proceed(result), result)
        return reads

    def _writes(self, calls: list[Any], togethers: list[Any]) -> list[Any]:
        """
        Run C{calls}' writes: in one transaction, or each alone when the
        batch is one call or had to be abandoned.
        """
        if not calls:
            return []
        if len(calls) == 1:
            outcomes: Optional[list[Any]] = None
        else:
            outcomes = self._together(calls, togethers)
        if outcomes is None:
            outcomes = [self._alone(name, func, args) for name, func, args, _ in calls]
        return outcomes

    def deliver(self, outcomes: Any) -> None:
        """
        Give each call its outcome (on the reactor thread).
        """
        if isinstance(outcomes, Failure):
            # Only a bug in the batch itself: every call has it.
            outcomes = [outcomes] * len(self._calls)
        for (_, _, _, d), outcome in zip(self._calls, outcomes):
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def _alone(self, name: str, func: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        try:
            return self._database._interact(True, name, func, args)
        except BaseException:
            return Failure()

    def _together(self, calls: list[Any], togethers: list[Any], carry: Any = None) -> Optional[list[Any]]:
        """
        Run every call in one transaction; their outcomes, or C{None} when
        the batch had to be abandoned (then nothing of it is committed).
        C{carry}: the arguments of L{Transaction.carry} (L{_carry}).
        """
        database = self._database
        try:
            connection = database._connect()
        except BaseException:
            return None
        txn = Transaction(connection.cursor(), database.engine, database._convert)
        if carry is not None:
            txn.carry(*carry)
        self._committing = False
        try:
            outcomes = self._in_transaction(connection, txn, calls, togethers)
        except BaseException as error:
            # BEGIN, a savepoint or COMMIT failed, or a call's error may
            # have ended the transaction: nothing of the batch stands.
            database._rollback(connection)
            if (self._committing or txn.committing) and database.engine.broken(connection):
                # The connection died during the COMMIT: the batch may or
                # may not have committed, so no call may run again; each
                # says so, as it would alone.
                database._drop(connection)
                unavailable = StoreUnavailable(f"{database.describe()}: {_first_line(error)}")
                unavailable.__cause__ = error
                return [Failure(unavailable) for _ in calls]
            return None
        finally:
            txn.close()
        for (name, _, _, _), (started, elapsed, outcome) in zip(calls, outcomes):
            database._count(name, started, 0, isinstance(outcome, Failure), elapsed)
        return [outcome for _, _, outcome in outcomes]

    def _in_transaction(
        self, connection: Any, txn: Transaction, calls: list[Any], togethers: list[Any]
    ) -> list[tuple[float, float, Any]]:
        engine = txn.engine
        # SQLite: a savepoint a call, so that one call's error is rolled
        # back alone, except for the calls given a together (below).
        # PostgreSQL: none (two more round trips a call); a call's error
        # abandons the batch, and each call runs again alone.
        savepoints = engine.single_writer
        # PostgreSQL: BEGIN goes with the batch's first statement
        # (Transaction.begin_later).
        getattr(engine, "begin_later", engine.begin)(txn)
        outcomes: list[tuple[float, float, Any]] = []
        index = 0
        while index < len(calls):
            if not savepoints or togethers[index] is not None:
                index = self._run_together(txn, index, outcomes, calls, togethers)
                continue
            _, func, args, _ = calls[index]
            started = time.perf_counter()
            txn.execute("SAVEPOINT grouped")
            outcome: Any
            try:
                outcome = func(txn, *args)
            except BaseException as error:
                kind = engine.classify(error)
                if kind not in (None, CONFLICT) or not connection.in_transaction:
                    raise
                if kind == CONFLICT:
                    # As alone: the constraint's name, never a value.
                    conflict = StoreConflict(_first_line(error))
                    conflict.__cause__ = error
                    outcome = Failure(conflict)
                else:
                    outcome = Failure()
                txn.execute("ROLLBACK TO grouped")
            txn.execute("RELEASE grouped")
            outcomes.append((started, time.perf_counter() - started, outcome))
            index += 1
        self._committing = True
        # Nothing to send when the last statement took the COMMIT with it
        # (psycopg commits nothing outside a transaction).
        _commit(connection)
        return outcomes

    def _run_together(
        self,
        txn: Transaction,
        index: int,
        outcomes: list[tuple[float, float, Any]],
        calls: list[Any],
        togethers: list[Any],
    ) -> int:
        """
        Run the call at C{index} without a savepoint, or, when it has a
        C{together}, the run of consecutive calls of its function with that
        C{together} at once; their errors are raised (the batch is then
        abandoned and each call runs again alone, so each outcome is still
        what it would be alone).  Returns the index after them.

        On SQLite a savepoint is not free: every page a call first changes
        inside one is copied to the statement journal first, which cost a
        refresh about 5 of its 45 microseconds of database work
        (C{docs/performance.md}, round nine); calls whose errors are rare
        enough to pay for a whole batch run again (the refreshes) are
        given a C{together} and run without one.
        """
        started = time.perf_counter()
        together = togethers[index]
        end = index + 1
        if together is not None:
            while end < len(calls) and togethers[end] is together and calls[end][1] is calls[index][1]:
                end += 1
        # The batch's last calls may commit with their last statement.
        txn.may_commit = end == len(calls)
        try:
            if end - index > 1:
                assert together is not None
                results = together(txn, [call[2] for call in calls[index:end]])
                if len(results) != end - index:
                    raise RuntimeError("a together function returned the wrong number of results")
            else:
                results = [calls[index][1](txn, *calls[index][2])]
        finally:
            txn.may_commit = False
        elapsed = (time.perf_counter() - started) / (end - index)
        outcomes.extend((started, elapsed, result) for result in results)
        return end




def _outcome(f: Callable[..., Any], *args: Any) -> Any:
    try:
        return f(*args)
    except BaseException:
        return Failure()


class _ReadBatch:
    """
    Calls of one function gathered for one call of its C{together}
    (L{Database.read}).
    """

    __slots__ = ("name", "calls")

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[tuple[Any, ...], Deferred[Any]]] = []


def _name(schema: Schema, func: Callable[..., Any]) -> str:
    """
    The default transaction name: C{component.function}.
    """
    return f"{schema.component}.{func.__name__.lstrip('_')}"


def _cached(convert: Callable[[str], str]) -> Callable[[str], str]:
    """
    C{convert} with its results remembered: the stores' statements are a
    few dozen constant strings, and the batched refreshes' statements,
    which vary with the batch (so at most 4,096 are kept).
    """
    seen: dict[str, str] = {}

    def converted(sql: str) -> str:
        result = seen.get(sql)
        if result is None:
            if len(seen) >= 4096:
                # Batched statements vary with the batch: stay bounded.
                seen.clear()
            result = seen[sql] = convert(sql)
        return result

    return converted


def _commit(connection: Any) -> None:
    """
    Commit C{connection}'s transaction.  A function of its own so that a
    profile can tell the database's COMMIT from the statements before it
    (C{bench/profiling.py} counts the samples with this frame innermost).
    """
    connection.commit()


def _close_quietly(cursor: Any) -> None:
    try:
        cursor.close()
    except Exception:
        # Closing the cursor of a dead connection can fail; the connection
        # is dealt with by the caller.
        pass


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
