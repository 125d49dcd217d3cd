/**
 * Refresh on Get against a real OAuth 2.0 / OpenID Connect server: panva's
 * oidc-provider (test/helpers/oidc.ts) with refresh token rotation and reuse
 * detection, in front of the real vault server on listen(0), a real
 * PostgreSQL and real Connect clients. The vault finds the provider through a
 * catalogue override file: the built-in "google" provider (integration
 * "gmail") moved to the test provider with client_secret_post, and a provider
 * "oidc-basic" (integration "oidc-basic-mail") with client_secret_basic.
 *
 * Refresh tokens are minted at the provider as a consent would leave them
 * (a grant of `openid offline_access`), so every refresh the vault makes is a
 * real refresh_token grant the provider validates, rotates and can refuse.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, ConnectError, type CallOptions, type Client } from "@connectrpc/connect";
import { durationFromMs, timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  ConnectionStatus,
  ErrorDetailSchema,
  ErrorReason,
  RefreshMode,
  RevocationStatus,
  TokenVaultService,
  type GetResponse,
} from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { loadCatalogue } from "../../src/providers/catalogue.js";
import type { DetailValue } from "../../src/audit/chain.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { encodings, secretMarker, secretToken, testKeyRing } from "../helpers/secrets.js";
import { startVault, type TestVault } from "../helpers/server.js";
import { startOidcProvider, type OidcClient, type OidcServer } from "../helpers/oidc.js";

type VaultClient = Client<typeof TokenVaultService>;

const gmailScope = "https://www.googleapis.com/auth/gmail.readonly";

let db: TestDatabase;
let op: OidcServer;
let vault: TestVault;
let admin: VaultClient;
let catalogueDir: string;
/** Tokens the tests stored themselves (the provider's are in op.issuedSecrets). */
const stored: string[] = [];

beforeAll(async () => {
  db = await createTestDatabase();
  op = await startOidcProvider({ accessTokenTtl: 600 });
  catalogueDir = mkdtempSync(path.join(tmpdir(), "tokenvault-oidc-"));
  const catalogue = loadCatalogue({ overrideFile: op.writeCatalogue(catalogueDir), settings: (p) => op.settings(p) });
  vault = await startVault({ pool: db.pool, keyRing: testKeyRing("k1"), catalogue, refresh: { providerTimeoutMs: 10_000 } });
  admin = vault.grpcClient;
});

