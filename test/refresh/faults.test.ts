/**
 * Refresh on Get when the provider misbehaves, through the real server on
 * listen(0), real Connect clients, a real PostgreSQL, and a token endpoint of
 * our own (test/helpers/token-endpoint.ts) that the catalogue's override file
 * points the vault at.
 *
 * After every failure the stored token set is unchanged: the sealed columns
 * (and, except for needs-reauth, the generation) stay as they were, and Get
 * with refresh NEVER and include_refresh_token returns the same tokens.
 *
 * 1. Transient faults (hang past the timeout, connection reset, 500, 502, 503,
 *    malformed JSON, 200 without access_token): a still-valid old token is
 *    returned (refreshed=false); an expired one is UNAVAILABLE with reason
 *    PROVIDER_UNAVAILABLE. Per-connection backoff: the next Get does not call
 *    the provider; refresh_retry_at grows exponentially from the base and is
 *    capped; once it passes the provider is called again; a success clears it.
 * 2. 429 (and 503) with Retry-After, as seconds or an HTTP-date: no attempt
 *    before it.
 * 3. invalid_grant (and GitHub's bad_refresh_token on a 200): NEEDS_REAUTH,
 *    status needs_reauth, later Gets fail at once; a new Store clears it.
 * 4. Misconfiguration: an integration missing from the catalogue, a provider
 *    without client secret, invalid_client from the provider:
 *    PROVIDER_NOT_CONFIGURED naming what to set.
 * 5. Rotation safety: no refresh_token in the answer keeps the old one; a new
 *    one replaces it; refresh_token_expires_in is kept and shown.
 * 6. Request shapes: Google (client_secret_post, no scope), Microsoft (tenant
 *    URL, scope with offline_access), a client_secret_basic provider.
 * 7. The provider call is bounded by the timeout and by the caller's deadline.
 * 8. Revocation on Remove and ClearUser (RFC 7009).
 * 9. Audit: one refresh/refresh_failed event per provider attempt beside the
 *    get event; backed-off Gets write only theirs. No token or client secret
 *    in any error, log line or audit row.
 */
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import pg from "pg";
import { Code, ConnectError, type CallOptions, type Client } from "@connectrpc/connect";
import { durationFromMs, timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  ConnectionStatus,
  ErrorDetailSchema,
  ErrorReason,
  RefreshMode,
  RevocationStatus,
  type GetResponse,
  type TokenVaultService,
} from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import type { KeyRing } from "../../src/crypto/key-ring.js";
import { loadCatalogue, type ProviderSettings } from "../../src/providers/catalogue.js";
import type { RefreshSettings } from "../../src/refresh/refresher.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { encodings, secretMarker, secretToken, testKeyRing } from "../helpers/secrets.js";
import { startVault, type TestVault } from "../helpers/server.js";
import { reply, startTokenEndpoint, type RecordedRequest, type Reply, type TokenEndpoint } from "../helpers/token-endpoint.js";

type VaultClient = Client<typeof TokenVaultService>;

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/** Every token and client secret of this file: none may reach an error, a log line or an audit row. */
const used: string[] = [];
const token = (kind: string): string => {
  const t = secretToken(kind);
  used.push(t);
  return t;
};

const google = { clientId: "google-client-1234.apps.example", clientSecret: token("google-client-secret") };
const microsoft = { clientId: "ms-client-5678", clientSecret: token("ms-client-secret") };
/** Characters that form-encoding must escape, in both parts, to prove RFC 6749 §2.3.1 encoding. */
const basic = { clientId: "basic client:id/1", clientSecret: `${token("basic-client-secret")} +:/&=%` };
used.push(basic.clientSecret);

const googleScope = "https://www.googleapis.com/auth/gmail.readonly";
const outlookScopes = ["https://graph.microsoft.com/Mail.Read", "offline_access"];

let db: TestDatabase;
let keyRing: KeyRing;
let endpoint: TokenEndpoint;
let dir: string;
const vaults: TestVault[] = [];
/** Every error message (and error metadata) a caller received in this file. */
const errorTexts: string[] = [];

/** Writes a catalogue override pointing google, microsoft and a client_secret_basic provider at `base`. */
function overrideFile(name: string, base: string, revokeBase = base): string {
  const file = path.join(dir, `${name}.json`);
  writeFileSync(
    file,
    JSON.stringify({
      providers: {
        google: { tokenUrl: `${base}/token`, revocationUrl: `${revokeBase}/google/revoke` },
        // keeps the {tenant} placeholder, filled from the provider's settings
        microsoft: { tokenUrl: `${base}/{tenant}/oauth2/v2.0/token` },
        basicco: {
          authorizationUrl: `${base}/basic/authorize`,
          tokenUrl: `${base}/basic/token`,
          revocationUrl: `${revokeBase}/basic/revoke`,
          tokenEndpointAuthMethod: "client_secret_basic",
          scopeSeparator: " ",
          pkce: false,
          authorizationParams: {},
          requiredScopes: [],
          refreshSendsScope: false,
          refreshTokenRotates: false,
        },
      },
      integrations: { "basic-app": { provider: "basicco", scopes: ["read"] } },
    }),
  );
  return file;
}

/** Settings as TOKENVAULT_PROVIDER_<NAME>_* would give them; `omit` leaves parts out. */
function settingsFor(omit: { googleSecret?: boolean } = {}): (provider: string) => ProviderSettings {
  return (provider) => {
    switch (provider) {
      case "google":
        return { clientId: google.clientId, clientSecret: omit.googleSecret ? undefined : google.clientSecret };
      case "microsoft":
        return { clientId: microsoft.clientId, clientSecret: microsoft.clientSecret, params: { tenant: "contoso" } };
      case "basicco":
        return { clientId: basic.clientId, clientSecret: basic.clientSecret };
      default:
        return {};
    }
  };
}

async function vaultWith(options: { file: string; refresh: Partial<RefreshSettings>; omitGoogleSecret?: boolean }): Promise<TestVault> {
  const catalogue = loadCatalogue({ overrideFile: options.file, settings: settingsFor({ googleSecret: options.omitGoogleSecret }) });
  const vault = await startVault({ pool: db.pool, keyRing, catalogue, refresh: options.refresh });
  vaults.push(vault);
  used.push(vault.secret);
  return vault;
}

/** The provider timeout of the vaults below: long enough for a loaded machine, short enough to wait out a hang. */
const providerTimeoutMs = 1_500;

/** The main vault: 1.5 s provider timeout, 1 s backoff base, 8 s cap. */
let vault: TestVault;
let client: VaultClient;

