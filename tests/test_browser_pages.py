"""
The consent page (C{/oauth/authorize}) and the connected-apps page
(C{/oauth/grants}) driven end to end in a real headless Chromium with
selenium, against a real C{twist smeldr-oauth} process.

What a person does, the browser does: open the authorization URL an
application built, read who is asking and where the answer goes, paste a site
token, press Approve (or Deny, or only the keyboard), and land on the
application's redirect URI; later sign in to the connected-apps page and
disconnect the application. The application's side is played here: PKCE is
built in Python, the client is registered with C{POST /oauth/register}, its
redirect URI is a small twisted.web server on the real reactor that records
the callback query, and the code is exchanged with treq.

Selenium blocks, and the callback server must answer while the browser
follows a redirect to it, so every browser step runs in a thread
(L{deferToThread}) while the reactor keeps serving.

The pages are photographed at a phone width (390x844) and a desktop width
(1280x900), into C{$SMELDR_SCREENSHOT_DIR} when it is set (the committed
ones live in C{docs/screenshots/}), otherwise into the test's temporary
directory.

Prerequisites (C{scripts/setup-browser.sh} installs them): Debian's
C{chromium} and C{chromium-driver}, and the C{selenium} package. Missing,
these tests fail under the README's test command and are skipped elsewhere
(L{tests.prerequisites}).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import treq
from hyperlink import URL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.e2e import RunningServer, adminCommand, createSiteToken, runProgram, startServer
from tests.lifetime import boundExecutable
from tests.prerequisites import require

try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - reported by requireBrowser
    HAVE_SELENIUM = False
else:
    HAVE_SELENIUM = True

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

#: Where the screenshots go; unset, into the test's temporary directory.
SCREENSHOT_ENVIRONMENT = "SMELDR_SCREENSHOT_DIR"

#: (name, width, height, mobile): the sizes the pages must look finished at.
VIEWPORTS = (("phone", 390, 844, True), ("desktop", 1280, 900, False))

CLIENT_NAME = "Smeldr Browser Test"

#: Put into every document before its own content (by DevTools, so the page's
#: CSP does not apply to it): remember each CSP violation the page reports.
#: The console says the same, but its messages may reach chromedriver only
#: after the page has loaded; the event is the page's own record.
WATCH_VIOLATIONS = """
window.__smeldrViolations = [];
document.addEventListener('securitypolicyviolation', e => window.__smeldrViolations.push(
    'securitypolicyviolation: ' + e.effectiveDirective + ' blocked ' + (e.blockedURI || 'inline')));
"""

T = TypeVar("T")


#: The step that installs everything these tests need.
INSTALL = "bash scripts/setup-browser.sh (Chromium, chromedriver) and .venv/bin/pip install -r requirements-test.txt (selenium)"


def requireBrowser() -> None:
    """
    Fail under the README's test command, skip elsewhere, when the browser
    tooling is missing: see L{tests.prerequisites}.
    """
    missing = []
    if not HAVE_SELENIUM:
        missing.append("the selenium package")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            missing.append(path)
    require("browser tests need " + ", ".join(missing) if missing else None, INSTALL)


def pkcePair() -> tuple[str, str]:
    """
    A PKCE verifier and its S256 challenge (RFC 7636 4.1, 4.2), as an
    application makes them.
    """
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class _Callback(Resource):
    """
    The application's redirect URI: remember every query it was called with
    and show "done", as a native app's loopback listener would.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[dict[str, list[str]]] = []
        self._waiting: list[Deferred[dict[str, list[str]]]] = []

    def render_GET(self, request: Any) -> bytes:
        if request.path != b"/callback":
            request.setResponseCode(404)
            return b"not found"
        query = {k.decode("utf-8"): [v.decode("utf-8") for v in vs] for k, vs in request.args.items()}
        self.queries.append(query)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(query)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return b"<!doctype html><title>done</title><p id=done>done</p>"

    def next(self) -> Deferred[dict[str, list[str]]]:
        """
        The query of the next callback, or of the last one if it already
        came and nobody took it.
        """
        d: Deferred[dict[str, list[str]]] = Deferred()
        self._waiting.append(d)
        return d


