"""
The servers under test, each a real process as in production:

  - C{twist --log-format=text smeldr-oauth ... --dev} on 127.0.0.1 with fresh
    temporary databases; its access log and event log go to a file, as they
    would go to a platform's log collector;
  - the references (L{bench.bare}): the floor, C{twist web --class
    bench.bare.floor}, a plain twisted.web C{Resource}, and the ceiling,
    C{twist web --class bench.bare.resource}, a bare Klein route; both return
    a small JSON body behind the same twisted.web C{Site} access log.

Every process started here dies with the bench, even on C{kill -9}
(L{bench.lifeline}).

And the synchronous set-up the benchmarks need before the clock starts: a
site token (made with the admin CLI, as an operator would), a registered
client, and grants obtained through the real consent and code exchange.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional
from urllib.parse import parse_qs, urlencode, urlsplit

from bench import lifeline
from bench.loadgen import pkce_pair, process_cpu

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REDIRECT_URI = "http://127.0.0.1:33418/callback"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit(wanted: int = 0) -> dict[str, Any]:
    """
    Raise this process's RLIMIT_NOFILE, which the servers and generators
    inherit: the hard limit to C{wanted} when it is higher (root with
    C{CAP_SYS_RESOURCE} may; the kernel caps it at C{fs.nr_open}), then the
    soft limit to the hard one.

    @return: the limits in force, and why the hard one could not be raised.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    refused = None
    if wanted > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        except (ValueError, OSError) as e:
            refused = f"{e} (raising the hard limit needs CAP_SYS_RESOURCE, and fs.nr_open >= {wanted})"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft": soft, "hard": hard, "wanted": wanted, "refused": refused}


#: L{_wait_listening}: a server that never listens while spending no CPU
#: (blocked) is given up on after this many wall-clock seconds.
WALL_LIMIT = 90.0


def _wait_listening(port: int, process: subprocess.Popen, log_path: str, timeout: float = 30.0) -> None:
    """
    Wait until C{process} listens on C{port}.  C{timeout} is seconds of the
    server's own CPU, not of the wall clock's: a start is a few seconds of
    CPU, which a 2-core box busy with other jobs (load average 15-25)
    stretches to tens of wall-clock seconds; a server that waits without
    working is still given up on after L{WALL_LIMIT}.
    """
    started = time.monotonic()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            try:
                spent = process_cpu(process.pid)
            except OSError:
                spent = 0.0
            waited = time.monotonic() - started
            if spent > timeout or waited > max(timeout, WALL_LIMIT):
                raise RuntimeError(
                    f"nothing listened on {port} within {timeout}s of the server's CPU"
                    f" ({spent:.1f}s used in {waited:.1f}s):\n{_tail(log_path)}"
                )
            time.sleep(0.05)


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


