#!/usr/bin/env node
// Drive a real smeldr-oauth server with the official MCP TypeScript SDK
// (npm @modelcontextprotocol/sdk, pinned in package.json).
//
// Run as a subprocess by tests/test_e2e_typescript_sdk.py. It plays both
// parts a person would: the MCP application (the SDK's Client over
// StreamableHTTPClientTransport or SSEClientTransport, with an
// OAuthClientProvider that keeps tokens and client information in memory)
// and the browser (the provider's redirectToAuthorization GETs the
// authorization URL, submits the consent form with a site token and reads the
// 303's Location; see browser.mjs). Nothing listens on the redirect URI: the
// driver hands the code to transport.finishAuth(code) and connects again,
// which is what the SDK's own OAuth example does after its callback server
// receives the code.
//
// The SDK is used as shipped; server bugs must surface here as failures.
//
// Output: one JSON line on stdout. On success {"ok": true, ...} with the
// negotiated protocol version, tool names, tool results, how often the
// browser authorized, token events (fingerprints, never tokens) and a trace
// of every HTTP exchange. On failure {"ok": false, "error": ...} with the
// same trace, the stack on stderr, and exit status 1.

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { SSEClientTransport } from '@modelcontextprotocol/sdk/client/sse.js';
import { StreamableHTTPError } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { UnauthorizedError } from '@modelcontextprotocol/sdk/client/auth.js';
import { consent, codeFromRedirect } from './browser.mjs';

const SDK_VERSION = JSON.parse(
  readFileSync(new URL('./node_modules/@modelcontextprotocol/sdk/package.json', import.meta.url), 'utf8'),
).version;

/** A short stable stand-in for a secret, so a report can show two tokens differ without showing one. */
function fingerprint(secret) {
  return secret == null ? null : createHash('sha256').update(secret).digest('hex').slice(0, 12);
}

/** A fetch that records every exchange (no bodies, no credentials) for the report. */
class Trace {
  constructor() {
    this.events = [];
    this.fetch = this.fetch.bind(this);
  }

  async fetch(input, init = {}) {
    const url = new URL(input instanceof Request ? input.url : String(input));
    const method = (init.method ?? (input instanceof Request ? input.method : 'GET')).toUpperCase();
    const headers = new Headers(init.headers ?? (input instanceof Request ? input.headers : undefined));
    const entry = { method, path: url.pathname, auth: headers.has('authorization') };
    const body = init.body;
    if (body != null && (url.pathname.endsWith('/token') || url.pathname.endsWith('/revoke'))) {
      const form = new URLSearchParams(body instanceof URLSearchParams ? body : String(body));
      if (form.has('grant_type')) entry.grant_type = form.get('grant_type');
      if (form.has('resource')) entry.resource = form.get('resource');
    }
    if (method === 'POST' && typeof body === 'string' && (headers.get('content-type') ?? '').startsWith('application/json')) {
      try {
        const message = JSON.parse(body);
        if (message && typeof message === 'object' && 'method' in message) entry.rpc = message.method;
      } catch {
        // not JSON-RPC
      }
    }
    if (url.pathname.endsWith('/authorize') && method === 'GET') {
      entry.query = Object.fromEntries(
        [...url.searchParams].filter(([k]) => ['client_id', 'resource', 'scope', 'state', 'prompt'].includes(k)),
      );
    }
    this.events.push(entry);
    try {
      const response = await fetch(input, init);
      entry.status = response.status;
      if (response.status === 401 || response.status === 403) {
        entry.www_authenticate = response.headers.get('www-authenticate');
      }
      return response;
    } catch (error) {
      entry.error = String(error?.cause ?? error);
      throw error;
    }
  }

  count(match) {
    return this.events.filter((e) => Object.entries(match).every(([k, v]) => e[k] === v)).length;
  }
}

/**
 * The application's OAuthClientProvider: tokens and client information in
 * memory, and the browser's part done over HTTP in redirectToAuthorization.
 */
class Provider {
  constructor({ redirectUrl, clientMetadataUrl, siteToken, decision, trace }) {
    this._redirectUrl = redirectUrl;
    if (clientMetadataUrl) this.clientMetadataUrl = clientMetadataUrl;
    this.siteToken = siteToken;
    this.decision = decision;
    this.trace = trace;
    this._tokens = undefined;
    this._client = undefined;
    this._verifier = undefined;
    this.history = [];
    this.authorizations = 0;
    this.invalidations = [];
    this.pendingCode = undefined;
  }

