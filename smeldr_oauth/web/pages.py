# -*- test-case-name: tests.test_web_pages -*-
"""
The HTML people see: one page shell (L{document}), written with
L{twisted.web.template} so every value is escaped by the flattener rather
than by hand, and the headers every page carries (L{respond}).

No JavaScript, no third-party resource: one inline style sheet, allowed by
a nonce new on every response.  Every page forbids framing (clickjacking),
caching and referrers.  The pages themselves (consent, connected apps,
landing, errors) build their bodies from L{tags} and hand them to
L{document}.
"""

from __future__ import annotations

import secrets
from typing import Iterable, Mapping, Optional

from twisted.web.iweb import IRequest
from twisted.web.template import Flattenable, Tag, flatten, tags

#: The one style sheet.  It contains no C{<}, C{>} or C{&}: the flattener
#: escapes those in text, and a style element's text is not unescaped.
STYLE = """
:root{color-scheme:light dark;--fg:#1b1f24;--bg:#f6f7f9;--card:#fff;--muted:#57606a;--accent:#0b5cad;--warn:#8a4b00;--warnbg:#fff4e0;--border:#d0d7de}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--bg:#0d1117;--card:#161b22;--muted:#9da7b3;--accent:#4c9aff;--warn:#f0b35a;--warnbg:#2b1d08;--border:#30363d}}
*{box-sizing:border-box}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:30rem;margin:2rem auto;padding:0 1rem}
.card{background:var(--card);border:1px solid var(--border);border-radius:12px;padding:1.5rem}
h1{font-size:1.35rem;margin:0 0 .75rem}
p{margin:.5rem 0}
a{color:var(--accent)}
.muted{color:var(--muted);font-size:.9rem}
ul.scopes{padding-left:1.2rem;margin:.5rem 0 1rem}
ul.grants{list-style:none;padding:0;margin:1rem 0}
li.grant{border-top:1px solid var(--border);padding:.75rem 0}
h2{font-size:1.1rem;margin:0 0 .25rem}
.warn{background:var(--warnbg);color:var(--warn);border-radius:8px;padding:.6rem .8rem;margin:.75rem 0;font-size:.95rem}
label{display:block;font-weight:600;margin:1rem 0 .35rem}
input[type=password]{width:100%;padding:.6rem .7rem;font:inherit;border:1px solid var(--border);border-radius:8px;background:var(--bg);color:var(--fg)}
input[type=password]:focus,button:focus,a:focus{outline:3px solid var(--accent);outline-offset:2px}
.actions{display:flex;gap:.75rem;margin-top:1.25rem;flex-wrap:wrap}
button{flex:1 1 8rem;padding:.65rem 1rem;font:inherit;font-weight:600;border-radius:8px;border:1px solid var(--border);cursor:pointer;background:var(--card);color:var(--fg)}
button.primary{background:var(--accent);border-color:var(--accent);color:#fff}
.error{color:#b42318;font-weight:600}
code{word-break:break-all}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.85rem}
th,td{text-align:left;vertical-align:top;padding:.3rem .5rem;border-top:1px solid var(--border)}
td.wrap,h2,li.finding{overflow-wrap:anywhere}
td.wrap{min-width:12rem}
"""

assert not any(c in STYLE for c in "<>&"), "the style sheet must survive the flattener's escaping"

#: What a page body may hold: tags, text, and lists of them.
Content = Flattenable


def new_nonce() -> str:
    return secrets.token_urlsafe(16)


def page_headers(nonce: str, form_targets: tuple[str, ...] = ()) -> dict[str, str]:
    """
    Headers for every HTML page: no framing (clickjacking), no caching, no
    referrer (the query carries state and codes), and a CSP that allows
    nothing from elsewhere.  C{form-action} must also allow the redirect
    URI's origin, because browsers apply it to the redirect that follows a
    form submission.
    """
    form_action = " ".join(("'self'",) + form_targets)
    csp = (
        "default-src 'none'; "
        f"style-src 'nonce-{nonce}'; "
        "img-src 'self'; "
        f"form-action {form_action}; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    return {
        "Content-Type": "text/html; charset=utf-8",
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }


class Page:
    """
    A page waiting for its nonce: a title and the content of its card.
    """

    def __init__(self, title: str, body: Content) -> None:
        self.title = title
        self.body = body

    def render(self, nonce: str) -> bytes:
        return document(self.title, self.body, nonce)


def flatten_now(root: object) -> bytes:
    """
    Flatten a tree that holds no Deferred, at once.

    @raise RuntimeError: if the tree needed to wait for something.
    """
    out: list[bytes] = []
    failures: list[object] = []
    d = flatten(None, root, out.append)  # type: ignore[arg-type]
    d.addErrback(failures.append)
    if failures:
        failures[0].raiseException()  # type: ignore[attr-defined]
    if not d.called:
        raise RuntimeError("a page tree must not wait for anything")
    return b"".join(out)


def document(title: str, body: Content, nonce: str) -> bytes:
    """
    The page shell around C{body}: language, viewport, the nonced style.
    """
    html = tags.html(lang="en")(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width,initial-scale=1"),
            tags.title(title),
            tags.style(STYLE, nonce=nonce),
        ),
        tags.body(Tag("main")(tags.div(class_="card")(body))),
    )
    return b"<!doctype html>\n" + flatten_now(html) + b"\n"


def respond(request: IRequest, status: int, page: Page, form_targets: tuple[str, ...] = ()) -> bytes:
    """
    Write C{page} as the answer to C{request}, with a fresh nonce and the
    page headers.
    """
    nonce = new_nonce()
    request.setResponseCode(status)
    for key, value in page_headers(nonce, form_targets).items():
        request.setHeader(key, value)
    return page.render(nonce)


def error_page(title: str, detail: str, *, hint: str = "") -> Page:
    """
    A page that says what went wrong, and nothing about how.
    """
    return Page(
        title,
        [
            tags.h1(title),
            tags.p(detail),
            tags.p(
                hint or "You can close this window and try connecting again from the application.",
                class_="muted",
            ),
        ],
    )


def scope_words(scopes: Iterable[str], words: Mapping[str, str]) -> list[tuple[str, str]]:
    """
    Each scope with the words a person reads for it (the configured ones;
    C{offline_access} is the server's own).
    """
    out = []
    for scope in scopes:
        if scope == "offline_access":
            out.append((scope, "Stay connected when you are away (refresh tokens)"))
        else:
            out.append((scope, words.get(scope, scope)))
    return out


def hidden_fields(fields: Iterable[tuple[str, str]]) -> list[Tag]:
    """
    The hidden inputs that carry a form's state back (the consent form's
    authorization request, the connected-apps forms' action and CSRF
    token); pairs, so a repeated name (C{resource}) stays repeated.
    """
    return [tags.input(type="hidden", name=key, value=value) for key, value in fields]


def site_token_field(error_id: Optional[str] = None) -> list[Tag]:
    """
    The labelled password field a site token is pasted into (the consent
    form and the connected-apps sign-in), tied to the error message with
    id C{error_id} when one is shown.
    """
    field = tags.input(
        type="password",
        id="site_token",
        name="site_token",
        autocomplete="off",
        spellcheck="false",
        autocapitalize="off",
    )
    if error_id is not None:
        field(**{"aria-describedby": error_id})
    return [tags.label("Your site token", for_="site_token"), field]
