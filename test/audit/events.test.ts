/**
 * The audit log as an auditor relies on it, through the real server on
 * listen(0), real clients and a real PostgreSQL:
 *
 * 1. Every TokenVaultService call, whatever its outcome, writes exactly one
 *    audit_events row (counted by request id, and as the only row added by the
 *    call), with the right caller, action, user, integration, snake_case
 *    outcome, the x-request-id the client got back, the peer and details.
 *    Health and reflection calls write nothing.
 * 2. No column of any event, and no log line, holds a token or a caller secret.
 * 3. Fail-closed: when the event cannot be committed (the chain's head locked
 *    past lock_timeout, or the events table locked), the call is UNAVAILABLE
 *    with reason AUDIT_UNAVAILABLE, carries no token, and adds no event; once
 *    the lock goes, calls work again.
 * 4. Group commit: 200 concurrent Gets commit 200 events in fewer batches,
 *    with consecutive ids and a hash chain recomputable with eventHash.
 * 5. A plain @grpc/grpc-js client's Get is audited the same way.
 */
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import pg from "pg";
import * as grpc from "@grpc/grpc-js";
import { Code, ConnectError, createClient, type CallOptions, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { ErrorDetailSchema, ErrorReason, TokenVaultService } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { Health, HealthCheckResponse_ServingStatus } from "../../src/gen/grpc/health/v1/health_pb.js";
import { ServerReflection, type ServerReflectionRequestSchema } from "../../src/gen/grpc/reflection/v1/reflection_pb.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { eventHash, genesisHash, type AuditEventInput, type DetailValue } from "../../src/audit/chain.js";
import type { AuditEventRow } from "../../src/db/queries/audit.js";
import { rpcNames } from "../../src/auth/policy.js";
import type { KeyRing } from "../../src/crypto/key-ring.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { encodings, secretMarker, secretToken, testKeyRing } from "../helpers/secrets.js";
import { grpcJsClient, startVault, type GrpcJsVault, type TestVault } from "../helpers/server.js";

type VaultClient = Client<typeof TokenVaultService>;

/** The one answer to every credential failure. */
const unauthenticatedMessage =
  "missing or invalid credentials: send 'authorization: Bearer <secret>' or a client certificate bound to a caller";

/** Every client connects from here (the server listens on 127.0.0.1). */
const peer = "127.0.0.1";

let db: TestDatabase;
let keyRing: KeyRing;
let vault: TestVault;
/** The harness's admin caller (every permission) and its name. */
let admin: VaultClient;
let adminName: string;
/** Callers beside the admin, by name. */
const callers = new Map<string, { secret: string; client: VaultClient }>();

/** Every token and caller secret used in this file: none may reach an event or a log line. */
const used: string[] = [];
/** A token-like secret, remembered for the leak scans. */
const token = (kind: string): string => {
  const t = secretToken(kind);
  used.push(t);
  return t;
};
/** A caller secret, remembered for the leak scans, with its random part on its own. */
const rememberSecret = (secret: string): string => {
  used.push(secret, secret.slice(-43));
  return secret;
};

beforeAll(async () => {
  db = await createTestDatabase();
  keyRing = testKeyRing("k1");
  vault = await startVault({ pool: db.pool, keyRing });
  rememberSecret(vault.secret);
  admin = vault.grpcClient;
  adminName = vault.callers.bySecret(vault.secret)!.name;
  const specs = {
    "no-get": { allow: rpcNames.filter((r) => r !== "Get"), integrations: ["*"] },
    "no-streamaudit": { allow: rpcNames.filter((r) => r !== "StreamAudit"), integrations: ["*"] },
    "outlook-only": { allow: [...rpcNames], integrations: ["outlook"] },
    auditor: { allow: ["StreamAudit", "VerifyAudit"], integrations: ["*"] },
  } as const;
  for (const [name, spec] of Object.entries(specs)) {
    const added = await vault.addCaller(name, { allow: [...spec.allow], integrations: [...spec.integrations] });
    callers.set(name, { secret: rememberSecret(added.secret), client: added.grpcClient });
  }
});

afterAll(async () => {
  await vault?.close();
  expect(vault.logs.leaks(used)).toEqual([]);
  await db?.drop();
});

// ---------------------------------------------------------------------------
// Helpers: calls with our own request id, and the rows they added.
// ---------------------------------------------------------------------------

/** An audit_events row as pg returns it. */
type AuditRow = AuditEventRow;

/** A fresh request id that the server honours (matches /^[A-Za-z0-9._:-]{1,128}$/). */
const newRequestId = (label: string): string => `${label}.${randomBytes(6).toString("hex")}`;

/** The newest committed event id. */
async function headId(): Promise<bigint> {
  return BigInt((await db.pool.query<{ last_id: string }>("select last_id from audit_head")).rows[0]!.last_id);
}

async function countEvents(): Promise<number> {
  return Number((await db.pool.query<{ n: string }>("select count(*) as n from audit_events")).rows[0]!.n);
}

async function eventsWithRequestId(requestId: string): Promise<AuditRow[]> {
  return (await db.pool.query<AuditRow>("select * from audit_events where request_id = $1::text order by id", [requestId])).rows;
}

async function eventsAfter(id: bigint): Promise<AuditRow[]> {
  return (await db.pool.query<AuditRow>("select * from audit_events where id > $1::bigint order by id", [id.toString()])).rows;
}

/** How a call ended, and the x-request-id the client got back (response header or error metadata). */
type Result<T> = { ok: true; res: T; echoed: string | null } | { ok: false; err: ConnectError; echoed: string | null };

/** Runs a Connect call with `x-request-id: requestId`. */
async function run<T>(requestId: string, call: (options: CallOptions) => Promise<T>): Promise<Result<T>> {
  let header: string | null = null;
  const options: CallOptions = {
    headers: { "x-request-id": requestId },
    onHeader: (h) => {
      header = h.get("x-request-id");
    },
  };
  try {
    const res = await call(options);
    return { ok: true, res, echoed: header };
  } catch (e) {
    const err = ConnectError.from(e);
    return { ok: false, err, echoed: err.metadata.get("x-request-id") ?? header };
  }
}

/** Drains a server stream into an array. */
async function drain<T>(stream: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const item of stream) out.push(item);
  return out;
}