  get redirectUrl() {
    return this._redirectUrl;
  }

  get clientMetadata() {
    return {
      client_name: 'smeldr e2e (mcp typescript sdk)',
      redirect_uris: [this._redirectUrl],
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'none',
    };
  }

  clientInformation() {
    return this._client;
  }

  saveClientInformation(info) {
    this._client = info;
  }

  tokens() {
    return this._tokens;
  }

  saveTokens(tokens) {
    this._tokens = tokens;
    this.history.push(tokens);
  }

  saveCodeVerifier(verifier) {
    this._verifier = verifier;
  }

  codeVerifier() {
    if (!this._verifier) throw new Error('no code verifier saved');
    return this._verifier;
  }

  invalidateCredentials(scope) {
    this.invalidations.push(scope);
    if (scope === 'all' || scope === 'tokens') this._tokens = undefined;
    if (scope === 'all' || scope === 'client') this._client = undefined;
    if (scope === 'all' || scope === 'verifier') this._verifier = undefined;
  }

  async redirectToAuthorization(authorizationUrl) {
    this.authorizations += 1;
    this.pendingCode = undefined;
    const redirect = await consent(authorizationUrl, this.siteToken, {
      decision: this.decision,
      fetchFn: this.trace.fetch,
    });
    const expected = new URL(this._redirectUrl);
    if (redirect.origin + redirect.pathname !== expected.origin + expected.pathname) {
      throw new Error(`consent redirected to ${redirect.origin}${redirect.pathname}, not the redirect URI ${expected}`);
    }
    this.pendingCode = codeFromRedirect(redirect).code;
  }

  /** The code the last consent produced, once: what a callback server would hand over. */
  takeCode() {
    const code = this.pendingCode;
    this.pendingCode = undefined;
    if (!code) throw new Error('the SDK asked for authorization but no code was captured');
    return code;
  }
}

function isUnauthorized(error) {
  return error instanceof UnauthorizedError;
}

/**
 * Connect a new Client, completing an authorization if the SDK asks for one:
 * on UnauthorizedError, exchange the captured code with finishAuth and
 * connect again on a new transport (a started one cannot start again).
 */
async function connect(makeTransport, provider, report) {
  let transport = makeTransport();
  let client = new Client({ name: 'smeldr-e2e-ts', version: '0.0.0' });
  try {
    await client.connect(transport);
    return { client, transport };
  } catch (error) {
    if (!isUnauthorized(error)) throw error;
    report.connect_unauthorized = (report.connect_unauthorized ?? 0) + 1;
    await transport.finishAuth(provider.takeCode());
    await client.close().catch(() => {});
  }
  transport = makeTransport();
  client = new Client({ name: 'smeldr-e2e-ts', version: '0.0.0' });
  await client.connect(transport);
  return { client, transport };
}

/**
 * The server ended the session: a 404 to a Streamable HTTP request carrying
 * its id, or to a POST on a legacy SSE session's message endpoint (that
 * transport only says so in its message).
 */
function isSessionGone(error) {
  if (error instanceof StreamableHTTPError) return error.code === 404;
  return error instanceof Error && /^Error POSTing to endpoint \(HTTP 404\)/.test(error.message);
}

/**
 * Call a tool as an application would:
 *  - if the SDK gave up with UnauthorizedError after sending the browser to
 *    consent, finish the authorization and call again on the same session;
 *  - if the server answers 404 for the session (it may end a session at any
 *    time, e.g. when its grant is revoked), start a new session (the spec's
 *    "MUST start a new session"; the SDK leaves that to the application)
 *    with the tokens it has, and call again.
 */
async function callTool(session, provider, name, args, report, makeTransport) {
  const call = () => session.client.callTool({ name, arguments: args });
  const restartIfGone = async (error) => {
    if (!isSessionGone(error) || !makeTransport) throw error;
    report.session_restarts = (report.session_restarts ?? 0) + 1;
    await session.client.close().catch(() => {});
    Object.assign(session, await connect(makeTransport, provider, report));
    return await call();
  };
  try {
    return await call();
  } catch (error) {
    if (!isUnauthorized(error)) return await restartIfGone(error);
    report.call_unauthorized = (report.call_unauthorized ?? 0) + 1;
    await session.transport.finishAuth(provider.takeCode());
    try {
      return await call();
    } catch (again) {
      return await restartIfGone(again);
    }
  }
}

