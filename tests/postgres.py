"""
A private, throwaway PostgreSQL cluster for the tests.

The first test that asks for PostgreSQL starts one cluster for the whole
test process (L{cluster}); every test gets its own fresh database in it
(L{database_url}).  The cluster lives in a temporary directory with its own
Unix-socket directory (no TCP port, so parallel test runs never collide),
runs as the C{postgres} system user when the tests run as root (the server
refuses root), and is stopped when the test process exits: at interpreter
exit, and, should the test process be killed outright, by the kernel
(C{PR_SET_PDEATHSIG}), so it never outlives the suite.

When the server binaries are missing, L{cluster} stops the test through
L{tests.prerequisites.require}: a failure naming C{bash
scripts/setup-postgres.sh} under the README's test command, a skip in a
bare C{trial} run.

Run C{python -m tests.postgres [--durable]} to get a cluster of your own on
the command line (for C{python -m bench --database URL}); it prints the
URL and stops when you press Enter or Ctrl-C.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from typing import IO, Any, Optional
from urllib.parse import quote

from smeldr_oauth.service import lifeline
from tests.prerequisites import require

INSTALL = "bash scripts/setup-postgres.sh"
#: The superuser the tests connect as (trust authentication on the socket).
USER = "postgres"
PORT = 5432
_READY = "database system is ready to accept connections"
_PREFIX = "smeldr-pg-"
_OWNER = "owner.pid"

#: Fast and throwaway: nothing is synced to disk (a crash loses the cluster,
#: which is thrown away anyway); a clean stop still writes everything.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def find_bindir() -> Optional[str]:
    """
    The directory of C{initdb} and C{postgres}: C{$SMELDR_PG_BINDIR}, else
    the newest C{/usr/lib/postgresql/*/bin} (Debian's layout), else C{PATH}.
    """
    override = os.environ.get("SMELDR_PG_BINDIR")
    candidates = [override] if override else []

    def major(path: str) -> float:
        try:
            return float(path.split("/")[-2])
        except ValueError:
            return 0.0

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.append(os.path.dirname(os.path.realpath(found)))
    for directory in candidates:
        if all(os.access(os.path.join(directory, tool), os.X_OK) for tool in ("initdb", "postgres")):
            return directory
    return None


class Cluster:
    """
    One PostgreSQL server on a Unix socket in a directory of its own.

    @ivar directory: holds C{data/}, C{socket/} and C{server.log}.
    @ivar socket_dir: the server's Unix-socket directory (the URL's host).
    """

    def __init__(self, bindir: str, durable: bool = False) -> None:
        self.bindir = bindir
        self.durable = durable
        _remove_abandoned()
        self.directory = tempfile.mkdtemp(prefix=_PREFIX)
        with open(os.path.join(self.directory, _OWNER), "w") as f:
            f.write(str(os.getpid()))
        self.data_dir = os.path.join(self.directory, "data")
        self.socket_dir = os.path.join(self.directory, "socket")
        self.log_path = os.path.join(self.directory, "server.log")
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._names = itertools.count(1)
        self._log: Optional[IO[bytes]] = None
        self._copier: Optional[threading.Thread] = None
        os.mkdir(self.socket_dir)
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            self._user = dict(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
            for path in (self.directory, self.socket_dir):
                os.chown(path, account.pw_uid, account.pw_gid)
        os.chmod(self.directory, 0o755)
        self._initdb()

    def _initdb(self) -> None:
        subprocess.run(
            [
                os.path.join(self.bindir, "initdb"),
                "-D", self.data_dir,
                "-U", USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            **self._user,
        )

    def url(self, dbname: str = "postgres") -> str:
        """
        The libpq URL of a database of this cluster.
        """
        return f"postgresql://{USER}@/{dbname}?host={quote(self.socket_dir, safe='/')}&port={PORT}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """
        Start the server and return once it accepts connections.
        """
        if self.running:
            return
        settings = {
            "listen_addresses": "",
            "unix_socket_directories": self.socket_dir,
            "port": str(PORT),
            "max_connections": "300",
            "shared_buffers": "32MB",
            "lc_messages": "C",
            "logging_collector": "off",
            # Deadlock tests wait this long before the server notices.
            "deadlock_timeout": "100ms",
        }
        if not self.durable:
            settings.update(FAST_SETTINGS)
        argv = [os.path.join(self.bindir, "postgres"), "-D", self.data_dir]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.PIPE,
            # SIGINT (PostgreSQL's fast shutdown) when the test process
            # dies, however it dies.
            preexec_fn=lifeline.preexec(sig=signal.SIGINT),
            **self._user,
        )
        ready = threading.Event()
        assert self.process.stderr is not None
        # The log goes through this thread (to the log file), which also
        # notices the line saying the server is ready: no polling.
        self._copier = threading.Thread(
            target=_copy_log, args=(self.process.stderr, self._log, ready), daemon=True
        )
        self._copier.start()
        if not ready.wait(timeout) or not self.running:
            self.stop()
            raise RuntimeError(f"PostgreSQL did not start; see {self.log_path}:\n{self.log_tail()}")

    def stop(self) -> None:
        """
        Fast shutdown: clients are disconnected, everything committed is
        kept.
        """
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # The server's last lines (its shutdown) may still be in the pipe:
        # the log is closed only once its thread has copied them all, or
        # the thread writes to a closed file (a traceback at the test
        # process's exit) and the lines are lost.  The thread ends at the
        # pipe's end, which the server's exit brings; the bound only
        # keeps a stray holder of the pipe from hanging the exit.
        copier, self._copier = self._copier, None
        if copier is not None:
            copier.join(30)
        log, self._log = self._log, None
        if log is not None and (copier is None or not copier.is_alive()):
            log.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, size: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.url(), autocommit=True)

    def create_database(self) -> tuple[str, str]:
        """
        A new empty database: C{(name, url)}.
        """
        name = f"test_{os.getpid()}_{next(self._names)}"
        with self._admin() as connection:
            connection.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return name, self.url(name)

    def drop_database(self, name: str) -> None:
        if not self.running:
            return
        with self._admin() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _remove_abandoned() -> None:
    """
    Remove the directories of clusters whose test process was killed
    outright (its server died with it, but nothing removed its files).
    """
    for directory in glob.glob(os.path.join(tempfile.gettempdir(), _PREFIX + "*")):
        try:
            with open(os.path.join(directory, _OWNER)) as f:
                owner = int(f.read().strip())
        except (OSError, ValueError):
            continue
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
        except PermissionError:
            # Alive, under another user.
            pass


def _copy_log(source: IO[bytes], sink: IO[bytes], ready: threading.Event) -> None:
    for line in iter(source.readline, b""):
        sink.write(line)
        sink.flush()
        if _READY.encode() in line:
            ready.set()
    ready.set()


_cluster: Optional[Cluster] = None
_lock = threading.Lock()


def cluster() -> Cluster:
    """
    The test process's cluster, started on first use and stopped (and
    removed) at exit.  Call it from the main thread: the kernel stops the
    server when the thread that started it ends.
    """
    global _cluster
    try:
        import psycopg  # noqa: F401
    except ImportError:
        require("psycopg is not installed", ".venv/bin/pip install -r requirements-test.txt")
    bindir = find_bindir()
    require(None if bindir else "PostgreSQL (initdb, postgres) is not installed", INSTALL)
    assert bindir is not None
    with _lock:
        if _cluster is None:
            assert threading.current_thread() is threading.main_thread(), "start the cluster from the main thread"
            created = Cluster(bindir)
            atexit.register(created.destroy)
            _cluster = created
        if not _cluster.running:
            _cluster.start()
        return _cluster


def database_url(testcase: Any) -> str:
    """
    The URL of a fresh, empty database for one test, dropped when the test
    ends (after the test's own clean-ups, which were added later).
    """
    server = cluster()
    name, url = server.create_database()
    testcase.addCleanup(server.drop_database, name)
    return url


def nested_plans(connection: Any) -> list[str]:
    """
    Log, as notices on C{connection} (a psycopg connection), the plan of
    every statement it runs from now on, including those inside functions
    (C{auto_explain} with nested statements); returns the list the plans
    are appended to.  The store tests read it to show that a function's
    kept plans use the index they need.
    """
    plans: list[str] = []
    connection.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
    for setting in (
        "LOAD 'auto_explain'",
        "SET auto_explain.log_min_duration = 0",
        "SET auto_explain.log_nested_statements = on",
        "SET auto_explain.log_level = notice",
        "SET client_min_messages = notice",
    ):
        connection.execute(setting)
    return plans


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    bindir = find_bindir()
    if bindir is None:
        sys.stderr.write(f"PostgreSQL is not installed; run: {INSTALL}\n")
        return 1
    server = Cluster(bindir, durable="--durable" in args)
    try:
        server.start()
        name, url = server.create_database()
        print(url, flush=True)
        sys.stderr.write("PostgreSQL is running; press Enter (or Ctrl-C) to stop it and remove it.\n")
        try:
            sys.stdin.readline()
        except KeyboardInterrupt:
            pass
    finally:
        server.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