/** What an event must say, beside the request id and peer. */
interface Expected {
  caller: string | null;
  action: string;
  user_id: string | null;
  integration: string | null;
  outcome: string;
  details: Record<string, DetailValue>;
}

/**
 * Runs `call` with a fresh request id and checks that it added exactly one
 * event, that this event carries the id the client got back, and says `expected`.
 */
async function expectAudited<T>(
  label: string,
  call: (options: CallOptions) => Promise<T>,
  expected: Expected | ((result: Result<T>) => Expected),
): Promise<{ result: Result<T>; event: AuditRow }> {
  const requestId = newRequestId(label);
  const mark = await headId();
  const before = new Date();
  const result = await run(requestId, call);
  const after = new Date();
  expect(result.echoed, "the client got its x-request-id back").toBe(requestId);
  const mine = await eventsWithRequestId(requestId);
  expect(mine, `events with request id ${requestId}`).toHaveLength(1);
  const added = await eventsAfter(mark);
  expect(added.map((e) => e.request_id), "the call added exactly one event").toEqual([requestId]);
  const event = mine[0]!;
  const want = typeof expected === "function" ? expected(result) : expected;
  expect({
    caller: event.caller,
    action: event.action,
    user_id: event.user_id,
    integration: event.integration,
    outcome: event.outcome,
    request_id: event.request_id,
    peer: event.peer,
    details: event.details,
  }).toEqual({ ...want, request_id: requestId, peer });
  expect(event.occurred_at.getTime()).toBeGreaterThanOrEqual(before.getTime());
  expect(event.occurred_at.getTime()).toBeLessThanOrEqual(after.getTime());
  return { result, event };
}

/** The ErrorDetail reason a failed call carries, if any. */
const reasonOf = (err: ConnectError): ErrorReason | undefined => err.findDetails(ErrorDetailSchema)[0]?.reason;

/** Everything a failed call shows its client, as one string to search. */
function everythingIn(err: ConnectError): string {
  return JSON.stringify({
    message: err.message,
    raw: err.rawMessage,
    metadata: [...err.metadata.entries()],
    details: err.details.map((d) => ("value" in d && d.value instanceof Uint8Array ? Buffer.from(d.value).toString("latin1") : JSON.stringify(d))),
  });
}

/** The event as the writer hashed it. */
function inputOf(row: AuditRow): AuditEventInput {
  return {
    occurredAt: row.occurred_at,
    caller: row.caller,
    action: row.action as AuditEventInput["action"],
    userId: row.user_id,
    integration: row.integration,
    outcome: row.outcome,
    requestId: row.request_id,
    peer: row.peer,
    details: row.details,
  };
}

/**
 * Recomputes the chain over ids from..to (inclusive): each prev_hash is the
 * previous event's hash (genesis for id 1), each hash is eventHash of the row.
 * Returns the problems found (empty when the chain holds).
 */