/**
 * Revoke a token the way an application's "disconnect" would (RFC 7009, as
 * a public client naming itself), then prove the access token is dead by
 * presenting it to the MCP endpoint directly.
 *
 * @param which "access" revokes the access token (the refresh token still
 *   works, so the SDK recovers by refreshing); "grant" revokes the refresh
 *   token, which ends the whole grant (so it must authorize again).
 */
async function revoke(which, mcpUrl, provider, trace) {
  const tokens = provider.tokens();
  const client = provider.clientInformation();
  const endpoint = new URL('/oauth/revoke', mcpUrl);
  const form = new URLSearchParams({
    token: which === 'grant' ? tokens.refresh_token : tokens.access_token,
    token_type_hint: which === 'grant' ? 'refresh_token' : 'access_token',
    client_id: client.client_id,
  });
  const response = await trace.fetch(endpoint, {
    method: 'POST',
    headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
    body: form.toString(),
  });
  const text = await response.text();
  if (response.status !== 200) {
    throw new Error(`POST /oauth/revoke (${which}) answered ${response.status}, expected 200 (RFC 7009 2.2); body: ${text.slice(0, 300)}`);
  }
  // Behind a balancer the revocation reaches the other processes within the
  // server's bound (one second), pushed: a probe before then may land on one
  // not told yet (the balanced suite sets this; none by default).
  await sleep(Number(process.env.SMELDR_REVOKE_SETTLE_SECONDS || '0') * 1000);
  const probe = await trace.fetch(mcpUrl, {
    method: 'POST',
    headers: {
      Authorization: `Bearer ${tokens.access_token}`,
      'Content-Type': 'application/json',
      Accept: 'application/json, text/event-stream',
    },
    body: JSON.stringify({ jsonrpc: '2.0', id: 'probe', method: 'ping' }),
  });
  await probe.body?.cancel();
  return {
    which,
    endpoint: endpoint.pathname,
    status: response.status,
    probe_status: probe.status,
    probe_www_authenticate: probe.headers.get('www-authenticate'),
  };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function run(options, trace, report) {
  const provider = new Provider({
    redirectUrl: `http://127.0.0.1:${options['callback-port']}/callback`,
    clientMetadataUrl: options.identity === 'cimd' ? options['client-metadata-url'] : undefined,
    siteToken: options['site-token'],
    decision: options.decision,
    trace,
  });
  report.provider = provider;
  const url = new URL(options.url);
  const makeTransport = () => {
    const transport =
      options.transport === 'streamable'
        ? new StreamableHTTPClientTransport(url, { authProvider: provider, fetch: trace.fetch })
        : new SSEClientTransport(url, { authProvider: provider, fetch: trace.fetch });
    // Record the version the Client negotiated (it tells the transport).
    const setProtocolVersion = transport.setProtocolVersion.bind(transport);
    transport.setProtocolVersion = (version) => {
      report.protocol_version = version;
      setProtocolVersion(version);
    };
    return transport;
  };
  const args = JSON.parse(options.args);

  const session = await connect(makeTransport, provider, report);
  try {
    report.server_info = session.client.getServerVersion() ?? null;
    const tools = await session.client.listTools();
    report.tools = tools.tools.map((t) => t.name).sort();
    report.tool_result = await callTool(session, provider, options.tool, args, report);
    report.authorizations_before_followup = provider.authorizations;
    report.code_grants_before_followup = trace.count({ grant_type: 'authorization_code', status: 200 });

    if (options.refresh) {
      const before = provider.tokens();
      const expiresIn = before.expires_in;
      if (expiresIn == null || expiresIn > options['max-wait']) {
        throw new Error(
          `--refresh needs the server's access tokens to live at most ${options['max-wait']}s ` +
            `(start it with --access-token-ttl); they live ${expiresIn}s`,
        );
      }
      // The SDK ignores expires_in: it refreshes when the server answers 401,
      // so let the server's own TTL run out.
      report.refresh_method = 'waited';
      await sleep((expiresIn + 1) * 1000);
      report.after_refresh_result = await callTool(session, provider, options.tool, args, report, makeTransport);
      report.refreshed = provider.tokens() !== before && provider.tokens().access_token !== before.access_token;
    }

    if (options.revoke) {
      report.revoke = await revoke(options.revoke, options.url, provider, trace);
      report.after_revoke_result = await callTool(session, provider, options.tool, args, report, makeTransport);
    }
  } finally {
    await session.client.close().catch(() => {});
  }
}

function finish(report, provider, trace) {
  if (provider) {
    report.authorizations = provider.authorizations;
    report.invalidations = provider.invalidations;
    report.tokens = provider.history.map((t) => ({
      access: fingerprint(t.access_token),
      refresh: fingerprint(t.refresh_token),
      expires_in: t.expires_in ?? null,
      scope: t.scope ?? null,
      token_type: t.token_type,
    }));
    const info = provider.clientInformation();
    report.registered = info
      ? {
          client_id_is_url: info.client_id.startsWith('https://'),
          token_endpoint_auth_method: info.token_endpoint_auth_method ?? null,
          has_secret: info.client_secret != null,
        }
      : null;
  }
  report.refresh_grants = trace.count({ grant_type: 'refresh_token', status: 200 });
  report.code_grants = trace.count({ grant_type: 'authorization_code', status: 200 });
  report.http = trace.events;
  delete report.provider;
}

function describe(error) {
  if (error instanceof AggregateError) return error.errors.map(describe).join('; ');
  let text = `${error?.name ?? 'Error'}: ${error?.message ?? String(error)}`;
  if (error?.cause) text += ` (caused by ${describe(error.cause)})`;
  return text;
}

async function main() {
  const { values: options } = parseArgs({
    options: {
      url: { type: 'string' },
      transport: { type: 'string', default: 'streamable' },
      'site-token': { type: 'string' },
      identity: { type: 'string', default: 'dcr' },
      'client-metadata-url': { type: 'string' },
      'callback-port': { type: 'string', default: '33419' },
      tool: { type: 'string', default: 'list_posts' },
      args: { type: 'string', default: '{}' },
      decision: { type: 'string', default: 'approve' },
      refresh: { type: 'boolean', default: false },
      revoke: { type: 'string' },
      'max-wait': { type: 'string', default: '5' },
      timeout: { type: 'string', default: '20' },
    },
  });
  options['max-wait'] = Number(options['max-wait']);
  const usage = [];
  if (!options.url) usage.push('--url is required');
  if (!options['site-token']) usage.push('--site-token is required');
  if (!['streamable', 'sse'].includes(options.transport)) usage.push('--transport is streamable or sse');
  if (!['dcr', 'cimd'].includes(options.identity)) usage.push('--identity is dcr or cimd');
  if (options.identity === 'cimd' && !options['client-metadata-url']) usage.push('--identity cimd needs --client-metadata-url');
  if (options.revoke && !['access', 'grant'].includes(options.revoke)) usage.push('--revoke is access or grant');
  if (usage.length) {
    process.stderr.write(usage.join('\n') + '\n');
    return 2;
  }

  const trace = new Trace();
  const report = { sdk: '@modelcontextprotocol/sdk', sdk_version: SDK_VERSION, transport: options.transport, identity: options.identity };
  // Errors the transports report out of band (a dropped GET stream, say):
  // kept for the report, not fatal by themselves.
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`gave up after ${options.timeout}s`)), Number(options.timeout) * 1000);
  });
  try {
    await Promise.race([run(options, trace, report), deadline]);
  } catch (error) {
    process.stderr.write(`${error?.stack ?? error}\n`);
    const provider = report.provider;
    finish(report, provider, trace);
    report.ok = false;
    report.error = describe(error);
    process.stdout.write(JSON.stringify(report) + '\n');
    return 1;
  } finally {
    clearTimeout(timer);
  }
  const provider = report.provider;
  finish(report, provider, trace);
  report.ok = true;
  process.stdout.write(JSON.stringify(report) + '\n');
  return 0;
}

main().then(
  (code) => process.exit(code),
  (error) => {
    process.stderr.write(`${error?.stack ?? error}\n`);
    process.exit(1);
  },
);