class Browser:
    """
    One headless Chromium session, used only from a worker thread.
    """

    def __init__(self, driver: webdriver.Chrome, profile: str) -> None:
        self.driver = driver
        self.profile = profile
        #: Every console message read so far, for the record.
        self.console: list[str] = []

    @classmethod
    def start(cls, logFile: str) -> Browser:
        """
        Start Chromium as root in a closed network: the background
        networking flags keep it from calling home (which the network
        refuses, and which slows everything down).

        chromedriver and the Chromium it starts are both bound to their
        parents (L{boundExecutable}): killed with the test process, neither
        stays behind. Call it from a thread that lives as long as the
        browser (the reactor's thread pool keeps its threads).
        """
        profile = tempfile.mkdtemp(prefix="smeldr-chromium-")
        directory = os.path.dirname(logFile)
        options = webdriver.ChromeOptions()
        options.binary_location = boundExecutable(directory, CHROMIUM)
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--window-size=1280,900",
        ):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(executable_path=boundExecutable(directory, CHROMEDRIVER), log_output=logFile)
        try:
            driver = webdriver.Chrome(options=options, service=service)
        except BaseException:
            shutil.rmtree(profile, ignore_errors=True)
            raise
        driver.set_page_load_timeout(15)
        driver.set_script_timeout(10)
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH_VIOLATIONS})
        return cls(driver, profile)

    def quit(self, consoleFile: str | None = None) -> None:
        try:
            if consoleFile is not None:
                with open(consoleFile, "w") as f:
                    f.write("\n".join(self.console) + "\n")
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    # -- looking -------------------------------------------------------------

    def text(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def one(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[WebElement]:
        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def submit(self, button: WebElement, timeout: float = 10.0) -> None:
        """
        Click a form's button and wait until the page it leads to has
        replaced this one: C{click()} returns before the navigation, and
        reading the page straight after it races the browser.
        """
        old = self.driver.find_element(By.TAG_NAME, "html")
        button.click()

        def gone(driver: Any) -> bool:
            # Chromium reports a replaced document either as a stale element
            # or, mid-navigation, as a node that "does not belong to the
            # document": both mean the old page is gone.
            try:
                return bool(staleness_of(old)(driver))
            except WebDriverException:
                return True

        WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(gone)

    def button(self, label: str, within: WebElement | None = None) -> WebElement:
        buttons = [
            b for b in (within or self.driver).find_elements(By.TAG_NAME, "button") if b.text.strip() == label
        ]
        assert len(buttons) == 1, f"{len(buttons)} buttons labelled {label!r}"
        return buttons[0]

    def active(self) -> dict[str, str]:
        """
        The focused element: its tag, id, name and text.
        """
        return dict(
            self.driver.execute_script(
                "const e = document.activeElement;"
                "return {tag: e.tagName.toLowerCase(), id: e.id || '',"
                " name: e.getAttribute('name') || '', text: (e.textContent || '').trim()};"
            )
        )

    def unlabelledInputs(self) -> list[dict[str, Any]]:
        """
        Every input a person can see or reach (not C{type=hidden}) that has
        neither a C{<label for=id>} with text nor an C{aria-label}.
        """
        return list(
            self.driver.execute_script(
                """
                const found = [];
                for (const i of document.querySelectorAll('input:not([type=hidden])')) {
                  const labels = i.id ? Array.from(document.querySelectorAll('label'))
                      .filter(l => l.htmlFor === i.id && l.textContent.trim()) : [];
                  const aria = (i.getAttribute('aria-label') || '').trim();
                  const unique = !i.id || document.querySelectorAll(
                      '[id="' + CSS.escape(i.id) + '"]').length === 1;
                  if ((!labels.length && !aria) || !unique) {
                    found.push({name: i.name, id: i.id, type: i.type, unique: unique});
                  }
                }
                return found;
                """
            )
        )

    def inputCount(self) -> int:
        return int(
            self.driver.execute_script("return document.querySelectorAll('input:not([type=hidden])').length")
        )

    def cspViolations(self) -> list[str]:
        """
        The Content Security Policy violations reported since the last call:
        by the current page (L{WATCH_VIOLATIONS}; read and cleared), and on
        the console, where Chromium logs each refused resource or form target
        as an error naming the policy, also for pages already left.
        """
        seen = list(
            self.driver.execute_script(
                "const v = window.__smeldrViolations || []; window.__smeldrViolations = []; return v;"
            )
        )
        entries = self.driver.get_log("browser")
        self.console.extend(f"{e['level']} {e['message']}" for e in entries)
        seen.extend(
            e["message"]
            for e in entries
            if "Content Security Policy" in e["message"] or "Refused to" in e["message"]
        )
        return seen

    def styleAgainstDefault(
        self, element: WebElement, properties: tuple[str, ...]
    ) -> dict[str, tuple[str, str]]:
        """
        The computed C{properties} of C{element} next to those of a button
        that no page style reaches (inside a shadow root), i.e. the browser's
        default look.
        """
        return dict(
            self.driver.execute_script(
                """
                const [element, properties] = arguments;
                const host = document.createElement('div');
                const plain = document.createElement('button');
                host.attachShadow({mode: 'open'}).appendChild(plain);
                document.body.appendChild(host);
                const mine = getComputedStyle(element), theirs = getComputedStyle(plain);
                const out = {};
                for (const p of properties) {
                  out[p] = [mine.getPropertyValue(p), theirs.getPropertyValue(p)];
                }
                host.remove();
                return out;
                """,
                element,
                list(properties),
            )
        )

    # -- doing ----------------------------------------------------------------

    def get(self, url: str) -> None:
        self.driver.get(url)

    def keys(self, *keys: str) -> None:
        """
        Type C{keys} into whatever has the focus, as a keyboard would.
        """
        ActionChains(self.driver).send_keys(*keys).perform()

    def tabUntil(self, wanted: Callable[[dict[str, str]], bool], most: int = 10) -> list[dict[str, str]]:
        """
        Press Tab until the focused element is C{wanted}; every element
        focused on the way, in order (the last one is the wanted one).

        @raise AssertionError: C{most} presses did not get there.
        """
        seen = []
        for _ in range(most):
            self.keys(Keys.TAB)
            now = self.active()
            seen.append(now)
            if wanted(now):
                return seen
        raise AssertionError(f"Tab never reached the element; focus went {seen}")

    def viewport(self, width: int, height: int, mobile: bool) -> dict[str, int]:
        """
        Emulate a screen of C{width} x C{height} CSS pixels (headless
        windows are never narrower than 500); what the page then sees.
        """
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )
        return dict(self.driver.execute_script("return {w: innerWidth, h: innerHeight}"))

    def screenshots(self, directory: str, name: str) -> list[str]:
        """
        Photograph the page at every L{VIEWPORTS} size into
        C{<directory>/<name>-<viewport>.png}; the page stays at desktop size.

        @return: A problem for each size at which the page scrolls
            sideways (it should fit every width).
        """
        problems = []
        for label, width, height, mobile in VIEWPORTS:
            seen = self.viewport(width, height, mobile)
            if seen["w"] != width:
                problems.append(f"{name} at {label}: the page sees width {seen['w']}, not {width}")
            overflow = self.driver.execute_script("return document.documentElement.scrollWidth - innerWidth")
            if overflow > 0:
                problems.append(f"{name} at {label}: scrolls sideways by {overflow}px")
            path = os.path.join(directory, f"{name}-{label}.png")
            if not self.driver.get_screenshot_as_file(path):
                problems.append(f"{name} at {label}: no screenshot written to {path}")
        self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        return problems


class BrowserPagesTests(TestCase):
    """
    The consent and connected-apps pages, as a person uses them in Chromium.
    """

    timeout = 60

    def setUp(self) -> None:
        requireBrowser()

    async def thread(self, f: Callable[..., T], *args: Any) -> T:
        """
        Run a (blocking) browser step in a worker thread, so the reactor
        keeps serving the callback meanwhile.
        """
        return await deferToThread(f, *args)

    async def start(self) -> None:
        """
        Start, at the same time, the server (with a site token), the
        browser, and the application's callback listener; register the
        application.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.directory = directory
        logFile = os.path.join(directory, "chromedriver.log")

        async def serve() -> tuple[RunningServer, str]:
            server = await startServer(self, reactor)
            return server, await createSiteToken(reactor, server, "browser")

        browserStarted: Deferred[Any] = deferToThread(Browser.start, logFile)
        serverStarted: Deferred[Any] = Deferred.fromCoroutine(serve())
        # Wait for both, so that neither is left running unwatched.
        outcomes: list[tuple[bool, Any]] = await DeferredList(
            [browserStarted, serverStarted], consumeErrors=True
        )
        (browserOK, browser), (serverOK, served) = outcomes
        if browserOK:
            consoleFile = os.path.join(directory, "console.log")
            self.addCleanup(self.thread, browser.quit, consoleFile)
        else:
            if isinstance(browser.value, WebDriverException):
                require(f"Chromium did not start: {browser.value.msg!r}; chromedriver log in {logFile}", INSTALL)
            browser.raiseException()
        if not serverOK:
            served.raiseException()
        self.browser: Browser = browser
        self.server: RunningServer
        self.siteToken: str
        self.server, self.siteToken = served

        self.callback = _Callback()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(self.callback))
        self.addCleanup(port.stopListening)
        self.redirectURI = f"http://127.0.0.1:{port.getHost().port}/callback"

        response = await treq.post(
            self.server.issuer + "/oauth/register",
            json.dumps(
                {
                    "client_name": CLIENT_NAME,
                    "redirect_uris": [self.redirectURI],
                    "grant_types": ["authorization_code", "refresh_token"],
                    "response_types": ["code"],
                    "token_endpoint_auth_method": "none",
                }
            ).encode("utf-8"),
            headers=Headers({"Content-Type": ["application/json"]}),
            persistent=False,
        )
        body = await response.text()
        self.assertEqual(response.code, 201, self.server.annotate(f"register: {body}"))
        self.clientID = json.loads(body)["client_id"]

    def authorizeURL(self) -> tuple[str, str, str]:
        """
        The authorization URL an application would open, with fresh PKCE
        and state; also the verifier and the state.
        """
        verifier, challenge = pkcePair()
        state = secrets.token_urlsafe(16)
        url = (
            URL.from_text(self.server.issuer)
            .child("oauth", "authorize")
            .replace(
                query=[
                    ("response_type", "code"),
                    ("client_id", self.clientID),
                    ("redirect_uri", self.redirectURI),
                    ("code_challenge", challenge),
                    ("code_challenge_method", "S256"),
                    ("state", state),
                    ("resource", self.server.mcpURL),
                ]
            )
        )
        return url.to_text(), verifier, state

    def screenshotDirectory(self) -> str:
        directory = os.environ.get(SCREENSHOT_ENVIRONMENT) or os.path.join(self.directory, "screenshots")
        os.makedirs(directory, exist_ok=True)
        return directory

    def fail_(self, message: str) -> str:
        return self.server.annotate(message)

    async def assertNoCSPViolations(self) -> None:
        violations = await self.thread(self.browser.cspViolations)
        self.assertEqual(violations, [], self.fail_("the CSP refused something"))

    async def callbackQuery(self, seen: int) -> dict[str, list[str]]:
        """
        The query of callback number C{seen + 1}: the browser's click has
        returned once the page loaded, so it has normally arrived already.
        """
        if len(self.callback.queries) > seen:
            return self.callback.queries[seen]
        return await self.callback.next().addTimeout(10, reactor)

    async def openConsent(self) -> tuple[str, str]:
        """
        Open a fresh authorization URL; the verifier and state.
        """
        url, verifier, state = self.authorizeURL()
        await self.thread(self.browser.get, url)
        title = await self.thread(lambda: self.browser.driver.title)
        self.assertIn(CLIENT_NAME, title, self.fail_("consent page title"))
        return verifier, state

    async def approve(self) -> tuple[dict[str, list[str]], str]:
        """
        Paste the token, click Approve, land on the callback; the callback's
        query and the verifier.
        """
        verifier, state = await self.openConsent()
        seen = len(self.callback.queries)

        def pasteAndApprove() -> str:
            self.browser.one("#site_token").send_keys(self.siteToken)
            self.browser.submit(self.browser.button("Approve"))
            return str(self.browser.driver.current_url)

        landed = await self.thread(pasteAndApprove)
        query = await self.callbackQuery(seen)
        self.assertTrue(landed.startswith(self.redirectURI + "?"), self.fail_(landed))
        self.assertEqual(query.get("state"), [state], query)
        self.assertEqual(query.get("iss"), [self.server.issuer], query)
        self.assertEqual(len(query.get("code", [])), 1, query)
        self.assertNotIn("error", query)
        return query, verifier

    async def exchange(self, code: str, verifier: str) -> dict[str, Any]:
        response = await treq.post(
            self.server.issuer + "/oauth/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.redirectURI,
                "client_id": self.clientID,
                "code_verifier": verifier,
                "resource": self.server.mcpURL,
            },
            persistent=False,
        )
        body = await response.text()
        self.assertEqual(response.code, 200, self.fail_(f"token exchange: {body}"))
        tokens: dict[str, Any] = json.loads(body)
        self.assertEqual(tokens["token_type"], "Bearer")
        return tokens

    async def mcpStatus(self, accessToken: str) -> int:
        """
        The status of an MCP C{initialize} made with C{accessToken}.
        """
        response = await treq.post(
            self.server.mcpURL,
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "initialize",
                    "params": {
                        "protocolVersion": "2025-06-18",
                        "capabilities": {},
                        "clientInfo": {"name": "browser-test", "version": "1"},
                    },
                }
            ).encode("utf-8"),
            headers=Headers(
                {
                    "Content-Type": ["application/json"],
                    "Accept": ["application/json, text/event-stream"],
                    "Authorization": [f"Bearer {accessToken}"],
                }
            ),
            persistent=False,
        )
        await response.content()
        return int(response.code)

    # -- the consent page ---------------------------------------------------

    async def test_approve(self) -> None:
        """
        The consent page names the application, where the answer goes and
        warns that it is a local one; pasting the token and clicking Approve
        lands on the redirect URI with C{code}, C{state} and C{iss}, and the
        code is good at the token endpoint. The page's CSP blocks nothing it
        needs (no violation on the console, the inline style applied).
        """
        await self.start()
        await self.openConsent()

        def look() -> tuple[str, dict[str, tuple[str, str]]]:
            return self.browser.text(), self.browser.styleAgainstDefault(
                self.browser.button("Approve"),
                ("background-color", "border-radius", "font-weight", "color"),
            )

        text, style = await self.thread(look)
        callbackHost = URL.from_text(self.redirectURI).authority()
        self.assertIn(f"{CLIENT_NAME} wants to connect", text)
        self.assertIn(f"you return to {callbackHost}", text)
        self.assertIn("runs on this computer", text)
        self.assertIn(self.clientID, text)
        changed = {p for p, (mine, plain) in style.items() if mine != plain}
        self.assertEqual(
            changed,
            set(style),
            f"the page style did not reach the Approve button: {style}",
        )
        await self.assertNoCSPViolations()

        # The console check sees a violation when there is one (Chromium's
        # wording is what it matches).
        def violate() -> list[str]:
            self.browser.get(
                "data:text/html,<meta http-equiv=Content-Security-Policy "
                "content=\"style-src 'none'\"><style>p{color:red}</style><p>x"
            )
            found: list[str] = []

            def both(_: object) -> bool:
                found.extend(self.browser.cspViolations())
                return len(found) >= 2

            # Both reports arrive on their own time: wait for them.
            WebDriverWait(self.browser.driver, 10, poll_frequency=0.05).until(both)
            return found

        found = await self.thread(violate)
        self.assertEqual(len(found), 2, found)
        self.assertTrue(found[0].startswith("securitypolicyviolation: style-src-elem"), found)
        self.assertIn("Content Security Policy", found[1])
        await self.openConsent()
        problems = await self.thread(self.browser.screenshots, self.screenshotDirectory(), "consent")
        self.assertEqual(problems, [])

        query, verifier = await self.approve()
        await self.assertNoCSPViolations()
        shown = await self.thread(lambda: self.browser.one("#done").text)
        self.assertEqual(shown, "done")
        tokens = await self.exchange(query["code"][0], verifier)
        self.assertEqual(await self.mcpStatus(tokens["access_token"]), 200)

    async def test_deny(self) -> None:
        """
        Deny needs no token and lands on the redirect URI with
        C{error=access_denied}, the state, the issuer and no code.
        """
        await self.start()
        _, state = await self.openConsent()

        def deny() -> str:
            self.browser.submit(self.browser.button("Deny"))
            return str(self.browser.driver.current_url)

        landed = await self.thread(deny)
        query = await self.callbackQuery(0)
        self.assertTrue(landed.startswith(self.redirectURI + "?"), self.fail_(landed))
        self.assertEqual(query.get("error"), ["access_denied"], query)
        self.assertEqual(query.get("state"), [state], query)
        self.assertEqual(query.get("iss"), [self.server.issuer], query)
        self.assertNotIn("code", query)
        await self.assertNoCSPViolations()

    async def test_wrongToken(self) -> None:
        """
        A token that is not accepted shows an alert on the same form, which
        the token field is described by; nothing was sent to the
        application, the field is empty again (the paste is never echoed),
        and the keyboard still reaches the field first.
        """
        await self.start()
        await self.openConsent()

        def pasteWrong() -> dict[str, Any]:
            self.browser.one("#site_token").send_keys("smeldr_not-a-real-token")
            self.browser.submit(self.browser.button("Approve"))
            alerts = self.browser.all("[role=alert]")
            field = self.browser.one("#site_token")
            return {
                "url": self.browser.driver.current_url,
                "alerts": [a.text for a in alerts],
                "alertIDs": [a.get_attribute("id") for a in alerts],
                "describedBy": field.get_attribute("aria-describedby"),
                "value": field.get_attribute("value"),
                "source": "smeldr_not-a-real-token" in self.browser.driver.page_source,
                "buttons": [b.text for b in self.browser.all("form button")],
                "unlabelled": self.browser.unlabelledInputs(),
                "firstTab": self.browser.tabUntil(lambda e: e["tag"] in ("input", "button"))[-1],
            }

        page = await self.thread(pasteWrong)
        self.assertEqual(self.callback.queries, [])
        self.assertTrue(page["url"].startswith(self.server.issuer + "/oauth/authorize"), page)
        self.assertEqual(page["alerts"], ["That site token was not accepted."], page)
        self.assertEqual(page["describedBy"], page["alertIDs"][0], page)
        self.assertEqual(page["value"], "", page)
        self.assertFalse(page["source"], "the refused token was echoed into the page")
        self.assertEqual(page["buttons"], ["Approve", "Deny"], page)
        self.assertEqual(page["unlabelled"], [], page)
        self.assertEqual(page["firstTab"]["id"], "site_token", page)
        await self.assertNoCSPViolations()

        # The form still works after the error.
        query, verifier = await self.approve()
        await self.exchange(query["code"][0], verifier)

    async def test_keyboardOnly(self) -> None:
        """
        Without a mouse: Tab from the top of the page reaches the token
        field first, typing fills it, the next Tab is Approve and Enter
        approves.
        """
        await self.start()
        verifier, state = await self.openConsent()

        def keyboard() -> dict[str, Any]:
            b = self.browser
            toField = b.tabUntil(lambda e: e["id"] == "site_token")
            b.keys(self.siteToken)
            b.keys(Keys.TAB)
            onButton = b.active()
            b.keys(Keys.ENTER)
            # Enter submits; wait (in this thread) for the application's page.
            WebDriverWait(b.driver, 10).until(lambda d: d.current_url.startswith(self.redirectURI))
            return {"toField": toField, "onButton": onButton, "url": b.driver.current_url}

        seen = await self.thread(keyboard)
        self.assertEqual(len(seen["toField"]), 1, f"Tab went through {seen['toField']}")
        self.assertEqual((seen["onButton"]["tag"], seen["onButton"]["text"]), ("button", "Approve"), seen)
        query = await self.callbackQuery(0)
        self.assertEqual(query.get("state"), [state], query)
        self.assertEqual(len(query.get("code", [])), 1, query)
        await self.exchange(query["code"][0], verifier)

    async def test_everyInputLabelled(self) -> None:
        """
        Every input a person can reach, on every page state (consent, consent
        after an error, connected-apps sign-in and its error), has a label.
        """
        await self.start()
        url, _, _ = self.authorizeURL()
        grants = self.server.issuer + "/oauth/grants"

        def survey() -> dict[str, Any]:
            b = self.browser
            found: dict[str, Any] = {}
            b.get(url)
            found["consent"] = (b.inputCount(), b.unlabelledInputs())
            b.one("#site_token").send_keys("wrong")
            b.submit(b.button("Approve"))
            found["consent error"] = (b.inputCount(), b.unlabelledInputs())
            b.get(grants)
            found["grants sign-in"] = (b.inputCount(), b.unlabelledInputs())
            b.one("#site_token").send_keys("wrong")
            b.submit(b.button("Show connected apps"))
            found["grants sign-in error"] = (b.inputCount(), b.unlabelledInputs())
            return found

        found = await self.thread(survey)
        for state, (count, unlabelled) in found.items():
            self.assertGreater(count, 0, f"{state}: no input at all")
            self.assertEqual(unlabelled, [], f"{state}: inputs without a label")
        await self.assertNoCSPViolations()

    # -- the landing page -----------------------------------------------------

    async def test_landing(self) -> None:
        """
        C{GET /}: says what the server is, shows the MCP URL to paste into
        an assistant, and leads to the connected-apps page; fits a phone.
        """
        await self.start()

        def visit() -> dict[str, Any]:
            b = self.browser
            b.get(self.server.issuer + "/")
            found = {
                "title": b.driver.title,
                "h1": b.one("h1").text,
                "url": b.one("#mcp-url").text,
                "text": b.text(),
                "links": {a.text: a.get_attribute("href") for a in b.all("a")},
            }
            found["problems"] = b.screenshots(self.screenshotDirectory(), "landing")
            link = [a for a in b.all("a") if a.text == "Connected apps"][0]
            old = b.driver.find_element(By.TAG_NAME, "html")
            link.click()
            WebDriverWait(b.driver, 10, poll_frequency=0.05).until(staleness_of(old))
            found["next"] = (b.driver.title, b.driver.current_url)
            return found

        page = await self.thread(visit)
        self.assertEqual(page["h1"], "smeldr")
        self.assertEqual(page["url"], self.server.issuer + "/mcp")
        for words in ("ChatGPT", "Claude"):
            self.assertIn(words, page["text"])
        self.assertEqual(page["links"]["Connected apps"], self.server.issuer + "/oauth/grants")
        self.assertEqual(page["problems"], [])
        self.assertEqual(page["next"], ("Connected apps", self.server.issuer + "/oauth/grants"))
        await self.assertNoCSPViolations()

    # -- the connected-apps page -------------------------------------------

    async def test_connectedAppsDisconnect(self) -> None:
        """
        After approving, the connected-apps page (signed in with the same
        token) lists the application; Disconnect removes it, and the access
        token it had is refused at C{/mcp} from then on.
        """
        await self.start()
        query, verifier = await self.approve()
        tokens = await self.exchange(query["code"][0], verifier)
        self.assertEqual(await self.mcpStatus(tokens["access_token"]), 200)

        def signIn() -> dict[str, Any]:
            b = self.browser
            b.get(self.server.issuer + "/oauth/grants")
            b.one("#site_token").send_keys(self.siteToken)
            b.submit(b.button("Show connected apps"))
            items = b.all("ul.grants > li")
            return {
                "items": [i.text for i in items],
                "source": self.siteToken in b.driver.page_source,
                "style": b.styleAgainstDefault(b.button("Disconnect"), ("border-radius", "font-weight")),
            }

        page = await self.thread(signIn)
        self.assertEqual(len(page["items"]), 1, page)
        self.assertIn(CLIENT_NAME, page["items"][0])
        self.assertIn("Connected ", page["items"][0])
        self.assertFalse(page["source"], "the site token was echoed into the page")
        self.assertTrue(all(mine != plain for mine, plain in page["style"].values()), page["style"])
        await self.assertNoCSPViolations()

        problems = await self.thread(self.browser.screenshots, self.screenshotDirectory(), "grants")
        self.assertEqual(problems, [])

        def disconnect() -> dict[str, Any]:
            b = self.browser
            item = b.one("ul.grants > li")
            b.submit(b.button("Disconnect", within=item))
            return {
                "items": [i.text for i in b.all("ul.grants > li")],
                "status": [s.text for s in b.all("[role=status]")],
                "text": b.text(),
            }

        after = await self.thread(disconnect)
        self.assertEqual(after["items"], [], after)
        self.assertEqual(after["status"], ["Disconnected."], after)
        self.assertIn("No application is connected", after["text"])
        await self.assertNoCSPViolations()
        self.assertEqual(
            await self.mcpStatus(tokens["access_token"]),
            401,
            self.fail_("the access token still works after Disconnect"),
        )

    async def test_operatorFlowTimeline(self) -> None:
        """
        The operator's page (C{/oauth/flows}): an ordinary site token is
        refused; an admin one lists the client that just connected, and its
        timeline shows the steps from the authorization page to the MCP
        initialize, with nothing secret in the page.
        """
        await self.start()
        query, verifier = await self.approve()
        tokens = await self.exchange(query["code"][0], verifier)
        self.assertEqual(await self.mcpStatus(tokens["access_token"]), 200)
        out, err, code = await runProgram(
            reactor,
            [*adminCommand(), "token", "create", "operator", "--admin", "--site-db", self.server.siteDB],
        )
        self.assertEqual(code, 0, err)
        adminToken = out.strip().split()[-1]

        def signIn() -> dict[str, Any]:
            b = self.browser
            b.get(self.server.issuer + "/oauth/flows")
            b.one("#site_token").send_keys(self.siteToken)
            b.submit(b.button("Show timelines"))
            refused = [e.text for e in b.all("[role=alert]")]
            b.one("#site_token").send_keys(adminToken)
            b.submit(b.button("Show timelines"))

            def listed(driver: Any) -> bool:
                # The server writes its steps once a second: reload until
                # the client's are in.
                if any(self.clientID in row.text for row in b.all("table.clients tbody tr")):
                    return True
                driver.refresh()
                return False

            WebDriverWait(b.driver, 15, poll_frequency=0.2).until(listed)
            clients = [row.text for row in b.all("table.clients tbody tr")]
            link = [a for a in b.all("table.clients a") if a.text == self.clientID][0]
            old = b.one("h1")
            link.click()
            WebDriverWait(b.driver, 10, poll_frequency=0.05).until(staleness_of(old))
            return {
                "refused": refused,
                "clients": clients,
                "steps": [row.text for row in b.all("table.timeline tbody tr")],
                "source": b.driver.page_source,
            }

        page = await self.thread(signIn)
        self.assertEqual(page["refused"], ["That site token is not an admin token."], page)
        self.assertEqual(len(page["clients"]), 1, page)
        steps = "\n".join(page["steps"])
        for label in ("registration", "authorization page", "approved", "code exchanged", "MCP initialize"):
            self.assertIn(label, steps, page)
        for secret in (self.siteToken, adminToken, tokens["access_token"], tokens["refresh_token"], query["code"][0]):
            self.assertNotIn(secret, page["source"])
        await self.assertNoCSPViolations()
        problems = await self.thread(self.browser.screenshots, self.screenshotDirectory(), "flows")
        self.assertEqual(problems, [])
