// The browser's part of an OAuth authorization, done over HTTP: shared by the
// TypeScript SDK driver (ts_sdk_client.mjs) and the $BROWSER script given to
// mcp-remote (mcp_remote_browser.mjs).
//
// A person opens the authorization URL, sees the consent form, pastes a site
// token and presses Approve; the server answers 303 to the application's
// redirect URI. This module does exactly that with fetch: GET the page
// (following redirects only within the server's origin, as a login page
// would), fill in every named <input> of the one form that has a site_token
// input or a decision button, set site_token and decision, POST it without
// following redirects, and insist on a 303 with a Location. Anything else is
// a server bug and is reported as such, with what was sent and received.

/** A server answer that a browser, or the application behind it, would not accept. */
export class BrowserError extends Error {
  constructor(message) {
    super(message);
    this.name = 'BrowserError';
  }
}

const ENTITIES = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'", '#39': "'" };

/** Undo HTML character references in an attribute value. */
export function unescapeHTML(text) {
  return text.replace(/&(#x[0-9a-f]+|#[0-9]+|[a-z]+);/gi, (whole, name) => {
    if (name[0] === '#') {
      const code = name[1] === 'x' || name[1] === 'X' ? parseInt(name.slice(2), 16) : parseInt(name.slice(1), 10);
      return Number.isFinite(code) ? String.fromCodePoint(code) : whole;
    }
    return ENTITIES[name.toLowerCase()] ?? whole;
  });
}

/** The attributes of one start tag's text, names lowercased, values unescaped. */
function attributes(tagText) {
  const found = {};
  const pattern = /([^\s"'>\/=]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?/g;
  // Skip the tag name itself.
  const body = tagText.replace(/^<\s*[a-z0-9]+/i, '').replace(/\/?>$/, '');
  for (const m of body.matchAll(pattern)) {
    const value = m[2] ?? m[3] ?? m[4];
    found[m[1].toLowerCase()] = value === undefined ? '' : unescapeHTML(value);
  }
  return found;
}

/**
 * The forms of a page as a browser would submit them: action, method, the
 * named inputs with their values (unchecked boxes and disabled fields left
 * out) and the submit buttons' name/value pairs.
 */
export function parseForms(html) {
  const forms = [];
  for (const f of html.matchAll(/<form\b[^>]*>([\s\S]*?)<\/form\s*>/gi)) {
    const open = attributes(f[0].match(/^<form\b[^>]*>/i)[0]);
    const form = {
      action: open.action ?? '',
      method: (open.method ?? 'get').toLowerCase(),
      inputs: [],
      buttons: [],
    };
    for (const t of f[1].matchAll(/<(input|button)\b[^>]*>/gi)) {
      const a = attributes(t[0]);
      if (t[1].toLowerCase() === 'input') {
        const kind = (a.type ?? 'text').toLowerCase();
        if (['submit', 'image', 'button'].includes(kind)) {
          if ('name' in a) form.buttons.push([a.name, a.value ?? '']);
        } else if (['checkbox', 'radio'].includes(kind) && !('checked' in a)) {
          continue;
        } else if ('name' in a && !('disabled' in a)) {
          form.inputs.push([a.name, a.value ?? '']);
        }
      } else if ((a.type ?? 'submit').toLowerCase() === 'submit' && 'name' in a) {
        form.buttons.push([a.name, a.value ?? '']);
      }
    }
    forms.push(form);
  }
  return forms;
}

/**
 * Open C{authorizationUrl}, consent with C{siteToken} and C{decision}, and
 * give back the URL the server sent the browser to (the application's
 * redirect URI with code, or error, in its query).
 *
 * @param fetchFn A fetch to use (a tracing one, for the driver's report).
 */
export async function consent(authorizationUrl, siteToken, { decision = 'approve', fetchFn = fetch } = {}) {
  const start = new URL(authorizationUrl);
  let pageUrl = start;
  let page = await fetchFn(pageUrl, { headers: { Accept: 'text/html' }, redirect: 'manual' });
  for (let hops = 0; hops < 5; hops++) {
    const location = page.headers.get('location');
    if (![301, 302, 303, 307, 308].includes(page.status) || !location) break;
    const target = new URL(location, pageUrl);
    await page.body?.cancel();
    if (target.origin !== start.origin) {
      throw new BrowserError(
        `GET authorize redirected to the client (${page.status}) instead of showing the consent form: ` +
          `error=${target.searchParams.get('error')} description=${target.searchParams.get('error_description')}`,
      );
    }
    pageUrl = target;
    page = await fetchFn(pageUrl, { headers: { Accept: 'text/html' }, redirect: 'manual' });
  }
  const html = await page.text();
  if (page.status !== 200) {
    throw new BrowserError(
      `GET authorize answered ${page.status} (Location: ${page.headers.get('location')}), ` +
        `expected 200 with the consent form; body: ${JSON.stringify(html.slice(0, 500))}`,
    );
  }
  const contentType = page.headers.get('content-type') ?? '';
  if (!contentType.startsWith('text/html')) {
    throw new BrowserError(`GET authorize answered Content-Type ${contentType}, expected text/html`);
  }
  const forms = parseForms(html).filter(
    (f) => f.inputs.some(([n]) => n === 'site_token') || f.buttons.some(([n]) => n === 'decision'),
  );
  if (forms.length !== 1) {
    throw new BrowserError(
      `consent page has ${forms.length} forms with a site_token input or a decision button, expected 1; ` +
        `page: ${JSON.stringify(html.slice(0, 1000))}`,
    );
  }
  const [form] = forms;
  if (form.method !== 'post') throw new BrowserError(`consent form method is ${form.method}, expected post`);
  if (!form.buttons.some(([n, v]) => n === 'decision' && v === decision)) {
    throw new BrowserError(
      `consent form has no <button name=decision value=${decision}>; buttons: ${JSON.stringify(form.buttons)}`,
    );
  }
  const fields = new URLSearchParams();
  for (const [name, value] of form.inputs) if (name !== 'site_token') fields.append(name, value);
  fields.append('site_token', siteToken);
  fields.append('decision', decision);
  const action = form.action ? new URL(form.action, pageUrl) : pageUrl;
  const answer = await fetchFn(action, {
    method: 'POST',
    redirect: 'manual',
    headers: { 'Content-Type': 'application/x-www-form-urlencoded', Origin: pageUrl.origin },
    body: fields.toString(),
  });
  const body = await answer.text();
  if (answer.status !== 303) {
    throw new BrowserError(
      `POST ${action.pathname} (consent, decision=${decision}) answered ${answer.status}, expected 303 to ` +
        `the redirect URI; Location: ${answer.headers.get('location')}; body: ${JSON.stringify(body.slice(0, 500))}`,
    );
  }
  const location = answer.headers.get('location');
  if (!location) throw new BrowserError('consent POST answered 303 without a Location header');
  return new URL(location, action);
}

/**
 * The code in a redirect back to the application, checked the way an
 * application checks it: an error is reported, a parameter may not repeat.
 */
export function codeFromRedirect(redirect) {
  const query = redirect.searchParams;
  for (const name of new Set(query.keys())) {
    if (query.getAll(name).length !== 1) throw new BrowserError(`redirect repeats the ${name} parameter: ${redirect}`);
  }
  if (query.has('error')) {
    throw new BrowserError(
      `consent redirected with error=${query.get('error')} description=${query.get('error_description') ?? ''}`,
    );
  }
  const code = query.get('code');
  if (!code) throw new BrowserError(`redirect has no code: ${redirect}`);
  return { code, state: query.get('state'), iss: query.get('iss') };
}
