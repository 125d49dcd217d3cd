/**
 * Caller authentication and policy, enforced by the real server on listen(0)
 * and seen through real clients: Connect's gRPC client (credentials in a
 * header) and a plain @grpc/grpc-js client (credentials in call metadata, as
 * another language's client sends them).
 *
 * For each RPC: every kind of bad credential is UNAUTHENTICATED with one and
 * the same message; a caller outside its policy is PERMISSION_DENIED naming
 * what it lacks; an allowed caller gets through. On every denial no row is
 * read or changed: a snapshot of the whole connections table (last_used_at
 * included, which a Get bumps) is the same before and after.
 *
 * Then the policy dimensions one by one (users, ClearUser's '*', what
 * ListConnections shows, refresh tokens), the open services (health,
 * reflection), and what is logged and stored: the caller's name, never a secret.
 */
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { Code, ConnectError, createClient, type CallOptions, type Client } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import type { MessageInitShape } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { TokenVaultService } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { Health, HealthCheckResponse_ServingStatus } from "../../src/gen/grpc/health/v1/health_pb.js";
import { ServerReflection, type ServerReflectionRequestSchema } from "../../src/gen/grpc/reflection/v1/reflection_pb.js";
import { revoke, rotateCallerSecret, type PolicySpec } from "../../src/auth/caller-admin.js";
import { hashSecret } from "../../src/auth/credentials.js";
import { rpcNames, type RpcName } from "../../src/auth/policy.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { encodings, secretToken, testKeyRing } from "../helpers/secrets.js";
import { bearer, grpcJsClient, grpcJsService, startVault, type GrpcJsVault, type TestVault } from "../helpers/server.js";

type VaultClient = Client<typeof TokenVaultService>;

/** The one answer to every credential failure, whatever its cause. */
const unauthenticatedMessage =
  "missing or invalid credentials: send 'authorization: Bearer <secret>' or a client certificate bound to a caller";

let db: TestDatabase;
let vault: TestVault;
/** A Connect gRPC client that sends no credential of its own: each call passes its headers. */
let anon: VaultClient;
/** A grpc-js client that sends no credential of its own: each call passes its metadata. */
let anonGrpcJs: GrpcJsVault;

/** Every secret issued in this file, to prove none is logged or stored. */
const issued: string[] = [];
/** Secrets of callers with the given names. */
const secrets = new Map<string, string>();
let revokedSecret: string;
let rotatedAwaySecret: string;
let rotatedNewSecret: string;

/** Tokens of the seeded connections, by "user/integration". */
const seededRefresh = new Map<string, string>();
const seededAccess = new Map<string, string>();

/** The connections every test starts from. */
const seed: { userId: string; integration: string }[] = [
  { userId: "alice", integration: "gmail" },
  { userId: "alice", integration: "outlook" },
  { userId: "alice", integration: "slack" },
  { userId: "carol", integration: "gmail" },
  { userId: "tenant-a/bob", integration: "gmail" },
  { userId: "tenant-b/eve", integration: "gmail" },
];

/** Callers the tests use, beside the harness's admin. */
const callerSpecs: Record<string, PolicySpec> = {
  // One caller per RPC with every permission but that RPC.
  ...Object.fromEntries(
    rpcNames.map((rpc) => [`no-${rpc.toLowerCase()}`, { allow: rpcNames.filter((r) => r !== rpc), integrations: ["*"], refreshTokens: true }]),
  ),
  // One caller per RPC allowed only that RPC, on gmail only (ClearUser needs '*').
  ...Object.fromEntries(
    rpcNames.map((rpc) => [`only-${rpc.toLowerCase()}`, { allow: [rpc], integrations: rpc === "ClearUser" ? ["*"] : ["gmail"] }]),
  ),
  "outlook-only": { allow: rpcNames, integrations: ["outlook"], refreshTokens: true },
  "gmail-slack": { allow: ["ListConnections"], integrations: ["gmail", "slack"] },
  "users-exact": { allow: rpcNames, integrations: ["*"], users: ["carol"] },
  "users-tenant-a": { allow: rpcNames, integrations: ["*"], users: ["tenant-a/*"] },
  "clear-listed": { allow: ["ClearUser"], integrations: ["gmail", "outlook", "slack"] },
  "refresh-ok": { allow: ["Get"], integrations: ["gmail"], refreshTokens: true },
  "refresh-no": { allow: ["Get"], integrations: ["gmail"] },
};