async function chainProblems(from: bigint, to: bigint): Promise<string[]> {
  const rows = (
    await db.pool.query<AuditRow>("select * from audit_events where id >= $1::bigint and id <= $2::bigint order by id", [
      (from > 1n ? from - 1n : from).toString(),
      to.toString(),
    ])
  ).rows;
  const problems: string[] = [];
  let prev: AuditRow | undefined = from > 1n ? rows.shift() : undefined;
  if (from > 1n && prev?.id !== (from - 1n).toString()) problems.push(`event ${from - 1n} is missing`);
  let expectedId = from;
  for (const row of rows) {
    const id = BigInt(row.id);
    if (id !== expectedId) problems.push(`id ${id} where ${expectedId} was expected`);
    const prevHash = prev === undefined ? genesisHash : prev.hash;
    if (!row.prev_hash.equals(prevHash)) problems.push(`event ${id}: prev_hash is not the previous event's hash`);
    if (!row.hash.equals(eventHash(row.prev_hash, id, inputOf(row)))) problems.push(`event ${id}: hash does not recompute`);
    prev = row;
    expectedId = id + 1n;
  }
  if (expectedId !== to + 1n) problems.push(`the chain ends at ${expectedId - 1n}, not ${to}`);
  return problems;
}

/** Stores one connection as the admin, with every token a secret. */
async function storeAsAdmin(userId: string, integration: string): Promise<{ accessToken: string }> {
  const accessToken = token("access");
  await admin.store({
    userId,
    integration,
    tokenSet: { accessToken, refreshToken: token("refresh"), idToken: token("id"), extras: { s: token("extra") } },
  });
  return { accessToken };
}

const clientOf = (name: string): VaultClient => callers.get(name)!.client;
const secretOf = (name: string): string => callers.get(name)!.secret;

// ---------------------------------------------------------------------------
// 1. One event per call, with the right fields
// ---------------------------------------------------------------------------

