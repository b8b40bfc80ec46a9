"""
Tests for L{smeldr_oauth.gateway.configfile} (and the records of
L{smeldr_oauth.gateway.config}): C{--upstream} options and the TOML
file, with one error line per mistake.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.gateway.config import DEFAULT_ENV_INHERIT, Credential, GatewayConfig, UpstreamConfig
from smeldr_oauth.gateway.configfile import ConfigError, load, load_file, parse_option
from smeldr_oauth.gateway.scopes import ScopeRule


def which(program: str, path: Optional[str]) -> Optional[str]:
    return None if program == "missing" else "/usr/bin/" + program


def problems(*args: Any, **kwargs: Any) -> list[str]:
    kwargs.setdefault("which", which)
    kwargs.setdefault("environ", {})
    try:
        load(*args, **kwargs)
    except ConfigError as e:
        return list(e.problems)
    raise AssertionError("no ConfigError")


class OptionTests(SynchronousTestCase):
    def test_stdio(self) -> None:
        config = load(["stdio:npx -y '@modelcontextprotocol/server-everything' stdio"], which=which, environ={})
        (upstream,) = config.upstreams
        self.assertEqual(upstream.kind, "stdio")
        self.assertEqual(upstream.command, ("npx", "-y", "@modelcontextprotocol/server-everything", "stdio"))
        self.assertEqual(upstream.name, "")
        self.assertEqual(upstream.isolation, "user")
        self.assertEqual(config.paths(), {"": "/mcp"})

    def test_http(self) -> None:
        (upstream,) = load(["http://10.0.0.5:9000/mcp"], environ={}).upstreams
        self.assertEqual((upstream.kind, upstream.url, upstream.transport), ("http", "http://10.0.0.5:9000/mcp", "auto"))
        self.assertEqual(upstream.describe(), "http://10.0.0.5:9000")

    def test_several_need_names(self) -> None:
        config = load(["files=stdio:ls", "api=https://api.example/mcp"], which=which, environ={})
        self.assertEqual(config.paths(), {"files": "/mcp/files", "api": "/mcp/api"})
        self.assertEqual(
            problems(["stdio:ls", "https://api.example/mcp"]),
            [
                "--upstream #1: several upstreams each need a name: --upstream NAME=stdio:... or NAME=https://...",
                "--upstream #2: several upstreams each need a name: --upstream NAME=stdio:... or NAME=https://...",
            ],
        )

    def test_parse_option(self) -> None:
        self.assertEqual(parse_option("a-1=stdio:x y"), ("a-1", {"command": "x y"}))
        self.assertEqual(parse_option("HTTPS://h/mcp"), ("", {"url": "HTTPS://h/mcp"}))
        self.assertRaises(ConfigError, parse_option, "ftp://h")
        self.assertRaises(ConfigError, parse_option, "npx thing")

    def test_isolation_option(self) -> None:
        (upstream,) = load(["stdio:ls"], isolation="session", which=which, environ={}).upstreams
        self.assertEqual(upstream.isolation, "session")
        self.assertEqual(problems(["stdio:ls"], isolation="process"), ["--upstream #1.isolation: must be one of user, session, shared"])

    def test_credential_from_env_option(self) -> None:
        (upstream,) = load(
            ["https://h/mcp"], credential_env="UP_TOKEN", environ={"UP_TOKEN": "s3cret\n"}
        ).upstreams
        self.assertEqual(upstream.credential, Credential("Authorization", "s3cret", "env:UP_TOKEN"))
        self.assertNotIn("s3cret", repr(upstream))

    def test_credential_problems_never_show_the_value(self) -> None:
        lines = problems(["https://h/mcp"], credential_env="UP_TOKEN", environ={"UP_TOKEN": "a\rb"})
        self.assertEqual(lines, ["--upstream #1.credential: the credential from env:UP_TOKEN must be one line"])
        self.assertEqual(
            problems(["https://h/mcp"], credential_env="NOPE"),
            ["--upstream #1.credential.env: the environment variable NOPE is not set or empty"],
        )

    def test_credential_must_be_latin1(self) -> None:
        """
        A credential (or its prefix) that cannot be an HTTP header value is
        refused at start-up, without the value; it used to be accepted, and
        every call to the upstream failed encoding its header.
        """
        lines = problems(["https://h/mcp"], credential_env="UP_TOKEN", environ={"UP_TOKEN": "s3cr\u20act"})
        self.assertEqual(lines, ["--upstream #1.credential: the credential from env:UP_TOKEN is not Latin-1 text (it goes in an HTTP header)"])
        text = '[upstreams.x]\nurl = "https://h/mcp"\ncredential = { prefix = "T\u20ac ", env = "K" }\n'
        self.assertEqual(
            problems(toml_text=text, environ={"K": "k"}),
            ["upstreams.x.credential.prefix: must be a string on one line, in Latin-1 (it goes in an HTTP header)"],
        )

    def test_bad_urls(self) -> None:
        self.assertEqual(problems(["https://user:pw@h/mcp"]), ["--upstream #1.url: must not carry a user or password: use credential = { ... }"])
        self.assertEqual(problems(["http:///mcp"]), ["--upstream #1.url: must be an http:// or https:// URL with a host"])
        self.assertEqual(problems(["https://h/mcp#x"]), ["--upstream #1.url: must not have a #fragment"])

    def test_missing_program(self) -> None:
        self.assertEqual(problems(["stdio:missing --flag"]), ["--upstream #1.command: 'missing' is not an executable on the upstream's PATH"])
        self.assertEqual(problems(["stdio:"]), ["--upstream #1.command: is empty"])
        self.assertEqual(problems(["stdio:a 'b"]), ["--upstream #1.command: cannot split the command: No closing quotation"])


TOML = """
[defaults]
isolation = "user"
limits = { idle_timeout = 60 }