beforeAll(async () => {
  db = await createTestDatabase();
  vault = await startVault({ pool: db.pool, keyRing: testKeyRing("k1") });
  issued.push(vault.secret);
  anon = createClient(TokenVaultService, createGrpcTransport({ baseUrl: vault.baseUrl }));
  anonGrpcJs = grpcJsClient(vault.port, undefined);
  for (const [name, spec] of Object.entries(callerSpecs)) {
    const { secret } = await vault.addCaller(name, spec);
    secrets.set(name, secret);
    issued.push(secret);
  }
  revokedSecret = (await vault.addCaller("revoked", { allow: rpcNames, integrations: ["*"] })).secret;
  rotatedAwaySecret = (await vault.addCaller("rotated", { allow: rpcNames, integrations: ["*"] })).secret;
  issued.push(revokedSecret, rotatedAwaySecret);
  await revoke(db.pool, "revoked");
  rotatedNewSecret = await rotateCallerSecret(db.pool, "rotated");
  issued.push(rotatedNewSecret);
  await vault.callers.reload();
});

afterAll(async () => {
  anonGrpcJs?.close();
  await vault?.close();
  expect(vault.logs.leaks(issued)).toEqual([]);
  await db?.drop();
});

/** Puts the connections table back to the seed, with one row marked used. */
async function reseed(): Promise<void> {
  await db.pool.query("delete from connections");
  for (const { userId, integration } of seed) {
    const key = `${userId}/${integration}`;
    seededAccess.set(key, secretToken("access"));
    seededRefresh.set(key, secretToken("refresh"));
    await vault.grpcClient.store({ userId, integration, tokenSet: { accessToken: seededAccess.get(key)!, refreshToken: seededRefresh.get(key)! } });
  }
  await vault.grpcClient.get({ userId: "alice", integration: "outlook" });
}

/** Every connections row, as PostgreSQL has it. */
async function snapshot(): Promise<Record<string, unknown>[]> {
  return (await db.pool.query("select * from connections order by id")).rows;
}

const secretOf = (name: string): string => {
  const secret = secrets.get(name);
  if (secret === undefined) throw new Error(`no caller ${name}`);
  return secret;
};

/** `secret` with its 256 random bits replaced: the right format and caller id, the wrong bytes. */
const wrongBytes = (secret: string) => `${secret.slice(0, -43)}${randomBytes(32).toString("base64url")}`;

/** The outcome of one call: ok, or the code and message as the client saw them. */
type Outcome = { ok: true; res: unknown } | { ok: false; code: string; message: string };

/** Calls one RPC through Connect's gRPC client or grpc-js with `authorization` (or none). */
interface RpcCase {
  readonly rpc: RpcName;
  connect(client: VaultClient, options: CallOptions): Promise<unknown>;
  grpcJs(): { request: Record<string, unknown> };
}

const rpcCases: RpcCase[] = [
  {
    rpc: "Store",
    connect: (c, o) => c.store({ userId: "alice", integration: "gmail", tokenSet: { accessToken: secretToken("store") } }, o),
    grpcJs: () => ({ request: { user_id: "alice", integration: "gmail", token_set: { access_token: secretToken("store") } } }),
  },
  {
    rpc: "Get",
    connect: (c, o) => c.get({ userId: "alice", integration: "gmail" }, o),
    grpcJs: () => ({ request: { user_id: "alice", integration: "gmail" } }),
  },
  {
    rpc: "Remove",
    connect: (c, o) => c.remove({ userId: "alice", integration: "gmail" }, o),
    grpcJs: () => ({ request: { user_id: "alice", integration: "gmail" } }),
  },
  {
    rpc: "ClearUser",
    connect: (c, o) => c.clearUser({ userId: "alice" }, o),
    grpcJs: () => ({ request: { user_id: "alice" } }),
  },
  {
    rpc: "ListConnections",
    connect: (c, o) => c.listConnections({ userId: "alice" }, o),
    grpcJs: () => ({ request: { user_id: "alice" } }),
  },
];