beforeAll(async () => {
  db = await createTestDatabase();
  keyRing = testKeyRing("k1");
  endpoint = await startTokenEndpoint();
  dir = mkdtempSync(path.join(tmpdir(), "tokenvault-faults-"));
  vault = await vaultWith({
    file: overrideFile("main", endpoint.baseUrl),
    refresh: { providerTimeoutMs, backoffBaseMs: 1_000, backoffMaxMs: 8_000 },
  });
  client = vault.grpcClient;
});

afterAll(async () => {
  for (const v of vaults) await v.close();
  await endpoint?.close();
  if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  await db?.drop();
});

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

let sequence = 0;
const newUser = (label: string): string => `${label}-${++sequence}-${randomBytes(3).toString("hex")}`;
const newRequestId = (label: string): string => `${label}.${randomBytes(6).toString("hex")}`;

interface Stored {
  userId: string;
  integration: string;
  accessToken: string;
  refreshToken: string | undefined;
}

/**
 * Stores a connection whose access token expires at `expiresAt` (default: in
 * 2 minutes, inside the default min_valid_for of 5 minutes, so Get refreshes).
 */
async function store(
  integration: string,
  options: { userId?: string; expiresAt?: Date | null; refresh?: boolean; scopes?: string[]; via?: VaultClient } = {},
): Promise<Stored> {
  const userId = options.userId ?? newUser(integration);
  const accessToken = token("access");
  const refreshToken = options.refresh === false ? undefined : token("refresh");
  const expiresAt = options.expiresAt === undefined ? new Date(Date.now() + 120_000) : options.expiresAt;
  await (options.via ?? client).store({
    userId,
    integration,
    tokenSet: {
      accessToken,
      refreshToken,
      scopes: options.scopes ?? (integration === "outlook" ? outlookScopes : integration === "gmail" ? [googleScope] : ["read"]),
      expiry: expiresAt === null ? { case: undefined } : { case: "expiresAt", value: timestampFromDate(expiresAt) },
    },
  });
  return { userId, integration, accessToken, refreshToken };
}

const expired = (): Date => new Date(Date.now() - 60_000);

/** A Get under our own request id. */
async function get(
  c: Stored,
  options: { via?: VaultClient; requestId?: string; callOptions?: CallOptions; minValidForMs?: number } = {},
): Promise<GetResponse> {
  return (options.via ?? client).get(
    {
      userId: c.userId,
      integration: c.integration,
      ...(options.minValidForMs === undefined ? {} : { minValidFor: durationFromMs(options.minValidForMs) }),
    },
    { ...options.callOptions, headers: { "x-request-id": options.requestId ?? newRequestId("get") } },
  );
}

/** The stored tokens as they are, without refreshing (refresh NEVER, include_refresh_token). */
async function peek(c: Stored, via: VaultClient = client): Promise<{ accessToken: string; refreshToken: string | undefined }> {
  const res = await via.get({ userId: c.userId, integration: c.integration, refresh: RefreshMode.NEVER, includeRefreshToken: true });
  return { accessToken: res.accessToken, refreshToken: res.refreshToken };
}

/** The ConnectError `call` fails with; its message and metadata are kept for the leak scan. */
async function failure(call: Promise<unknown>): Promise<ConnectError> {
  try {
    await call;
  } catch (err) {
    const e = ConnectError.from(err);
    errorTexts.push(e.message, e.rawMessage, JSON.stringify([...e.metadata.entries()]));
    return e;
  }
  throw new Error("expected the call to fail");
}

function reasonOf(err: ConnectError): ErrorReason | undefined {
  return err.findDetails(ErrorDetailSchema)[0]?.reason;
}

interface Row {
  id: string;
  key_id: string;
  access_token_sealed: Buffer;
  refresh_token_sealed: Buffer | null;
  id_token_sealed: Buffer | null;
  extras_sealed: Buffer | null;
  generation: string;
  status: string;
  expires_at: Date | null;
  refresh_failures: number;
  refresh_retry_at: Date | null;
  refresh_token_expires_at: Date | null;
  last_refreshed_at: Date | null;
}

async function row(c: Stored): Promise<Row | undefined> {
  const result = await db.pool.query<Row>(
    `select id, key_id, access_token_sealed, refresh_token_sealed, id_token_sealed, extras_sealed, generation, status,
       expires_at, refresh_failures, refresh_retry_at, refresh_token_expires_at, last_refreshed_at
     from connections where user_id = $1 and integration = $2`,
    [c.userId, c.integration],
  );
  return result.rows[0];
}

/** The sealed columns (and key id) of a row, comparable with toEqual. */
function sealed(r: Row | undefined): Record<string, string | null> {
  if (r === undefined) throw new Error("no row");
  const hex = (b: Buffer | null) => (b === null ? null : b.toString("hex"));
  return {
    key_id: r.key_id,
    access: hex(r.access_token_sealed),
    refresh: hex(r.refresh_token_sealed),
    id: hex(r.id_token_sealed),
    extras: hex(r.extras_sealed),
  };
}

/** Sealed columns and generation: what a failed refresh must not change. */
async function snapshot(c: Stored): Promise<{ sealed: Record<string, string | null>; generation: string }> {
  const r = await row(c);
  return { sealed: sealed(r), generation: r!.generation };
}

interface EventRow {
  action: string;
  outcome: string;
  user_id: string | null;
  integration: string | null;
  details: Record<string, unknown>;
}

/** The audit events of one call, in order. */
async function events(requestId: string): Promise<EventRow[]> {
  const result = await db.pool.query<EventRow>(
    "select action, outcome, user_id, integration, details from audit_events where request_id = $1 order by id",
    [requestId],
  );
  return result.rows;
}

const tokenCalls = (): number => endpoint.tokenRequests().length;
const lastTokenRequest = (): RecordedRequest => endpoint.tokenRequests().at(-1)!;