afterAll(async () => {
  await vault?.close();
  // No token, neither the ones stored nor any the provider issued, in any log line.
  expect(vault.logs.leaks([...stored, ...(op?.issuedSecrets ?? []), vault.secret])).toEqual([]);
  await op?.close();
  await db?.drop();
  rmSync(catalogueDir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/** A user id of this test alone. */
const newUser = (label: string) => `oidc-${label}-${randomBytes(4).toString("hex")}`;

/** A token-like value the test stores, remembered for the leak scans. */
function storedToken(kind: string): string {
  const t = secretToken(kind);
  stored.push(t);
  return t;
}

/**
 * Stores a connection whose access token (a test value, unknown to the
 * provider) expires in `expiresInMs` (default one minute, well within Get's
 * default min_valid_for of 5 minutes; null: no expiry), with `refreshToken`.
 * Returns the stored access token.
 */
async function storeExpiring(
  userId: string,
  integration: string,
  refreshToken: string | undefined,
  expiresInMs: number | null = 60_000,
): Promise<string> {
  const accessToken = storedToken("at");
  await admin.store({
    userId,
    integration,
    tokenSet: {
      accessToken,
      refreshToken,
      tokenType: "Bearer",
      scopes: [gmailScope],
      expiry: expiresInMs === null ? { case: undefined } : { case: "expiresIn", value: durationFromMs(expiresInMs) },
    },
    metadata: { ipAddress: "203.0.113.7", userAgent: "oidc-test" },
  });
  return accessToken;
}

/** A Get with its own x-request-id; returns the answer and that id. */
async function get(
  userId: string,
  integration: string,
  options: { minValidForMs?: number; refresh?: RefreshMode; includeRefreshToken?: boolean } = {},
): Promise<{ res: GetResponse; requestId: string }> {
  const requestId = `oidc.${randomBytes(6).toString("hex")}`;
  const call: CallOptions = { headers: { "x-request-id": requestId } };
  const res = await admin.get(
    {
      userId,
      integration,
      minValidFor: options.minValidForMs === undefined ? undefined : durationFromMs(options.minValidForMs),
      refresh: options.refresh ?? RefreshMode.AUTO,
      includeRefreshToken: options.includeRefreshToken ?? false,
    },
    call,
  );
  return { res, requestId };
}

/** The error a Get fails with (fails the test when it succeeds). */
async function getError(userId: string, integration: string, options: { refresh?: RefreshMode } = {}): Promise<ConnectError> {
  try {
    await get(userId, integration, options);
  } catch (err) {
    return ConnectError.from(err);
  }
  throw new Error("Get succeeded, expected an error");
}

function reasonOf(err: ConnectError): ErrorReason | undefined {
  return err.findDetails(ErrorDetailSchema)[0]?.reason;
}

/** The refresh token the vault holds now (admin may see it), read without refreshing. */
async function storedRefreshToken(userId: string, integration: string): Promise<string | undefined> {
  const { res } = await get(userId, integration, { refresh: RefreshMode.NEVER, includeRefreshToken: true });
  return res.refreshToken;
}

interface AuditRow {
  id: string;
  action: string;
  outcome: string;
  user_id: string | null;
  integration: string | null;
  request_id: string | null;
  details: Record<string, DetailValue>;
}

/** A user's audit events, oldest first. */
async function eventsOf(userId: string): Promise<AuditRow[]> {
  return (
    await db.pool.query<AuditRow>(
      "select id, action, outcome, user_id, integration, request_id, details from audit_events where user_id = $1::text order by id",
      [userId],
    )
  ).rows;
}

/** The audit events written by one call. */
async function eventsOfRequest(requestId: string): Promise<AuditRow[]> {
  return (
    await db.pool.query<AuditRow>(
      "select id, action, outcome, user_id, integration, request_id, details from audit_events where request_id = $1::text order by id",
      [requestId],
    )
  ).rows;
}

/** The payload of a JWT (the id token), unverified. */
function jwtPayload(jwt: string): Record<string, unknown> {
  return JSON.parse(Buffer.from(jwt.split(".")[1]!, "base64url").toString("utf8")) as Record<string, unknown>;
}

async function connectionOf(userId: string, integration: string) {
  const list = await admin.listConnections({ userId });
  const found = list.connections.find((c) => c.integration === integration);
  if (found === undefined) throw new Error(`no ${integration} connection for ${userId}`);
  return found;
}

// ---------------------------------------------------------------------------

describe("refresh on Get against oidc-provider (rotation on)", () => {
  it("refreshes a token about to expire: the provider's new access token, rotated refresh token stored, one refresh event", async () => {
    const userId = newUser("refresh");
    const { refreshToken: minted, grantId } = await op.mintRefreshToken(userId);
    const old = await storeExpiring(userId, "gmail", minted);
    const before = op.tokenCalls().length;

    const started = Date.now();
    const { res, requestId } = await get(userId, "gmail");

    // Exactly one refresh_token grant reached the provider, as the post client with its secret in the body.
    const calls = op.tokenCalls().slice(before);
    expect(calls).toHaveLength(1);
    const call = calls[0]!;
    expect(call).toMatchObject({ grantType: "refresh_token", clientId: op.postClient.clientId, secretInBody: true, authorizationScheme: undefined, status: 200 });

    // The Get answers with the access token the provider issued, not the stored one.
    expect(res.refreshed).toBe(true);
    expect(res.accessToken).not.toBe(old);
    expect(res.accessToken).toBe(call.accessToken);
    expect(res.tokenType).toBe("Bearer");
    // expires_in 600 from the provider: the expiry moved to about now + 10 minutes.
    const expiresAt = timestampDate(res.expiresAt!).getTime();
    expect(expiresAt).toBeGreaterThanOrEqual(started + 600_000 - 5_000);
    expect(expiresAt).toBeLessThanOrEqual(Date.now() + 600_000 + 5_000);
    // The provider's answer said which scopes the token has; the vault keeps them.
    expect(res.scopes).toEqual(["openid", "offline_access"]);
    // The refresh brought a new OpenID id token for this user from this issuer.
    expect(res.idToken).toBe(call.idToken);
    expect(jwtPayload(res.idToken!)).toMatchObject({ sub: userId, iss: op.issuer, aud: op.postClient.clientId });

    // The provider itself says the new access token is live, for this user and client.
    expect(await op.introspect(res.accessToken, "access_token")).toMatchObject({ active: true, sub: userId, client_id: op.postClient.clientId });

    // Rotation: the vault now holds the new refresh token; the minted one is consumed at the provider.
    const rotated = await storedRefreshToken(userId, "gmail");
    expect(rotated).toBeDefined();
    expect(rotated).not.toBe(minted);
    expect(rotated).toBe(call.refreshToken);
    expect(await op.introspect(minted, "refresh_token")).toMatchObject({ active: false });
    expect(await op.introspect(rotated!, "refresh_token")).toMatchObject({ active: true, sub: userId });
    expect(await op.grantExists(grantId)).toBe(true);
    expect(op.revokedGrants).not.toContain(grantId);

    // The connection says when it was refreshed and that it is active.
    const connection = await connectionOf(userId, "gmail");
    expect(connection.status).toBe(ConnectionStatus.ACTIVE);
    expect(connection.hasRefreshToken).toBe(true);
    expect(connection.lastRefreshedAt).toBeDefined();

    // The Get wrote exactly two events: the refresh (first) and the get itself, both ok, no token anywhere.
    const events = await eventsOfRequest(requestId);
    expect(events.map((e) => [e.action, e.outcome])).toEqual([
      ["refresh", "ok"],
      ["get", "ok"],
    ]);
    expect(events[0]).toMatchObject({ user_id: userId, integration: "gmail" });
    expect(events[0]!.details).toMatchObject({ rpc: "Get", provider: "google", refresh_token_rotated: true, expires_in: 600 });
    expect(events[1]!.details).toMatchObject({ rpc: "Get", refreshed: true });
    const dump = JSON.stringify(events);
    for (const t of [old, minted, rotated!, res.accessToken, res.idToken!]) expect(dump).not.toContain(t);

    // A later Get within the new token's validity does not call the provider.
    const again = await get(userId, "gmail");
    expect(again.res.refreshed).toBe(false);
    expect(again.res.accessToken).toBe(res.accessToken);
    expect(op.tokenCalls().length).toBe(before + 1);
    expect((await eventsOfRequest(again.requestId)).map((e) => e.action)).toEqual(["get"]);
    // Still the one rotated refresh token: nothing refreshed behind our back.
    expect(await storedRefreshToken(userId, "gmail")).toBe(rotated);
  });

  it("each refresh rotates again and uses the latest refresh token (no reuse across refreshes)", async () => {
    const userId = newUser("chain");
    const { refreshToken: minted, grantId } = await op.mintRefreshToken(userId);
    await storeExpiring(userId, "gmail", minted);
    const seen = new Set<string>([minted]);
    const accessTokens = new Set<string>();
    const before = op.tokenCalls().length;
    // min_valid_for above the provider's 10 minutes: every Get must refresh.
    for (let i = 0; i < 3; i++) {
      const { res } = await get(userId, "gmail", { minValidForMs: 15 * 60_000 });
      expect(res.refreshed).toBe(true);
      expect(accessTokens.has(res.accessToken)).toBe(false);
      accessTokens.add(res.accessToken);
      const rt = await storedRefreshToken(userId, "gmail");
      expect(seen.has(rt!)).toBe(false);
      seen.add(rt!);
    }
    const calls = op.tokenCalls().slice(before);
    expect(calls.map((c) => c.status)).toEqual([200, 200, 200]);
    expect(op.revokedGrants).not.toContain(grantId);
    expect(await op.grantExists(grantId)).toBe(true);
    expect((await eventsOf(userId)).filter((e) => e.action === "refresh")).toHaveLength(3);
  });

  it("an access token that already expired is refreshed, and with refresh NEVER it is still handed out as stored", async () => {
    const userId = newUser("expired");
    const { refreshToken: minted } = await op.mintRefreshToken(userId);
    const old = storedToken("at");
    await admin.store({
      userId,
      integration: "gmail",
      tokenSet: { accessToken: old, refreshToken: minted, scopes: [gmailScope], expiry: { case: "expiresAt", value: timestampFromDate(new Date(Date.now() - 60_000)) } },
    });
    const never = await get(userId, "gmail", { refresh: RefreshMode.NEVER });
    expect(never.res.accessToken).toBe(old);
    const before = op.tokenCalls().length;
    const { res } = await get(userId, "gmail", { minValidForMs: 0 });
    expect(res.refreshed).toBe(true);
    expect(res.accessToken).not.toBe(old);
    expect(op.tokenCalls().length).toBe(before + 1);
    expect(await op.introspect(res.accessToken, "access_token")).toMatchObject({ active: true, sub: userId });
  });

  it("20 concurrent Gets in one process, over gRPC and Connect: one provider call, one new token for all", async () => {
    const userId = newUser("burst");
    const { refreshToken: minted, grantId } = await op.mintRefreshToken(userId);
    const old = await storeExpiring(userId, "gmail", minted);
    const before = op.tokenCalls().length;
    const clients = [vault.grpcClient, vault.connectClient, vault.grpcWebClient];
    const answers = await Promise.all(Array.from({ length: 20 }, (_, i) => clients[i % clients.length]!.get({ userId, integration: "gmail" })));
    const calls = op.tokenCalls().slice(before);
    expect(calls).toHaveLength(1);
    expect(new Set(answers.map((a) => a.accessToken))).toEqual(new Set([calls[0]!.accessToken]));
    expect(answers.some((a) => a.accessToken === old)).toBe(false);
    expect(await storedRefreshToken(userId, "gmail")).toBe(calls[0]!.refreshToken);
    expect(op.revokedGrants).not.toContain(grantId);
    expect((await eventsOf(userId)).filter((e) => e.action === "refresh")).toHaveLength(1);
  });

  it("a client_secret_basic provider is called with HTTP Basic and no secret in the body", async () => {
    const userId = newUser("basic");
    const { refreshToken: minted } = await op.mintRefreshToken(userId, { client: op.basicClient });
    const old = await storeExpiring(userId, "oidc-basic-mail", minted);
    const before = op.tokenCalls().length;
    const { res } = await get(userId, "oidc-basic-mail");
    const calls = op.tokenCalls().slice(before);
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatchObject({ clientId: op.basicClient.clientId, authorizationScheme: "Basic", secretInBody: false, status: 200 });
    expect(res.refreshed).toBe(true);
    expect(res.accessToken).not.toBe(old);
    expect(await op.introspect(res.accessToken, "access_token")).toMatchObject({ active: true, sub: userId, client_id: op.basicClient.clientId });
    expect(await storedRefreshToken(userId, "oidc-basic-mail")).toBe(calls[0]!.refreshToken);
  });

  it("Get with refresh NEVER returns the stored token as it is, without the provider; AUTO then never returns the old one", async () => {
    const userId = newUser("never");
    const { refreshToken: minted } = await op.mintRefreshToken(userId);
    const old = await storeExpiring(userId, "gmail", minted);
    const before = op.tokenCalls().length;

    const never = await get(userId, "gmail", { refresh: RefreshMode.NEVER });
    expect(never.res.accessToken).toBe(old);
    expect(never.res.refreshed).toBe(false);
    expect(op.tokenCalls().length).toBe(before);
    expect(await storedRefreshToken(userId, "gmail")).toBe(minted);

    const auto = await get(userId, "gmail");
    expect(auto.res.refreshed).toBe(true);
    expect(auto.res.accessToken).not.toBe(old);
    expect(op.tokenCalls().length).toBe(before + 1);
    // Once refreshed, even NEVER hands out the new token: the old one is gone from the vault.
    const after = await get(userId, "gmail", { refresh: RefreshMode.NEVER });
    expect(after.res.accessToken).toBe(auto.res.accessToken);
  });

  it("a token without expiry is returned as it is, whatever min_valid_for, without the provider", async () => {
    const userId = newUser("noexpiry");
    const { refreshToken: minted } = await op.mintRefreshToken(userId);
    const token = await storeExpiring(userId, "gmail", minted, null);
    const before = op.tokenCalls().length;
    const { res } = await get(userId, "gmail", { minValidForMs: 24 * 3_600_000 });
    expect(res.accessToken).toBe(token);
    expect(res.refreshed).toBe(false);
    expect(res.expiresAt).toBeUndefined();
    expect(op.tokenCalls().length).toBe(before);
    expect(await storedRefreshToken(userId, "gmail")).toBe(minted);
  });
});

describe("the provider refuses the refresh token: needs-reauth", () => {
  it("a grant revoked at the provider: FAILED_PRECONDITION/NEEDS_REAUTH, listed as needs-reauth, later Gets answer without the provider, a new Store clears it", async () => {
    const userId = newUser("revoked");
    const { refreshToken: minted, grantId } = await op.mintRefreshToken(userId);
    await storeExpiring(userId, "gmail", minted);
    // The user disconnects the app at the provider.
    expect(await op.revokeDirectly(minted)).toBe(200);
    expect(await op.grantExists(grantId)).toBe(false);
    const before = op.tokenCalls().length;

    const requestId = `oidc.${randomBytes(6).toString("hex")}`;
    let err: ConnectError | undefined;
    try {
      await admin.get({ userId, integration: "gmail" }, { headers: { "x-request-id": requestId } });
    } catch (e) {
      err = ConnectError.from(e);
    }
    expect(err?.code).toBe(Code.FailedPrecondition);
    expect(reasonOf(err!)).toBe(ErrorReason.NEEDS_REAUTH);
    const calls = op.tokenCalls().slice(before);
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatchObject({ grantType: "refresh_token", status: 400, error: "invalid_grant" });

    // One refresh_failed event (needs_reauth, the provider's error code, no token) and the Get's own.
    const events = await eventsOfRequest(requestId);
    expect(events.map((e) => [e.action, e.outcome])).toEqual([
      ["refresh_failed", "failed_precondition"],
      ["get", "failed_precondition"],
    ]);
    expect(events[0]!.details).toMatchObject({ rpc: "Get", provider: "google", error: "invalid_grant", needs_reauth: true });
    expect(JSON.stringify(events)).not.toContain(minted);

    const connection = await connectionOf(userId, "gmail");
    expect(connection.status).toBe(ConnectionStatus.NEEDS_REAUTH);

    // Later Gets answer at once, without the provider, in either mode; no further refresh events.
    const second = await getError(userId, "gmail");
    expect(second.code).toBe(Code.FailedPrecondition);
    expect(reasonOf(second)).toBe(ErrorReason.NEEDS_REAUTH);
    const never = await getError(userId, "gmail", { refresh: RefreshMode.NEVER });
    expect(reasonOf(never)).toBe(ErrorReason.NEEDS_REAUTH);
    expect(op.tokenCalls().length).toBe(before + 1);
    const all = await eventsOf(userId);
    expect(all.filter((e) => e.action === "refresh_failed")).toHaveLength(1);
    expect(all.filter((e) => e.action === "refresh")).toHaveLength(0);

    // The user consents again: a new Store makes the connection active, and it refreshes normally.
    const { refreshToken: fresh } = await op.mintRefreshToken(userId);
    const old = await storeExpiring(userId, "gmail", fresh);
    expect((await connectionOf(userId, "gmail")).status).toBe(ConnectionStatus.ACTIVE);
    const { res } = await get(userId, "gmail");
    expect(res.refreshed).toBe(true);
    expect(res.accessToken).not.toBe(old);
    expect(res.connection?.status).toBe(ConnectionStatus.ACTIVE);
    expect(op.tokenCalls().length).toBe(before + 2);
    expect(await op.introspect(res.accessToken, "access_token")).toMatchObject({ active: true, sub: userId });
  });

  it("a refresh token already used elsewhere: the provider's reuse detection revokes the grant, the vault marks needs-reauth", async () => {
    const userId = newUser("reused");
    const { refreshToken: minted, grantId } = await op.mintRefreshToken(userId);
    // Someone else (an old copy of the token) refreshed with it first: it is consumed and rotated away.
    const elsewhere = await op.refreshDirectly(minted);
    expect(elsewhere.status).toBe(200);
    await storeExpiring(userId, "gmail", minted);
    const before = op.tokenCalls().length;

    const err = await getError(userId, "gmail");
    expect(err.code).toBe(Code.FailedPrecondition);
    expect(reasonOf(err)).toBe(ErrorReason.NEEDS_REAUTH);
    expect(op.tokenCalls().slice(before)).toMatchObject([{ status: 400, error: "invalid_grant" }]);
    // Reuse detection fired: the whole grant is gone, the other party's rotated token with it.
    expect(op.revokedGrants).toContain(grantId);
    expect(await op.grantExists(grantId)).toBe(false);
    expect(await op.introspect(elsewhere.body.refresh_token as string, "refresh_token")).toMatchObject({ active: false });
    expect((await connectionOf(userId, "gmail")).status).toBe(ConnectionStatus.NEEDS_REAUTH);
  });
});

describe("revocation at the provider on Remove and ClearUser", () => {
  it("Remove with revoke calls the revocation endpoint with the refresh token: REVOKED, and the token no longer works", async () => {
    const userId = newUser("remove");
    const { refreshToken: minted, grantId } = await op.mintRefreshToken(userId);
    await storeExpiring(userId, "gmail", minted);
    // Refresh first, so the vault holds a rotated refresh token and a live access token from the provider.
    const { res } = await get(userId, "gmail");
    const rotated = await storedRefreshToken(userId, "gmail");
    expect(await op.introspect(res.accessToken, "access_token")).toMatchObject({ active: true });
    const before = op.revocationCalls().length;

    const removed = await admin.remove({ userId, integration: "gmail", revoke: true });
    expect(removed.existed).toBe(true);
    expect(removed.revocation?.integration).toBe("gmail");
    expect(removed.revocation?.status).toBe(RevocationStatus.REVOKED);

    const calls = op.revocationCalls().slice(before);
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatchObject({ tokenTypeHint: "refresh_token", clientId: op.postClient.clientId, secretInBody: true, status: 200 });

    // At the provider: the refresh token, the grant and the access token of the grant are dead.
    expect(await op.introspect(rotated!, "refresh_token")).toMatchObject({ active: false });
    expect(await op.introspect(res.accessToken, "access_token")).toMatchObject({ active: false });
    const attempt = await op.refreshDirectly(rotated!);
    expect(attempt).toMatchObject({ status: 400, body: { error: "invalid_grant" } });
    expect(await op.grantExists(grantId)).toBe(false);

    // And in the vault the connection is gone.
    expect((await getError(userId, "gmail")).code).toBe(Code.NotFound);
    const events = await eventsOf(userId);
    expect(events.filter((e) => e.action === "remove")).toMatchObject([{ action: "remove", outcome: "ok", details: { existed: true, revocation: "revoked" } }]);
  });

  it("ClearUser with revoke reports per integration: revoked where the provider has an endpoint and credentials, not supported or failed otherwise", async () => {
    const userId = newUser("clear");
    const viaPost = await op.mintRefreshToken(userId);
    const viaBasic = await op.mintRefreshToken(userId, { client: op.basicClient });
    await storeExpiring(userId, "gmail", viaPost.refreshToken);
    await storeExpiring(userId, "oidc-basic-mail", viaBasic.refreshToken);
    // GitHub has no revocation endpoint in the catalogue; Salesforce has one but no client credentials here.
    await storeExpiring(userId, "github", storedToken("rt"));
    await storeExpiring(userId, "salesforce", storedToken("rt"));
    const before = op.revocationCalls().length;

    const cleared = await admin.clearUser({ userId, revoke: true });
    expect(cleared.removedCount).toBe(4);
    expect(cleared.revocations.map((r) => [r.integration, RevocationStatus[r.status]])).toEqual([
      ["github", "NOT_SUPPORTED"],
      ["gmail", "REVOKED"],
      ["oidc-basic-mail", "REVOKED"],
      ["salesforce", "FAILED"],
    ]);

    // Exactly the two providers with an endpoint and credentials were called, each as its own client.
    const calls = op.revocationCalls().slice(before);
    expect(calls.map((c) => [c.clientId, c.authorizationScheme ?? "post", c.tokenTypeHint, c.status]).sort()).toEqual([
      [op.basicClient.clientId, "Basic", "refresh_token", 200],
      [op.postClient.clientId, "post", "refresh_token", 200],
    ]);
    for (const [token, client] of [[viaPost.refreshToken, op.postClient], [viaBasic.refreshToken, op.basicClient]] as [string, OidcClient][]) {
      expect(await op.refreshDirectly(token, client)).toMatchObject({ status: 400, body: { error: "invalid_grant" } });
    }
    expect(await op.grantExists(viaPost.grantId)).toBe(false);
    expect(await op.grantExists(viaBasic.grantId)).toBe(false);

    expect((await admin.listConnections({ userId })).connections).toEqual([]);
    const events = await eventsOf(userId);
    expect(events.filter((e) => e.action === "clear_user")).toMatchObject([{
      action: "clear_user",
      outcome: "ok",
      details: { removed: 4, revocations: { github: "not_supported", gmail: "revoked", "oidc-basic-mail": "revoked", salesforce: "failed" } },
    }]);
  });
});

describe("the audit log", () => {
  it("holds one refresh event per refresh, one refresh_failed per refusal, and no token in any column", async () => {
    const refreshes = await db.pool.query<{ n: number }>("select count(*)::int as n from audit_events where action = 'refresh'");
    // Every successful refresh_token grant the vault sent wrote one refresh event, every refused one a refresh_failed.
    const okCalls = op.tokenCalls("refresh_token").filter((c) => c.status === 200);
    expect(okCalls.length).toBeGreaterThan(0);
    expect(refreshes.rows[0]!.n).toBe(okCalls.length);
    const failed = await db.pool.query<{ n: number }>("select count(*)::int as n from audit_events where action = 'refresh_failed'");
    const refusedCalls = op.tokenCalls("refresh_token").filter((c) => c.status !== 200);
    expect(refusedCalls.length).toBeGreaterThan(0);
    expect(failed.rows[0]!.n).toBe(refusedCalls.length);

    // No column of any event holds a token, in any encoding.
    const rows = (await db.pool.query<{ row: string }>("select t::text as row from audit_events t")).rows.map((r) => r.row);
    expect(rows.length).toBeGreaterThan(0);
    const needles = [...stored, ...op.issuedSecrets, op.postClient.clientSecret, op.basicClient.clientSecret].flatMap(encodings);
    const leaks = rows.filter((row) => row.includes(secretMarker) || needles.some((n) => row.includes(n)));
    expect(leaks).toEqual([]);
  });
});