const clientKinds = ["connect-grpc", "grpc-js"] as const;
type ClientKind = (typeof clientKinds)[number];

/** Runs `rpc` through `kind` with the given authorization header value (undefined: none). */
async function callWith(kind: ClientKind, rpc: RpcCase, authorization: string | undefined, requestId?: string): Promise<Outcome> {
  if (kind === "connect-grpc") {
    const headers: Record<string, string> = {};
    if (authorization !== undefined) headers["authorization"] = authorization;
    if (requestId !== undefined) headers["x-request-id"] = requestId;
    return rpc.connect(anon, { headers }).then(
      (res) => ({ ok: true as const, res }),
      (e: unknown) => {
        const err = ConnectError.from(e);
        return { ok: false as const, code: Code[err.code], message: err.rawMessage };
      },
    );
  }
  const metadata = new grpc.Metadata();
  if (authorization !== undefined) metadata.set("authorization", authorization);
  if (requestId !== undefined) metadata.set("x-request-id", requestId);
  return anonGrpcJs.call(rpc.rpc, rpc.grpcJs().request, metadata).then(
    (res) => ({ ok: true as const, res }),
    (e: grpc.ServiceError) => ({
      ok: false as const,
      code: Code[grpcToConnect(e.code)],
      // grpc-js decodes grpc-message with decodeURI, which leaves %3A (':')
      // and other reserved characters percent-encoded; decode the rest here.
      message: decodeURIComponent(e.details),
    }),
  );
}

/** grpc status numbers are Connect's codes. */
const grpcToConnect = (status: grpc.status): Code => status as number as Code;

/** Calls and snapshots around the call: the outcome and whether the table changed. */
async function observed(call: () => Promise<Outcome>): Promise<{ outcome: Outcome; changed: boolean; before: unknown; after: unknown }> {
  const before = await snapshot();
  const outcome = await call();
  const after = await snapshot();
  return { outcome, changed: JSON.stringify(before) !== JSON.stringify(after), before, after };
}

/** Expects a denial with `code` and `message`, and the table exactly as it was. */
async function expectDenied(call: () => Promise<Outcome>, code: Code, message: string): Promise<void> {
  const { outcome, before, after } = await observed(call);
  expect(outcome.ok, "the call succeeded").toBe(false);
  const failure = outcome as { code: string; message: string };
  expect(failure.code).toBe(Code[code]);
  expect(failure.message).toBe(message);
  expect(after).toEqual(before);
}

/** Every way a call can fail to prove a caller; each must look the same to the client. */
const badCredentials: { name: string; header: () => string | undefined }[] = [
  { name: "no credential", header: () => undefined },
  { name: "malformed: 'Bearer' and nothing else", header: () => "Bearer" },
  { name: "malformed: another scheme (Basic)", header: () => `Basic ${Buffer.from("admin:admin").toString("base64")}` },
  { name: "malformed: a valid secret without the Bearer scheme", header: () => vault.secret },
  { name: "malformed: a valid secret followed by more text", header: () => `Bearer ${vault.secret} trailing` },
  { name: "malformed: a bearer token that is not a TokenVault secret", header: () => "Bearer not-a-tokenvault-secret" },
  { name: "malformed: a secret one character short", header: () => `Bearer ${vault.secret.slice(0, -1)}` },
  { name: "wrong secret: right format and caller id, wrong bytes", header: () => `Bearer ${wrongBytes(vault.secret)}` },
  {
    name: "wrong secret: the admin's random part under another caller's id",
    header: () => `Bearer ${secretOf("only-get").slice(0, -43)}${vault.secret.slice(-43)}`,
  },
  { name: "a secret of a caller id that does not exist", header: () => `Bearer tvs_987654321_${randomBytes(32).toString("base64url")}` },
  { name: "a revoked caller's secret", header: () => `Bearer ${revokedSecret}` },
  { name: "a rotated-away secret", header: () => `Bearer ${rotatedAwaySecret}` },
];