[upstreams.everything]
command = ["node", "server.js", "stdio"]
env = { NODE_ENV = "production" }
env_inherit = ["PATH"]
subject_env = "MCP_USER"

[upstreams.everything.scopes]
required = ["mcp"]
list = "hide"
tools = { "get-*" = ["tools:read"], "*" = "tools:write tools:read" }
resources = { "demo://resource/static/*" = [] }

[upstreams.internal]
url = "https://10.0.0.5:9000/mcp"
transport = "streamable"
isolation = "shared"
credential = { header = "X-Api-Key", env = "INTERNAL_KEY" }
identity_headers = { subject = "X-Smeldr-Subject", scopes = "X-Smeldr-Scopes" }
limits = { request_timeout = 30, max_instances = 2 }
"""


class TOMLTests(SynchronousTestCase):
    def test_full(self) -> None:
        config = load(toml_text=TOML, which=which, environ={"INTERNAL_KEY": "k"})
        everything, internal = config.upstreams
        self.assertEqual(everything.name, "everything")
        self.assertEqual(everything.command, ("node", "server.js", "stdio"))
        self.assertEqual(everything.limits.idle_timeout, 60.0)
        self.assertEqual(everything.scopes.list_policy, "hide")
        self.assertEqual(
            everything.scopes.tools,
            (ScopeRule("get-*", ("tools:read",)), ScopeRule("*", ("tools:write", "tools:read"))),
        )
        self.assertEqual(everything.scopes.resources, (ScopeRule("demo://resource/static/*", ()),))
        self.assertEqual(
            everything.child_environment("alice", {"PATH": "/bin", "SECRET": "x", "HOME": "/root"}),
            {"PATH": "/bin", "NODE_ENV": "production", "MCP_USER": "alice"},
        )
        self.assertEqual(internal.isolation, "shared")
        self.assertEqual(internal.limits.idle_timeout, 60.0)
        self.assertEqual((internal.limits.request_timeout, internal.limits.max_instances), (30.0, 2))
        self.assertEqual(internal.credential, Credential("X-Api-Key", "k", "env:INTERNAL_KEY"))
        self.assertEqual(internal.identity_headers.names(), ["X-Smeldr-Subject", "X-Smeldr-Scopes"])
        self.assertEqual(config.paths(), {"everything": "/mcp/everything", "internal": "/mcp/internal"})
        self.assertEqual(config.all_scopes(), {"mcp", "tools:read", "tools:write"})

    def test_default_environment_hides_secrets(self) -> None:
        config = UpstreamConfig(name="x", kind="stdio", command=("x",))
        env = config.child_environment(None, {"PATH": "/bin", "DATABASE_URL": "postgres://secret", "HOME": "/h"})
        self.assertEqual(env, {"PATH": "/bin", "HOME": "/h"})
        self.assertIn("PATH", DEFAULT_ENV_INHERIT)

    def test_one_line_per_mistake(self) -> None:
        text = """
[upstreams.a]
command = "ls"
url = "https://h"

