#!/usr/bin/env node
// A headless "browser" for mcp-remote, used as $BROWSER by
// tests/test_e2e_mcp_remote.py.
//
// mcp-remote opens the authorization URL with the `open` package, whose
// xdg-open (with no desktop session) runs `$BROWSER <url>`. This script then
// does what the person would: consent on the server's page with the site
// token in $SMELDR_SITE_TOKEN (see browser.mjs), and follow the server's 303
// to mcp-remote's loopback callback, which makes mcp-remote exchange the
// code. It exits 0 only if the callback page answered 200.
//
// Its stdout and stderr are thrown away by `open`, so it appends one JSON
// line per run to $SMELDR_BROWSER_LOG: what it saw, for the test to judge
// and to print on failure. Codes and tokens are never written.

import { appendFileSync } from 'node:fs';
import { consent, codeFromRedirect } from './browser.mjs';

function record(entry) {
  const file = process.env.SMELDR_BROWSER_LOG;
  if (file) appendFileSync(file, JSON.stringify(entry) + '\n');
}

async function main() {
  const url = process.argv[2];
  const entry = { authorize_query: {}, ok: false };
  try {
    if (!url) throw new Error('no URL given');
    const authorize = new URL(url);
    for (const name of ['client_id', 'redirect_uri', 'scope', 'resource', 'state', 'prompt', 'code_challenge_method']) {
      if (authorize.searchParams.has(name)) entry.authorize_query[name] = authorize.searchParams.get(name);
    }
    entry.has_state = authorize.searchParams.has('state');
    const siteToken = process.env.SMELDR_SITE_TOKEN;
    if (!siteToken) throw new Error('SMELDR_SITE_TOKEN is not set');
    const redirect = await consent(url, siteToken, { decision: process.env.SMELDR_DECISION ?? 'approve' });
    entry.redirect = `${redirect.origin}${redirect.pathname}`;
    const { state, iss } = codeFromRedirect(redirect);
    entry.state_returned = state === authorize.searchParams.get('state');
    entry.iss = iss;
    // The browser follows the 303 to the application's callback.
    const callback = await fetch(redirect, { redirect: 'manual' });
    entry.callback_status = callback.status;
    entry.callback_body = (await callback.text()).replace(/\s+/g, ' ').slice(0, 300);
    entry.ok = callback.status === 200;
  } catch (error) {
    entry.error = `${error?.name ?? 'Error'}: ${error?.message ?? error}`;
  }
  record(entry);
  return entry.ok ? 0 : 1;
}

main().then((code) => process.exit(code));