describe.each(rpcCases)("$rpc", (rpc) => {
  beforeEach(reseed);

  describe.each(clientKinds)("through %s", (kind) => {
    it.each(badCredentials)("$name: UNAUTHENTICATED with the one message, nothing read or changed", async ({ header }) => {
      await expectDenied(() => callWith(kind, rpc, header()), Code.Unauthenticated, unauthenticatedMessage);
    });

    it("a caller lacking the RPC: PERMISSION_DENIED naming the RPC, nothing read or changed", async () => {
      const name = `no-${rpc.rpc.toLowerCase()}`;
      await expectDenied(() => callWith(kind, rpc, `Bearer ${secretOf(name)}`), Code.PermissionDenied, `caller "${name}" may not call ${rpc.rpc}`);
    });

    if (rpc.rpc === "ListConnections") {
      it("a caller lacking the integration: allowed, but the integration is not listed", async () => {
        const { outcome, changed } = await observed(() => callWith(kind, rpc, `Bearer ${secretOf("outlook-only")}`));
        expect(outcome.ok).toBe(true);
        const res = (outcome as { res: { connections: { integration: string }[] } }).res;
        expect(res.connections.map((c) => c.integration)).toEqual(["outlook"]);
        expect(changed).toBe(false);
      });
    } else {
      it("a caller lacking the integration: PERMISSION_DENIED naming it, nothing read or changed", async () => {
        const message = rpc.rpc === "ClearUser"
          ? `caller "outlook-only" may not call ClearUser: it needs access to every integration ('*')`
          : `caller "outlook-only" may not access integration "gmail"`;
        await expectDenied(() => callWith(kind, rpc, `Bearer ${secretOf("outlook-only")}`), Code.PermissionDenied, message);
      });
    }

    it("a caller allowed exactly this RPC gets through", async () => {
      const { outcome, changed } = await observed(() => callWith(kind, rpc, `Bearer ${secretOf(`only-${rpc.rpc.toLowerCase()}`)}`));
      expect(outcome.ok, outcome.ok ? "" : `${outcome.code}: ${outcome.message}`).toBe(true);
      // Proves the snapshot sees what the call does: every RPC but ListConnections changes the table.
      expect(changed).toBe(rpc.rpc !== "ListConnections");
      const res = (outcome as { res: Record<string, unknown> }).res;
      switch (rpc.rpc) {
        case "Get":
          expect(res["accessToken"] ?? res["access_token"]).toBe(seededAccess.get("alice/gmail"));
          break;
        case "Remove":
          expect(res["existed"]).toBe(true);
          break;
        case "ClearUser":
          expect(res["removedCount"] ?? res["removed_count"]).toBe(3);
          break;
        case "ListConnections":
          expect((res["connections"] as { integration: string }[]).map((c) => c.integration)).toEqual(["gmail"]);
          break;
        case "Store":
          expect(res["created"]).toBe(false);
          break;
      }
    });
  });
});

describe("one answer for every credential failure", () => {
  beforeAll(reseed);

  it("all bad credentials, over both clients and every RPC, produced one message (and the admin secret works)", async () => {
    const messages = new Set<string>();
    for (const rpc of rpcCases.filter((r) => r.rpc === "ListConnections" || r.rpc === "Get")) {
      for (const kind of clientKinds) {
        for (const { header } of badCredentials) {
          const outcome = await callWith(kind, rpc, header());
          expect(outcome.ok).toBe(false);
          messages.add(`${(outcome as { code: string }).code}: ${(outcome as { message: string }).message}`);
        }
        expect((await callWith(kind, rpc, `Bearer ${vault.secret}`)).ok).toBe(true);
      }
    }
    expect([...messages]).toEqual([`Unauthenticated: ${unauthenticatedMessage}`]);
  });

  it("the rotated caller's new secret works where the old one fails", async () => {
    const list = rpcCases.find((r) => r.rpc === "ListConnections")!;
    expect((await callWith("connect-grpc", list, `Bearer ${rotatedNewSecret}`)).ok).toBe(true);
    expect((await callWith("grpc-js", list, `Bearer ${rotatedNewSecret}`)).ok).toBe(true);
    expect((await callWith("connect-grpc", list, `Bearer ${rotatedAwaySecret}`)).ok).toBe(false);
  });

  it("the Bearer scheme is case-insensitive", async () => {
    const list = rpcCases.find((r) => r.rpc === "ListConnections")!;
    expect((await callWith("connect-grpc", list, `bearer ${vault.secret}`)).ok).toBe(true);
    expect((await callWith("grpc-js", list, `BEARER ${vault.secret}`)).ok).toBe(true);
  });

  it("the Connect protocol (HTTP/1.1 JSON) gets the same UNAUTHENTICATED", async () => {
    const json = createClient(TokenVaultService, createConnectTransport({ baseUrl: vault.baseUrl, httpVersion: "1.1", useBinaryFormat: false }));
    const err = await json.listConnections({ userId: "alice" }).then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    expect(err).toBeInstanceOf(ConnectError);
    expect(Code[err!.code]).toBe(Code[Code.Unauthenticated]);
    expect(err!.rawMessage).toBe(unauthenticatedMessage);
  });
});

