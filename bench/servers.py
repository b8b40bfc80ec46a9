"""
The servers under test, each a real process as in production:

  - C{twist --log-format=text smeldr-oauth ... --dev} on 127.0.0.1 with fresh
    temporary databases; its access log and event log go to a file, as they
    would go to a platform's log collector;
  - the ceiling: C{twist web --class bench.bare.resource}, a bare Klein route
    returning a small JSON body, behind the same twisted.web C{Site} access
    log.

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

from bench.loadgen import pkce_pair

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REDIRECT_URI = "http://127.0.0.1:33418/callback"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit() -> tuple[int, int]:
    """
    Raise this process's soft RLIMIT_NOFILE to the hard limit; children
    (the servers, the generators) inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _wait_listening(port: int, process: subprocess.Popen, log_path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listened on {port} within {timeout}s:\n{_tail(log_path)}")
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
        self, argv: list[str], port: int, directory: str, env: dict[str, str], own_directory: bool
    ) -> None:
        self.argv = argv
        self.port = port
        self.directory = directory
        self.log_path = os.path.join(directory, "server.log")
        self._own_directory = own_directory
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=directory, env=env, start_new_session=True
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


def start_bare(directory: Optional[str] = None) -> Server:
    own = directory is None
    directory = directory or tempfile.mkdtemp(prefix="smeldr-bench-bare-")
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
        "bench.bare.resource",
    ]
    return Server(argv, port, directory, _environment(True), own)


class OAuthServer(Server):
    issuer: str
    site_db: str
    resource: str


def start_smeldr(extra: tuple[str, ...] = (), directory: Optional[str] = None) -> OAuthServer:
    """
    C{twist smeldr-oauth} with fresh databases.  Not run from the checkout's
    path: the installed package is what is measured.
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
        f"tcp:{port}:interface=127.0.0.1",
        "--oauth-db",
        os.path.join(directory, "oauth.db"),
        "--site-db",
        site_db,
        "--dev",
        *extra,
    ]
    server = OAuthServer.__new__(OAuthServer)
    server.issuer = issuer
    server.site_db = site_db
    server.resource = issuer + "/mcp"
    Server.__init__(server, argv, port, directory, _environment(False), own)
    return server


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


def obtain_tokens(server: OAuthServer, client_id: str, site_token: str, count: int) -> list[dict[str, str]]:
    """
    C{count} separate grants, each through the consent form and the code
    exchange; each gives an access token and a refresh token.
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
                    scope="read write offline_access",
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
                    "refresh_token": issued["refresh_token"],
                }
            )
    finally:
        client.close()
    return tokens
