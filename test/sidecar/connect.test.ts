/**
 * The OAuth sidecar end to end, with plain fetch (redirect: "manual") acting
 * as the browser: the real sidecar on listen(0), a real vault on listen(0)
 * over a real PostgreSQL, reached with a caller allowed only Store, and a
 * token endpoint of our own (test/helpers/token-endpoint.ts) that the
 * catalogue's override file points the providers at. The authorization URLs
 * point at a host that is never fetched: the test reads the 302's Location,
 * plays the provider by calling /callback itself, and scripts the token
 * endpoint's answer to the code exchange.
 *
 * 1. Happy paths: Google (PKCE, access_type=offline&prompt=consent, client
 *    secret in the form), Microsoft (tenant URL, offline_access added), a
 *    client_secret_basic provider without PKCE. The 302's parameters, the
 *    state cookie's attributes, the exchange's form (verifier against the
 *    challenge), what the vault stored (tokens, expiry, scopes, extras, IP,
 *    user agent), the 303 to the return URL, the cleared cookie, the headers.
 * 2. Tickets at /connect: missing, forged, alg none, tampered, expired, too
 *    long-lived, for another integration, reused, return URL off the list:
 *    400 page, no cookie, no redirect. Unknown integration 404, provider
 *    without client id 503.
 * 3. State at /callback: missing, malformed, without cookie, with another
 *    flow's cookie, forged or tampered cookie, expired flow, replayed, another
 *    integration's flow: 400 page, no token endpoint call, nothing stored.
 * 4. Outcomes sent back to the app: denial, provider errors, missing code,
 *    token endpoint failures (5xx, 429, reset, invalid_grant, invalid_client,
 *    timeout), vault down, caller without Store, token set the vault refuses.
 *    /healthz, /readyz, 405.
 * 5. Leaks: no token, code, ticket, verifier, client secret, cookie or state
 *    in any log line of any sidecar; none of those but state and challenge in
 *    the provider's Location; none at all in return redirects and pages.
 *
 * Every case that must store nothing proves it with ListConnections for its
 * own user, and every case that must not call the provider proves it with the
 * token endpoint's record.
 */
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { SignJWT } from "jose";
import { ConnectionStatus, RefreshMode } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import type { KeyRing } from "../../src/crypto/key-ring.js";
import { loadCatalogue, type Catalogue, type ProviderSettings } from "../../src/providers/catalogue.js";
import { sealFlow } from "../../src/sidecar/flow.js";
import { generateTicketKey, mintConnectTicket, parseTicketKeys } from "../../src/sidecar/tickets.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { secretMarker, secretToken, testKeyRing } from "../helpers/secrets.js";
import { startVault, type TestVault } from "../helpers/server.js";
import { startSidecar, type StartSidecarOptions, type TestSidecar } from "../helpers/sidecar.js";
import { clientAuth, reply, startTokenEndpoint, type RecordedRequest, type TokenEndpoint } from "../helpers/token-endpoint.js";

// ---------------------------------------------------------------------------
// What must never leak, and what was seen
// ---------------------------------------------------------------------------

/** Tokens, codes, tickets, verifiers, client and caller secrets, cookie values: in no log line, page or return redirect. */
const secrets = new Set<string>();
/** Flow states: legitimately in the provider's Location, in nothing else the sidecar writes. */
const states = new Set<string>();
/** Every Location to a provider (302 from /connect). */
const providerLocations: string[] = [];
/** Every other Location (303 to the return URL), and every response body. */
const otherOutput: string[] = [];
const keep = <T extends string>(s: T): T => {
  if (s !== "") secrets.add(s);
  return s;
};
const token = (kind: string) => keep(secretToken(kind));
/** An authorization code as a provider would issue it (carries the marker). */
const newCode = () => token("code");

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/** Never fetched: the test reads the Location the sidecar sends the browser to. */
const authBase = "https://provider.example.test";
const googleScope = "https://www.googleapis.com/auth/gmail.readonly";
const mailRead = "https://graph.microsoft.com/Mail.Read";
const returnUrl = "http://app.localhost.test/settings";
const otherReturnUrl = "https://app.example.test/integrations";

const google = { clientId: "google-client-1234.apps.example", clientSecret: token("google-client-secret") };
const microsoft = { clientId: "ms-client-5678", clientSecret: token("ms-client-secret") };
/** Characters that form-encoding must escape, in both parts (RFC 6749 §2.3.1). */
const basic = { clientId: "basic client:id/1", clientSecret: `${token("basic-client-secret")} +:/&=%` };

let db: TestDatabase;
let keyRing: KeyRing;
let vault: TestVault;
let endpoint: TokenEndpoint;
let dir: string;
let catalogue: Catalogue;
/** The sidecar's caller: allowed only Store. */
let callerSecret: string;
/** The sidecar most tests use. */
let sc: TestSidecar;
const sidecars: TestSidecar[] = [];

function settings(provider: string): ProviderSettings {
  switch (provider) {
    case "google":
      return { ...google };
    case "microsoft":
      return { ...microsoft, params: { tenant: "contoso" } };
    case "basicco":
      return { ...basic };
    default:
      // slack, github ...: no client id, so connecting them is not configured
      return {};
  }
}

async function sidecar(options: Partial<StartSidecarOptions> = {}): Promise<TestSidecar> {
  const started = await startSidecar({
    vaultUrl: vault.baseUrl,
    callerSecret,
    catalogue,
    returnUrls: [returnUrl, otherReturnUrl],
    ...options,
  });
  sidecars.push(started);
  return started;
}

beforeAll(async () => {
  db = await createTestDatabase();
  keyRing = testKeyRing();
  endpoint = await startTokenEndpoint();
  dir = mkdtempSync(path.join(tmpdir(), "tv-sidecar-"));
  const file = path.join(dir, "providers.json");
  writeFileSync(
    file,
    JSON.stringify({
      providers: {
        google: { authorizationUrl: `${authBase}/o/oauth2/v2/auth`, tokenUrl: `${endpoint.baseUrl}/google/token` },
        // keeps the {tenant} placeholders, filled from the provider's settings
        microsoft: {
          authorizationUrl: `${authBase}/{tenant}/oauth2/v2.0/authorize`,
          tokenUrl: `${endpoint.baseUrl}/{tenant}/oauth2/v2.0/token`,
        },
        basicco: {
          // a query of its own, which the authorization request must keep
          authorizationUrl: `${authBase}/basic/authorize?display=popup`,
          tokenUrl: `${endpoint.baseUrl}/basic/token`,
          revocationUrl: null,
          tokenEndpointAuthMethod: "client_secret_basic",
          scopeSeparator: ",",
          pkce: false,
          authorizationParams: { audience: "api" },
          requiredScopes: ["offline"],
          refreshSendsScope: false,
          refreshTokenRotates: false,
        },
      },
      integrations: {
        // without offline_access among its scopes: the provider's required scope adds it
        "outlook-mail": { provider: "microsoft", scopes: [mailRead] },
        "basic-app": { provider: "basicco", scopes: ["read", "write", "offline"] },
      },
    }),
  );
  catalogue = loadCatalogue({ overrideFile: file, settings });
  vault = await startVault({ pool: db.pool, keyRing, catalogue });
  keep(vault.secret);
  const caller = await vault.addCaller(`oauth-sidecar-${randomBytes(3).toString("hex")}`, { allow: ["Store"], integrations: ["*"] });
  callerSecret = keep(caller.secret);
  sc = await sidecar();
});