describe("policy dimensions", () => {
  beforeEach(reseed);

  const asCaller = (name: string) => vault.clientsWith(secretOf(name)).grpcClient;
  /** Runs a Connect call and reports its outcome. */
  const outcomeOf = (call: () => Promise<unknown>): Promise<Outcome> =>
    call().then(
      (res) => ({ ok: true as const, res }),
      (e: unknown) => {
        const err = ConnectError.from(e);
        return { ok: false as const, code: Code[err.code], message: err.rawMessage };
      },
    );

  describe("users: exact ids", () => {
    it("the listed user is allowed", async () => {
      const got = await asCaller("users-exact").get({ userId: "carol", integration: "gmail" });
      expect(got.accessToken).toBe(seededAccess.get("carol/gmail"));
      expect((await asCaller("users-exact").listConnections({ userId: "carol" })).connections).toHaveLength(1);
    });

    it.each([
      { name: "another user", userId: "alice" },
      { name: "a longer id that starts with the listed one", userId: "carol2" },
      { name: "a shorter id", userId: "caro" },
      { name: "a different case", userId: "Carol" },
    ])("$name is PERMISSION_DENIED for every RPC, nothing read or changed", async ({ userId }) => {
      const client = asCaller("users-exact");
      const message = `caller "users-exact" may not access this user`;
      for (const call of [
        () => client.get({ userId, integration: "gmail" }),
        () => client.store({ userId, integration: "gmail", tokenSet: { accessToken: secretToken() } }),
        () => client.remove({ userId, integration: "gmail" }),
        () => client.clearUser({ userId }),
        () => client.listConnections({ userId }),
      ]) {
        await expectDenied(() => outcomeOf(call), Code.PermissionDenied, message);
      }
    });
  });

  describe("users: prefixes", () => {
    it("a user under the prefix is allowed, for every RPC", async () => {
      const client = asCaller("users-tenant-a");
      expect((await client.get({ userId: "tenant-a/bob", integration: "gmail" })).accessToken).toBe(seededAccess.get("tenant-a/bob/gmail"));
      expect((await client.listConnections({ userId: "tenant-a/bob" })).connections).toHaveLength(1);
      expect((await client.store({ userId: "tenant-a/new", integration: "gmail", tokenSet: { accessToken: secretToken() } })).created).toBe(true);
      expect((await client.remove({ userId: "tenant-a/new", integration: "gmail" })).existed).toBe(true);
      expect((await client.clearUser({ userId: "tenant-a/bob" })).removedCount).toBe(1);
    });

    it.each([
      { name: "a user under another prefix", userId: "tenant-b/eve" },
      { name: "the prefix without its slash", userId: "tenant-a" },
      { name: "a user that merely contains the prefix", userId: "x/tenant-a/bob" },
      { name: "a user without a tenant", userId: "alice" },
    ])("$name is PERMISSION_DENIED for every RPC, nothing read or changed", async ({ userId }) => {
      const client = asCaller("users-tenant-a");
      const message = `caller "users-tenant-a" may not access this user`;
      for (const call of [
        () => client.get({ userId, integration: "gmail" }),
        () => client.store({ userId, integration: "gmail", tokenSet: { accessToken: secretToken() } }),
        () => client.remove({ userId, integration: "gmail" }),
        () => client.clearUser({ userId }),
        () => client.listConnections({ userId }),
      ]) {
        await expectDenied(() => outcomeOf(call), Code.PermissionDenied, message);
      }
    });
  });

  describe("ClearUser needs '*' integrations", () => {
    it("a caller listing every integration the user has is still refused", async () => {
      await expectDenied(
        () => outcomeOf(() => asCaller("clear-listed").clearUser({ userId: "alice" })),
        Code.PermissionDenied,
        `caller "clear-listed" may not call ClearUser: it needs access to every integration ('*')`,
      );
    });

    it("the same call by a caller with '*' clears the user", async () => {
      expect((await asCaller("only-clearuser").clearUser({ userId: "alice" })).removedCount).toBe(3);
    });
  });

  describe("ListConnections shows only the caller's integrations", () => {
    it.each([
      { name: "admin", caller: undefined, expected: ["gmail", "outlook", "slack"] },
      { name: "outlook-only", caller: "outlook-only", expected: ["outlook"] },
      { name: "gmail-slack", caller: "gmail-slack", expected: ["gmail", "slack"] },
    ])("$name sees $expected", async ({ caller, expected }) => {
      const secret = caller === undefined ? vault.secret : secretOf(caller);
      const res = await vault.clientsWith(secret).grpcClient.listConnections({ userId: "alice" });
      expect(res.connections.map((c) => c.integration)).toEqual(expected);
      const grpcJs = await anonGrpcJs.call<{ connections: { integration: string }[] }>("ListConnections", { user_id: "alice" }, metadataWith(secret));
      expect(grpcJs.connections.map((c) => c.integration)).toEqual(expected);
    });

    it("a caller with none of the user's integrations sees an empty list, not an error", async () => {
      const res = await asCaller("outlook-only").listConnections({ userId: "carol" });
      expect(res.connections).toEqual([]);
    });
  });

  describe("Get include_refresh_token", () => {
    it("a caller allowed refresh tokens gets it when it asks", async () => {
      const got = await asCaller("refresh-ok").get({ userId: "alice", integration: "gmail", includeRefreshToken: true });
      expect(got.refreshToken).toBe(seededRefresh.get("alice/gmail"));
      expect(got.accessToken).toBe(seededAccess.get("alice/gmail"));
      const raw = await anonGrpcJs.call<{ refresh_token?: string }>(
        "Get",
        { user_id: "alice", integration: "gmail", include_refresh_token: true },
        metadataWith(secretOf("refresh-ok")),
      );
      expect(raw.refresh_token).toBe(seededRefresh.get("alice/gmail"));
    });

    it("a caller not allowed them is PERMISSION_DENIED, and the connection is not even marked used", async () => {
      const client = asCaller("refresh-no");
      await expectDenied(
        () => outcomeOf(() => client.get({ userId: "alice", integration: "gmail", includeRefreshToken: true })),
        Code.PermissionDenied,
        `caller "refresh-no" may not receive refresh tokens`,
      );
      await expectDenied(
        () => callWith("grpc-js", { ...rpcCases[1]!, grpcJs: () => ({ request: { user_id: "alice", integration: "gmail", include_refresh_token: true } }) }, `Bearer ${secretOf("refresh-no")}`),
        Code.PermissionDenied,
        `caller "refresh-no" may not receive refresh tokens`,
      );
    });

    it.each([
      { name: "refresh-no", caller: "refresh-no" },
      { name: "refresh-ok", caller: "refresh-ok" },
      { name: "the admin", caller: undefined },
    ])("a default Get never returns it ($name)", async ({ caller }) => {
      const secret = caller === undefined ? vault.secret : secretOf(caller);
      const got = await vault.clientsWith(secret).grpcClient.get({ userId: "alice", integration: "gmail" });
      expect(got.accessToken).toBe(seededAccess.get("alice/gmail"));
      expect(got.refreshToken).toBeUndefined();
      expect(got.connection?.hasRefreshToken).toBe(true);
      const raw = await anonGrpcJs.call("Get", { user_id: "alice", integration: "gmail" }, metadataWith(secret));
      expect(JSON.stringify(raw)).not.toContain(seededRefresh.get("alice/gmail")!);
    });
  });
});