describe("one event per call, with the right fields", () => {
  describe("Store", () => {
    it("ok: caller, action store, the user and integration, outcome ok", async () => {
      const accessToken = token("access");
      const { result } = await expectAudited(
        "store-ok",
        (o) => admin.store({ userId: "alice", integration: "gmail", tokenSet: { accessToken, refreshToken: token("refresh"), idToken: token("id") } }, o),
        { caller: adminName, action: "store", user_id: "alice", integration: "gmail", outcome: "ok", details: { rpc: "Store" } },
      );
      expect(result.ok).toBe(true);
    });

    it("over the Connect protocol (HTTP/1.1 JSON) too", async () => {
      await expectAudited(
        "store-connect",
        (o) => vault.connectClient.store({ userId: "alice", integration: "outlook", tokenSet: { accessToken: token("access") } }, o),
        { caller: adminName, action: "store", user_id: "alice", integration: "outlook", outcome: "ok", details: { rpc: "Store" } },
      );
    });
  });

  describe("Get", () => {
    it("ok: action get, whether a refresh token was returned", async () => {
      const { accessToken } = await storeAsAdmin("bob", "gmail");
      const { result } = await expectAudited("get-ok", (o) => admin.get({ userId: "bob", integration: "gmail" }, o), {
        caller: adminName,
        action: "get",
        user_id: "bob",
        integration: "gmail",
        outcome: "ok",
        details: { rpc: "Get", refreshed: false, refresh_token_returned: false },
      });
      expect(result.ok && result.res.accessToken).toBe(accessToken);
    });

    it("ok with include_refresh_token: refresh_token_returned true (over gRPC-Web)", async () => {
      await storeAsAdmin("bob", "slack");
      await expectAudited("get-refresh", (o) => vault.grpcWebClient.get({ userId: "bob", integration: "slack", includeRefreshToken: true }, o), {
        caller: adminName,
        action: "get",
        user_id: "bob",
        integration: "slack",
        outcome: "ok",
        details: { rpc: "Get", refreshed: false, refresh_token_returned: true },
      });
    });

    it("not_found", async () => {
      const { result } = await expectAudited("get-notfound", (o) => admin.get({ userId: "bob", integration: "hubspot" }, o), {
        caller: adminName,
        action: "get",
        user_id: "bob",
        integration: "hubspot",
        outcome: "not_found",
        details: { rpc: "Get", error: "no connection for this user_id and integration" },
      });
      expect(!result.ok && result.err.code).toBe(Code.NotFound);
    });

    it("invalid_argument: a bad user id is not recorded (user_id null), even when it holds a secret", async () => {
      const badUserId = `${token("in-user-id")}\u0001`;
      const { result } = await expectAudited("get-invalid", (o) => admin.get({ userId: badUserId, integration: "gmail" }, o), {
        caller: adminName,
        action: "get",
        user_id: null,
        integration: "gmail",
        outcome: "invalid_argument",
        details: { rpc: "Get", error: "user_id must not contain control characters or unpaired surrogates" },
      });
      expect(!result.ok && result.err.code).toBe(Code.InvalidArgument);
    });

    it("a tampered ciphertext: action integrity_failure, outcome data_loss, no token returned", async () => {
      const { accessToken } = await storeAsAdmin("mallory-victim", "gmail");
      // Flip one bit of the GCM tag at the end of the sealed access token.
      const updated = await db.pool.query(
        `update connections
            set access_token_sealed = set_byte(access_token_sealed, length(access_token_sealed) - 1,
                                               get_byte(access_token_sealed, length(access_token_sealed) - 1) # 1)
          where user_id = 'mallory-victim' and integration = 'gmail'`,
      );
      expect(updated.rowCount).toBe(1);
      const { result } = await expectAudited("get-tampered", (o) => admin.get({ userId: "mallory-victim", integration: "gmail" }, o), {
        caller: adminName,
        action: "integrity_failure",
        user_id: "mallory-victim",
        integration: "gmail",
        outcome: "data_loss",
        details: {
          rpc: "Get",
          error: "a stored token failed its integrity check (altered, moved, or sealed under a different key); it was not returned",
        },
      });
      expect(result.ok).toBe(false);
      const err = (result as { err: ConnectError }).err;
      expect(err.code).toBe(Code.DataLoss);
      expect(reasonOf(err)).toBe(ErrorReason.INTEGRITY_FAILURE);
      expect(everythingIn(err)).not.toContain(accessToken);
    });
  });

  describe("Remove", () => {
    it("of an existing connection: details.existed true; again: false", async () => {
      await storeAsAdmin("carol", "gmail");
      const expected = (existed: boolean): Expected => ({
        caller: adminName,
        action: "remove",
        user_id: "carol",
        integration: "gmail",
        outcome: "ok",
        details: { rpc: "Remove", existed },
      });
      await expectAudited("remove-1", (o) => admin.remove({ userId: "carol", integration: "gmail" }, o), expected(true));
      await expectAudited("remove-2", (o) => admin.remove({ userId: "carol", integration: "gmail" }, o), expected(false));
    });
  });

  describe("ClearUser", () => {
    it("details.removed counts the connections that went; no integration", async () => {
      for (const integration of ["gmail", "outlook", "slack"]) await storeAsAdmin("dave", integration);
      const { result } = await expectAudited("clear", (o) => admin.clearUser({ userId: "dave" }, o), {
        caller: adminName,
        action: "clear_user",
        user_id: "dave",
        integration: null,
        outcome: "ok",
        details: { rpc: "ClearUser", removed: 3 },
      });
      expect(result.ok && result.res.removedCount).toBe(3);
      await expectAudited("clear-again", (o) => admin.clearUser({ userId: "dave" }, o), {
        caller: adminName,
        action: "clear_user",
        user_id: "dave",
        integration: null,
        outcome: "ok",
        details: { rpc: "ClearUser", removed: 0 },
      });
    });
  });

  describe("ListConnections", () => {
    it("details.connections counts what the caller saw", async () => {
      for (const integration of ["gmail", "outlook"]) await storeAsAdmin("erin", integration);
      await expectAudited("list-admin", (o) => admin.listConnections({ userId: "erin" }, o), {
        caller: adminName,
        action: "list",
        user_id: "erin",
        integration: null,
        outcome: "ok",
        details: { rpc: "ListConnections", connections: 2 },
      });
      // A caller limited to outlook sees one of them.
      await expectAudited("list-outlook", (o) => clientOf("outlook-only").listConnections({ userId: "erin" }, o), {
        caller: "outlook-only",
        action: "list",
        user_id: "erin",
        integration: null,
        outcome: "ok",
        details: { rpc: "ListConnections", connections: 1 },
      });
    });
  });

  describe("denied: action denied, outcome permission_denied, the caller's name, the missing permission", () => {
    it("a caller lacking the RPC", async () => {
      await storeAsAdmin("frank", "gmail");
      await expectAudited("denied-rpc", (o) => clientOf("no-get").get({ userId: "frank", integration: "gmail" }, o), {
        caller: "no-get",
        action: "denied",
        user_id: "frank",
        integration: "gmail",
        outcome: "permission_denied",
        details: { rpc: "Get", error: 'caller "no-get" may not call Get' },
      });
    });

    it("a caller lacking the integration", async () => {
      await expectAudited("denied-integration", (o) => clientOf("outlook-only").get({ userId: "frank", integration: "gmail" }, o), {
        caller: "outlook-only",
        action: "denied",
        user_id: "frank",
        integration: "gmail",
        outcome: "permission_denied",
        details: { rpc: "Get", error: 'caller "outlook-only" may not access integration "gmail"' },
      });
    });

    it("a caller lacking StreamAudit", async () => {
      await expectAudited("denied-stream", (o) => drain(clientOf("no-streamaudit").streamAudit({}, o)), {
        caller: "no-streamaudit",
        action: "denied",
        user_id: null,
        integration: null,
        outcome: "permission_denied",
        details: { rpc: "StreamAudit", error: 'caller "no-streamaudit" may not call StreamAudit' },
      });
    });
  });

  describe("unauthenticated: action unauthenticated, caller null, whom the credential claimed", () => {
    const anonymous = () => vault.clientsWith(undefined).grpcClient;

    it("no credential: no claimed caller", async () => {
      await expectAudited("unauth-none", (o) => anonymous().get({ userId: "frank", integration: "gmail" }, o), {
        caller: null,
        action: "unauthenticated",
        user_id: "frank",
        integration: "gmail",
        outcome: "unauthenticated",
        details: { rpc: "Get", error: unauthenticatedMessage },
      });
    });

    it("an existing caller's id with the wrong random part: claimed_caller is that caller's name", async () => {
      const wrong = rememberSecret(`${secretOf("no-get").slice(0, -43)}${randomBytes(32).toString("base64url")}`);
      await expectAudited("unauth-wrong", (o) => vault.clientsWith(wrong).grpcClient.get({ userId: "frank", integration: "gmail" }, o), {
        caller: null,
        action: "unauthenticated",
        user_id: "frank",
        integration: "gmail",
        outcome: "unauthenticated",
        details: { rpc: "Get", error: unauthenticatedMessage, claimed_caller: "no-get" },
      });
    });

    it("a made-up caller id: claimed_caller is 'unknown caller id N'", async () => {
      const madeUp = rememberSecret(`tvs_987654321_${randomBytes(32).toString("base64url")}`);
      await expectAudited("unauth-unknown", (o) => vault.clientsWith(madeUp).connectClient.listConnections({ userId: "frank" }, o), {
        caller: null,
        action: "unauthenticated",
        user_id: "frank",
        integration: null,
        outcome: "unauthenticated",
        details: { rpc: "ListConnections", error: unauthenticatedMessage, claimed_caller: "unknown caller id 987654321" },
      });
    });
  });

  describe("VerifyAudit", () => {
    it("ok: details say the result and how many events were checked", async () => {
      const before = await countEvents();
      const { result } = await expectAudited("verify", (o) => clientOf("auditor").verifyAudit({}, o), {
        caller: "auditor",
        action: "verify_audit",
        user_id: null,
        integration: null,
        outcome: "ok",
        details: { rpc: "VerifyAudit", ok: true, checked: before },
      });
      expect(result.ok && result.res.ok).toBe(true);
      expect(result.ok && result.res.checked).toBe(BigInt(before));
    });
  });

  describe("StreamAudit", () => {
    it("a stream that starts writes one stream_audit event holding its filter", async () => {
      await storeAsAdmin("stream-user", "gmail");
      await admin.get({ userId: "stream-user", integration: "gmail" });
      await storeAsAdmin("stream-user", "outlook");
      const since = new Date(Date.UTC(2020, 0, 1));
      const { result } = await expectAudited(
        "stream",
        (o) =>
          drain(
            clientOf("auditor").streamAudit(
              {
                filter: { userId: "stream-user", integration: "gmail", caller: adminName, actions: ["get", "store"], since: timestampFromDate(since) },
                afterCursor: 0n,
                follow: false,
              },
              o,
            ),
          ),
        {
          caller: "auditor",
          action: "stream_audit",
          user_id: "stream-user",
          integration: "gmail",
          outcome: "ok",
          details: {
            rpc: "StreamAudit",
            follow: false,
            after_cursor: "0",
            caller: adminName,
            actions: ["get", "store"],
            since: since.toISOString(),
          },
        },
      );
      // What it streamed matches the filter: the gmail Store and Get by the admin, not the outlook Store.
      const streamed = result.ok ? result.res.map((r) => r.event!) : [];
      expect(streamed.map((e) => e.action)).toEqual(["store", "get"]);
      expect(streamed.every((e) => e.userId === "stream-user" && e.integration === "gmail" && e.caller === adminName)).toBe(true);
    });

    // The handler records its own event, so a filter it refuses is recorded
    // there too, like a refused Get (invalid_argument, recorded above).
    it("a refused filter (invalid_argument) writes one event too", async () => {
      const requestId = newRequestId("stream-invalid");
      const mark = await headId();
      const result = await run(requestId, (o) => drain(clientOf("auditor").streamAudit({ filter: { actions: ["no_such_action"] } }, o)));
      expect(!result.ok && result.err.code).toBe(Code.InvalidArgument);
      expect(result.echoed).toBe(requestId);
      const added = await eventsAfter(mark);
      expect(added.map((e) => e.request_id)).toEqual([requestId]);
      expect(added[0]).toMatchObject({
        caller: "auditor",
        action: "stream_audit",
        outcome: "invalid_argument",
        peer,
        details: { rpc: "StreamAudit", error: expect.stringContaining("filter.actions") },
      });
    });
  });

  describe("health and reflection write nothing", () => {
    it("a health Check and a reflection listing add no event", async () => {
      const mark = await headId();
      const requestId = newRequestId("health");
      const health = createClient(Health, createGrpcTransport({ baseUrl: vault.baseUrl }));
      const res = await health.check({ service: TokenVaultService.typeName }, { headers: { "x-request-id": requestId } });
      expect(res.status).toBe(HealthCheckResponse_ServingStatus.SERVING);

      const reflection = createClient(ServerReflection, createGrpcTransport({ baseUrl: vault.baseUrl }));
      async function* input(): AsyncIterable<MessageInitShape<typeof ServerReflectionRequestSchema>> {
        yield { messageRequest: { case: "listServices", value: "" } };
      }
      const names: string[] = [];
      for await (const r of reflection.serverReflectionInfo(input(), { headers: { "x-request-id": `${requestId}.r` } })) {
        if (r.messageResponse.case === "listServicesResponse") names.push(...r.messageResponse.value.service.map((s) => s.name));
      }
      expect(names).toContain(TokenVaultService.typeName);

      expect(await eventsAfter(mark)).toEqual([]);
      expect(await headId()).toBe(mark);
    });
  });
});

