# -*- test-case-name: tests.test_gateway_config -*-
"""
Gateway configuration files and options: C{--upstream} options and the TOML
file, validated into the frozen records of L{smeldr_oauth.gateway.config}.

Both sources go through the same rules (L{_upstream}), so an option and a
file entry mean the same thing.  Validation never stops at the first
mistake: L{ConfigError} carries one line per mistake, each naming where it
is (C{upstreams.files.limits.idle_timeout: must be a number >= 1}).

One concern, kept whole although it is over 500 lines: the rule for each
key (its type, its grammar, its bounds) and the two sources that feed them
are read together whenever a key is added, and most of the length is one
short function per key; cutting it would put half of a key's rule in
another module.

Secrets: a credential for an upstream is read here, from a file or an
environment variable, never from the command line (where C{ps} and shell
history would show it).  Its value is kept out of C{repr} and out of every
error message.

The TOML file::

    [defaults]                      # optional: any upstream key but command/url
    isolation = "user"

    [upstreams.everything]          # served at /mcp/everything
    command = "npx -y @modelcontextprotocol/server-everything"
    env = { NODE_ENV = "production" }
    cwd = "/srv/tools"

    [upstreams.everything.scopes]
    required = ["mcp"]
    list = "show"                   # or "hide"
    tools = { "get-*" = ["tools:read"], "*" = ["tools:write"] }

    [upstreams.internal]
    url = "https://10.0.0.5:9000/mcp"
    credential = { header = "Authorization", prefix = "Bearer ", file = "/run/secrets/internal" }
    identity_headers = { subject = "X-Smeldr-Subject", scopes = "X-Smeldr-Scopes" }
    limits = { request_timeout = 60 }
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import hyperlink

from smeldr_oauth.gateway.config import (
    ISOLATIONS,
    TRANSPORTS,
    Credential,
    GatewayConfig,
    IdentityHeaders,
    Limits,
    UpstreamConfig,
)
from smeldr_oauth.gateway.scopes import LIST_POLICIES, ScopeMap, ScopeRule
from smeldr_oauth.mcp.versions import SESSION_VERSIONS

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62})$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
_CLI_NAMED = re.compile(r"^([a-z0-9][a-z0-9-]{0,62})=(stdio:|https?://)", re.IGNORECASE)

#: Headers the gateway sets itself: a credential or identity header may not
#: be one of them (lower case).
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "accept",
        "connection",
        "transfer-encoding",
        "te",
        "upgrade",
        "mcp-session-id",
        "mcp-protocol-version",
        "last-event-id",
        "mcp-method",
        "mcp-name",
    }
)


class ConfigError(ValueError):
    """
    The configuration has mistakes; C{str()} is one line per mistake.

    @ivar problems: the lines.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


#: Each limit: (type, smallest allowed value).
_LIMIT_RULES: dict[str, tuple[type, float]] = {
    "max_instances": (int, 1),
    "idle_timeout": (float, 1),
    "startup_timeout": (float, 0.1),
    "request_timeout": (float, 0.1),
    "max_request_time": (float, 0.1),
    "max_in_flight": (int, 1),
    "max_server_requests": (int, 1),
    "max_message_bytes": (int, 1024),
    "notification_rate": (float, 0.1),
    "notification_burst": (int, 1),
    "restart_backoff": (float, 0),
    "restart_backoff_max": (float, 0),
    "stderr_lines_per_second": (float, 0),
    "stop_grace": (float, 0),
}