function metadataWith(secret: string): grpc.Metadata {
  const md = new grpc.Metadata();
  md.set("authorization", `Bearer ${secret}`);
  return md;
}

type ReflectionRequest = MessageInitShape<typeof ServerReflectionRequestSchema>;

/** Lists the services through reflection, sending `secret` when given. */
async function listServices(baseUrl: string, secret: string | undefined): Promise<string[]> {
  const client = createClient(ServerReflection, createGrpcTransport({ baseUrl, interceptors: secret === undefined ? [] : [bearer(secret)] }));
  async function* input(): AsyncIterable<ReflectionRequest> {
    yield { messageRequest: { case: "listServices", value: "" } };
  }
  const names: string[] = [];
  for await (const res of client.serverReflectionInfo(input())) {
    if (res.messageResponse.case === "listServicesResponse") names.push(...res.messageResponse.value.service.map((s) => s.name));
  }
  return names;
}

/** Health Check of the vault service, sending `secret` when given. */
async function checkHealth(baseUrl: string, secret: string | undefined): Promise<HealthCheckResponse_ServingStatus> {
  const client = createClient(Health, createGrpcTransport({ baseUrl, interceptors: secret === undefined ? [] : [bearer(secret)] }));
  return (await client.check({ service: TokenVaultService.typeName })).status;
}

