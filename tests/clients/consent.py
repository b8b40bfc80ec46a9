"""
The browser's part of the Python SDK drivers, shared by
C{python_sdk_client.py} (2.x, in C{.venv}) and C{python_sdk1_client.py} (1.x,
in C{.tooling/mcp1}).

Standard library only, so that it imports in either venv: the drivers run as
scripts, so Python puts this directory on C{sys.path} and they C{import
consent}. The HTTP itself stays in each driver (C{httpx2} for 2.x, C{httpx}
for 1.x); the helpers here only read what a response object of either offers
(C{status_code}, C{headers.get}, C{text}, C{url}, C{request.extensions}), so
every check a browser makes is written once and fails alike in both.
"""

from __future__ import annotations

import builtins
import hashlib
import json
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

#: The statuses a browser follows.
REDIRECT_STATUSES = (301, 302, 303, 307, 308)


def fingerprint(secret: str | None) -> str | None:
    """
    A short, stable stand-in for a token in the output, so that runs can show
    that two tokens differ without ever printing one.
    """
    if secret is None:
        return None
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:12]


class DriverError(Exception):
    """
    The server did something a browser or the SDK would not accept; the
    message says what was sent, what came back and what was expected.
    """


def describe(exc: BaseException) -> str:
    """
    One line per leaf exception: anyio wraps failures in exception groups,
    whose own message ("unhandled errors in a TaskGroup") says nothing.
    """
    # BaseExceptionGroup is a builtin from 3.11 on (the lint targets 3.10).
    groups = getattr(builtins, "BaseExceptionGroup", ())
    if isinstance(exc, groups):
        return "; ".join(describe(e) for e in exc.exceptions)
    text = f"{type(exc).__name__}: {exc}"
    if exc.__cause__ is not None:
        text += f" (caused by {describe(exc.__cause__)})"
    return text


class Trace:
    """
    Every HTTP exchange either client made, in order, without bodies or
    credentials: the evidence a failure report needs.

    A driver subclasses it to name its HTTP library's C{RequestNotRead}
    (C{notRead}) and whether OAuth requests' C{resource} and C{scope} are
    recorded (C{recordResource}).
    """

    notRead: type[Exception] = Exception
    recordResource = False

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def onRequest(self, request: Any) -> None:
        entry: dict[str, Any] = {
            "method": request.method,
            "path": request.url.path,
            "auth": "Authorization" in request.headers,
        }
        if request.url.path.endswith("/token") or request.url.path.endswith("/revoke"):
            try:
                form = parse_qs(request.content.decode("ascii"))
            except (self.notRead, UnicodeDecodeError):
                form = {}
            if "grant_type" in form:
                entry["grant_type"] = form["grant_type"][0]
            if self.recordResource and "resource" in form:
                entry["resource"] = form["resource"]
        if self.recordResource and request.method == "GET" and request.url.path.endswith("/authorize"):
            query = parse_qs(request.url.query.decode("ascii", "replace"))
            entry["resource"] = query.get("resource")
            entry["scope"] = query.get("scope")
        if request.method == "POST" and request.headers.get("content-type", "").startswith(
            "application/json"
        ):
            try:
                body = json.loads(request.content)
                if isinstance(body, dict) and "method" in body:
                    entry["rpc"] = body["method"]
            except (self.notRead, ValueError):
                pass
        self.events.append(entry)
        request.extensions["trace_entry"] = entry

    async def onResponse(self, response: Any) -> None:
        entry = response.request.extensions.get("trace_entry")
        if entry is None:
            return
        entry["status"] = response.status_code
        if response.status_code in (401, 403):
            entry["www_authenticate"] = response.headers.get("www-authenticate")

    def hooks(self) -> dict[str, list[Any]]:
        return {"request": [self.onRequest], "response": [self.onResponse]}

    def count(self, **match: Any) -> int:
        return sum(1 for e in self.events if all(e.get(k) == v for k, v in match.items()))