[upstreams.b]
command = "ls"
limits = { idle_timeout = -1, max_instances = 1.5, bogus = 1 }
scopes = { tools = { "x" = ["bad scope\\"quote"] }, list = "maybe" }
isolation = "nobody"
colour = "red"

[upstreams.c]
url = "https://h/mcp"
cwd = "/tmp"
credential = { file = "/nonexistent/token" }
identity_headers = { subject = "Host" }

[upstreams.D_bad]
command = "ls"
"""
        self.assertEqual(
            problems(toml_text=text),
            [
                "upstreams.a: give exactly one of command (a stdio upstream) and url (an HTTP upstream)",
                "upstreams.b.colour: unknown setting (allowed: command, url, env, env_inherit, cwd, subject_env, transport, credential, identity_headers, isolation, protocol_version, limits, scopes)",
                "upstreams.b.isolation: must be one of user, session, shared",
                "upstreams.b.limits.bogus: unknown setting (allowed: max_instances, idle_timeout, startup_timeout, request_timeout, max_request_time, max_in_flight, max_server_requests, max_message_bytes, notification_rate, notification_burst, restart_backoff, restart_backoff_max, stderr_lines_per_second, stop_grace)",
                "upstreams.b.limits.max_instances: must be a whole number >= 1",
                "upstreams.b.limits.idle_timeout: must be a number >= 1",
                "upstreams.b.scopes.list: must be one of show, hide",
                "upstreams.b.scopes.tools.'x': 'bad scope\"quote' is not a valid OAuth scope",
                "upstreams.c.credential.file: cannot read /nonexistent/token: No such file or directory",
                "upstreams.c.identity_headers.subject: Host is set by the gateway itself",
                "upstreams.c.cwd: applies to stdio upstreams only",
                "upstreams.D_bad: the name must be lower-case letters, digits and '-' (it becomes /mcp/NAME)",
            ],
        )

    def test_limits_must_be_finite(self) -> None:
        """
        TOML's nan and inf are refused: a nan limit used to pass the
        minimum check, and then every call answered "Internal error" (its
        timer refused).
        """
        text = '[upstreams.x]\nurl = "https://h/mcp"\nlimits = { request_timeout = nan, stop_grace = inf, notification_rate = -nan }\n'
        self.assertEqual(
            problems(toml_text=text),
            [
                "upstreams.x.limits.request_timeout: must be a number >= 0.1",
                "upstreams.x.limits.notification_rate: must be a number >= 0.1",
                "upstreams.x.limits.stop_grace: must be a number >= 0",
            ],
        )

    def test_credential_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("tok-123\n")
        text = f'[upstreams.x]\nurl = "https://h/mcp"\ncredential = {{ prefix = "Bearer ", file = "{path}" }}\n'
        (upstream,) = load(toml_text=text, environ={}).upstreams
        self.assertEqual(upstream.credential, Credential("Authorization", "Bearer tok-123", f"file:{path}"))

    def test_cross_kind_and_duplicates(self) -> None:
        text = '[upstreams.x]\ncommand = "ls"\ntransport = "sse"\n[upstreams.y]\nurl = "https://h/m"\nsubject_env = "U"\n'
        self.assertEqual(
            problems(["x=stdio:ls"], toml_text=text),
            [
                "upstreams.x.transport: applies to HTTP upstreams only",
                "upstreams.y.subject_env: applies to stdio upstreams only",
                "--upstream #1 (x): the name 'x' is used twice",
            ],
        )

    def test_subject_env_needs_user_isolation(self) -> None:
        text = '[upstreams.x]\ncommand = "ls"\nsubject_env = "U"\nisolation = "shared"\n'
        self.assertEqual(problems(toml_text=text), ['upstreams.x.subject_env: needs isolation = "user" (a process serves one subject)'])

    def test_cwd_must_exist(self) -> None:
        text = '[upstreams.x]\ncommand = "ls"\ncwd = "/nonexistent-dir"\n'
        self.assertEqual(problems(toml_text=text), ["upstreams.x.cwd: /nonexistent-dir is not a directory"])

    def test_bad_toml(self) -> None:
        (line,) = problems(toml_text="[upstreams.x\n")
        self.assertTrue(line.startswith("(file): not valid TOML"), line)

    def test_load_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[upstreams.x]\nurl = "https://h/mcp"\n')
        self.assertEqual(load_file(path).upstreams[0].name, "x")
        self.assertRaises(ConfigError, load_file, path + ".missing")

    def test_real_which(self) -> None:
        """Without a stand-in, the program is looked up on the child's PATH."""
        (upstream,) = load(["stdio:sh -c true"], environ={"PATH": os.environ["PATH"]}).upstreams
        self.assertEqual(upstream.command[0], "sh")
        with self.assertRaises(ConfigError) as caught:
            load(["stdio:sh"], environ={"PATH": "/nonexistent"})
        self.assertEqual(caught.exception.problems, ("--upstream #1.command: 'sh' is not an executable on the upstream's PATH",))

    def test_empty(self) -> None:
        self.assertEqual(load(environ={}), GatewayConfig(()))

    @settings(deadline=None)  # no timing in tests: a loaded CI box is slow
    @given(st.text(max_size=200))
    def test_any_option_text(self, text: str) -> None:
        """Any option text gives a configuration or a ConfigError, nothing else."""
        try:
            load([text], which=which, environ={})
        except ConfigError as e:
            self.assertTrue(e.problems)
