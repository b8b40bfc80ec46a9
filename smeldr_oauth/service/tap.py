# -*- test-case-name: tests.test_service_tap -*-
"""
C{twist smeldr-oauth}: command-line options and the service they describe.

The shape follows C{twisted.web.tap}: repeatable C{--listen} endpoint
strings, defaults filled in C{postOptions}, and C{makeService} returning a
L{MultiService} with one endpoint service per listener.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from twisted.application.service import IService, MultiService
from twisted.application.strports import service as strports_service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from smeldr_oauth.oauth.config import Config, ConfigError
from smeldr_oauth.oauth.numbers import MAX_WHOLE
from smeldr_oauth.service import affinity, workers

log = Logger()


def _positive_int(name: str, unit: str = "seconds"):  # type: ignore[no-untyped-def]
    def convert(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise usage.UsageError(f"--{name} must be a whole number of {unit}, got {value!r}")
        if number <= 0:
            raise usage.UsageError(f"--{name} must be positive, got {value!r}")
        if number > MAX_WHOLE:
            raise usage.UsageError(f"--{name} must be at most {MAX_WHOLE}, got {value!r}")
        return number

    return convert


def _db_threads(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 64:
        raise usage.UsageError(f"--db-threads must be a whole number from 0 to 64, got {value!r}")
    return int(value)


def _load_app(spec: str) -> Any:
    """
    C{--app}: the L{MCPApp} named by C{spec}, loaded now so a mistake is a
    usage error.  Its factory (if it is one) is called without arguments
    and must not be asynchronous: nothing runs the reactor yet.
    """
    from twisted.python.failure import Failure

    from smeldr_oauth.mcp.app import AppLoadError, load_app

    found: list[Any] = []
    load_app(spec).addBoth(found.append)
    if not found:
        raise usage.UsageError(f"--app {spec!r}: the factory must return the app, not wait for it")
    result = found[0]
    if isinstance(result, Failure):
        if result.check(AppLoadError):
            raise usage.UsageError(str(result.value))
        raise usage.UsageError(f"--app {spec!r}: {type(result.value).__name__}: {result.value}")
    return result


class Options(usage.Options):
    synopsis = "--issuer https://example.com [options]"
    longdesc = (
        "Serve an OAuth 2.1 authorization server and an MCP server (Streamable HTTP and "
        "HTTP+SSE at /mcp) for ChatGPT, Claude.ai and MCP SDK clients, on SQLite."
    )

    optParameters = [
        ["issuer", None, None, "Public base URL of this server (https unless loopback). Required."],
        ["resource", None, None, "Public URL of the MCP endpoint [default: <issuer>/mcp]."],
        [
            "database",
            None,
            None,
            "PostgreSQL URL (postgresql://user:password@host/dbname) for OAuth data and site "
            "content, instead of the SQLite files below.",
        ],
        ["oauth-db", None, "./oauth.db", "SQLite file for clients, grants and tokens."],
        ["site-db", None, "./site.db", "SQLite file for site content and site tokens."],
        ["app", None, None, "Serve your own MCP app (module:attribute) instead of the site tools."],
        ["access-token-ttl", None, 3600, "Access token lifetime in seconds.", _positive_int("access-token-ttl")],
        ["auth-code-ttl", None, 300, "Authorization code lifetime in seconds.", _positive_int("auth-code-ttl")],
        [
            "refresh-token-ttl",
            None,
            30 * 24 * 3600,
            "Refresh token idle lifetime in seconds.",
            _positive_int("refresh-token-ttl"),
        ],
        [
            "refresh-grace",
            None,
            60,
            "Seconds the previous refresh token stays usable after rotation.",
            _positive_int("refresh-grace"),
        ],
        [
            "db-threads",
            None,
            None,
            "SQLite: 0 runs it on the reactor thread (fastest; a slow disk or another process "
            "holding the write lock stalls the server), 1 on one database thread per file "
            "[default: 0]. PostgreSQL: the pool's threads (and connections) [default: 4].",
            _db_threads,
        ],
        ["keepalive", None, 15, "Seconds between SSE keepalive comments.", _positive_int("keepalive")],
        ["max-body", None, 1 << 20, "Largest request body accepted, in bytes.", _positive_int("max-body")],
        [
            "max-sessions",
            None,
            10000,
            "MCP sessions the server holds at once (a last resort: beyond it, 503).",
            _positive_int("max-sessions"),
        ],
        [
            "max-sessions-per-grant",
            None,
            50,
            "MCP sessions one grant may hold at once (its oldest idle one is ended first).",
            _positive_int("max-sessions-per-grant"),
        ],
        [
            "max-sessions-per-user",
            None,
            200,
            "MCP sessions one user (subject) may hold at once, over all its grants.",
            _positive_int("max-sessions-per-user"),
        ],
        [
            "paste-limit",
            None,
            30,
            "Refused site-token pastes per client address per minute (consent and connected-apps pages).",
            _positive_int("paste-limit", "attempts"),
        ],
        [
            "registration-limit",
            None,
            20,
            "Dynamic client registrations per client address per minute.",
            _positive_int("registration-limit", "requests"),
        ],
        [
            "cimd-fetch-limit",
            None,
            30,
            "Authorization requests per client address per minute that fetch a client metadata document.",
            _positive_int("cimd-fetch-limit", "requests"),
        ],
        [
            "token-limit-per-address",
            None,
            600,
            "Token requests per client address per minute.",
            _positive_int("token-limit-per-address", "requests"),
        ],
        [
            "token-limit-per-client",
            None,
            600,
            "Token requests per client id per minute.",
            _positive_int("token-limit-per-client", "requests"),
        ],
        [
            "rate-limit-keys",
            None,
            10000,
            "Addresses (or client ids) each rate limit remembers; the least recently seen go first.",
            _positive_int("rate-limit-keys", "keys"),
        ],
        ["docs-url", None, None, "A documentation link for the landing page at / [default: none]."],
        ["cimd-ca-file", None, None, "TESTING ONLY: PEM CA to trust for client metadata fetches."],
        ["service-name", None, "smeldr", "Name shown on the consent page."],
        [
            "upstream-config",
            None,
            None,
            "A TOML file of upstream MCP servers to serve behind our OAuth (see docs/gateway.md).",
        ],
        [
            "upstream-isolation",
            None,
            None,
            "Default isolation of the upstreams: user (one instance per user), session or shared "
            "[default: user].",
        ],
        [
            "upstream-credential-file",
            None,
            None,
            "A file holding the gateway's own credential for the HTTP upstreams given with --upstream "
            "(sent as Authorization; the caller's token never is).",
        ],
        [
            "upstream-credential-env",
            None,
            None,
            "The same, from this environment variable.",
        ],
        [
            "metrics-listen",
            None,
            None,
            "Serve Prometheus metrics on this endpoint (e.g. tcp:9100:interface=127.0.0.1) [default: off].",
        ],
        [
            "workers",
            None,
            1,
            "Worker processes sharing the --listen sockets (one per core); above 1 this process "
            "only supervises them.",
            workers.worker_count,
        ],
    ]

    optFlags = [
        ["no-registration", None, "Turn dynamic client registration (RFC 7591) off."],
        ["no-cimd", None, "Turn Client ID Metadata Documents off."],
        ["no-flow-timeline", None, "Do not record the flow timeline (smeldr-oauth-admin flows)."],
        [
            "no-gc-freeze",
            None,
            "Leave CPython's garbage collector as it is (by default the objects alive after start-up are "
            "frozen out of it and its youngest generation's threshold is raised: docs/performance.md).",
        ],
        ["dev", None, "DEVELOPMENT ONLY: allow http:// and loopback client_id URLs."],
        [
            "refresh-for-refresh-grant-clients",
            None,
            "Issue refresh tokens to clients whose metadata lists the refresh_token grant (the default).",
        ],
        [
            "offline-access-only",
            None,
            "Issue refresh tokens only when the offline_access scope was granted.",
        ],
        [
            "pin-cpus",
            None,
            "Pin each serving process, all its threads, to one CPU (worker i to the i-th it may use); "
            "Linux only; for hosts whose cores are the server's (docs/deployment.md).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["allowed-origin"] = []
        self["trust-forwarded-from"] = []
        self["upstream"] = []

    def parseOptions(self, options: Optional[list[str]] = None) -> None:
        """
        A bad value is one line on stderr and exit status 2, not the whole
        usage text that C{twist} would print (exit 64): operators read it in
        platform logs where the one line is what shows.
        """
        try:
            # The hidden argument of a --workers child; the rest is the
            # command line a child is started with.
            self["argv"], self["worker"] = workers.take_worker_argument(
                sys.argv[1:] if options is None else options
            )
            super().parseOptions(self["argv"])
        except usage.UsageError as e:
            sys.stderr.write(f"smeldr-oauth: error: {e}\n")
            raise SystemExit(2)

    def opt_listen(self, description: str) -> None:
        """
        A Twisted endpoint to listen on (repeatable), e.g. tcp:8080 or
        ssl:8443:privateKey=key.pem:certKey=cert.pem [default: tcp:8080].
        """
        from twisted.internet import reactor

        try:
            serverFromString(reactor, description)
        except Exception as e:
            raise usage.UsageError(f"--listen {description!r}: {e}")
        self["listen"].append(description)

    def opt_trust_forwarded_from(self, network: str) -> None:
        """
        A proxy address or network (e.g. 10.0.0.0/8) whose X-Forwarded-For
        header gives the client address for rate limits and logs
        (repeatable) [default: none; forwarded headers are ignored].
        """
        import ipaddress

        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as e:
            raise usage.UsageError(f"--trust-forwarded-from {network!r}: {e}")
        self["trust-forwarded-from"].append(network)

    def opt_upstream(self, spec: str) -> None:
        """
        Serve an existing MCP server behind our OAuth (repeatable):
        [NAME=]stdio:COMMAND ARGS... or [NAME=]https://host/mcp.  One is
        served at /mcp; several each at /mcp/NAME.  The site's own tools
        are then not served.
        """
        self["upstream"].append(spec)

    def _load_upstreams(self) -> None:
        """
        C{--upstream*}: the gateway's configuration and where each upstream
        is served, checked now so that a mistake is a usage error.
        """
        self["gateway"] = None
        self["upstreams"] = ()
        if not self["upstream"] and not self["upstream-config"]:
            for name in ("upstream-isolation", "upstream-credential-file", "upstream-credential-env"):
                if self[name]:
                    raise usage.UsageError(f"--{name} needs --upstream or --upstream-config")
            return
        from smeldr_oauth.gateway import configfile as gateway_config
        from smeldr_oauth.gateway.front import plan

        if self["app"]:
            raise usage.UsageError("--app and --upstream exclude each other: serve your app as an upstream")
        text = None
        if self["upstream-config"]:
            try:
                with open(self["upstream-config"], encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise usage.UsageError(f"--upstream-config: cannot read {self['upstream-config']!r}: {e}")
        try:
            self["gateway"] = gateway_config.load(
                self["upstream"],
                text,
                isolation=self["upstream-isolation"],
                credential_file=self["upstream-credential-file"],
                credential_env=self["upstream-credential-env"],
            )
        except gateway_config.ConfigError as e:
            raise usage.UsageError("upstreams: " + "; ".join(e.problems))
        if not self["gateway"].upstreams:
            raise usage.UsageError("--upstream-config names no upstream")
        try:
            self["upstreams"] = plan(self["gateway"], self["issuer"], self["resource"])
        except ValueError as e:
            raise usage.UsageError(str(e))

    def opt_allowed_origin(self, origin: str) -> None:
        """
        A browser Origin allowed to call /mcp (repeatable) [default: the issuer's origin].
        """
        self["allowed-origin"].append(origin.rstrip("/"))

    def postOptions(self) -> None:
        if not self["issuer"]:
            raise usage.UsageError("--issuer is required")
        from smeldr_oauth.db.postgres import is_postgres_url

        if self["database"] and not is_postgres_url(self["database"]):
            raise usage.UsageError(
                "--database must be a postgresql:// URL (SQLite files are --oauth-db and --site-db)"
            )
        if self["pin-cpus"] and not affinity.available():
            raise usage.UsageError("--pin-cpus needs Linux (sched_setaffinity)")
        if not self["database"] and (self["db-threads"] or 0) > 1:
            raise usage.UsageError("--db-threads must be 0 or 1 with SQLite (one writer per file)")
        if not self["listen"]:
            self["listen"] = ["tcp:8080"]
        self._load_upstreams()
        self["mcp-app"] = None
        if self["app"]:
            self["mcp-app"] = _load_app(self["app"])
        if self["metrics-listen"]:
            from twisted.internet import reactor

            try:
                serverFromString(reactor, self["metrics-listen"])
            except Exception as e:
                raise usage.UsageError(f"--metrics-listen {self['metrics-listen']!r}: {e}")
        if self["cimd-ca-file"]:
            from twisted.internet.ssl import Certificate

            try:
                with open(self["cimd-ca-file"], "rb") as f:
                    self["cimd-ca"] = Certificate.loadPEM(f.read())
            except Exception as e:
                raise usage.UsageError(f"--cimd-ca-file: cannot load a PEM certificate: {e}")
        else:
            self["cimd-ca"] = None
        try:
            self["config"] = self.config(verify_bearer=lambda token: False)
        except ConfigError as e:
            raise usage.UsageError(str(e))
        workers.check_options(self)

    def config(self, **overrides: Any) -> Config:
        """
        The authorization server's L{Config} these options describe.
        """
        kw: dict[str, Any] = dict(
            issuer=self["issuer"],
            resource=self["resource"],
            access_token_ttl=self["access-token-ttl"],
            auth_code_ttl=self["auth-code-ttl"],
            refresh_token_ttl=self["refresh-token-ttl"],
            refresh_grace=self["refresh-grace"],
            dynamic_registration=not self["no-registration"],
            allow_insecure_client_ids=bool(self["dev"]),
            refresh_for_refresh_grant_clients=not self["offline-access-only"],
            service_name=self["service-name"],
            paste_failures_per_minute=self["paste-limit"],
            registrations_per_minute=self["registration-limit"],
            cimd_fetches_per_minute=self["cimd-fetch-limit"],
            token_requests_per_minute_per_address=self["token-limit-per-address"],
            token_requests_per_minute_per_client=self["token-limit-per-client"],
            rate_limit_keys=self["rate-limit-keys"],
        )
        if self.get("upstreams"):
            from smeldr_oauth.gateway.front import authorization_settings

            kw.update(authorization_settings(self["upstreams"]))
        kw.update(overrides)
        return Config(**kw)


def makeService(options: Options) -> IService:
    from smeldr_oauth.service.standalone import StandaloneService

    if options["workers"] > 1 and options["worker"] is None:
        return workers.supervise(options)
    if options["pin-cpus"]:
        # Before the reactor runs: the threads started later inherit it.
        index = 0 if options["worker"] is None else options["worker"].index
        log.info("pinned to CPU {cpu}", cpu=affinity.pin(index))
    top = MultiService()
    app_service = StandaloneService(options)
    app_service.setServiceParent(top)
    if options["worker"] is not None:
        # The parent listens and serves the metrics.
        workers.serve_as_worker(options, app_service).setServiceParent(top)
        return top
    # A database that cannot be opened at start-up: exit status 1 (twist
    # exited 0 after stopping the reactor, so a service manager's restart
    # on failure never saw one).
    app_service.on_failure = lambda: workers.exit_with_failure(app_service.reactor)
    for description in options["listen"]:
        listener = strports_service(description, app_service.site)
        listener.setServiceParent(top)
    if options["metrics-listen"]:
        from twisted.web.server import Site

        metrics_site = Site(app_service.metrics.resource())
        strports_service(options["metrics-listen"], metrics_site).setServiceParent(top)
    return top
