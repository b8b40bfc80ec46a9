# -*- test-case-name: tests.test_oauth_http -*-
"""
The HTML the authorization server shows people: the consent form and the
error page.  No JavaScript, no third-party resource; one inline style sheet
allowed by a per-response nonce.
"""

from __future__ import annotations

import secrets
from html import escape
from typing import Mapping, Optional

from smeldr_oauth.oauth.urls import is_loopback_host, parse

STYLE = """
:root{color-scheme:light dark;--fg:#1b1f24;--bg:#f6f7f9;--card:#fff;--muted:#57606a;--accent:#0b5cad;--warn:#8a4b00;--warnbg:#fff4e0;--border:#d0d7de}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--bg:#0d1117;--card:#161b22;--muted:#9da7b3;--accent:#4c9aff;--warn:#f0b35a;--warnbg:#2b1d08;--border:#30363d}}
*{box-sizing:border-box}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:30rem;margin:2rem auto;padding:0 1rem}
.card{background:var(--card);border:1px solid var(--border);border-radius:12px;padding:1.5rem}
h1{font-size:1.35rem;margin:0 0 .75rem}
p{margin:.5rem 0}
.muted{color:var(--muted);font-size:.9rem}
ul.scopes{padding-left:1.2rem;margin:.5rem 0 1rem}
ul.grants{list-style:none;padding:0;margin:1rem 0}
ul.grants>li{border-top:1px solid var(--border);padding:.75rem 0}
h2{font-size:1.1rem;margin:0 0 .25rem}
.warn{background:var(--warnbg);color:var(--warn);border-radius:8px;padding:.6rem .8rem;margin:.75rem 0;font-size:.95rem}
label{display:block;font-weight:600;margin:1rem 0 .35rem}
input[type=password]{width:100%;padding:.6rem .7rem;font:inherit;border:1px solid var(--border);border-radius:8px;background:var(--bg);color:var(--fg)}
input[type=password]:focus,button:focus{outline:3px solid var(--accent);outline-offset:2px}
.actions{display:flex;gap:.75rem;margin-top:1.25rem;flex-wrap:wrap}
button{flex:1 1 8rem;padding:.65rem 1rem;font:inherit;font-weight:600;border-radius:8px;border:1px solid var(--border);cursor:pointer;background:var(--card);color:var(--fg)}
button.primary{background:var(--accent);border-color:var(--accent);color:#fff}
.error{color:#b42318;font-weight:600}
code{word-break:break-all}
"""


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


def new_nonce() -> str:
    return secrets.token_urlsafe(16)


def _document(title: str, body: str, nonce: str) -> bytes:
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title>"
        f'<style nonce="{nonce}">{STYLE}</style></head>'
        f'<body><main><div class="card">{body}</div></main></body></html>\n'
    ).encode("utf-8")


def error_page(title: str, detail: str, nonce: str) -> bytes:
    body = (
        f"<h1>{escape(title)}</h1>"
        f"<p>{escape(detail)}</p>"
        '<p class="muted">You can close this window and try connecting again from the application.</p>'
    )
    return _document(title, body, nonce)


def _host(url: str) -> str:
    parsed = parse(url)
    if parsed is None:
        return url
    host = parsed.host
    if parsed.port is not None and parsed.port not in (80, 443):
        host = f"{host}:{parsed.port}"
    return host


def consent_page(
    *,
    action: str,
    site_name: str,
    client_name: Optional[str],
    client_id: str,
    client_is_url: bool,
    redirect_uri: str,
    scopes: list[tuple[str, str]],
    fields: list[tuple[str, str]],
    nonce: str,
    error: Optional[str] = None,
) -> bytes:
    """
    The consent form: who is asking (name and where its identity comes
    from), where the answer goes, what it may do, and a place to paste a
    site token.  Everything from the request is escaped.
    """
    name = client_name or "An application"
    origin = _host(client_id) if client_is_url else None
    redirect = parse(redirect_uri)
    redirect_host = _host(redirect_uri)
    parts = [f"<h1>{escape(name)} wants to connect to {escape(site_name)}</h1>"]
    if origin:
        parts.append(f'<p class="muted">Identity published by <strong>{escape(origin)}</strong></p>')
    else:
        parts.append(
            '<p class="muted">Registered application <code>'
            f"{escape(client_id)}</code> (its name is self-declared)</p>"
        )
    parts.append(f'<p class="muted">After you answer, you return to <strong>{escape(redirect_host)}</strong></p>')
    if redirect is not None and is_loopback_host(redirect.host):
        parts.append(
            '<p class="warn" role="note">This application runs on this computer (it returns to a '
            "local address). Approve only if you started it yourself.</p>"
        )
    parts.append("<p>It will be able to:</p><ul class=\"scopes\">")
    for scope, words in scopes:
        parts.append(f"<li>{escape(words)} <span class=\"muted\">({escape(scope)})</span></li>")
    parts.append("</ul>")
    if error:
        parts.append(f'<p class="error" role="alert" id="paste-error">{escape(error)}</p>')
    parts.append(f'<form method="post" action="{escape(action)}">')
    for key, value in fields:
        parts.append(f'<input type="hidden" name="{escape(key)}" value="{escape(value)}">')
    described = ' aria-describedby="paste-error"' if error else ""
    parts.append(
        '<label for="site_token">Your site token</label>'
        '<input type="password" id="site_token" name="site_token" autocomplete="off" '
        f'spellcheck="false" autocapitalize="off"{described}>'
        '<p class="muted">Paste a site token to approve. Deny needs no token.</p>'
        '<div class="actions">'
        '<button type="submit" class="primary" name="decision" value="approve">Approve</button>'
        '<button type="submit" name="decision" value="deny">Deny</button>'
        "</div></form>"
    )
    return _document(f"Connect {name}", "".join(parts), nonce)


def scope_words(scopes: tuple[str, ...], words: Mapping[str, str]) -> list[tuple[str, str]]:
    out = []
    for scope in scopes:
        if scope == "offline_access":
            out.append((scope, "Stay connected when you are away (refresh tokens)"))
        else:
            out.append((scope, words.get(scope, scope)))
    return out