// ---------------------------------------------------------------------------
// 5. A plain @grpc/grpc-js client
// ---------------------------------------------------------------------------

describe("a plain @grpc/grpc-js client", () => {
  let client: GrpcJsVault;
  beforeAll(() => {
    client = grpcJsClient(vault.port, vault.secret);
  });
  afterAll(() => client?.close());

  /** Calls Get with call metadata, as another language's client would; returns the echoed request id. */
  function get(request: Record<string, unknown>, requestId: string): Promise<{ err: grpc.ServiceError | null; res: unknown; echoed: string | undefined }> {
    return new Promise((resolve) => {
      const metadata = new grpc.Metadata();
      metadata.set("authorization", `Bearer ${vault.secret}`);
      metadata.set("x-request-id", requestId);
      let echoed: string | undefined;
      const call = client.raw["Get"]!(request, metadata, (err: grpc.ServiceError | null, res: unknown) =>
        resolve({ err, res, echoed: echoed ?? (err?.metadata.get("x-request-id")[0] as string | undefined) }),
      ) as grpc.ClientUnaryCall;
      call.on("metadata", (m: grpc.Metadata) => {
        echoed = m.get("x-request-id")[0] as string | undefined;
      });
    });
  }

  it("Get writes exactly one event with the request id it got back", async () => {
    const { accessToken } = await storeAsAdmin("grace", "gmail");
    const requestId = newRequestId("grpcjs");
    const mark = await headId();
    const { err, res, echoed } = await get({ user_id: "grace", integration: "gmail" }, requestId);
    expect(err).toBeNull();
    expect((res as { access_token: string }).access_token).toBe(accessToken);
    expect(echoed).toBe(requestId);
    const added = await eventsAfter(mark);
    expect(added).toHaveLength(1);
    expect(added[0]).toMatchObject({
      caller: adminName,
      action: "get",
      user_id: "grace",
      integration: "gmail",
      outcome: "ok",
      request_id: requestId,
      peer,
      details: { rpc: "Get", refreshed: false, refresh_token_returned: false },
    });
  });

  it("a failed Get (not found) too", async () => {
    const requestId = newRequestId("grpcjs-notfound");
    const mark = await headId();
    const { err, echoed } = await get({ user_id: "grace", integration: "salesforce" }, requestId);
    expect(err?.code).toBe(grpc.status.NOT_FOUND);
    expect(echoed).toBe(requestId);
    const added = await eventsAfter(mark);
    expect(added.map((e) => [e.request_id, e.action, e.outcome, e.user_id, e.integration])).toEqual([
      [requestId, "get", "not_found", "grace", "salesforce"],
    ]);
  });
});