class ConsentFormParser(HTMLParser):
    """
    Collect the forms of a page the way a browser sees them: each form's
    action and method, its named C{<input>}s with their values, and its
    submit buttons' name/value pairs.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v if v is not None else "") for k, v in attrs}
        if tag == "form":
            self._current = {
                "action": a.get("action", ""),
                "method": a.get("method", "get").lower(),
                "inputs": [],
                "buttons": [],
            }
            self.forms.append(self._current)
        elif self._current is None:
            return
        elif tag == "input":
            kind = a.get("type", "text").lower()
            if kind in ("submit", "image", "button"):
                if "name" in a:
                    self._current["buttons"].append((a["name"], a.get("value", "")))
            elif kind in ("checkbox", "radio") and "checked" not in a:
                return
            elif "name" in a and "disabled" not in a:
                self._current["inputs"].append((a["name"], a.get("value", "")))
        elif tag == "button" and a.get("type", "submit").lower() == "submit" and "name" in a:
            self._current["buttons"].append((a["name"], a.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


def nextOnOrigin(page: Any, origin: tuple[str, str]) -> str | None:
    """
    Where a browser goes after C{page}, an answer on the way to the consent
    form: a browser follows redirects on the server's own origin (a login or
    consent page elsewhere on the site); one that leaves it goes back to the
    application, which only happens for errors here.

    @return: The URL to GET next, or L{None} when C{page} is no redirect.
    @raise DriverError: The redirect leaves C{origin}.
    """
    location = page.headers.get("location")
    if page.status_code not in REDIRECT_STATUSES or not location:
        return None
    target = urljoin(str(page.url), location)
    if urlsplit(target)[:2] != origin:
        query = parse_qs(urlsplit(target).query)
        raise DriverError(
            f"GET authorize redirected to the client ({page.status_code}) instead "
            f"of showing the consent form: error={query.get('error')} "
            f"description={query.get('error_description')}"
        )
    return target


def consentForm(page: Any, decision: str) -> dict[str, Any]:
    """
    The one consent form of the page C{GET authorize} ended at, checked the
    way a browser and a person would need it: a 200 HTML page, exactly one
    form with a C{site_token} input or a C{decision} button, posted, with the
    button for C{decision}.
    """
    if page.status_code != 200:
        raise DriverError(
            f"GET authorize answered {page.status_code} "
            f"(Location: {page.headers.get('location')!r}), expected 200 with "
            f"the consent form; body: {page.text[:500]!r}"
        )
    contentType = page.headers.get("content-type", "")
    if not contentType.startswith("text/html"):
        raise DriverError(f"GET authorize answered Content-Type {contentType!r}, expected text/html")
    parser = ConsentFormParser()
    parser.feed(page.text)
    parser.close()
    forms = [
        f
        for f in parser.forms
        if any(name == "site_token" for name, _ in f["inputs"])
        or any(name == "decision" for name, _ in f["buttons"])
    ]
    if len(forms) != 1:
        raise DriverError(
            f"consent page has {len(forms)} forms with a site_token input or a "
            f"decision button, expected exactly 1; page: {page.text[:1000]!r}"
        )
    form = forms[0]
    if form["method"] != "post":
        raise DriverError(f"consent form method is {form['method']!r}, expected post")
    if ("decision", decision) not in form["buttons"]:
        raise DriverError(
            f"consent form has no <button name=decision value={decision}>; buttons: {form['buttons']!r}"
        )
    return form


def consentSubmission(
    page: Any, form: dict[str, Any], siteToken: str, decision: str
) -> tuple[str, bytes, dict[str, str]]:
    """
    What the browser POSTs when the person pastes C{siteToken} and presses
    the C{decision} button: every other input as the page filled it in.

    @return: The action URL, the form-encoded body and the request headers.
    """
    fields = [(n, v) for n, v in form["inputs"] if n != "site_token"]
    fields.append(("site_token", siteToken))
    fields.append(("decision", decision))
    # An empty or missing action submits to the document's own URL.
    action = urljoin(str(page.url), form["action"]) if form["action"] else str(page.url)
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Origin": "{0.scheme}://{0.netloc}".format(urlsplit(str(page.url))),
    }
    return action, urlencode(fields).encode("ascii"), headers


def consentLocation(answer: Any, action: str, decision: str) -> str:
    """
    The C{Location} of the 303 that must answer the consent POST.
    """
    if answer.status_code != 303:
        raise DriverError(
            f"POST {urlsplit(action).path} (consent, decision={decision}) "
            f"answered {answer.status_code}, expected 303 to the redirect URI; "
            f"Location: {answer.headers.get('location')!r}; body: {answer.text[:500]!r}"
        )
    location = answer.headers.get("location")
    if not location:
        raise DriverError("consent POST answered 303 without a Location header")
    return location


def redirectQuery(location: str) -> dict[str, list[str]]:
    """
    The query of the consent redirect, checked as an application would: no
    error, no repeated parameter, a code.
    """
    query = parse_qs(urlsplit(location).query)
    if "error" in query:
        raise DriverError(
            f"consent redirected with error={query['error'][0]!r} "
            f"description={query.get('error_description', [''])[0]!r}"
        )
    for name, values in query.items():
        if len(values) != 1:
            raise DriverError(f"redirect repeats the {name!r} parameter: {location!r}")
    if "code" not in query:
        raise DriverError(f"redirect has no code: {location!r}")
    return query