async function until(condition: () => boolean | Promise<boolean>, what: string, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** Waits until the row's backoff has passed. */
async function backoffPassed(c: Stored): Promise<void> {
  const r = await row(c);
  if (r?.refresh_retry_at) {
    const wait = r.refresh_retry_at.getTime() - Date.now();
    if (wait > 0) await sleep(wait + 25);
  }
}

// ---------------------------------------------------------------------------
// 1. Transient faults
// ---------------------------------------------------------------------------

const transientFaults: { name: string; reply: () => Reply; reason: RegExp }[] = [
  { name: "a hang longer than the provider timeout", reply: reply.hang, reason: /timeout/ },
  { name: "a connection reset", reply: reply.reset, reason: /connection/ },
  { name: "HTTP 500", reply: () => reply.status(500), reason: /500/ },
  { name: "HTTP 502", reply: () => reply.status(502), reason: /502/ },
  { name: "HTTP 503", reply: () => reply.status(503), reason: /503/ },
  { name: "malformed JSON on a 200", reply: reply.malformedJson, reason: /malformed/ },
  { name: "a 200 without access_token", reply: reply.withoutAccessToken, reason: /access_token/ },
];

describe("transient provider faults", () => {
  describe.each(transientFaults)("$name", (fault) => {
    it("returns the still-valid old token (refreshed=false), changes nothing stored, and backs off", async () => {
      const c = await store("gmail");
      const before = await snapshot(c);
      endpoint.script(fault.reply());
      const calls = tokenCalls();
      const t0 = Date.now();

      const requestId = newRequestId("transient-valid");
      const res = await get(c, { requestId });
      expect(res.accessToken).toBe(c.accessToken);
      expect(res.refreshed).toBe(false);
      expect(tokenCalls()).toBe(calls + 1);

      const after = await row(c);
      expect({ sealed: sealed(after), generation: after!.generation }).toEqual(before);
      expect(after!.refresh_failures).toBe(1);
      expect(after!.refresh_retry_at!.getTime()).toBeGreaterThanOrEqual(t0 + 1_000);
      expect(await peek(c)).toEqual({ accessToken: c.accessToken, refreshToken: c.refreshToken });

      const recorded = await events(requestId);
      expect(recorded.map((e) => [e.action, e.outcome])).toEqual([["refresh_failed", "unavailable"], ["get", "ok"]]);
      expect(recorded[0]).toMatchObject({ user_id: c.userId, integration: "gmail", details: { provider: "google", failures: 1, served_old_token: true } });
      expect(String(recorded[0]!.details.reason)).toMatch(fault.reason);

      // Backing off: the next Get does not call the provider and writes only its get event.
      const again = newRequestId("transient-valid-again");
      const res2 = await get(c, { requestId: again });
      expect(res2.accessToken).toBe(c.accessToken);
      expect(res2.refreshed).toBe(false);
      expect(tokenCalls()).toBe(calls + 1);
      expect((await events(again)).map((e) => e.action)).toEqual(["get"]);
      expect(endpoint.unscripted()).toEqual([]);
    });

    it("fails an expired token UNAVAILABLE with reason PROVIDER_UNAVAILABLE, changes nothing stored, and backs off", async () => {
      const c = await store("gmail", { expiresAt: expired() });
      const before = await snapshot(c);
      endpoint.script(fault.reply());
      const calls = tokenCalls();

      const requestId = newRequestId("transient-expired");
      const err = await failure(get(c, { requestId }));
      expect(err.code).toBe(Code.Unavailable);
      expect(reasonOf(err)).toBe(ErrorReason.PROVIDER_UNAVAILABLE);
      expect(Number(err.metadata.get("retry-after"))).toBeGreaterThanOrEqual(1);
      expect(tokenCalls()).toBe(calls + 1);

      const after = await row(c);
      expect({ sealed: sealed(after), generation: after!.generation }).toEqual(before);
      expect(after!.refresh_failures).toBe(1);
      expect(await peek(c)).toEqual({ accessToken: c.accessToken, refreshToken: c.refreshToken });

      const recorded = await events(requestId);
      expect(recorded.map((e) => [e.action, e.outcome])).toEqual([["refresh_failed", "unavailable"], ["get", "unavailable"]]);
      expect(recorded[0]!.details).toMatchObject({ provider: "google", failures: 1, served_old_token: false });

      const again = newRequestId("transient-expired-again");
      const err2 = await failure(get(c, { requestId: again }));
      expect(err2.code).toBe(Code.Unavailable);
      expect(reasonOf(err2)).toBe(ErrorReason.PROVIDER_UNAVAILABLE);
      expect(tokenCalls()).toBe(calls + 1);
      expect((await events(again)).map((e) => [e.action, e.outcome])).toEqual([["get", "unavailable"]]);
      expect(endpoint.unscripted()).toEqual([]);
    });
  });

  it("backs off exponentially from the base, capped, calls again once the backoff passed, and a success clears it", async () => {
    // 200 ms base, 800 ms cap: 200, 400, 800, 800 ...
    const fast = await vaultWith({
      file: overrideFile("fast", endpoint.baseUrl),
      refresh: { providerTimeoutMs, backoffBaseMs: 200, backoffMaxMs: 800 },
    });
    const c = await store("gmail", { expiresAt: expired(), via: fast.grpcClient });
    const before = await snapshot(c);
    const expected = [200, 400, 800, 800, 800];
    for (const [i, backoff] of expected.entries()) {
      await backoffPassed(c);
      endpoint.script(reply.status(503));
      const calls = tokenCalls();
      const t0 = Date.now();
      const err = await failure(get(c, { via: fast.grpcClient }));
      const t1 = Date.now();
      expect(err.code).toBe(Code.Unavailable);
      expect(tokenCalls()).toBe(calls + 1);
      const r = (await row(c))!;
      expect(r.refresh_failures).toBe(i + 1);
      // retry_at = (when the provider answered) + backoff, and that moment lies in [t0, t1].
      expect(r.refresh_retry_at!.getTime()).toBeGreaterThanOrEqual(t0 + backoff);
      expect(r.refresh_retry_at!.getTime()).toBeLessThanOrEqual(t1 + backoff);
      expect({ sealed: sealed(r), generation: r.generation }).toEqual(before);
    }

    await backoffPassed(c);
    const fresh = token("access");
    endpoint.script(reply.success({ access_token: fresh, expires_in: 3600 }));
    const calls = tokenCalls();
    const res = await get(c, { via: fast.grpcClient });
    expect(tokenCalls()).toBe(calls + 1);
    expect(res.refreshed).toBe(true);
    expect(res.accessToken).toBe(fresh);
    const r = (await row(c))!;
    expect(r.refresh_failures).toBe(0);
    expect(r.refresh_retry_at).toBeNull();
    expect(r.last_refreshed_at).not.toBeNull();
    expect(endpoint.unscripted()).toEqual([]);
  });
});

describe("without a refresh token", () => {
  it("an expired token is NEEDS_REAUTH at once, without the provider; a still-valid one is served as it is", async () => {
    const dead = await store("gmail", { expiresAt: expired(), refresh: false });
    const calls = endpoint.requests.length;
    const requestId = newRequestId("no-refresh");
    const err = await failure(get(dead, { requestId }));
    expect(err.code).toBe(Code.FailedPrecondition);
    expect(reasonOf(err)).toBe(ErrorReason.NEEDS_REAUTH);
    expect((await events(requestId)).map((e) => e.action)).toEqual(["get"]);

    const alive = await store("gmail", { refresh: false });
    const res = await get(alive);
    expect(res).toMatchObject({ accessToken: alive.accessToken, refreshed: false });
    expect(endpoint.requests.length).toBe(calls);
  });
});

describe("concurrent Gets in one process", () => {
  it("share one provider call: one refresh event, every caller gets the new token", async () => {
    const c = await store("gmail", { expiresAt: expired() });
    const fresh = token("access");
    endpoint.script(reply.delayed(300, reply.success({ access_token: fresh, expires_in: 3600 })));
    const calls = tokenCalls();
    const ids = Array.from({ length: 5 }, () => newRequestId("flight"));
    const results = await Promise.all(ids.map((requestId) => get(c, { requestId })));
    expect(tokenCalls()).toBe(calls + 1);
    // Every caller gets the new token. (`refreshed` is not asserted for all: a Get that reads the
    // row only after the refresh committed gets the new token as stored, and says false.)
    for (const res of results) expect(res.accessToken).toBe(fresh);
    expect(results.some((res) => res.refreshed)).toBe(true);
    const all = (await Promise.all(ids.map(events))).flat();
    expect(all.filter((e) => e.action === "refresh")).toHaveLength(1);
    expect(all.filter((e) => e.action === "get")).toHaveLength(5);
    expect(all).toHaveLength(6);
  });

  it("share one failing provider call: one refresh_failed event, every caller UNAVAILABLE", async () => {
    const c = await store("gmail", { expiresAt: expired() });
    endpoint.script(reply.delayed(300, reply.status(503)));
    const calls = tokenCalls();
    const ids = Array.from({ length: 5 }, () => newRequestId("flight-fail"));
    const errors = await Promise.all(ids.map((requestId) => failure(get(c, { requestId }))));
    expect(tokenCalls()).toBe(calls + 1);
    for (const err of errors) {
      expect(err.code).toBe(Code.Unavailable);
      expect(reasonOf(err)).toBe(ErrorReason.PROVIDER_UNAVAILABLE);
    }
    const all = (await Promise.all(ids.map(events))).flat();
    expect(all.filter((e) => e.action === "refresh_failed")).toHaveLength(1);
    expect(all.filter((e) => e.action === "get")).toHaveLength(5);
    expect((await row(c))!.refresh_failures).toBe(1);
  });
});

describe("while a refresh is in flight", () => {
  /** A vault on a pool of its own with 3 connections and a 60 s provider timeout. */
  let slow: TestVault;
  let smallPool: pg.Pool;

  beforeAll(async () => {
    smallPool = new pg.Pool({ connectionString: db.url, max: 3 });
    const catalogue = loadCatalogue({ overrideFile: overrideFile("in-flight", endpoint.baseUrl), settings: settingsFor() });
    slow = await startVault({ pool: smallPool, keyRing, catalogue, refresh: { providerTimeoutMs: 60_000, backoffBaseMs: 1_000 } });
    used.push(slow.secret);
  });

  afterAll(async () => {
    await slow?.close();
    await smallPool?.end();
    expect(slow.logs.leaks(used.flatMap(encodings))).toEqual([]);
  });

  /** Starts a Get that refreshes `c` against a provider answering after `ms`; resolves once the provider has the request. */
  async function refreshInFlight(c: Stored, ms: number): Promise<{ request: RecordedRequest; done: Promise<unknown> }> {
    const before = endpoint.requests.length;
    endpoint.script(reply.delayed(ms, reply.success({ access_token: token("access"), expires_in: 3600 })));
    const done = get(c, { via: slow.grpcClient }).catch((err: unknown) => err);
    await endpoint.waitForRequests(before + 1);
    return { request: endpoint.requests[before]!, done };
  }

  /** How many sessions on the test database wait for a lock. */
  async function lockWaiters(): Promise<number> {
    const result = await db.pool.query<{ n: number }>(
      "select count(*)::int as n from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'",
    );
    return result.rows[0]!.n;
  }

  // A Get never waits for the row lock a refresh holds during its provider call (the first
  // version did: its read was an UPDATE of last_used_at).
  it("a Get with refresh NEVER returns the stored token at once, without waiting for the provider", async () => {
    const c = await store("gmail", { via: slow.grpcClient });
    const { request, done } = await refreshInFlight(c, 4_000);
    const res = await slow.grpcClient.get({ userId: c.userId, integration: c.integration, refresh: RefreshMode.NEVER });
    const providerStillBusy = request.closedAt === undefined;
    await done;
    expect(res.accessToken).toBe(c.accessToken);
    expect(providerStillBusy).toBe(true);
  });

  it("Gets waiting for one connection's refresh neither wait on its lock nor hold up Gets of other connections", async () => {
    const hot = await store("gmail", { via: slow.grpcClient });
    const other = await store("gmail", { via: slow.grpcClient, expiresAt: new Date(Date.now() + 3_600_000) });
    const { request, done } = await refreshInFlight(hot, 4_000);
    // More Gets of the hot connection than the pool has connections.
    const waiting = Array.from({ length: 5 }, () => get(hot, { via: slow.grpcClient }));
    await sleep(500);
    expect(await lockWaiters()).toBe(0);
    const res = await get(other, { via: slow.grpcClient });
    const providerStillBusy = request.closedAt === undefined;
    const results = await Promise.all(waiting);
    await done;
    expect(res.accessToken).toBe(other.accessToken);
    expect(providerStillBusy).toBe(true);
    const fresh = (await peek(hot)).accessToken;
    expect(fresh).not.toBe(hot.accessToken);
    for (const r of results) expect(r).toMatchObject({ accessToken: fresh, refreshed: true });
  });
});

// ---------------------------------------------------------------------------
// 2. Retry-After
// ---------------------------------------------------------------------------

describe("429 and Retry-After", () => {
  it("waits at least Retry-After given in seconds", async () => {
    const c = await store("gmail", { expiresAt: expired() });
    endpoint.script(reply.tooManyRequests("30"));
    const t0 = Date.now();
    const err = await failure(get(c));
    const t1 = Date.now();
    expect(err.code).toBe(Code.Unavailable);
    expect(reasonOf(err)).toBe(ErrorReason.PROVIDER_UNAVAILABLE);
    expect(Number(err.metadata.get("retry-after"))).toBeGreaterThanOrEqual(29);
    const r = (await row(c))!;
    expect(r.refresh_retry_at!.getTime()).toBeGreaterThanOrEqual(t0 + 30_000);
    expect(r.refresh_retry_at!.getTime()).toBeLessThanOrEqual(t1 + 30_000);

    const calls = tokenCalls();
    expect((await failure(get(c))).code).toBe(Code.Unavailable);
    expect(tokenCalls()).toBe(calls);
  });

  it("waits at least Retry-After given as an HTTP-date", async () => {
    const c = await store("gmail", { expiresAt: expired() });
    const date = new Date(Date.now() + 90_000).toUTCString();
    endpoint.script(reply.tooManyRequests(date));
    const err = await failure(get(c));
    expect(err.code).toBe(Code.Unavailable);
    const r = (await row(c))!;
    expect(r.refresh_retry_at!.getTime()).toBeGreaterThanOrEqual(Date.parse(date));
    expect(r.refresh_retry_at!.getTime()).toBeLessThan(Date.parse(date) + 5_000);
  });

  it("honours Retry-After on a 503 too, and a Retry-After shorter than the backoff does not shorten it", async () => {
    const a = await store("gmail", { expiresAt: expired() });
    endpoint.script(reply.status(503, { "retry-after": "45" }));
    const t0 = Date.now();
    await failure(get(a));
    expect((await row(a))!.refresh_retry_at!.getTime()).toBeGreaterThanOrEqual(t0 + 45_000);

    const b = await store("gmail", { expiresAt: expired() });
    endpoint.script(reply.tooManyRequests("0"));
    const t1 = Date.now();
    await failure(get(b));
    expect((await row(b))!.refresh_retry_at!.getTime()).toBeGreaterThanOrEqual(t1 + 1_000);
  });

  // Regression (was a product bug, fixed in src/providers and src/refresh):
  it("a Retry-After too large for a date still backs off and serves the still-valid token", async () => {
    const c = await store("gmail");
    endpoint.script(reply.tooManyRequests("99999999999999999"));
    const res = await get(c);
    expect(res).toMatchObject({ accessToken: c.accessToken, refreshed: false });
    const r = (await row(c))!;
    expect(r.refresh_failures).toBe(1);
    expect(r.refresh_retry_at).not.toBeNull();
    const calls = tokenCalls();
    expect((await get(c)).accessToken).toBe(c.accessToken);
    expect(tokenCalls()).toBe(calls);
  });
});

// ---------------------------------------------------------------------------
// 3. invalid_grant
// ---------------------------------------------------------------------------

describe("a refused refresh token", () => {
  it.each([
    { name: "invalid_grant (400)", reply: reply.invalidGrant },
    { name: "bad_refresh_token on a 200 (GitHub)", reply: () => reply.error("bad_refresh_token", 200) },
  ])("$name: NEEDS_REAUTH, status needs_reauth, later Gets fail at once; a new Store clears it", async (refusal) => {
    const c = await store("gmail", { expiresAt: expired() });
    const before = await snapshot(c);
    endpoint.script(refusal.reply());
    const calls = tokenCalls();

    const requestId = newRequestId("reauth");
    const err = await failure(get(c, { requestId }));
    expect(err.code).toBe(Code.FailedPrecondition);
    expect(reasonOf(err)).toBe(ErrorReason.NEEDS_REAUTH);
    expect(tokenCalls()).toBe(calls + 1);
    const recorded = await events(requestId);
    expect(recorded.map((e) => [e.action, e.outcome])).toEqual([["refresh_failed", "failed_precondition"], ["get", "failed_precondition"]]);
    expect(recorded[0]!.details).toMatchObject({ provider: "google", needs_reauth: true });

    // Nothing sealed changed (the status change bumps the generation).
    expect(sealed(await row(c))).toEqual(before.sealed);
    const listed = await client.listConnections({ userId: c.userId });
    expect(listed.connections.map((x) => [x.integration, x.status])).toEqual([["gmail", ConnectionStatus.NEEDS_REAUTH]]);

    // The next Get fails at once, without the provider.
    const again = newRequestId("reauth-again");
    const err2 = await failure(get(c, { requestId: again }));
    expect(err2.code).toBe(Code.FailedPrecondition);
    expect(reasonOf(err2)).toBe(ErrorReason.NEEDS_REAUTH);
    expect(tokenCalls()).toBe(calls + 1);
    expect((await events(again)).map((e) => e.action)).toEqual(["get"]);

    // A new consent: Store makes it active, and its refresh token is the one used next.
    const renewed = await store("gmail", { userId: c.userId, expiresAt: expired() });
    expect((await client.listConnections({ userId: c.userId })).connections[0]!.status).toBe(ConnectionStatus.ACTIVE);
    const fresh = token("access");
    endpoint.script(reply.success({ access_token: fresh, expires_in: 3600 }));
    const res = await get(renewed);
    expect(res.accessToken).toBe(fresh);
    expect(lastTokenRequest().form.refresh_token).toBe(renewed.refreshToken);
  });
});

// ---------------------------------------------------------------------------
// 4. Misconfiguration
// ---------------------------------------------------------------------------

describe("misconfiguration", () => {
  it("an integration missing from the catalogue: PROVIDER_NOT_CONFIGURED naming it, without calling anything", async () => {
    const c = await store("acme");
    const before = await snapshot(c);
    const calls = endpoint.requests.length;
    const requestId = newRequestId("acme");
    const err = await failure(get(c, { requestId }));
    expect(err.code).toBe(Code.FailedPrecondition);
    expect(reasonOf(err)).toBe(ErrorReason.PROVIDER_NOT_CONFIGURED);
    expect(err.rawMessage).toContain('"acme"');
    expect(err.rawMessage).toContain("TOKENVAULT_PROVIDERS_FILE");
    expect(endpoint.requests.length).toBe(calls);
    expect(await snapshot(c)).toEqual(before);
    expect((await events(requestId)).map((e) => [e.action, e.outcome])).toEqual([["get", "failed_precondition"]]);

    // A token that needs no refresh is served without the catalogue.
    const fresh = await store("acme", { expiresAt: new Date(Date.now() + 3_600_000) });
    expect((await get(fresh)).accessToken).toBe(fresh.accessToken);
  });

  it("a provider without client secret: PROVIDER_NOT_CONFIGURED naming the variables to set", async () => {
    const noSecret = await vaultWith({
      file: overrideFile("no-secret", endpoint.baseUrl),
      refresh: { providerTimeoutMs, backoffBaseMs: 1_000 },
      omitGoogleSecret: true,
    });
    const c = await store("gmail", { via: noSecret.grpcClient });
    const before = await snapshot(c);
    const calls = endpoint.requests.length;
    const err = await failure(get(c, { via: noSecret.grpcClient }));
    expect(err.code).toBe(Code.FailedPrecondition);
    expect(reasonOf(err)).toBe(ErrorReason.PROVIDER_NOT_CONFIGURED);
    expect(err.rawMessage).toContain("TOKENVAULT_PROVIDER_GOOGLE_CLIENT_ID");
    expect(err.rawMessage).toContain("TOKENVAULT_PROVIDER_GOOGLE_CLIENT_SECRET");
    expect(endpoint.requests.length).toBe(calls);
    expect(await snapshot(c)).toEqual(before);
  });

  it.each([
    { name: "invalid_client (401)", reply: reply.invalidClient },
    { name: "unauthorized_client (400)", reply: () => reply.error("unauthorized_client") },
  ])("$name from the provider: PROVIDER_NOT_CONFIGURED, nothing stored changes", async (refusal) => {
    const c = await store("gmail", { expiresAt: expired() });
    const before = await snapshot(c);
    endpoint.script(refusal.reply());
    const calls = tokenCalls();
    const requestId = newRequestId("invalid-client");
    const err = await failure(get(c, { requestId }));
    expect(err.code).toBe(Code.FailedPrecondition);
    expect(reasonOf(err)).toBe(ErrorReason.PROVIDER_NOT_CONFIGURED);
    expect(err.rawMessage).toContain('"google"');
    expect(tokenCalls()).toBe(calls + 1);
    expect(await snapshot(c)).toEqual(before);
    expect((await row(c))!.status).toBe("active");
    const recorded = await events(requestId);
    expect(recorded.map((e) => [e.action, e.outcome])).toEqual([["refresh_failed", "failed_precondition"], ["get", "failed_precondition"]]);
    expect(await peek(c)).toEqual({ accessToken: c.accessToken, refreshToken: c.refreshToken });
  });
});

// ---------------------------------------------------------------------------
// 5. Rotation safety and refresh token expiry
// ---------------------------------------------------------------------------

describe("rotation safety", () => {
  it("an answer without refresh_token keeps the old refresh token", async () => {
    const c = await store("gmail");
    const before = await snapshot(c);
    const fresh = token("access");
    endpoint.script(reply.success({ access_token: fresh, expires_in: 3600 }));
    const requestId = newRequestId("keep");
    const res = await get(c, { requestId });
    expect(res.refreshed).toBe(true);
    expect(res.accessToken).toBe(fresh);
    expect(lastTokenRequest().form.refresh_token).toBe(c.refreshToken);
    expect(await peek(c)).toEqual({ accessToken: fresh, refreshToken: c.refreshToken });

    const r = (await row(c))!;
    expect(BigInt(r.generation)).toBe(BigInt(before.generation) + 1n);
    expect(r.refresh_failures).toBe(0);
    expect(r.last_refreshed_at).not.toBeNull();
    expect(timestampDate(res.expiresAt!).getTime()).toBeGreaterThan(Date.now() + 3_500_000);
    expect(res.connection!.lastRefreshedAt).toBeDefined();
    expect(res.connection!.hasRefreshToken).toBe(true);

    const recorded = await events(requestId);
    expect(recorded.map((e) => [e.action, e.outcome])).toEqual([["refresh", "ok"], ["get", "ok"]]);
    expect(recorded[0]!.details).toMatchObject({ provider: "google", refresh_token_rotated: false, expires_in: 3600 });
    expect(recorded[1]!.details).toMatchObject({ refreshed: true });
  });

  it("an answer with refresh_token replaces it, and the next refresh uses the new one", async () => {
    const c = await store("outlook");
    const rotated = token("refresh");
    const first = token("access");
    // 60 s: below the default min_valid_for, so the next Get refreshes again.
    endpoint.script(reply.success({ access_token: first, refresh_token: rotated, expires_in: 60 }));
    const res = await get(c);
    expect(res.accessToken).toBe(first);
    expect(await peek(c)).toEqual({ accessToken: first, refreshToken: rotated });

    const second = token("access");
    endpoint.script(reply.success({ access_token: second, expires_in: 3600 }));
    const res2 = await get(c);
    expect(res2.accessToken).toBe(second);
    expect(lastTokenRequest().form.refresh_token).toBe(rotated);
    expect(await peek(c)).toEqual({ accessToken: second, refreshToken: rotated });
  });

  it("keeps refresh_token_expires_in: ListConnections shows refresh_token_expires_at and refresh_token_expiring_soon", async () => {
    const soon = await store("outlook");
    const t0 = Date.now();
    endpoint.script(reply.success({ access_token: token("access"), refresh_token: token("refresh"), expires_in: 60, refresh_token_expires_in: 3 * 86_400 }));
    await get(soon);
    const t1 = Date.now();
    let [listed] = (await client.listConnections({ userId: soon.userId })).connections;
    const at = timestampDate(listed!.refreshTokenExpiresAt!).getTime();
    expect(at).toBeGreaterThanOrEqual(t0 + 3 * 86_400_000 - 1_000);
    expect(at).toBeLessThanOrEqual(t1 + 3 * 86_400_000 + 1_000);
    expect(listed!.refreshTokenExpiringSoon).toBe(true);
    expect(listed!.lastRefreshedAt).toBeDefined();

    // A later answer that says nothing about the refresh token keeps what is known of it.
    endpoint.script(reply.success({ access_token: token("access"), expires_in: 3600 }));
    expect((await get(soon)).refreshed).toBe(true);
    [listed] = (await client.listConnections({ userId: soon.userId })).connections;
    expect(timestampDate(listed!.refreshTokenExpiresAt!).getTime()).toBe(at);
    expect(listed!.refreshTokenExpiringSoon).toBe(true);

    const later = await store("outlook");
    endpoint.script(reply.success({ access_token: token("access"), refresh_token: token("refresh"), expires_in: 3600, refresh_token_expires_in: 30 * 86_400 }));
    await get(later);
    [listed] = (await client.listConnections({ userId: later.userId })).connections;
    expect(listed!.refreshTokenExpiresAt).toBeDefined();
    expect(listed!.refreshTokenExpiringSoon).toBe(false);

    // A new Store forgets it (a new consent, a new refresh token).
    await store("outlook", { userId: later.userId });
    [listed] = (await client.listConnections({ userId: later.userId })).connections;
    expect(listed!.refreshTokenExpiresAt).toBeUndefined();
    expect(listed!.refreshTokenExpiringSoon).toBe(false);
  });
});

// ---------------------------------------------------------------------------
// 6. Request shapes
// ---------------------------------------------------------------------------

/** Decodes one application/x-www-form-urlencoded component. */
const formDecode = (s: string): string => decodeURIComponent(s.replace(/\+/g, " "));

describe("refresh request shapes", () => {
  it("Google: POST form with grant_type, refresh_token, client_id, client_secret (client_secret_post) and no scope", async () => {
    const c = await store("gmail");
    endpoint.script(reply.success({ access_token: token("access"), expires_in: 3600 }));
    await get(c);
    const req = lastTokenRequest();
    expect(req.method).toBe("POST");
    expect(req.path).toBe("/token");
    expect(req.headers["content-type"]).toMatch(/^application\/x-www-form-urlencoded/);
    expect(req.headers.authorization).toBeUndefined();
    expect([...req.formKeys].sort()).toEqual(["client_id", "client_secret", "grant_type", "refresh_token"]);
    expect(req.form).toEqual({
      grant_type: "refresh_token",
      refresh_token: c.refreshToken,
      client_id: google.clientId,
      client_secret: google.clientSecret,
    });
  });

  it("Microsoft (outlook): POST to the tenant's URL with scope = the stored scopes, offline_access included", async () => {
    const c = await store("outlook", { scopes: outlookScopes });
    endpoint.script(reply.success({ access_token: token("access"), expires_in: 3600 }));
    await get(c);
    const req = lastTokenRequest();
    expect(req.method).toBe("POST");
    expect(req.path).toBe("/contoso/oauth2/v2.0/token");
    expect(req.form.scope).toBe(outlookScopes.join(" "));
    expect(req.form.scope!.split(" ")).toContain("offline_access");
    expect(req.form).toMatchObject({
      grant_type: "refresh_token",
      refresh_token: c.refreshToken,
      client_id: microsoft.clientId,
      client_secret: microsoft.clientSecret,
    });
  });

  it("client_secret_basic: an Authorization: Basic header of the form-encoded id:secret, no client_secret in the body", async () => {
    const c = await store("basic-app");
    endpoint.script(reply.success({ access_token: token("access"), expires_in: 3600 }));
    const res = await get(c);
    expect(res.refreshed).toBe(true);
    const req = lastTokenRequest();
    expect(req.path).toBe("/basic/token");
    const header = String(req.headers.authorization);
    expect(header).toMatch(/^Basic [A-Za-z0-9+/]+=*$/);
    const decoded = Buffer.from(header.slice("Basic ".length), "base64").toString("utf8");
    // The colon separates the parts only because each part's own colons are encoded.
    const [id, secret, ...rest] = decoded.split(":");
    expect(rest).toEqual([]);
    expect(formDecode(id!)).toBe(basic.clientId);
    expect(formDecode(secret!)).toBe(basic.clientSecret);
    expect(req.form.client_secret).toBeUndefined();
    expect(req.rawBody).not.toContain("client_secret");
    expect(req.form).toMatchObject({ grant_type: "refresh_token", refresh_token: c.refreshToken });
  });
});

// ---------------------------------------------------------------------------
// 7. The provider call is bounded
// ---------------------------------------------------------------------------

describe("bounded provider calls", () => {
  it("a hanging endpoint: Get ends after the provider timeout on the transient path", async () => {
    const c = await store("gmail", { expiresAt: expired() });
    endpoint.script(reply.hang());
    const started = Date.now();
    const err = await failure(get(c));
    expect(err.code).toBe(Code.Unavailable);
    expect(reasonOf(err)).toBe(ErrorReason.PROVIDER_UNAVAILABLE);
    // Generous slack: this only proves the call was cut, not how fast anything is.
    expect(Date.now() - started).toBeLessThan(providerTimeoutMs + 10_000);
    const req = lastTokenRequest();
    await until(() => req.closedAt !== undefined, "the vault to drop the hanging request");
  });

  it("a caller deadline shorter than the provider's answer: the caller gets DEADLINE_EXCEEDED, the refresh still commits", async () => {
    // Aborting the provider call at the caller's deadline could throw away a
    // token the provider has already rotated, and would put the connection in
    // backoff for everyone because one caller was impatient.
    const slow = await vaultWith({
      file: overrideFile("slow", endpoint.baseUrl),
      refresh: { providerTimeoutMs: 60_000, backoffBaseMs: 1_000 },
    });
    const c = await store("gmail", { via: slow.grpcClient });
    const before = await snapshot(c);
    const newAccess = secretToken("late-at");
    endpoint.script(reply.delayed(2_500, reply.success({ access_token: newAccess, expires_in: 3600 })));
    const calls = tokenCalls();
    let outcome: GetResponse | ConnectError;
    try {
      outcome = await get(c, { via: slow.grpcClient, callOptions: { timeoutMs: 1_000 } });
    } catch (err) {
      outcome = ConnectError.from(err);
      errorTexts.push(outcome.rawMessage);
    }
    // The caller gave up (or got the old token just in time): never a hang.
    if (outcome instanceof ConnectError) expect(outcome.code).toBe(Code.DeadlineExceeded);
    else expect(outcome).toMatchObject({ accessToken: c.accessToken, refreshed: false });
    expect(tokenCalls()).toBe(calls + 1);

    // The refresh went on: the new token is stored, no failure recorded, and the next Get serves it without the provider.
    await until(async () => (await row(c))!.generation !== before.generation, "the refresh to commit", 20_000);
    expect((await row(c))!.refresh_failures).toBe(0);
    const next = await get(c, { via: slow.grpcClient });
    expect(next.accessToken).toBe(newAccess);
    expect(tokenCalls()).toBe(calls + 1);
  });
});

// ---------------------------------------------------------------------------
// 8. Revocation
// ---------------------------------------------------------------------------

describe("revocation on Remove and ClearUser", () => {
  it("Remove with revoke posts the refresh token with token_type_hint=refresh_token and reports REVOKED on 200", async () => {
    const c = await store("gmail");
    endpoint.scriptRevokeFor("/google/revoke", reply.ok());
    const before = endpoint.revokeRequests().length;
    const requestId = newRequestId("revoke");
    const res = await client.remove({ userId: c.userId, integration: "gmail", revoke: true }, { headers: { "x-request-id": requestId } });
    expect(res.existed).toBe(true);
    expect(res.revocation).toMatchObject({ integration: "gmail", status: RevocationStatus.REVOKED });
    expect(await row(c)).toBeUndefined();
    const revokes = endpoint.revokeRequests();
    expect(revokes.length).toBe(before + 1);
    const req = revokes.at(-1)!;
    expect(req.method).toBe("POST");
    expect(req.path).toBe("/google/revoke");
    expect(req.headers["content-type"]).toMatch(/^application\/x-www-form-urlencoded/);
    expect(req.form).toMatchObject({ token: c.refreshToken, token_type_hint: "refresh_token", client_id: google.clientId });
    const recorded = await events(requestId);
    expect(recorded.map((e) => [e.action, e.outcome])).toEqual([["remove", "ok"]]);
    expect(recorded[0]!.details).toMatchObject({ existed: true, revocation: "revoked" });
  });

  it("revokes the access token (token_type_hint=access_token) when no refresh token is stored", async () => {
    const c = await store("gmail", { refresh: false });
    endpoint.scriptRevokeFor("/google/revoke", reply.ok());
    const res = await client.remove({ userId: c.userId, integration: "gmail", revoke: true });
    expect(res.revocation!.status).toBe(RevocationStatus.REVOKED);
    expect(endpoint.revokeRequests().at(-1)!.form).toMatchObject({ token: c.accessToken, token_type_hint: "access_token" });
  });

  it("reports FAILED on a 500, and the row is deleted anyway", async () => {
    const c = await store("gmail");
    endpoint.scriptRevokeFor("/google/revoke", reply.status(500));
    const res = await client.remove({ userId: c.userId, integration: "gmail", revoke: true });
    expect(res.existed).toBe(true);
    expect(res.revocation!.status).toBe(RevocationStatus.FAILED);
    expect(await row(c)).toBeUndefined();
  });

  it("reports FAILED when the revocation endpoint is unreachable, and the row is deleted anyway", async () => {
    // A port that was just free: nothing listens there.
    const probe = http.createServer();
    await new Promise<void>((resolve) => probe.listen(0, "127.0.0.1", resolve));
    const deadPort = (probe.address() as AddressInfo).port;
    await new Promise<void>((resolve) => probe.close(() => resolve()));
    const unreachable = await vaultWith({
      file: overrideFile("unreachable", endpoint.baseUrl, `http://127.0.0.1:${deadPort}`),
      refresh: { providerTimeoutMs },
    });
    const c = await store("gmail", { via: unreachable.grpcClient });
    const res = await unreachable.grpcClient.remove({ userId: c.userId, integration: "gmail", revoke: true });
    expect(res.existed).toBe(true);
    expect(res.revocation!.status).toBe(RevocationStatus.FAILED);
    expect(await row(c)).toBeUndefined();
  });

  it("reports NOT_SUPPORTED for a provider without revocation endpoint (Microsoft) and calls nothing", async () => {
    const c = await store("outlook");
    const before = endpoint.requests.length;
    const res = await client.remove({ userId: c.userId, integration: "outlook", revoke: true });
    expect(res.existed).toBe(true);
    expect(res.revocation).toMatchObject({ integration: "outlook", status: RevocationStatus.NOT_SUPPORTED });
    expect(endpoint.requests.length).toBe(before);
    expect(await row(c)).toBeUndefined();
  });

  it("Remove without revoke reports no revocation and calls nothing; revoke of a missing connection is NOT_REQUESTED", async () => {
    const c = await store("gmail");
    const before = endpoint.requests.length;
    const res = await client.remove({ userId: c.userId, integration: "gmail" });
    expect(res.existed).toBe(true);
    expect(res.revocation).toBeUndefined();
    const missing = await client.remove({ userId: c.userId, integration: "gmail", revoke: true });
    expect(missing).toMatchObject({ existed: false, revocation: { status: RevocationStatus.NOT_REQUESTED } });
    expect(endpoint.requests.length).toBe(before);
  });

  it("ClearUser with revoke reports each integration and deletes every row", async () => {
    const userId = newUser("clear");
    const gmail = await store("gmail", { userId });
    const outlook = await store("outlook", { userId });
    const acme = await store("acme", { userId });
    const basicApp = await store("basic-app", { userId });
    endpoint.scriptRevokeFor("/google/revoke", reply.ok());
    endpoint.scriptRevokeFor("/basic/revoke", reply.status(503));
    const requestId = newRequestId("clear");
    const res = await client.clearUser({ userId, revoke: true }, { headers: { "x-request-id": requestId } });
    expect(res.removedCount).toBe(4);
    expect(res.revocations.map((r) => [r.integration, RevocationStatus[r.status]])).toEqual([
      ["acme", "NOT_SUPPORTED"],
      ["basic-app", "FAILED"],
      ["gmail", "REVOKED"],
      ["outlook", "NOT_SUPPORTED"],
    ]);
    for (const c of [gmail, outlook, acme, basicApp]) expect(await row(c)).toBeUndefined();
    const basicRevoke = endpoint.revokeRequests().filter((r) => r.path === "/basic/revoke").at(-1)!;
    expect(basicRevoke.form).toMatchObject({ token: basicApp.refreshToken, token_type_hint: "refresh_token" });
    expect(basicRevoke.form.client_secret).toBeUndefined();
    expect(String(basicRevoke.headers.authorization)).toMatch(/^Basic /);
    const recorded = await events(requestId);
    expect(recorded.map((e) => e.action)).toEqual(["clear_user"]);
    expect(recorded[0]!.details).toMatchObject({
      removed: 4,
      revocations: { acme: "not_supported", "basic-app": "failed", gmail: "revoked", outlook: "not_supported" },
    });
  });
});

// ---------------------------------------------------------------------------
// 9. Nothing secret anywhere (runs last: it scans what every test above produced)
// ---------------------------------------------------------------------------

describe("no secret leaks", () => {
  it("no token or client secret in any error message, log line or audit row", async () => {
    expect(errorTexts.length).toBeGreaterThan(10);
    const needles = used.flatMap(encodings);
    const inErrors = errorTexts.filter((t) => t.includes(secretMarker) || needles.some((n) => t.includes(n)));
    expect(inErrors).toEqual([]);

    for (const v of vaults) expect(v.logs.leaks(needles)).toEqual([]);

    const audit = await db.pool.query<Record<string, unknown>>("select * from audit_events order by id");
    expect(audit.rows.some((r) => r.action === "refresh")).toBe(true);
    expect(audit.rows.some((r) => r.action === "refresh_failed")).toBe(true);
    const leaking = audit.rows.filter((r) => {
      const text = JSON.stringify(r, (_k, v: unknown) => (Buffer.isBuffer(v) ? v.toString("hex") : v));
      return text.includes(secretMarker) || needles.some((n) => text.includes(n));
    });
    expect(leaking).toEqual([]);
  });
});