class _Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.lines.append(f"{where}: {what}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(self.lines)


def _unknown(table: Mapping[str, Any], allowed: Sequence[str], where: str, problems: _Problems) -> None:
    for key in table:
        if key not in allowed:
            problems.add(f"{where}.{key}", "unknown setting (allowed: " + ", ".join(allowed) + ")")


def _string(value: Any, where: str, problems: _Problems) -> Optional[str]:
    if not isinstance(value, str) or not value:
        problems.add(where, "must be a non-empty string")
        return None
    return value


def _string_list(value: Any, where: str, problems: _Problems) -> Optional[tuple[str, ...]]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.add(where, "must be a list of non-empty strings")
        return None
    return tuple(value)


def _header(value: Any, where: str, problems: _Problems) -> Optional[str]:
    name = _string(value, where, problems)
    if name is None:
        return None
    if not _HEADER_NAME.match(name):
        problems.add(where, f"{name[:64]!r} is not a valid HTTP header name")
        return None
    if name.lower() in RESERVED_HEADERS:
        problems.add(where, f"{name} is set by the gateway itself")
        return None
    return name


def _scopes_value(value: Any, where: str, problems: _Problems) -> Optional[tuple[str, ...]]:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.add(where, "must be a list of scopes (or one space-separated string)")
        return None
    for scope in value:
        if not _SCOPE_TOKEN.match(scope):
            problems.add(where, f"{scope[:64]!r} is not a valid OAuth scope")
            return None
    return tuple(value)


def _rules(value: Any, where: str, problems: _Problems) -> tuple[ScopeRule, ...]:
    if not isinstance(value, dict):
        problems.add(where, 'must be a table of pattern = [scopes], e.g. { "read_*" = ["files:read"] }')
        return ()
    rules = []
    for pattern, scopes in value.items():
        if not pattern:
            problems.add(where, "a pattern must not be empty")
            continue
        parsed = _scopes_value(scopes, f"{where}.{pattern!r}", problems)
        if parsed is not None:
            rules.append(ScopeRule(pattern, parsed))
    return tuple(rules)


def _scope_map(value: Any, where: str, problems: _Problems) -> ScopeMap:
    if not isinstance(value, dict):
        problems.add(where, "must be a table")
        return ScopeMap()
    _unknown(value, ("required", "list", "tools", "resources", "prompts"), where, problems)
    required = _scopes_value(value.get("required", []), f"{where}.required", problems) or ()
    policy = value.get("list", "show")
    if policy not in LIST_POLICIES:
        problems.add(f"{where}.list", "must be one of " + ", ".join(LIST_POLICIES))
        policy = "show"
    return ScopeMap(
        required=required,
        tools=_rules(value.get("tools", {}), f"{where}.tools", problems),
        resources=_rules(value.get("resources", {}), f"{where}.resources", problems),
        prompts=_rules(value.get("prompts", {}), f"{where}.prompts", problems),
        list_policy=policy,
    )


def _limits(value: Any, where: str, problems: _Problems) -> Limits:
    if not isinstance(value, dict):
        problems.add(where, "must be a table")
        return Limits()
    _unknown(value, tuple(_LIMIT_RULES), where, problems)
    values: dict[str, Any] = {}
    for key, (kind, minimum) in _LIMIT_RULES.items():
        if key not in value:
            continue
        raw = value[key]
        ok = isinstance(raw, int) if kind is int else isinstance(raw, (int, float))
        # TOML has inf and nan: a nan passes "< minimum" and fails every
        # timer the limit sets (callLater refuses it), an inf makes the
        # rate and backoff arithmetic nan; a large number does what either meant.
        if isinstance(raw, bool) or not ok or not math.isfinite(raw) or raw < minimum:
            noun = "a whole number" if kind is int else "a number"
            problems.add(f"{where}.{key}", f"must be {noun} >= {minimum:g}")
            continue
        values[key] = kind(raw)
    limits = Limits(**values)
    if limits.max_request_time < limits.request_timeout:
        problems.add(f"{where}.max_request_time", "must not be shorter than request_timeout")
    if limits.restart_backoff_max < limits.restart_backoff:
        problems.add(f"{where}.restart_backoff_max", "must not be shorter than restart_backoff")
    return limits


def _latin1(text: str) -> bool:
    """Whether C{text} can be an HTTP header value as the channel sends it."""
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _read_secret(value: Any, where: str, problems: _Problems, environ: Mapping[str, str]) -> Optional[Credential]:
    if not isinstance(value, dict):
        problems.add(where, "must be a table: { header = ..., file = ... } or { header = ..., env = ... }")
        return None
    _unknown(value, ("header", "prefix", "file", "env"), where, problems)
    header = _header(value.get("header", "Authorization"), f"{where}.header", problems)
    prefix = value.get("prefix", "")
    if not isinstance(prefix, str) or any(c in prefix for c in "\r\n\0") or not _latin1(prefix):
        problems.add(f"{where}.prefix", "must be a string on one line, in Latin-1 (it goes in an HTTP header)")
        prefix = ""
    if ("file" in value) == ("env" in value):
        problems.add(where, "give exactly one of file (a path) and env (a variable name)")
        return None
    secret: Optional[str] = None
    if "file" in value:
        path = _string(value["file"], f"{where}.file", problems)
        if path is None:
            return None
        source = f"file:{path}"
        try:
            with open(path, encoding="utf-8") as handle:
                secret = handle.read(65536).strip()
        except (OSError, UnicodeDecodeError) as e:
            problems.add(f"{where}.file", f"cannot read {path}: {getattr(e, 'strerror', None) or type(e).__name__}")
            return None
    else:
        name = _string(value["env"], f"{where}.env", problems)
        if name is None:
            return None
        source = f"env:{name}"
        secret = environ.get(name, "").strip()
        if not secret:
            problems.add(f"{where}.env", f"the environment variable {name} is not set or empty")
            return None
    if not secret:
        problems.add(where, f"the credential from {source} is empty")
        return None
    if any(c in secret for c in "\r\n\0"):
        problems.add(where, f"the credential from {source} must be one line")
        return None
    if not _latin1(secret):
        # Every request would fail encoding its header (an internal error
        # for each call); said here, without the value.
        problems.add(where, f"the credential from {source} is not Latin-1 text (it goes in an HTTP header)")
        return None
    if header is None:
        return None
    return Credential(header, prefix + secret, source)


def _identity(value: Any, where: str, problems: _Problems) -> IdentityHeaders:
    if not isinstance(value, dict):
        problems.add(where, "must be a table: { subject = ..., client = ..., scopes = ... }")
        return IdentityHeaders()
    _unknown(value, ("subject", "client", "scopes"), where, problems)
    names = {k: _header(value[k], f"{where}.{k}", problems) for k in ("subject", "client", "scopes") if k in value}
    identity = IdentityHeaders(**names)
    lowered = [n.lower() for n in identity.names()]
    if len(set(lowered)) != len(lowered):
        problems.add(where, "each identity header needs its own name")
    return identity


def _command(value: Any, where: str, problems: _Problems) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            parts = shlex.split(value)
        except ValueError as e:
            problems.add(where, f"cannot split the command: {e}")
            return ()
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        parts = list(value)
    else:
        problems.add(where, "must be a string (split like a shell does) or a list of strings")
        return ()
    if not parts or not parts[0]:
        problems.add(where, "is empty")
        return ()
    return tuple(parts)


def _url(value: Any, where: str, problems: _Problems) -> Optional[str]:
    text = _string(value, where, problems)
    if text is None:
        return None
    try:
        url = hyperlink.URL.from_text(text)
    except (hyperlink.URLParseError, ValueError):
        problems.add(where, "is not a URL")
        return None
    if url.scheme not in ("http", "https") or not url.host:
        problems.add(where, "must be an http:// or https:// URL with a host")
        return None
    if url.userinfo:
        problems.add(where, "must not carry a user or password: use credential = { ... }")
        return None
    if url.fragment:
        problems.add(where, "must not have a #fragment")
        return None
    return text


_UPSTREAM_KEYS = (
    "command",
    "url",
    "env",
    "env_inherit",
    "cwd",
    "subject_env",
    "transport",
    "credential",
    "identity_headers",
    "isolation",
    "protocol_version",
    "limits",
    "scopes",
)


def _upstream(
    name: str,
    table: Any,
    defaults: Mapping[str, Any],
    where: str,
    problems: _Problems,
    environ: Mapping[str, str],
    which: Callable[[str, Optional[str]], Optional[str]],
) -> Optional[UpstreamConfig]:
    """The one set of rules for an upstream, from a file or an option."""
    if not isinstance(table, dict):
        problems.add(where, "must be a table")
        return None
    _unknown(table, _UPSTREAM_KEYS, where, problems)
    merged = {**defaults, **table}
    if isinstance(defaults.get("limits"), dict) and isinstance(table.get("limits"), dict):
        # Limits merge key by key: a default idle_timeout survives an upstream's own request_timeout.
        merged["limits"] = {**defaults["limits"], **table["limits"]}
    if ("command" in table) == ("url" in table):
        problems.add(where, "give exactly one of command (a stdio upstream) and url (an HTTP upstream)")
        return None
    values: dict[str, Any] = {"name": name}
    if "command" in table:
        values["kind"] = "stdio"
        command = _command(table["command"], f"{where}.command", problems)
        values["command"] = command
        if "env" in merged:
            env = merged["env"]
            if not isinstance(env, dict) or not all(
                isinstance(v, str) and isinstance(k, str) and _ENV_NAME.match(k) for k, v in env.items()
            ):
                problems.add(f"{where}.env", "must be a table of NAME = \"value\" strings")
            else:
                values["env"] = dict(env)
        if "env_inherit" in merged:
            inherit = _string_list(merged["env_inherit"], f"{where}.env_inherit", problems)
            if inherit is not None:
                values["env_inherit"] = inherit
        if "cwd" in merged:
            cwd = _string(merged["cwd"], f"{where}.cwd", problems)
            if cwd is not None and not os.path.isdir(cwd):
                problems.add(f"{where}.cwd", f"{cwd} is not a directory")
            values["cwd"] = cwd
        if "subject_env" in merged:
            subject_env = _string(merged["subject_env"], f"{where}.subject_env", problems)
            if subject_env is not None and not _ENV_NAME.match(subject_env):
                problems.add(f"{where}.subject_env", "must be an environment variable name")
            values["subject_env"] = subject_env
        for key in ("url", "transport", "credential", "identity_headers"):
            if key in table:
                problems.add(f"{where}.{key}", "applies to HTTP upstreams only")
        if command:
            child = UpstreamConfig(**values).child_environment(None, environ)
            if which(command[0], child.get("PATH")) is None:
                problems.add(f"{where}.command", f"{command[0]!r} is not an executable on the upstream's PATH")
    else:
        values["kind"] = "http"
        values["url"] = _url(table["url"], f"{where}.url", problems)
        transport = merged.get("transport", "auto")
        if transport not in TRANSPORTS:
            problems.add(f"{where}.transport", "must be one of " + ", ".join(TRANSPORTS))
        values["transport"] = transport
        if "credential" in merged:
            values["credential"] = _read_secret(merged["credential"], f"{where}.credential", problems, environ)
        if "identity_headers" in merged:
            identity = _identity(merged["identity_headers"], f"{where}.identity_headers", problems)
            credential = values.get("credential")
            if credential is not None and credential.header.lower() in [n.lower() for n in identity.names()]:
                problems.add(f"{where}.identity_headers", "must not reuse the credential's header")
            values["identity_headers"] = identity
        for key in ("env", "env_inherit", "cwd", "subject_env"):
            if key in table:
                problems.add(f"{where}.{key}", "applies to stdio upstreams only")
    isolation = merged.get("isolation", "user")
    if isolation not in ISOLATIONS:
        problems.add(f"{where}.isolation", "must be one of " + ", ".join(ISOLATIONS))
    values["isolation"] = isolation
    if values.get("subject_env") is not None and isolation != "user":
        problems.add(f"{where}.subject_env", 'needs isolation = "user" (a process serves one subject)')
    version = merged.get("protocol_version", SESSION_VERSIONS[0])
    if version not in SESSION_VERSIONS:
        problems.add(f"{where}.protocol_version", "must be one of " + ", ".join(SESSION_VERSIONS))
    values["protocol_version"] = version
    values["limits"] = _limits(merged.get("limits", {}), f"{where}.limits", problems)
    values["scopes"] = _scope_map(merged.get("scopes", {}), f"{where}.scopes", problems)
    if values["kind"] == "http" and values["url"] is None:
        return None
    return UpstreamConfig(**values)


def _which(program: str, path: Optional[str]) -> Optional[str]:
    if os.sep in program:
        return program if os.access(program, os.X_OK) and os.path.isfile(program) else None
    return shutil.which(program, path=path)


def parse_option(spec: str) -> tuple[str, dict[str, Any]]:
    """
    Split one C{--upstream} value into a name and a table like the TOML
    file's: C{[NAME=]stdio:COMMAND ARGS...} or C{[NAME=]http(s)://...}.
    The name is optional for a single upstream.

    @raise ConfigError: neither form.
    """
    name = ""
    named = _CLI_NAMED.match(spec)
    if named:
        name = named.group(1).lower()
        spec = spec[len(named.group(1)) + 1 :]
    if spec.startswith("stdio:"):
        return name, {"command": spec[len("stdio:") :]}
    if spec.lower().startswith(("http://", "https://")):
        return name, {"url": spec}
    raise ConfigError([f"--upstream {spec[:80]!r}: must be stdio:COMMAND ... or an http(s):// URL"])


def load(
    options: Sequence[str] = (),
    toml_text: Optional[str] = None,
    *,
    isolation: Optional[str] = None,
    credential_file: Optional[str] = None,
    credential_env: Optional[str] = None,
    credential_header: str = "Authorization",
    environ: Optional[Mapping[str, str]] = None,
    which: Callable[[str, Optional[str]], Optional[str]] = _which,
) -> GatewayConfig:
    """
    Build the gateway configuration from C{--upstream} options and the text
    of a TOML file.

    @param isolation: C{--upstream-isolation}: the default for every
        upstream that does not set its own.
    @param credential_file: C{--upstream-credential-file}: a credential for
        the HTTP upstreams given as options.
    @param credential_env: C{--upstream-credential-env}: the same, from a
        variable.
    @raise ConfigError: one line per mistake.
    """
    problems = _Problems()
    env = os.environ if environ is None else environ
    tables: list[tuple[str, Any, str]] = []
    defaults: dict[str, Any] = {}
    if toml_text is not None:
        document = _parse_toml(toml_text, problems)
        _unknown(document, ("defaults", "upstreams"), "(file)", problems)
        raw_defaults = document.get("defaults", {})
        if not isinstance(raw_defaults, dict):
            problems.add("defaults", "must be a table")
        else:
            for key in ("command", "url"):
                if key in raw_defaults:
                    problems.add(f"defaults.{key}", "belongs to each upstream")
            _unknown(raw_defaults, _UPSTREAM_KEYS, "defaults", problems)
            defaults = {k: v for k, v in raw_defaults.items() if k not in ("command", "url")}
        upstreams = document.get("upstreams", {})
        if not isinstance(upstreams, dict):
            problems.add("upstreams", "must be a table of [upstreams.NAME] tables")
            upstreams = {}
        for name, table in upstreams.items():
            tables.append((name, table, f"upstreams.{name}"))
    if isolation is not None:
        defaults.setdefault("isolation", isolation)
    credential: Optional[dict[str, Any]] = None
    if credential_file is not None or credential_env is not None:
        credential = {"header": credential_header}
        if credential_file is not None:
            credential["file"] = credential_file
        if credential_env is not None:
            credential["env"] = credential_env
    for index, spec in enumerate(options):
        try:
            name, table = parse_option(spec)
        except ConfigError as e:
            problems.lines.extend(e.problems)
            continue
        if credential is not None and "url" in table:
            table["credential"] = credential
        tables.append((name, table, f"--upstream #{index + 1}" + (f" ({name})" if name else "")))
    configs: list[UpstreamConfig] = []
    seen: set[str] = set()
    for name, table, where in tables:
        if name == "" and len(tables) > 1:
            problems.add(where, "several upstreams each need a name: --upstream NAME=stdio:... or NAME=https://...")
        elif name and not _NAME.match(name):
            problems.add(where, "the name must be lower-case letters, digits and '-' (it becomes /mcp/NAME)")
        if name and name in seen:
            problems.add(where, f"the name {name!r} is used twice")
        seen.add(name)
        config = _upstream(name, table, defaults, where, problems, env, which)
        if config is not None:
            configs.append(config)
    problems.raise_if_any()
    return GatewayConfig(tuple(configs))


def _parse_toml(text: str, problems: _Problems) -> dict[str, Any]:
    if sys.version_info < (3, 11):  # pragma: no cover
        problems.add("(file)", "a TOML configuration file needs Python 3.11 or later (tomllib)")
        return {}
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        problems.add("(file)", f"not valid TOML: {e}")
        return {}


def load_file(path: str, options: Sequence[str] = (), **kwargs: Any) -> GatewayConfig:
    """L{load} with the text of the TOML file at C{path}."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read: {getattr(e, 'strerror', None) or type(e).__name__}"])
    return load(options, text, **kwargs)