afterEach(() => {
  // No token request the test did not script, and no scripted answer left for the next test.
  const unexpected = endpoint.unscripted();
  const left = endpoint.pending();
  endpoint.reset();
  expect(unexpected.map((r) => r.path), "token endpoint calls nobody scripted").toEqual([]);
  expect(left, "scripted answers nobody asked for").toEqual({ token: 0, revoke: 0 });
});

afterAll(async () => {
  await Promise.all(sidecars.map((s) => s.close()));
  await vault?.close();
  await endpoint?.close();
  await db?.drop();
  if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------
// The browser
// ---------------------------------------------------------------------------

interface Answer {
  status: number;
  headers: Headers;
  location: string | null;
  /** Each Set-Cookie header. */
  setCookies: string[];
  body: string;
}

async function browse(url: string, init: { method?: string; headers?: Record<string, string> } = {}): Promise<Answer> {
  const res = await fetch(url, { method: init.method ?? "GET", headers: init.headers, redirect: "manual" });
  const body = await res.text();
  const answer: Answer = { status: res.status, headers: res.headers, location: res.headers.get("location"), setCookies: res.headers.getSetCookie(), body };
  otherOutput.push(body);
  if (answer.location !== null) (answer.status === 302 ? providerLocations : otherOutput).push(answer.location);
  return answer;
}

/** A started flow: what the browser holds after /connect. */
interface Flow {
  sidecar: TestSidecar;
  integration: string;
  userId: string;
  ticket: string;
  answer: Answer;
  /** The provider authorization request. */
  authorize: URL;
  state: string;
  cookieName: string;
  cookieValue: string;
  /** `name=value`, as a Cookie header. */
  cookie: string;
}

const newUser = (label = "user") => `${label}-${randomBytes(6).toString("hex")}`;

/** Mints a ticket and GETs /connect with it; expects the 302 to the provider. */
async function connect(integration: string, options: { sidecar?: TestSidecar; userId?: string; returnUrl?: string } = {}): Promise<Flow> {
  const s = options.sidecar ?? sc;
  const userId = options.userId ?? newUser();
  const ticket = keep(await s.mint({ userId, integration, ...(options.returnUrl === undefined ? {} : { returnUrl: options.returnUrl }) }));
  const answer = await browse(s.connectUrl(integration, ticket));
  expect(answer.status, answer.body).toBe(302);
  const authorize = new URL(answer.location!);
  const state = authorize.searchParams.get("state")!;
  states.add(state);
  expect(answer.setCookies).toHaveLength(1);
  const pair = answer.setCookies[0]!.split(";")[0]!;
  const eq = pair.indexOf("=");
  const cookieName = pair.slice(0, eq);
  const cookieValue = keep(pair.slice(eq + 1));
  return { sidecar: s, integration, userId, ticket, answer, authorize, state, cookieName, cookieValue, cookie: pair };
}

/** GETs /callback/<integration> with `query`, sending `cookie` (a Cookie header) when given. */
function callback(target: Flow | TestSidecar, integration: string, query: Record<string, string>, cookie?: string, headers: Record<string, string> = {}): Promise<Answer> {
  const s = "cookieName" in target ? target.sidecar : target;
  const url = new URL(`/callback/${integration}`, s.url);
  for (const [k, v] of Object.entries(query)) url.searchParams.set(k, v);
  return browse(url.href, { headers: { ...(cookie === undefined ? {} : { cookie }), ...headers } });
}

/** The provider's redirect back with a code, from the browser that started `flow`. */
const finish = (flow: Flow, code: string, headers: Record<string, string> = {}) =>
  callback(flow, flow.integration, { code, state: flow.state }, flow.cookie, headers);

// ---------------------------------------------------------------------------
// Expectations
// ---------------------------------------------------------------------------

function expectSecurityHeaders(a: Answer): void {
  expect(a.headers.get("referrer-policy")).toBe("no-referrer");
  expect(a.headers.get("cache-control")).toBe("no-store");
  expect(a.headers.get("x-content-type-options")).toBe("nosniff");
  expect(a.headers.get("x-frame-options")).toBe("DENY");
  expect(a.headers.get("content-security-policy")).toContain("frame-ancestors 'none'");
}

/** A refusal page: status, HTML, no redirect, the security headers. */
function expectPage(a: Answer, status: number, text?: RegExp): void {
  expect(a.status, a.body).toBe(status);
  expect(a.location).toBeNull();
  expect(a.headers.get("content-type")).toMatch(/^text\/html; charset=utf-8/);
  expect(a.body).toMatch(/^<!doctype html>/);
  if (text !== undefined) expect(a.body).toMatch(text);
  expectSecurityHeaders(a);
}

/** A refusal at /connect: the page, and no state cookie set. */
function expectConnectRefused(a: Answer, status: number, text?: RegExp): void {
  expectPage(a, status, text);
  expect(a.setCookies).toEqual([]);
}

/** A Set-Cookie header's attributes, by lower-case name. */
function cookieAttributes(header: string): { name: string; value: string; attrs: Map<string, string> } {
  const [pair, ...rest] = header.split(";").map((s) => s.trim());
  const eq = pair!.indexOf("=");
  const attrs = new Map<string, string>();
  for (const part of rest) {
    const i = part.indexOf("=");
    attrs.set((i === -1 ? part : part.slice(0, i)).toLowerCase(), i === -1 ? "" : part.slice(i + 1));
  }
  return { name: pair!.slice(0, eq), value: pair!.slice(eq + 1), attrs };
}

/** The response deletes the flow's cookie (same name and path, Max-Age=0). */
function expectCookieCleared(a: Answer, flow: Flow): void {
  expect(a.setCookies).toHaveLength(1);
  const c = cookieAttributes(a.setCookies[0]!);
  expect(c.name).toBe(flow.cookieName);
  expect(c.value).toBe("");
  expect(c.attrs.get("max-age")).toBe("0");
  expect(c.attrs.get("path")).toBe(`/callback/${flow.integration}`);
  expect(c.attrs.has("httponly")).toBe(true);
}

/** The 303 to the return URL; its query must be exactly `expected` after the return URL's own. */
function expectReturned(a: Answer, expected: Record<string, string>, base = returnUrl, ownQuery: [string, string][] = []): URL {
  expect(a.status, a.body).toBe(303);
  expect(a.body).toBe("");
  expectSecurityHeaders(a);
  const back = new URL(a.location!);
  expect(`${back.origin}${back.pathname}`).toBe(base);
  expect([...back.searchParams]).toEqual([...ownQuery, ...Object.entries(expected)]);
  return back;
}

async function expectNothingStored(userId: string): Promise<void> {
  const { connections } = await vault.grpcClient.listConnections({ userId });
  expect(connections, `nothing stored for ${userId}`).toEqual([]);
}

/** The number of token endpoint requests so far (to prove none happened). */
const tokenCalls = () => endpoint.tokenRequests().length;

async function storeEvents(userId: string): Promise<number> {
  let n = 0;
  for await (const res of vault.grpcClient.streamAudit({ filter: { userId, actions: ["store"] } }, { signal: AbortSignal.timeout(10_000) })) {
    if (res.event !== undefined) n++;
  }
  return n;
}

/** Scripts a successful exchange with fresh tokens and returns them. */
function scriptTokens(extra: Record<string, unknown> = {}): { access: string; refresh: string } {
  const access = token("access");
  const refresh = token("refresh");
  endpoint.script(reply.success({ access_token: access, refresh_token: refresh, expires_in: 3600, ...extra }));
  return { access, refresh };
}

/** The code exchange request recorded since `before` (exactly one). */
function exchangeSince(before: number): RecordedRequest {
  const made = endpoint.tokenRequests().slice(before);
  expect(made).toHaveLength(1);
  const req = made[0]!;
  if (req.form.code_verifier !== undefined) keep(req.form.code_verifier);
  return req;
}

const sha256url = (s: string) => createHash("sha256").update(s).digest("base64url");

/** A free TCP port nothing listens on. */
async function closedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

// ---------------------------------------------------------------------------
// 1. Happy paths
// ---------------------------------------------------------------------------

describe("connecting an account", () => {
  it("Google: 302 with every parameter, the state cookie, the exchange with the verifier, the tokens stored, 303 connected", async () => {
    const userId = newUser();
    const flow = await connect("gmail", { userId });

    // The authorization request.
    expect(`${flow.authorize.origin}${flow.authorize.pathname}`).toBe(`${authBase}/o/oauth2/v2/auth`);
    const p = flow.authorize.searchParams;
    expect([...p.keys()].sort()).toEqual(
      ["access_type", "client_id", "code_challenge", "code_challenge_method", "prompt", "redirect_uri", "response_type", "scope", "state"].sort(),
    );
    expect(p.get("response_type")).toBe("code");
    expect(p.get("client_id")).toBe(google.clientId);
    expect(p.get("redirect_uri")).toBe(`${sc.url}/callback/gmail`);
    expect(p.get("scope")).toBe(googleScope);
    expect(flow.state).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(p.get("code_challenge")).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(p.get("code_challenge_method")).toBe("S256");
    expect(p.get("access_type")).toBe("offline");
    expect(p.get("prompt")).toBe("consent");
    expect(flow.answer.location).not.toContain(flow.ticket);
    expect(flow.answer.body).toBe("");
    expectSecurityHeaders(flow.answer);

    // The state cookie.
    const cookie = cookieAttributes(flow.answer.setCookies[0]!);
    expect(cookie.name).toBe(`tv_flow_${flow.state}`);
    expect(cookie.value.length).toBeGreaterThan(100);
    expect(cookie.value).not.toContain(flow.state);
    expect(cookie.attrs.has("httponly")).toBe(true);
    expect(cookie.attrs.get("samesite")).toBe("Lax");
    expect(cookie.attrs.get("path")).toBe("/callback/gmail");
    expect(cookie.attrs.get("max-age")).toBe("600");
    expect(cookie.attrs.has("secure"), "no Secure on http://localhost").toBe(false);
    expect(cookie.attrs.has("domain")).toBe(false);

    // The provider sends the browser back; the exchange succeeds.
    const access = token("access");
    const refresh = token("refresh");
    const idToken = token("id");
    endpoint.script(
      reply.success({ access_token: access, refresh_token: refresh, expires_in: 3600, scope: `${googleScope} openid`, id_token: idToken, x_account: "acct-42", nested: { team: "T1" } }),
    );
    const ua = "Mozilla/5.0 (X11; Linux x86_64) TokenVaultTest/1.0";
    const before = tokenCalls();
    const startedAt = Date.now();
    const code = newCode();
    // a spoofed X-Forwarded-For is ignored without trusted proxies
    const done = await finish(flow, code, { "user-agent": ua, "x-forwarded-for": "203.0.113.9" });
    const finishedAt = Date.now();

    expectReturned(done, { status: "connected", integration: "gmail" });
    expectCookieCleared(done, flow);

    // The exchange: the code, the same redirect_uri, the verifier of the challenge, the client's credentials.
    const req = exchangeSince(before);
    expect(req.method).toBe("POST");
    expect(req.path).toBe("/google/token");
    expect(req.headers["content-type"]).toMatch(/^application\/x-www-form-urlencoded/);
    expect(req.form.grant_type).toBe("authorization_code");
    expect(req.form.code).toBe(code);
    expect(req.form.redirect_uri).toBe(`${sc.url}/callback/gmail`);
    expect(req.form.code_verifier).toMatch(/^[A-Za-z0-9._~-]{43,128}$/);
    expect(sha256url(req.form.code_verifier!)).toBe(p.get("code_challenge"));
    expect(clientAuth(req)).toEqual({ method: "client_secret_post", clientId: google.clientId, clientSecret: google.clientSecret });
    expect(req.formKeys.filter((k) => k === "code")).toHaveLength(1);

    // What the vault holds.
    const got = await vault.grpcClient.get({ userId, integration: "gmail", refresh: RefreshMode.NEVER, includeRefreshToken: true });
    expect(got.accessToken).toBe(access);
    expect(got.refreshToken).toBe(refresh);
    expect(got.idToken).toBe(idToken);
    expect(got.tokenType).toBe("Bearer");
    expect(got.scopes).toEqual([googleScope, "openid"]);
    expect(got.extras).toEqual({ x_account: "acct-42", nested: { team: "T1" } });
    const expiresAt = timestampDate(got.expiresAt!).getTime();
    expect(expiresAt).toBeGreaterThanOrEqual(startedAt + 3_600_000 - 1_000);
    expect(expiresAt).toBeLessThanOrEqual(finishedAt + 3_600_000 + 1_000);
    const connection = got.connection!;
    expect(connection.userId).toBe(userId);
    expect(connection.integration).toBe("gmail");
    expect(connection.status).toBe(ConnectionStatus.ACTIVE);
    expect(connection.hasRefreshToken).toBe(true);
    expect(connection.consent?.ipAddress).toBe("127.0.0.1");
    expect(connection.consent?.userAgent).toBe(ua);
    expect(await storeEvents(userId)).toBe(1);
  });

  it("Microsoft: the tenant in the URLs, offline_access added to the scopes, the return URL's own query kept", async () => {
    const userId = newUser();
    const ret = `${otherReturnUrl}/mail?from=settings`;
    const flow = await connect("outlook-mail", { userId, returnUrl: ret });
    expect(`${flow.authorize.origin}${flow.authorize.pathname}`).toBe(`${authBase}/contoso/oauth2/v2.0/authorize`);
    const p = flow.authorize.searchParams;
    expect(p.get("client_id")).toBe(microsoft.clientId);
    expect(p.get("scope")).toBe(`${mailRead} offline_access`);
    expect(p.get("redirect_uri")).toBe(`${sc.url}/callback/outlook-mail`);
    expect(p.get("code_challenge_method")).toBe("S256");
    expect(p.has("access_type")).toBe(false);
    expect(p.has("prompt")).toBe(false);
    expect(cookieAttributes(flow.answer.setCookies[0]!).attrs.get("path")).toBe("/callback/outlook-mail");

    // No scope in the answer: the requested scopes are stored (RFC 6749 §5.1).
    const { access, refresh } = scriptTokens();
    const before = tokenCalls();
    const done = await finish(flow, newCode(), { "user-agent": "Edge/1" });
    const back = expectReturned(done, { status: "connected", integration: "outlook-mail" }, `${otherReturnUrl}/mail`, [["from", "settings"]]);
    expect(back.href).toBe(`${otherReturnUrl}/mail?from=settings&status=connected&integration=outlook-mail`);

    const req = exchangeSince(before);
    expect(req.path).toBe("/contoso/oauth2/v2.0/token");
    expect(req.form.redirect_uri).toBe(`${sc.url}/callback/outlook-mail`);
    expect(sha256url(req.form.code_verifier!)).toBe(p.get("code_challenge"));
    expect(clientAuth(req)).toEqual({ method: "client_secret_post", clientId: microsoft.clientId, clientSecret: microsoft.clientSecret });

    const got = await vault.grpcClient.get({ userId, integration: "outlook-mail", refresh: RefreshMode.NEVER, includeRefreshToken: true });
    expect(got.accessToken).toBe(access);
    expect(got.refreshToken).toBe(refresh);
    expect(got.scopes).toEqual([mailRead, "offline_access"]);
  });

  it("Microsoft via the built-in outlook integration: offline_access asked once", async () => {
    const flow = await connect("outlook");
    expect(flow.authorize.searchParams.get("scope")).toBe(`${mailRead} offline_access`);
    // abandoned at the provider: nothing else happens
    await expectNothingStored(flow.userId);
  });

  it("a client_secret_basic provider without PKCE: no challenge, no verifier, Basic auth, its scope separator and extras", async () => {
    const userId = newUser();
    const flow = await connect("basic-app", { userId });
    expect(`${flow.authorize.origin}${flow.authorize.pathname}`).toBe(`${authBase}/basic/authorize`);
    const p = flow.authorize.searchParams;
    expect(p.get("display")).toBe("popup");
    expect(p.get("audience")).toBe("api");
    expect(p.get("response_type")).toBe("code");
    expect(p.get("client_id")).toBe(basic.clientId);
    expect(p.get("scope")).toBe("read,write,offline");
    expect(p.has("code_challenge")).toBe(false);
    expect(p.has("code_challenge_method")).toBe(false);

    // Only an access token: no refresh token, no expiry.
    const access = token("basic-access");
    endpoint.script(reply.success({ access_token: access }));
    const before = tokenCalls();
    expectReturned(await finish(flow, newCode()), { status: "connected", integration: "basic-app" });
    const req = exchangeSince(before);
    expect(req.path).toBe("/basic/token");
    expect(req.form).not.toHaveProperty("code_verifier");
    expect(req.form).not.toHaveProperty("client_secret");
    expect(req.form).not.toHaveProperty("client_id");
    expect(clientAuth(req)).toEqual({ method: "client_secret_basic", clientId: basic.clientId, clientSecret: basic.clientSecret });

    const got = await vault.grpcClient.get({ userId, integration: "basic-app", refresh: RefreshMode.NEVER, includeRefreshToken: true });
    expect(got.accessToken).toBe(access);
    expect(got.refreshToken).toBeUndefined();
    expect(got.expiresAt).toBeUndefined();
    expect(got.scopes).toEqual(["read", "write", "offline"]);
    expect(got.connection?.hasRefreshToken).toBe(false);
    // no User-Agent header sent: none stored
    expect(got.connection?.consent?.ipAddress).toBe("127.0.0.1");
  });

  it("two flows of one browser in two tabs do not overwrite each other", async () => {
    const userId = newUser();
    const one = await connect("gmail", { userId });
    const two = await connect("gmail", { userId });
    expect(one.cookieName).not.toBe(two.cookieName);
    // the browser sends both cookies to /callback/gmail
    const both = `${one.cookie}; ${two.cookie}`;
    const { access } = scriptTokens();
    const a = await callback(sc, "gmail", { code: newCode(), state: two.state }, both);
    expectReturned(a, { status: "connected", integration: "gmail" });
    expectCookieCleared(a, two);
    const got = await vault.grpcClient.get({ userId, integration: "gmail", refresh: RefreshMode.NEVER });
    expect(got.accessToken).toBe(access);
  });

  it("behind one trusted proxy, the address that proxy appended is stored; a non-address stores none", async () => {
    const proxied = await sidecar({ trustedProxies: 1 });
    for (const [xff, ip] of [
      ["198.51.100.7", "198.51.100.7"],
      ["203.0.113.1, 198.51.100.8", "198.51.100.8"],
      ["2001:db8::1", "2001:db8::1"],
      ["not-an-address", ""],
    ] as const) {
      const userId = newUser();
      const flow = await connect("gmail", { sidecar: proxied, userId });
      scriptTokens();
      expectReturned(await finish(flow, newCode(), { "x-forwarded-for": xff }), { status: "connected", integration: "gmail" });
      const { connections } = await vault.grpcClient.listConnections({ userId });
      expect(connections[0]?.consent?.ipAddress ?? "", xff).toBe(ip);
    }
  });

  // ConsentMetadata is informational, but the vault refuses a user agent with
  // control characters (src/vault/validate.ts validateConsent). A tab is legal
  // inside an HTTP field value (RFC 9110 §5.5) and Node reads bytes 0x80-0x9F
  // of a header as C1 controls (latin1): the sidecar must clean the user agent
  // it forwards rather than lose the user's consent to token_rejected.
  it.each([
    ["a tab", "Mozilla/5.0\t(Test) Browser"],
    ["a byte 0x85 (C1 control once read as latin1)", "Mozilla/5.0 (Test)\u0085 Browser"],
  ])("a user agent with %s is forwarded cleaned, not refused", async (_what, ua) => {
    const userId = newUser();
    const flow = await connect("gmail", { userId });
    scriptTokens();
    const done = await finish(flow, newCode(), { "user-agent": ua });
    const storeFailure = flow.sidecar.logs.lines.filter((l) => l.includes("storing the token set in the vault failed")).pop();
    expect(new URL(done.location!).searchParams.get("status"), storeFailure).toBe("connected");
    const { connections } = await vault.grpcClient.listConnections({ userId });
    expect(connections).toHaveLength(1);
    expect(connections[0]!.consent?.userAgent).toMatch(/^Mozilla\/5\.0/);
    expect(connections[0]!.consent?.userAgent).not.toMatch(/[\u0000-\u001f\u007f-\u009f]/);
  });
});

// ---------------------------------------------------------------------------
// 2. Tickets at /connect
// ---------------------------------------------------------------------------

describe("/connect refuses a bad ticket with a 400 page, no cookie and no redirect", () => {
  const b64 = (v: unknown) => Buffer.from(JSON.stringify(v)).toString("base64url");

  /** GETs /connect/<integration> with `ticket` and expects the refusal, nothing stored and no provider call. */
  async function refused(integration: string, ticket: string | undefined, status: number, text: RegExp, userId?: string): Promise<Answer> {
    if (ticket !== undefined) keep(ticket);
    const before = tokenCalls();
    const url = ticket === undefined ? `${sc.url}/connect/${integration}` : sc.connectUrl(integration, ticket);
    const a = await browse(url);
    expectConnectRefused(a, status, text);
    if (ticket !== undefined && ticket.length > 0) expect(a.body).not.toContain(ticket);
    expect(tokenCalls()).toBe(before);
    if (userId !== undefined) await expectNothingStored(userId);
    return a;
  }

  it("a missing or empty ticket", async () => {
    await refused("gmail", undefined, 400, /no ticket/);
    await refused("gmail", "", 400, /no ticket/);
  });

  it("a ticket signed with another key under the same kid (forged)", async () => {
    const userId = newUser("victim");
    const forger = parseTicketKeys(`${sc.keys.signing.id}:${randomBytes(32).toString("base64url")}`, "forger");
    const ticket = await mintConnectTicket(forger, { userId, integration: "gmail", returnUrl });
    await refused("gmail", ticket, 400, /signature does not verify/, userId);
  });

  it("a ticket signed with a key the sidecar does not know", async () => {
    const userId = newUser("victim");
    const ticket = await mintConnectTicket(parseTicketKeys(generateTicketKey("other"), "other"), { userId, integration: "gmail", returnUrl });
    await refused("gmail", ticket, 400, /unknown key/, userId);
  });

  it('an unsigned ticket (alg "none")', async () => {
    const userId = newUser("victim");
    const iat = Math.floor(Date.now() / 1000);
    const ticket = `${b64({ alg: "none", typ: "JWT", kid: sc.keys.signing.id })}.${b64({
      aud: "tokenvault-sidecar",
      sub: userId,
      integration: "gmail",
      return_url: returnUrl,
      iat,
      exp: iat + 300,
      jti: randomBytes(16).toString("base64url"),
    })}.`;
    await refused("gmail", ticket, 400, /not a valid signed JWT/, userId);
  });

  it("a ticket whose payload was changed (another user), signature kept", async () => {
    const victim = newUser("victim");
    const ticket = await sc.mint({ userId: newUser("attacker"), integration: "gmail" });
    const [header, payload, signature] = ticket.split(".") as [string, string, string];
    const changed = { ...JSON.parse(Buffer.from(payload, "base64url").toString("utf8")), sub: victim };
    await refused("gmail", `${header}.${b64(changed)}.${signature}`, 400, /signature does not verify/, victim);
  });

  // The documented "sub" is a string. A number passes verifyConnectTicket today
  // (src/sidecar/tickets.ts: no type check), starts a flow whose cookie
  // openFlow then refuses, so the user consents at the provider for nothing.
  it("a ticket whose sub is not a string", async () => {
    const iat = Math.floor(Date.now() / 1000);
    const ticket = await new SignJWT({ sub: 12345 as unknown as string, integration: "gmail", return_url: returnUrl })
      .setProtectedHeader({ alg: "HS256", typ: "JWT", kid: sc.keys.signing.id })
      .setAudience("tokenvault-sidecar")
      .setIssuedAt(iat)
      .setExpirationTime(iat + 300)
      .setJti(randomBytes(16).toString("base64url"))
      .sign(sc.keys.signing.secret);
    await refused("gmail", ticket, 400, /Invalid connect link/, "12345");
  });

  it("an expired ticket", async () => {
    const userId = newUser();
    const ticket = await sc.mint({ userId, integration: "gmail", ttlSeconds: 300, now: new Date(Date.now() - 400_000) });
    await refused("gmail", ticket, 400, /expired/, userId);
  });

  it("a ticket living longer than 600 s (minted by hand), where one of 600 s passes", async () => {
    const userId = newUser();
    const handMinted = (lifetime: number) => {
      const iat = Math.floor(Date.now() / 1000);
      return new SignJWT({ integration: "gmail", return_url: returnUrl })
        .setProtectedHeader({ alg: "HS256", typ: "JWT", kid: sc.keys.signing.id })
        .setAudience("tokenvault-sidecar")
        .setSubject(userId)
        .setIssuedAt(iat)
        .setExpirationTime(iat + lifetime)
        .setJti(randomBytes(16).toString("base64url"))
        .sign(sc.keys.signing.secret);
    };
    await refused("gmail", await handMinted(601), 400, /lives longer than 600 seconds/, userId);
    const ok = keep(await handMinted(600));
    const a = await browse(sc.connectUrl("gmail", ok));
    expect(a.status).toBe(302);
    states.add(new URL(a.location!).searchParams.get("state")!);
  });

  it("a ticket for another integration (and it stays usable for its own)", async () => {
    const userId = newUser();
    const ticket = keep(await sc.mint({ userId, integration: "google-calendar" }));
    await refused("gmail", ticket, 400, /another integration/, userId);
    const a = await browse(sc.connectUrl("google-calendar", ticket));
    expect(a.status).toBe(302);
    states.add(new URL(a.location!).searchParams.get("state")!);
  });

  it("a ticket used a second time", async () => {
    const userId = newUser();
    const ticket = keep(await sc.mint({ userId, integration: "gmail" }));
    const first = await browse(sc.connectUrl("gmail", ticket));
    expect(first.status).toBe(302);
    states.add(new URL(first.location!).searchParams.get("state")!);
    await refused("gmail", ticket, 400, /already been used/, userId);
    await refused("gmail", ticket, 400, /already been used/, userId);
  });

  it.each([
    ["another host", "https://evil.example/settings"],
    ["a sibling path sharing the prefix", "http://app.localhost.test/settings-evil"],
    ["another scheme", "https://app.localhost.test/settings"],
    ["a user name", "http://attacker@app.localhost.test/settings"],
    ["javascript:", "javascript:alert(document.cookie)"],
  ])("a ticket whose return URL is off the allow-list: %s", async (_what, badReturn) => {
    const userId = newUser();
    const ticket = await sc.mint({ userId, integration: "gmail", returnUrl: badReturn });
    const a = await refused("gmail", ticket, 400, /return address is not one this service may send you to/, userId);
    expect(a.body).not.toContain(badReturn);
  });

  it("an unknown integration is 404, at /connect and at /callback", async () => {
    const ticket = keep(await sc.mint({ userId: newUser(), integration: "no-such-thing" }));
    const a = await browse(sc.connectUrl("no-such-thing", ticket));
    expectConnectRefused(a, 404, /Unknown integration/);
    const b = await browse(`${sc.url}/callback/no-such-thing?code=x&state=${"a".repeat(43)}`);
    expectPage(b, 404, /Unknown integration/);
  });

  it("a provider without client id is 503", async () => {
    const userId = newUser();
    const ticket = keep(await sc.mint({ userId, integration: "slack" }));
    const a = await browse(sc.connectUrl("slack", ticket));
    expectConnectRefused(a, 503, /not configured/);
    await expectNothingStored(userId);
  });

  it("other paths are 404", async () => {
    for (const p of ["/", "/connect", "/connect/", "/connect/gmail/extra", "/callback", "/favicon.ico"]) {
      expectPage(await browse(`${sc.url}${p}`), 404);
    }
  });
});

// ---------------------------------------------------------------------------
// 3. State at /callback
// ---------------------------------------------------------------------------

describe("/callback refuses a bad state with a 400 page, without calling the provider or storing anything", () => {
  /** Expects the 400 page, no provider call since `before`, nothing stored for the users. */
  async function expectRefusedCallback(a: Answer, before: number, users: string[], text: RegExp): Promise<void> {
    expectPage(a, 400, text);
    expect(tokenCalls(), "no token endpoint call").toBe(before);
    for (const u of users) await expectNothingStored(u);
  }

  it("a missing state", async () => {
    const flow = await connect("gmail");
    const before = tokenCalls();
    const a = await callback(flow, "gmail", { code: newCode() }, flow.cookie);
    await expectRefusedCallback(a, before, [flow.userId], /no valid state/);
    expect(a.setCookies).toEqual([]);
  });

  it("a malformed state (even with a cookie named after it)", async () => {
    const flow = await connect("gmail");
    const before = tokenCalls();
    for (const bad of ["short", `${flow.state}x`, `${flow.state.slice(0, 42)}.`, `${flow.state.slice(0, 42)}=`, "../../etc"]) {
      const a = await callback(flow, "gmail", { code: newCode(), state: bad }, `tv_flow_${bad}=${flow.cookieValue}; ${flow.cookie}`);
      await expectRefusedCallback(a, before, [flow.userId], /no valid state/);
      expect(a.setCookies).toEqual([]);
    }
  });

  it("a state without its cookie (another browser), which does not use the flow up", async () => {
    const flow = await connect("gmail");
    const before = tokenCalls();
    const a = await callback(flow, "gmail", { code: newCode(), state: flow.state });
    await expectRefusedCallback(a, before, [flow.userId], /no connect in progress/);
    expect(a.setCookies).toEqual([]);
    // the browser that started it can still finish
    scriptTokens();
    expectReturned(await finish(flow, newCode()), { status: "connected", integration: "gmail" });
  });

  it("a provider error without the cookie is a 400 too: no outcome goes back for a flow this browser did not start", async () => {
    const flow = await connect("gmail");
    const before = tokenCalls();
    const a = await callback(flow, "gmail", { error: "access_denied", state: flow.state });
    await expectRefusedCallback(a, before, [flow.userId], /no connect in progress/);
  });

  it("an attacker's state and code sent to a victim's browser (login CSRF): the victim has no cookie for it", async () => {
    const attacker = await connect("gmail", { userId: newUser("attacker") });
    const victim = await connect("gmail", { userId: newUser("victim") });
    const before = tokenCalls();
    const a = await callback(victim, "gmail", { code: newCode(), state: attacker.state }, victim.cookie);
    await expectRefusedCallback(a, before, [attacker.userId, victim.userId], /no connect in progress/);
  });

  it("another flow's cookie under this flow's name (mismatched)", async () => {
    const mine = await connect("gmail", { userId: newUser("victim") });
    const other = await connect("gmail", { userId: newUser("attacker") });
    const before = tokenCalls();
    const a = await callback(mine, "gmail", { code: newCode(), state: mine.state }, `${mine.cookieName}=${other.cookieValue}`);
    await expectRefusedCallback(a, before, [mine.userId, other.userId], /expired or not valid/);
    expectCookieCleared(a, mine);
  });

  it("a tampered cookie, garbage, or one sealed under another key with the same kid (forged)", async () => {
    const flow = await connect("gmail");
    const before = tokenCalls();
    const v = flow.cookieValue;
    const i = v.length - 30;
    const flipped = `${v.slice(0, i)}${v[i] === "A" ? "B" : "A"}${v.slice(i + 1)}`;
    const forger = parseTicketKeys(`${sc.keys.signing.id}:${randomBytes(32).toString("base64url")}`, "forger");
    const forged = keep(
      await sealFlow(forger, {
        state: flow.state,
        codeVerifier: randomBytes(32).toString("base64url"),
        userId: newUser("victim"),
        integration: "gmail",
        returnUrl,
        expiresAt: Math.floor(Date.now() / 1000) + 600,
      }),
    );
    for (const value of [flipped, "garbage", "", forged, v.split(".").slice(0, 4).join(".")]) {
      const a = await callback(flow, "gmail", { code: newCode(), state: flow.state }, `${flow.cookieName}=${value}`);
      await expectRefusedCallback(a, before, [flow.userId], /expired or not valid/);
      expectCookieCleared(a, flow);
    }
  });

  it("an expired flow (the clock moved past 600 s), where one at 590 s still finishes", async () => {
    let skewMs = 0;
    const clocked = await sidecar({ now: () => new Date(Date.now() + skewMs) });
    const late = await connect("gmail", { sidecar: clocked });
    const inTime = await connect("gmail", { sidecar: clocked });
    skewMs = 601_000;
    const before = tokenCalls();
    const a = await finish(late, newCode());
    await expectRefusedCallback(a, before, [late.userId], /expired or not valid/);
    expectCookieCleared(a, late);

    skewMs = 590_000;
    scriptTokens();
    expectReturned(await finish(inTime, newCode()), { status: "connected", integration: "gmail" });
    expect((await vault.grpcClient.listConnections({ userId: inTime.userId })).connections).toHaveLength(1);
  });

  it("a replayed callback (same cookie, state and code): 400, one exchange, one Store", async () => {
    const flow = await connect("gmail");
    const { access } = scriptTokens();
    const code = newCode();
    const before = tokenCalls();
    expectReturned(await finish(flow, code), { status: "connected", integration: "gmail" });
    expect(tokenCalls()).toBe(before + 1);
    for (const again of [code, newCode()]) {
      const a = await finish(flow, again);
      expectPage(a, 400, /used already/);
      expectCookieCleared(a, flow);
    }
    expect(tokenCalls(), "the replay did not reach the provider").toBe(before + 1);
    expect(await storeEvents(flow.userId)).toBe(1);
    const got = await vault.grpcClient.get({ userId: flow.userId, integration: "gmail", refresh: RefreshMode.NEVER });
    expect(got.accessToken).toBe(access);
  });

  it("a flow of one integration finished at another's callback", async () => {
    const flow = await connect("gmail");
    const before = tokenCalls();
    const a = await callback(flow, "google-calendar", { code: newCode(), state: flow.state }, flow.cookie);
    await expectRefusedCallback(a, before, [flow.userId], /does not belong to this integration/);
  });

  it("a flow whose return URL left the allow-list since it started (a replica with a narrower list, same keys)", async () => {
    const shared = generateTicketKey("shared");
    const wide = await sidecar({ ticketKeys: shared });
    const narrow = await sidecar({ ticketKeys: shared, returnUrls: [otherReturnUrl] });
    const flow = await connect("gmail", { sidecar: wide });
    const before = tokenCalls();
    const a = await callback(narrow, "gmail", { code: newCode(), state: flow.state }, flow.cookie);
    await expectRefusedCallback(a, before, [flow.userId], /no longer one this service may send you to/);
  });

  it("a flow started at one replica finishes at another with the same keys", async () => {
    const shared = generateTicketKey("shared");
    const one = await sidecar({ ticketKeys: shared });
    const two = await sidecar({ ticketKeys: shared });
    const flow = await connect("gmail", { sidecar: one });
    scriptTokens();
    const before = tokenCalls();
    expectReturned(await callback(two, "gmail", { code: newCode(), state: flow.state }, flow.cookie), { status: "connected", integration: "gmail" });
    // (each test replica has its own localhost origin; real replicas share TOKENVAULT_SIDECAR_PUBLIC_URL)
    expect(sha256url(exchangeSince(before).form.code_verifier!)).toBe(flow.authorize.searchParams.get("code_challenge"));
    expect((await vault.grpcClient.listConnections({ userId: flow.userId })).connections).toHaveLength(1);
  });
});

// ---------------------------------------------------------------------------
// 4. Outcomes sent back to the app
// ---------------------------------------------------------------------------

describe("/callback sends outcomes back to the return URL", () => {
  it("the user declined: status=denied&reason=access_denied, without the provider's description, and no replay", async () => {
    const flow = await connect("gmail");
    const before = tokenCalls();
    const description = token("description");
    const a = await callback(flow, "gmail", { error: "access_denied", error_description: description, state: flow.state }, flow.cookie);
    expectReturned(a, { status: "denied", integration: "gmail", reason: "access_denied" });
    expect(a.location).not.toContain(description);
    expectCookieCleared(a, flow);
    expect(tokenCalls()).toBe(before);
    await expectNothingStored(flow.userId);
    expectPage(await callback(flow, "gmail", { error: "access_denied", state: flow.state }, flow.cookie), 400);
  });

  it.each([
    ["server_error", "server_error"],
    ["temporarily_unavailable", "temporarily_unavailable"],
    ["invalid_scope", "invalid_scope"],
    ["<script>alert(1)</script>", "provider_error"],
    ["x".repeat(65), "provider_error"],
  ])("another provider error %j: status=error&reason=%s", async (error, reason) => {
    const flow = await connect("gmail");
    const before = tokenCalls();
    const a = await callback(flow, "gmail", { error, state: flow.state, code: newCode() }, flow.cookie);
    expectReturned(a, { status: "error", integration: "gmail", reason });
    expectCookieCleared(a, flow);
    expect(tokenCalls()).toBe(before);
    await expectNothingStored(flow.userId);
  });

  it.each([
    ["no code parameter", undefined],
    ["an empty code", ""],
  ])("%s: status=error&reason=missing_code", async (_what, code) => {
    const flow = await connect("gmail");
    const before = tokenCalls();
    const a = await callback(flow, "gmail", { state: flow.state, ...(code === undefined ? {} : { code }) }, flow.cookie);
    expectReturned(a, { status: "error", integration: "gmail", reason: "missing_code" });
    expectCookieCleared(a, flow);
    expect(tokenCalls()).toBe(before);
    await expectNothingStored(flow.userId);
  });

  it.each([
    ["500", "provider_unavailable", reply.status(500)],
    ["503 with Retry-After", "provider_unavailable", reply.status(503, { "retry-after": "30" })],
    ["429", "provider_unavailable", reply.tooManyRequests("10")],
    ["a connection reset", "provider_unavailable", reply.reset()],
    ["malformed JSON", "provider_unavailable", reply.malformedJson()],
    ["200 without access_token", "provider_unavailable", reply.withoutAccessToken()],
    ["invalid_grant", "code_rejected", reply.invalidGrant()],
    ["invalid_client", "provider_misconfigured", reply.invalidClient()],
    ["unauthorized_client", "provider_misconfigured", reply.error("unauthorized_client")],
  ] as const)("the token endpoint answers %s: status=error&reason=%s, nothing stored", async (_what, reason, answer) => {
    const flow = await connect("gmail");
    endpoint.script(answer);
    const before = tokenCalls();
    const a = await finish(flow, newCode());
    expectReturned(a, { status: "error", integration: "gmail", reason });
    expectCookieCleared(a, flow);
    exchangeSince(before);
    await expectNothingStored(flow.userId);
  });

  it("the token endpoint hangs past providerTimeoutMs: provider_unavailable in time", async () => {
    const impatient = await sidecar({ providerTimeoutMs: 400 });
    const flow = await connect("gmail", { sidecar: impatient });
    endpoint.script(reply.hang());
    const before = tokenCalls();
    const started = Date.now();
    const a = await finish(flow, newCode());
    const took = Date.now() - started;
    expectReturned(a, { status: "error", integration: "gmail", reason: "provider_unavailable" });
    expect(took).toBeGreaterThanOrEqual(350);
    expect(took).toBeLessThan(4_000);
    const req = exchangeSince(before);
    // the sidecar hung up on the provider
    for (let i = 0; i < 100 && req.closedAt === undefined; i++) await new Promise((r) => setTimeout(r, 20));
    expect(req.closedAt).toBeDefined();
    await expectNothingStored(flow.userId);
  });

  it("the vault is down: status=error&reason=vault_unavailable, nothing stored, /readyz 503", async () => {
    const down = await sidecar({ vaultUrl: `http://127.0.0.1:${await closedPort()}`, vaultTimeoutMs: 2_000 });
    const flow = await connect("gmail", { sidecar: down });
    scriptTokens();
    const before = tokenCalls();
    const a = await finish(flow, newCode());
    expectReturned(a, { status: "error", integration: "gmail", reason: "vault_unavailable" });
    expectCookieCleared(a, flow);
    exchangeSince(before);
    await expectNothingStored(flow.userId);

    const ready = await browse(`${down.url}/readyz`);
    expect(ready.status).toBe(503);
    expect(ready.body).toBe("the vault is not reachable\n");
    expectSecurityHeaders(ready);
    expect((await browse(`${down.url}/healthz`)).status).toBe(200);
  });

  it("the sidecar's caller may not Store: vault_refused; a wrong caller secret: vault_refused", async () => {
    const readOnly = await vault.addCaller(`reader-${randomBytes(3).toString("hex")}`, { allow: ["Get", "ListConnections"], integrations: ["*"] });
    keep(readOnly.secret);
    const secretLess = keep(`tv_${randomBytes(24).toString("base64url")}`);
    for (const secret of [readOnly.secret, secretLess]) {
      const refusedSidecar = await sidecar({ callerSecret: secret });
      const flow = await connect("gmail", { sidecar: refusedSidecar });
      scriptTokens();
      const before = tokenCalls();
      const a = await finish(flow, newCode());
      expectReturned(a, { status: "error", integration: "gmail", reason: "vault_refused" });
      exchangeSince(before);
      await expectNothingStored(flow.userId);
    }
  });

  it("a caller allowed Store for other integrations only: vault_refused", async () => {
    const narrow = await vault.addCaller(`sidecar-cal-${randomBytes(3).toString("hex")}`, { allow: ["Store"], integrations: ["google-calendar"] });
    keep(narrow.secret);
    const s = await sidecar({ callerSecret: narrow.secret });
    const flow = await connect("gmail", { sidecar: s });
    scriptTokens();
    expectReturned(await finish(flow, newCode()), { status: "error", integration: "gmail", reason: "vault_refused" });
    await expectNothingStored(flow.userId);
  });

  it("a token set the vault refuses (access token over 16 KiB): token_rejected, nothing stored", async () => {
    const flow = await connect("gmail");
    const huge = keep(`${secretMarker}-huge-${"x".repeat(17 * 1024)}`);
    endpoint.script(reply.success({ access_token: huge, expires_in: 3600 }));
    expectReturned(await finish(flow, newCode()), { status: "error", integration: "gmail", reason: "token_rejected" });
    await expectNothingStored(flow.userId);
  });
});

describe("health, readiness and methods", () => {
  it("/healthz 200, /readyz 200 with the vault up", async () => {
    const health = await browse(`${sc.url}/healthz`);
    expect(health.status).toBe(200);
    expect(health.body).toBe("ok\n");
    expect(health.headers.get("content-type")).toMatch(/^text\/plain/);
    expectSecurityHeaders(health);
    const ready = await browse(`${sc.url}/readyz`);
    expect(ready.status).toBe(200);
    expect(ready.body).toBe("ready\n");
  });

  it("POST, HEAD and others are 405 with Allow: GET, and do not use the ticket up", async () => {
    const userId = newUser();
    const ticket = keep(await sc.mint({ userId, integration: "gmail" }));
    for (const method of ["POST", "HEAD", "PUT", "DELETE", "OPTIONS"]) {
      const a = await browse(sc.connectUrl("gmail", ticket), { method });
      expect(a.status, method).toBe(405);
      expect(a.headers.get("allow")).toBe("GET");
      expect(a.setCookies).toEqual([]);
      expect(a.location).toBeNull();
      expectSecurityHeaders(a);
    }
    expect((await browse(`${sc.url}/healthz`, { method: "POST" })).status).toBe(405);
    const a = await browse(`${sc.url}/callback/gmail?code=x&state=${"a".repeat(43)}`, { method: "POST" });
    expect(a.status).toBe(405);
    const ok = await browse(sc.connectUrl("gmail", ticket));
    expect(ok.status).toBe(302);
    states.add(new URL(ok.location!).searchParams.get("state")!);
    await expectNothingStored(userId);
  });
});

// ---------------------------------------------------------------------------
// 5. Leaks (last: covers every request of this file)
// ---------------------------------------------------------------------------

describe("leaks", () => {
  it("no token, code, ticket, verifier, secret, cookie or state in any sidecar log line, page or return redirect", () => {
    expect(secrets.size).toBeGreaterThan(50);
    expect(states.size).toBeGreaterThan(20);
    const everything = [...secrets, ...states];
    const logLines = sidecars.flatMap((s) => s.logs.lines);
    expect(logLines.length).toBeGreaterThan(50);
    for (const s of sidecars) expect(s.logs.leaks(everything)).toEqual([]);
    // the verifier's challenge is not in the logs either
    const challenges = providerLocations.map((l) => new URL(l).searchParams.get("code_challenge")).filter((c): c is string => c !== null);
    expect(logLines.filter((l) => challenges.some((c) => l.includes(c)))).toEqual([]);
    // query strings never reach a log line
    expect(logLines.filter((l) => /[?&](ticket|code|state)=/.test(l))).toEqual([]);

    // pages and return redirects: nothing at all
    const leaked = otherOutput.filter((o) => o.includes(secretMarker) || everything.some((s) => s !== "" && o.includes(s)));
    expect(leaked).toEqual([]);

    // the provider's Location: state and challenge, nothing else secret
    expect(providerLocations.length).toBeGreaterThan(20);
    const inProvider = providerLocations.filter((o) => o.includes(secretMarker) || [...secrets].some((s) => o.includes(s)));
    expect(inProvider).toEqual([]);

    // the vault's logs carry no token either
    expect(vault.logs.leaks([...secrets])).toEqual([]);
  });
});