/** "ok", or the Code a rejected promise carries; the message is kept for failure output. */
async function codeOf(promise: Promise<unknown>): Promise<{ code: string; message: string }> {
  return promise.then(
    () => ({ code: "ok", message: "" }),
    (e: unknown) => ({ code: Code[ConnectError.from(e).code], message: ConnectError.from(e).rawMessage }),
  );
}

/** Expects `promise` to end with `code` ("ok" for success). */
async function expectCode(promise: Promise<unknown>, code: string): Promise<void> {
  const outcome = await codeOf(promise);
  expect(outcome.code, outcome.message).toBe(code);
}

describe("open services", () => {
  it("health Check needs no credential by default (Connect and grpc-js)", async () => {
    expect(await checkHealth(vault.baseUrl, undefined)).toBe(HealthCheckResponse_ServingStatus.SERVING);
    const HealthClient = grpcJsService("grpc/health/v1/health.proto", "grpc.health.v1.Health");
    const health = new HealthClient(`127.0.0.1:${vault.port}`, grpc.credentials.createInsecure()) as grpc.Client & Record<string, (...args: unknown[]) => unknown>;
    try {
      const res = await new Promise<{ status: string }>((resolve, reject) =>
        health["Check"]!({ service: "" }, (err: grpc.ServiceError | null, r: { status: string }) => (err ? reject(err) : resolve(r))),
      );
      expect(res.status).toBe("SERVING");
    } finally {
      health.close();
    }
  });

  it("reflection needs no credential by default", async () => {
    expect(await listServices(vault.baseUrl, undefined)).toContain(TokenVaultService.typeName);
  });

  describe("with openServices empty", () => {
    let closed: TestVault;
    beforeAll(async () => {
      closed = await startVault({ pool: db.pool, keyRing: testKeyRing("k1"), openServices: new Set() });
      issued.push(closed.secret);
    });
    afterAll(async () => {
      await closed?.close();
      expect(closed.logs.leaks(issued)).toEqual([]);
    });

    it("health Check without a credential is UNAUTHENTICATED", async () => {
      await expectCode(checkHealth(closed.baseUrl, undefined), Code[Code.Unauthenticated]);
    });

    it("reflection without a credential is UNAUTHENTICATED", async () => {
      await expectCode(listServices(closed.baseUrl, undefined), Code[Code.Unauthenticated]);
    });

    it("health Check with a wrong secret is UNAUTHENTICATED", async () => {
      await expectCode(checkHealth(closed.baseUrl, wrongBytes(closed.secret)), Code[Code.Unauthenticated]);
    });

    // "Needs a credential" means a valid one lets the caller in. Policies can
    // only name TokenVaultService RPCs, so if health and reflection were put
    // through the RPC policy nobody could ever call them.
    it("health Check with the admin's credential is SERVING", async () => {
      await expectCode(checkHealth(closed.baseUrl, closed.secret), "ok");
    });

    it("reflection with the admin's credential lists the services", async () => {
      await expectCode(listServices(closed.baseUrl, closed.secret), "ok");
    });

    it("the vault service itself still works with the credential", async () => {
      expect((await closed.grpcClient.listConnections({ userId: "nobody" })).connections).toEqual([]);
    });
  });
});

