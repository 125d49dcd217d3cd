/**
 * Every RPC through the real server on listen(0), with Connect's clients over
 * gRPC, the Connect protocol and gRPC-Web.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, ConnectError } from "@connectrpc/connect";
import { create, toJsonString } from "@bufbuild/protobuf";
import { durationFromMs, timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  ConnectionStatus,
  ErrorDetailSchema,
  ErrorReason,
  ListConnectionsResponseSchema,
  RefreshMode,
  StoreResponseSchema,
} from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { secretToken, testKeyRing } from "../helpers/secrets.js";
import { startVault, type TestVault } from "../helpers/server.js";

let db: TestDatabase;
let vault: TestVault;

beforeAll(async () => {
  db = await createTestDatabase();
  vault = await startVault({ pool: db.pool, keyRing: testKeyRing("k1") });
});

afterAll(async () => {
  await vault?.close();
  expect(vault.logs.leaks()).toEqual([]);
  await db?.drop();
});

const transports = ["grpcClient", "connectClient", "grpcWebClient"] as const;

describe.each(transports)("over %s", (transport) => {
  const client = () => vault[transport];
  const user = `user-${transport}`;

  it("stores a token set and returns metadata only", async () => {
    const accessToken = secretToken("access");
    const res = await client().store({
      userId: user,
      integration: "gmail",
      tokenSet: {
        accessToken,
        refreshToken: secretToken("refresh"),
        scopes: ["https://mail.google.com/", "openid", "openid"],
        expiry: { case: "expiresIn", value: durationFromMs(3_600_000) },
      },
      metadata: { ipAddress: "203.0.113.9", userAgent: "Mozilla/5.0 test" },
    });
    expect(res.created).toBe(true);
    const c = res.connection!;
    expect(c.userId).toBe(user);
    expect(c.integration).toBe("gmail");
    expect(c.scopes).toEqual(["https://mail.google.com/", "openid"]);
    expect(c.tokenType).toBe("Bearer");
    expect(c.status).toBe(ConnectionStatus.ACTIVE);
    expect(c.hasRefreshToken).toBe(true);
    expect(c.consent?.ipAddress).toBe("203.0.113.9");
    expect(c.consent?.userAgent).toBe("Mozilla/5.0 test");
    expect(c.lastUsedAt).toBeUndefined();
    const expiresIn = timestampDate(c.expiresAt!).getTime() - Date.now();
    expect(expiresIn).toBeGreaterThan(3_500_000);
    expect(expiresIn).toBeLessThanOrEqual(3_600_000);
    expect(toJsonString(StoreResponseSchema, res)).not.toContain("tvsecret");
  });

  it("gets the access token back and marks the connection used", async () => {
    const accessToken = secretToken("access");
    const idToken = secretToken("id");
    const expiresAt = new Date(Date.now() + 7_200_000);
    await client().store({
      userId: user,
      integration: "outlook",
      tokenSet: {
        accessToken,
        tokenType: "bearer",
        idToken,
        scopes: ["Mail.Read"],
        expiry: { case: "expiresAt", value: timestampFromDate(expiresAt) },
        extras: { tenant: "contoso", ext_expires_in: 3600, nested: { ok: true } },
      },
    });
    const got = await client().get({ userId: user, integration: "outlook" });
    expect(got.accessToken).toBe(accessToken);
    expect(got.idToken).toBe(idToken);
    expect(got.tokenType).toBe("bearer");
    expect(got.scopes).toEqual(["Mail.Read"]);
    expect(timestampDate(got.expiresAt!).getTime()).toBe(expiresAt.getTime());
    expect(got.extras).toEqual({ tenant: "contoso", ext_expires_in: 3600, nested: { ok: true } });
    expect(got.refreshed).toBe(false);
    expect(got.connection?.hasRefreshToken).toBe(false);
    expect(got.connection?.lastUsedAt).toBeDefined();
    const listed = await client().listConnections({ userId: user });
    const outlook = listed.connections.find((c) => c.integration === "outlook")!;
    expect(timestampDate(outlook.lastUsedAt!).getTime()).toBe(timestampDate(got.connection!.lastUsedAt!).getTime());
  });

  it("Store keeps the refresh token's lifetime when the provider gave one, and a later Store without it clears it", async () => {
    const before = Date.now();
    const res = await client().store({
      userId: user,
      integration: "outlook",
      tokenSet: { accessToken: secretToken(), refreshToken: secretToken("refresh"), refreshTokenExpiresIn: durationFromMs(30 * 86_400_000) },
    });
    const at = timestampDate(res.connection!.refreshTokenExpiresAt!).getTime();
    expect(at).toBeGreaterThanOrEqual(before + 30 * 86_400_000 - 1_000);
    expect(at).toBeLessThanOrEqual(Date.now() + 30 * 86_400_000 + 1_000);
    expect(res.connection!.refreshTokenExpiringSoon).toBe(false);
    const soon = await client().store({
      userId: user,
      integration: "outlook",
      tokenSet: { accessToken: secretToken(), refreshToken: secretToken("refresh"), refreshTokenExpiresIn: durationFromMs(86_400_000) },
    });
    expect(soon.connection!.refreshTokenExpiringSoon).toBe(true);
    const cleared = await client().store({ userId: user, integration: "outlook", tokenSet: { accessToken: secretToken(), refreshToken: secretToken("refresh") } });
    expect(cleared.connection!.refreshTokenExpiresAt).toBeUndefined();
  });

  it("Store upserts: replaces tokens, keeps created_at, bumps the generation", async () => {
    const first = await client().store({ userId: user, integration: "hubspot", tokenSet: { accessToken: secretToken() } });
    const second = secretToken("second");
    const res = await client().store({ userId: user, integration: "hubspot", tokenSet: { accessToken: second } });
    expect(res.created).toBe(false);
    expect(timestampDate(res.connection!.createdAt!).getTime()).toBe(timestampDate(first.connection!.createdAt!).getTime());
    expect((await client().get({ userId: user, integration: "hubspot" })).accessToken).toBe(second);
    const row = await db.pool.query("select generation from connections where user_id = $1 and integration = 'hubspot'", [user]);
    expect(row.rows[0].generation).toBe("2");
  });

  it("a token without expiry is returned as it is", async () => {
    const accessToken = secretToken();
    await client().store({ userId: user, integration: "github", tokenSet: { accessToken } });
    const got = await client().get({
      userId: user,
      integration: "github",
      minValidFor: durationFromMs(60_000),
      refresh: RefreshMode.NEVER,
    });
    expect(got.accessToken).toBe(accessToken);
    expect(got.expiresAt).toBeUndefined();
  });

  it("Get of a missing connection is NOT_FOUND with a reason", async () => {
    const err = await client().get({ userId: user, integration: "salesforce" }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ConnectError);
    expect((err as ConnectError).code).toBe(Code.NotFound);
    const [detail] = (err as ConnectError).findDetails(ErrorDetailSchema);
    expect(detail?.reason).toBe(ErrorReason.CONNECTION_NOT_FOUND);
  });

  it("Remove says whether the connection existed", async () => {
    await client().store({ userId: user, integration: "slack", tokenSet: { accessToken: secretToken() } });
    expect((await client().remove({ userId: user, integration: "slack" })).existed).toBe(true);
    expect((await client().remove({ userId: user, integration: "slack" })).existed).toBe(false);
    await expect(client().get({ userId: user, integration: "slack" })).rejects.toMatchObject({ code: Code.NotFound });
  });

  it("ClearUser removes every connection of one user and no other", async () => {
    const other = `${user}-other`;
    await client().store({ userId: other, integration: "gmail", tokenSet: { accessToken: secretToken() } });
    const before = (await client().listConnections({ userId: user })).connections.length;
    expect(before).toBeGreaterThan(0);
    expect((await client().clearUser({ userId: user })).removedCount).toBe(before);
    expect((await client().listConnections({ userId: user })).connections).toEqual([]);
    expect((await client().listConnections({ userId: other })).connections).toHaveLength(1);
    expect((await client().clearUser({ userId: user })).removedCount).toBe(0);
  });
});

describe("ListConnections", () => {
  it("lists metadata ordered by integration, never a secret", async () => {
    const user = "list-user";
    const tokens = [secretToken(), secretToken(), secretToken()];
    for (const [i, integration] of ["outlook", "gmail", "slack"].entries()) {
      await vault.grpcClient.store({
        userId: user,
        integration,
        tokenSet: { accessToken: tokens[i]!, refreshToken: secretToken("r"), idToken: secretToken("i"), extras: { s: secretToken("x") } },
      });
    }
    const res = await vault.grpcClient.listConnections({ userId: user });
    expect(res.connections.map((c) => c.integration)).toEqual(["gmail", "outlook", "slack"]);
    expect(res.connections.every((c) => c.status === ConnectionStatus.ACTIVE && c.hasRefreshToken)).toBe(true);
    expect(toJsonString(ListConnectionsResponseSchema, res)).not.toContain("tvsecret");
  });

  it("returns an empty list for an unknown user", async () => {
    expect((await vault.connectClient.listConnections({ userId: "nobody" })).connections).toEqual([]);
  });
});

describe("request ids", () => {
  it("echoes the caller's x-request-id and logs it", async () => {
    let header: string | null = null;
    await vault.grpcClient.listConnections(
      { userId: "rid-user" },
      { headers: { "x-request-id": "req-123.abc" }, onHeader: (h) => (header = h.get("x-request-id")) },
    );
    expect(header).toBe("req-123.abc");
    expect(vault.logs.lines.some((l) => l.includes('"requestId":"req-123.abc"'))).toBe(true);
  });

  it("generates one when the caller sends none or an invalid one", async () => {
    let header: string | null = null;
    await vault.grpcClient.listConnections(
      { userId: "rid-user" },
      { headers: { "x-request-id": "bad id\twith tab" }, onHeader: (h) => (header = h.get("x-request-id")) },
    );
    expect(header).toMatch(/^[0-9a-f-]{36}$/);
  });
});

describe("error details", () => {
  it("are readable by a client as a typed ErrorDetail", async () => {
    const err = await vault.grpcClient
      .store({ userId: "", integration: "gmail", tokenSet: { accessToken: secretToken() } })
      .then(
        () => expect.unreachable("Store succeeded"),
        (e: unknown) => ConnectError.from(e),
      );
    expect(err.code).toBe(Code.InvalidArgument);
    expect(err.rawMessage).toBe("user_id must be 1..256 characters");
    expect(err.findDetails(ErrorDetailSchema)).toEqual([
      create(ErrorDetailSchema, { reason: ErrorReason.INVALID_FIELD, field: "user_id" }),
    ]);
  });
});