// ---------------------------------------------------------------------------
// 4. Group commit
// ---------------------------------------------------------------------------

describe("group commit", () => {
  it("200 concurrent Gets: 200 events committed in fewer batches, consecutive ids, a valid chain", async () => {
    const { accessToken } = await storeAsAdmin("burst-user", "gmail");
    const tag = `burst.${randomBytes(4).toString("hex")}`;
    const requestIds = Array.from({ length: 200 }, (_, i) => `${tag}.${i}`);
    const mark = await headId();
    const statsBefore = vault.audit.writer.stats();

    const results = await Promise.all(requestIds.map((id) => admin.get({ userId: "burst-user", integration: "gmail" }, { headers: { "x-request-id": id } })));
    expect(results.every((r) => r.accessToken === accessToken)).toBe(true);

    const statsAfter = vault.audit.writer.stats();
    const events = statsAfter.events - statsBefore.events;
    const batches = statsAfter.batches - statsBefore.batches;
    expect(events).toBe(200);
    expect(batches).toBeGreaterThan(0);
    expect(batches, `${events} events in ${batches} batches`).toBeLessThan(events);
    expect(statsAfter.largestBatch).toBeGreaterThan(1);

    const added = await eventsAfter(mark);
    expect(added).toHaveLength(200);
    expect(added.map((e) => e.request_id).sort()).toEqual([...requestIds].sort());
    expect(added.map((e) => BigInt(e.id))).toEqual(Array.from({ length: 200 }, (_, i) => mark + 1n + BigInt(i)));
    expect(added.every((e) => e.action === "get" && e.outcome === "ok" && e.caller === adminName)).toBe(true);
    expect(await chainProblems(mark + 1n, mark + 200n)).toEqual([]);
  });
});