def _environment(with_checkout: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if with_checkout:
        env["PYTHONPATH"] = CHECKOUT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Server:
    """A server process on 127.0.0.1; stop it with L{stop}."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        directory: str,
        env: dict[str, str],
        own_directory: bool,
        new_session: bool = True,
    ) -> None:
        self.argv = argv
        self.port = port
        self.directory = directory
        self.log_path = os.path.join(directory, "server.log")
        self._own_directory = own_directory
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=directory,
            env=env,
            start_new_session=new_session,
            **lifeline.popen_kwargs(),
        )
        try:
            _wait_listening(port, self.process, self.log_path)
        except Exception:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def target(self, **extra: Any) -> dict[str, Any]:
        return dict(host="127.0.0.1", port=self.port, hostport=f"127.0.0.1:{self.port}", **extra)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def log(self) -> str:
        return _tail(self.log_path, 20000)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


#: The references of L{bench.bare}: name -> (factory, path served).
REFERENCES = {"floor": ("bench.bare.floor", "/floor"), "bare": ("bench.bare.resource", "/bare")}


def start_reference(name: str, directory: Optional[str] = None) -> Server:
    """The floor (C{name="floor"}) or the ceiling (C{"bare"}); see L{REFERENCES}."""
    own = directory is None
    directory = directory or tempfile.mkdtemp(prefix=f"smeldr-bench-{name}-")
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "twisted",
        "--log-format=text",
        "web",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--class",
        REFERENCES[name][0],
    ]
    return Server(argv, port, directory, _environment(True), own)


class OAuthServer(Server):
    issuer: str
    site_db: str
    resource: str


def start_smeldr(
    extra: tuple[str, ...] = (), directory: Optional[str] = None, listen_options: str = "", new_session: bool = True
) -> OAuthServer:
    """
    C{twist smeldr-oauth} with fresh databases.  Not run from the checkout's
    path: the installed package is what is measured.

    @param listen_options: appended to the C{--listen} endpoint, e.g.
        C{":backlog=1024"} for a server that must accept thousands of
        connections at once.
    @param new_session: start the server in a session of its own (off:
        in the bench's, beside processes it is compared with; see
        L{bench.gateway_front.start_front}).
    """
    own = directory is None
    directory = directory or tempfile.mkdtemp(prefix="smeldr-bench-")
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    site_db = os.path.join(directory, "site.db")
    argv = [
        sys.executable,
        "-m",
        "twisted",
        "--log-format=text",
        "smeldr-oauth",
        "--issuer",
        issuer,
        "--listen",
        f"tcp:{port}:interface=127.0.0.1{listen_options}",
        "--oauth-db",
        os.path.join(directory, "oauth.db"),
        "--site-db",
        site_db,
        "--dev",
        # The load generators send thousands of token requests a second
        # from one address: far past the production limits, which are
        # still checked on every request.
        "--token-limit-per-address",
        "1000000000",
        "--token-limit-per-client",
        "1000000000",
        # The full flow's users all paste the site token from that one
        # address, 50 at the same instant when the run starts: a paste
        # counts against the paste limit until its check comes back
        # (docs/security.md), so past the limit's 30 the rest were refused
        # with 429 and those users' flows were lost.
        "--paste-limit",
        "1000000000",
        *extra,
    ]
    server = OAuthServer.__new__(OAuthServer)
    server.issuer = issuer
    server.site_db = site_db
    server.resource = issuer + "/mcp"
    Server.__init__(server, argv, port, directory, _environment(False), own, new_session)
    return server


def postmaster_pid(url: str) -> Optional[int]:
    """
    The process id of the postmaster of the PostgreSQL server at C{url}
    when it runs on this machine and its processes can be read (the parent
    of the backend that answers), so that a run can measure the
    database's CPU beside the server's; C{None} for a remote server or one
    that cannot be reached.
    """
    try:
        import psycopg

        with psycopg.connect(url, autocommit=True, connect_timeout=5) as connection:
            row = connection.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            # Read while the connection is open: its backend exits when it
            # closes (read after, the run lost its database CPU figure
            # about one time in three on a busy box).
            with open(f"/proc/{int(row[0])}/status") as f:
                parent = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            command = f.read().split(b"\0")[0]
    except Exception:
        return None
    # A backend of another machine's server has a different pid here.
    return parent if os.path.basename(command) in (b"postgres", b"postmaster") else None


def admin_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "smeldr-oauth-admin")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "smeldr_oauth.site.admin"]


def create_site_token(server: OAuthServer) -> str:
    where = ["--site-db", server.site_db]
    if "--database" in server.argv:
        where = ["--database", server.argv[server.argv.index("--database") + 1]]
    out = subprocess.run(
        [*admin_command(), "token", "create", "bench", *where],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        **lifeline.popen_kwargs(),
    ).stdout
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[-1].split()[-1]


class Client:
    """A tiny synchronous client for set-up (not for measuring)."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(
        self, method: str, path: str, body: bytes = b"", headers: Optional[dict[str, str]] = None
    ) -> tuple[int, dict[str, str], bytes]:
        self.connection.request(method, path, body=body or None, headers=headers or {})
        response = self.connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def close(self) -> None:
        self.connection.close()


def register_client(server: OAuthServer) -> str:
    client = Client(server.port)
    try:
        status, _, body = client.call(
            "POST",
            "/oauth/register",
            json.dumps(
                {
                    "client_name": "smeldr bench",
                    "redirect_uris": [REDIRECT_URI],
                    "grant_types": ["authorization_code", "refresh_token"],
                    "token_endpoint_auth_method": "none",
                }
            ).encode(),
            {"Content-Type": "application/json"},
        )
        if status != 201:
            raise RuntimeError(f"registration failed: {status} {body!r}")
        return str(json.loads(body)["client_id"])
    finally:
        client.close()


def obtain_tokens(
    server: OAuthServer, client_id: str, site_token: str, count: int, scope: str = "read write offline_access"
) -> list[dict[str, str]]:
    """
    C{count} separate grants, each through the consent form and the code
    exchange; each gives an access token and a refresh token.

    @param scope: what the consent grants (the site's tools' scopes by
        default; a gateway's upstream has its own).
    """
    client = Client(server.port)
    form_headers = {"Content-Type": "application/x-www-form-urlencoded"}
    tokens = []
    try:
        for _ in range(count):
            verifier, challenge = pkce_pair()
            body = urlencode(
                dict(
                    response_type="code",
                    client_id=client_id,
                    redirect_uri=REDIRECT_URI,
                    scope=scope,
                    code_challenge=challenge,
                    code_challenge_method="S256",
                    resource=server.resource,
                    decision="approve",
                    site_token=site_token,
                )
            ).encode()
            status, headers, data = client.call("POST", "/oauth/authorize", body, form_headers)
            if status != 303:
                raise RuntimeError(f"authorize failed: {status} {data[:300]!r}")
            code = parse_qs(urlsplit(headers["location"]).query)["code"][0]
            body = urlencode(
                dict(
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=verifier,
                    client_id=client_id,
                    redirect_uri=REDIRECT_URI,
                )
            ).encode()
            status, _, data = client.call("POST", "/oauth/token", body, form_headers)
            if status != 200:
                raise RuntimeError(f"code exchange failed: {status} {data[:300]!r}")
            issued = json.loads(data)
            tokens.append(
                {
                    "client_id": client_id,
                    "access_token": issued["access_token"],
                    "refresh_token": issued.get("refresh_token", ""),
                }
            )
    finally:
        client.close()
    return tokens