describe("logs and storage", () => {
  /** The log line of the call with `requestId`, parsed. */
  const logLineOf = (requestId: string): Record<string, unknown> => {
    const lines = vault.logs.lines.filter((l) => l.includes(`"requestId":"${requestId}"`) && l.includes('"msg":"call'));
    expect(lines, `log lines of ${requestId}`).toHaveLength(1);
    return JSON.parse(lines[0]!) as Record<string, unknown>;
  };
  const list = () => rpcCases.find((r) => r.rpc === "ListConnections")!;

  it.each(clientKinds)("an allowed call's log line names its caller (%s)", async (kind) => {
    const requestId = `rid-ok-${kind}-${randomBytes(4).toString("hex")}`;
    expect((await callWith(kind, list(), `Bearer ${secretOf("only-listconnections")}`, requestId)).ok).toBe(true);
    expect(logLineOf(requestId)).toMatchObject({ caller: "only-listconnections", code: "ok", method: "tokenvault.v1.TokenVaultService/ListConnections" });
  });

  it("a denied call's log line names its caller and the reason", async () => {
    const requestId = `rid-denied-${randomBytes(4).toString("hex")}`;
    expect((await callWith("connect-grpc", list(), `Bearer ${secretOf("no-listconnections")}`, requestId)).ok).toBe(false);
    expect(logLineOf(requestId)).toMatchObject({
      caller: "no-listconnections",
      code: "PermissionDenied",
      reason: `caller "no-listconnections" may not call ListConnections`,
    });
  });

  it.each([
    { name: "a revoked caller", header: () => `Bearer ${revokedSecret}` },
    { name: "a rotated-away secret", header: () => `Bearer ${rotatedAwaySecret}` },
  ])("an unauthenticated call ($name) is logged without a caller", async ({ header }) => {
    const requestId = `rid-unauth-${randomBytes(4).toString("hex")}`;
    expect((await callWith("connect-grpc", list(), header(), requestId)).ok).toBe(false);
    const line = logLineOf(requestId);
    expect(line).toMatchObject({ code: "Unauthenticated" });
    expect(line["caller"]).toBeUndefined();
  });

  it("no issued secret, nor its random part, nor its hash, appears in any log line", () => {
    expect(vault.logs.lines.length).toBeGreaterThan(100);
    const needles = issued.flatMap((s) => [...encodings(s), s.slice(-43), hashSecret(s).toString("hex"), hashSecret(s).toString("base64")]);
    expect(vault.logs.leaks(needles)).toEqual([]);
  });

  it("the callers table holds hashes, never a secret", async () => {
    const rows = (await db.pool.query<{ row: string; name: string }>("select callers::text as row, name from callers order by id")).rows;
    expect(rows.length).toBeGreaterThanOrEqual(issued.length - 1);
    const all = rows.map((r) => r.row).join("\n");
    for (const secret of issued) {
      for (const needle of [...encodings(secret), secret.slice(-43)]) expect(all.includes(needle), `a secret in the callers table`).toBe(false);
    }
    // The text does include the hash column: the current secret's hash is there, the rotated-away one's is gone.
    const rotated = rows.find((r) => r.name === "rotated")!.row;
    expect(rotated).toContain(hashSecret(rotatedNewSecret).toString("hex"));
    expect(all).not.toContain(hashSecret(rotatedAwaySecret).toString("hex"));
  });
});