// ---------------------------------------------------------------------------
// 3. Fail-closed
// ---------------------------------------------------------------------------

describe("fail-closed", () => {
  let strict: TestVault;
  let holder: pg.Client | undefined;

  beforeAll(async () => {
    strict = await startVault({ pool: db.pool, keyRing, audit: { lockTimeoutMs: 200 } });
    rememberSecret(strict.secret);
  });

  afterAll(async () => {
    await holder?.end().catch(() => {});
    await strict?.close();
    expect(strict.logs.leaks(used)).toEqual([]);
  });

  /** Opens a separate connection that holds `lockSql` in an open transaction until released. */
  async function hold(lockSql: string): Promise<{ release(): Promise<void> }> {
    const client = new pg.Client({ connectionString: db.url });
    await client.connect();
    holder = client;
    await client.query("begin");
    await client.query(lockSql);
    return {
      async release() {
        await client.query("rollback");
        await client.end();
        holder = undefined;
      },
    };
  }

  /** Expects `result` to be UNAVAILABLE with AUDIT_UNAVAILABLE, showing none of `secrets`. */
  function expectAuditUnavailable(result: Result<unknown>, secrets: string[]): void {
    expect(result.ok, "the call succeeded without its audit event").toBe(false);
    const err = (result as { err: ConnectError }).err;
    expect(Code[err.code]).toBe(Code[Code.Unavailable]);
    expect(reasonOf(err)).toBe(ErrorReason.AUDIT_UNAVAILABLE);
    const shown = everythingIn(err);
    expect(shown).not.toContain(secretMarker);
    for (const s of secrets) expect(shown).not.toContain(s);
  }

  /** The writer logged a failed batch with this SQLSTATE. */
  const batchFailureLogged = (sqlstate: string) =>
    strict.logs.lines.some((l) => l.includes("audit batch failed") && l.includes(`"code":"${sqlstate}"`));

  it("the chain's head locked by another transaction past lock_timeout: Get is UNAVAILABLE, no token, no event; then it works", async () => {
    const accessToken = token("access");
    await strict.grpcClient.store({ userId: "fc-head", integration: "gmail", tokenSet: { accessToken, refreshToken: token("refresh") } });
    const before = await countEvents();
    const failedId = newRequestId("fc-head-failed");

    const lock = await hold("select * from audit_head for update");
    let failed: Result<unknown>;
    try {
      failed = await run(failedId, (o) => strict.grpcClient.get({ userId: "fc-head", integration: "gmail" }, o));
      // audit_events itself is readable while only the head row is locked.
      expect(await countEvents()).toBe(before);
    } finally {
      await lock.release();
    }
    expectAuditUnavailable(failed, [accessToken]);
    expect(failed.echoed).toBe(failedId);
    expect(batchFailureLogged("55P03")).toBe(true);
    expect(await countEvents()).toBe(before);
    expect(await eventsWithRequestId(failedId)).toEqual([]);

    const okId = newRequestId("fc-head-ok");
    const ok = await run(okId, (o) => strict.grpcClient.get({ userId: "fc-head", integration: "gmail" }, o));
    expect(ok.ok && ok.res.accessToken).toBe(accessToken);
    expect(await countEvents()).toBe(before + 1);
    expect((await eventsWithRequestId(okId)).map((e) => [e.action, e.outcome])).toEqual([["get", "ok"]]);
  });

  it("the events table locked by another transaction: the writer's insert fails, Get is UNAVAILABLE, no event; then it works", async () => {
    const accessToken = token("access");
    await strict.grpcClient.store({ userId: "fc-table", integration: "gmail", tokenSet: { accessToken } });
    const before = await countEvents();
    const failedId = newRequestId("fc-table-failed");

    const lock = await hold("lock table audit_events in access exclusive mode");
    let failed: Result<unknown>;
    try {
      failed = await run(failedId, (o) => strict.connectClient.get({ userId: "fc-table", integration: "gmail" }, o));
    } finally {
      await lock.release();
    }
    expectAuditUnavailable(failed, [accessToken]);
    expect(failed.echoed).toBe(failedId);
    expect(await countEvents()).toBe(before);
    expect(await eventsWithRequestId(failedId)).toEqual([]);

    const ok = await run(newRequestId("fc-table-ok"), (o) => strict.connectClient.get({ userId: "fc-table", integration: "gmail" }, o));
    expect(ok.ok && ok.res.accessToken).toBe(accessToken);
    expect(await countEvents()).toBe(before + 1);
  });

  it("a Store whose event cannot commit is UNAVAILABLE too, and the committed change is logged loudly", async () => {
    const before = await countEvents();
    const lock = await hold("select * from audit_head for update");
    let failed: Result<unknown>;
    try {
      failed = await run(newRequestId("fc-store"), (o) =>
        strict.grpcClient.store({ userId: "fc-store", integration: "gmail", tokenSet: { accessToken: token("access") } }, o),
      );
    } finally {
      await lock.release();
    }
    expectAuditUnavailable(failed, []);
    expect(await countEvents()).toBe(before);
    expect(strict.logs.lines.some((l) => l.includes("a change was committed but its audit event could not be") && l.includes('"rpc":"Store"'))).toBe(true);
  });

  it("after the failures the whole chain still recomputes, and VerifyAudit agrees", async () => {
    const head = await headId();
    expect(await chainProblems(1n, head)).toEqual([]);
    const verified = await strict.grpcClient.verifyAudit({});
    expect(verified.ok).toBe(true);
    expect(verified.headCursor).toBe(head);
  });
});

// ---------------------------------------------------------------------------
// 2. No secret in the log (runs last: it scans every event written above)
// ---------------------------------------------------------------------------

describe("no token or secret in any event", () => {
  it("no column of any row holds the marker, a token or a caller secret, in any encoding", async () => {
    const rows = (await db.pool.query<{ t: string }>("select t::text as t from audit_events t order by id")).rows.map((r) => r.t);
    expect(rows.length).toBeGreaterThan(200);
    // The scan sees the rows' text: the admin's name is in them.
    expect(rows.some((r) => r.includes(adminName))).toBe(true);
    const needles = [secretMarker, ...used.flatMap((s) => (s.startsWith(secretMarker) ? encodings(s) : [s]))];
    expect(used.length).toBeGreaterThan(20);
    const leaks = rows.filter((r) => needles.some((n) => r.includes(n)));
    expect(leaks).toEqual([]);
    const head = (await db.pool.query<{ t: string }>("select t::text as t from audit_head t")).rows[0]!.t;
    expect(needles.some((n) => head.includes(n))).toBe(false);
  });

  it("and no log line of the vault holds one", () => {
    expect(vault.logs.lines.length).toBeGreaterThan(0);
    expect(vault.logs.leaks(used)).toEqual([]);
  });

  it("the whole chain, from the first event, recomputes", async () => {
    expect(await chainProblems(1n, await headId())).toEqual([]);
  });
});
