/**
 * StreamAudit as a reader sees it, against a real vault on listen(0) and a
 * real PostgreSQL, through real clients (Connect over gRPC, the Connect
 * protocol over HTTP/1.1, and a plain @grpc/grpc-js client loaded from proto/).
 *
 * What it proves:
 * - Replay (no follow) from cursor 0 is exactly the audit_events table in id
 *   order (cursor, time, caller, action, user, integration, outcome, request id,
 *   peer, details, prev_hash, hash), the hashes chain and recompute, and the
 *   stream ends by itself (its own stream_audit event being the last one).
 * - Every filter (user, integration, caller, actions, since/until, and
 *   combinations) returns exactly the matching rows; after_cursor the rest.
 *   An unknown action or since >= until is INVALID_ARGUMENT, and recorded.
 * - A following stream with `until` ends by itself once that time has passed.
 * - Resume: followers aborted after k events and restarted from the last
 *   cursor they saw, while writers run, together see every id exactly once.
 * - A grpc-js client streams with `authorization: Bearer` metadata.
 * - Permissions: without StreamAudit the call is PERMISSION_DENIED (and
 *   recorded as denied); a caller limited to "gmail" (or to some users) sees
 *   only those events, in replay and live.
 *
 * Regressions: a follower with an `until` more than 24.8 days ahead must not
 * overflow setTimeout and spin; a revoked caller's open follow stream is cut off.
 *
 * The live handover, other processes, slow consumers and shutdown are in
 * stream-follow.test.ts.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { setTimeout as sleep } from "node:timers/promises";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { JsonObject, MessageInitShape } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import {
  TokenVaultService,
  type AuditEvent,
  type StreamAuditRequestSchema,
} from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import type { AuditEventRow } from "../../src/db/queries/audit.js";
import { eventHash, genesisHash, type AuditAction, type AuditEventInput, type DetailValue } from "../../src/audit/chain.js";
import { revoke } from "../../src/auth/caller-admin.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { prng } from "../helpers/random.js";
import { secretToken, testKeyRing } from "../helpers/secrets.js";
import { grpcJsClient, startVault, type GrpcJsVault, type TestVault } from "../helpers/server.js";

type VaultClient = Client<typeof TokenVaultService>;
type StreamRequest = MessageInitShape<typeof StreamAuditRequestSchema>;

let db: TestDatabase;
let vault: TestVault;
/** Limited to Get and StreamAudit on gmail. */
let gmailAuditor: { secret: string; grpcClient: VaultClient; connectClient: VaultClient };
let gmailAuditorName: string;

// ---------------------------------------------------------------- helpers

/** An audit_events row, its id as a bigint. */
type Row = Omit<AuditEventRow, "id"> & { id: bigint };

/** A filter as the test states it; each field also becomes SQL below, written independently of the product's query. */
interface Filter {
  userId?: string;
  integration?: string;
  caller?: string;
  actions?: string[];
  since?: Date;
  until?: Date;
}

/** Rows matching `f` with id > after, in id order, straight from the table. */
async function rows(f: Filter = {}, after = 0n, extraWhere = "true"): Promise<Row[]> {
  const where: string[] = ["id > $1::bigint", extraWhere];
  const values: unknown[] = [after.toString()];
  const add = (sql: string, value: unknown) => {
    values.push(value);
    where.push(sql.replace("?", `$${values.length}`));
  };
  if (f.userId !== undefined) add("user_id = ?", f.userId);
  if (f.integration !== undefined) add("integration = ?", f.integration);
  if (f.caller !== undefined) add("caller = ?", f.caller);
  if (f.actions !== undefined) add("action = any(?::text[])", f.actions);
  if (f.since !== undefined) add("occurred_at >= ?", f.since);
  if (f.until !== undefined) add("occurred_at < ?", f.until);
  const result = await db.pool.query<Omit<Row, "id"> & { id: string }>(
    `select id, occurred_at, caller, action, user_id, integration, outcome, request_id, peer, details, prev_hash, hash
     from audit_events where ${where.join(" and ")} order by id`,
    values,
  );
  return result.rows.map((r) => ({ ...r, id: BigInt(r.id) }));
}

async function headId(): Promise<bigint> {
  const r = await db.pool.query<{ last_id: string }>("select last_id from audit_head");
  return BigInt(r.rows[0]!.last_id);
}

function streamRequest(f: Filter, afterCursor = 0n, follow = false): StreamRequest {
  return {
    afterCursor,
    follow,
    filter: {
      userId: f.userId ?? "",
      integration: f.integration ?? "",
      caller: f.caller ?? "",
      actions: f.actions ?? [],
      since: f.since === undefined ? undefined : timestampFromDate(f.since),
      until: f.until === undefined ? undefined : timestampFromDate(f.until),
    },
  };
}

/** Reads a stream that must end by itself within `timeoutMs`. */
async function replay(client: VaultClient, req: StreamRequest, timeoutMs = 20_000): Promise<AuditEvent[]> {
  const signal = AbortSignal.timeout(timeoutMs);
  const events: AuditEvent[] = [];
  try {
    for await (const res of client.streamAudit(req, { signal })) events.push(res.event!);
  } catch (err) {
    if (signal.aborted) throw new Error(`the stream did not end by itself within ${timeoutMs} ms (${events.length} events)`);
    throw err;
  }
  return events;
}

/** The status a stream ends with (throws if it ends OK). */
async function streamFailure(client: VaultClient, req: StreamRequest): Promise<ConnectError> {
  try {
    await replay(client, req);
  } catch (err) {
    return ConnectError.from(err);
  }
  throw new Error("expected the stream to fail");
}

async function waitFor(condition: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

/** The event as it was hashed: empty strings are the columns' nulls. */
function inputOf(e: AuditEvent): AuditEventInput {
  const orNull = (s: string) => (s === "" ? null : s);
  return {
    occurredAt: timestampDate(e.occurredAt!),
    caller: orNull(e.caller),
    action: e.action as AuditAction,
    userId: orNull(e.userId),
    integration: orNull(e.integration),
    outcome: e.outcome,
    requestId: orNull(e.requestId),
    peer: orNull(e.peer),
    details: (e.details ?? {}) as Record<string, DetailValue>,
  };
}

/** Streamed events equal the rows, field by field, in the same order. */
function expectSameEvents(events: AuditEvent[], expected: Row[]): void {
  expect(events.map((e) => e.cursor)).toEqual(expected.map((r) => r.id));
  events.forEach((e, i) => {
    const r = expected[i]!;
    expect({
      occurredAt: timestampDate(e.occurredAt!).getTime(),
      caller: e.caller,
      action: e.action,
      userId: e.userId,
      integration: e.integration,
      outcome: e.outcome,
      requestId: e.requestId,
      peer: e.peer,
      details: e.details as JsonObject,
    }).toEqual({
      occurredAt: r.occurred_at.getTime(),
      caller: r.caller ?? "",
      action: r.action,
      userId: r.user_id ?? "",
      integration: r.integration ?? "",
      outcome: r.outcome,
      requestId: r.request_id ?? "",
      peer: r.peer ?? "",
      details: r.details,
    });
    expect(Buffer.from(e.prevHash).equals(r.prev_hash), `prev_hash of ${e.cursor}`).toBe(true);
    expect(Buffer.from(e.hash).equals(r.hash), `hash of ${e.cursor}`).toBe(true);
  });
}

async function store(client: VaultClient, userId: string, integration: string): Promise<void> {
  await client.store({ userId, integration, tokenSet: { accessToken: secretToken(), refreshToken: secretToken("refresh") } });
}

/** Calls that fail are part of the log too: swallow their error. */
async function attempt(call: Promise<unknown>): Promise<void> {
  await call.catch(() => undefined);
}

// ---------------------------------------------------------------- setup

beforeAll(async () => {
  db = await createTestDatabase();
  vault = await startVault({ pool: db.pool, keyRing: testKeyRing("k1"), listenUrl: db.url });
  gmailAuditorName = "gmail-auditor";
  gmailAuditor = await vault.addCaller(gmailAuditorName, { allow: ["Get", "StreamAudit"], integrations: ["gmail"] });
  const noAuth = vault.clientsWith(undefined).grpcClient;
  const badSecret = vault.clientsWith(`tvs_1_${"A".repeat(43)}`).grpcClient;
  const c = vault.grpcClient;

  // A varied log: every action an ordinary call can produce, several users,
  // integrations and callers, failures and refusals.
  for (const user of ["u-a", "u-b", "tenant-a/x", "tenant-a/y"]) {
    for (const integration of ["gmail", "outlook", "hubspot"]) await store(c, user, integration);
  }
  await c.get({ userId: "u-a", integration: "gmail" });
  await vault.connectClient.get({ userId: "u-b", integration: "outlook" });
  await attempt(c.get({ userId: "nobody", integration: "gmail" })); // not_found
  await attempt(c.get({ userId: "u-a", integration: "Not A Name" })); // invalid_argument
  await gmailAuditor.grpcClient.get({ userId: "u-a", integration: "gmail" });
  await attempt(gmailAuditor.grpcClient.get({ userId: "u-a", integration: "outlook" })); // denied
  await attempt(gmailAuditor.grpcClient.listConnections({ userId: "u-a" })); // denied, no integration
  await attempt(noAuth.get({ userId: "u-b", integration: "gmail" })); // unauthenticated
  await attempt(badSecret.listConnections({ userId: "u-b" })); // unauthenticated
  await c.listConnections({ userId: "u-a" });
  await c.remove({ userId: "u-b", integration: "hubspot" });
  await c.remove({ userId: "u-b", integration: "hubspot" });
  await c.clearUser({ userId: "tenant-a/y" });
  await c.verifyAudit({});
  await store(c, "u-a", "gmail");
  await c.get({ userId: "tenant-a/x", integration: "gmail" });
}, 120_000);

afterAll(async () => {
  await vault?.close();
  expect(vault?.logs.leaks() ?? []).toEqual([]);
  await db?.drop();
});

// ---------------------------------------------------------------- replay

describe("replay", () => {
  it("from cursor 0 is exactly the table in id order, chained, and ends by itself", async () => {
    const before = await headId();
    const events = await replay(vault.grpcClient, streamRequest({}));
    const table = await rows();
    expectSameEvents(events, table);
    // Nothing was left out: ids 1..head with no gap; the last is the stream's own event.
    expect(table.map((r) => r.id)).toEqual(Array.from({ length: table.length }, (_, i) => BigInt(i + 1)));
    expect(events.length).toBe(Number(before) + 1);
    const own = events[events.length - 1]!;
    expect(own.action).toBe("stream_audit");
    expect(own.outcome).toBe("ok");
    expect(own.details).toMatchObject({ rpc: "StreamAudit", follow: false, after_cursor: "0" });
    // Each event carries its hash and the one before it; the hash recomputes from the streamed fields.
    expect(Buffer.from(events[0]!.prevHash).equals(genesisHash)).toBe(true);
    events.forEach((e, i) => {
      expect(e.hash).toHaveLength(32);
      if (i > 0) expect(Buffer.from(e.prevHash).equals(Buffer.from(events[i - 1]!.hash))).toBe(true);
      expect(eventHash(Buffer.from(e.prevHash), e.cursor, inputOf(e)).equals(Buffer.from(e.hash)), `hash of ${e.cursor}`).toBe(true);
    });
    // The setup produced every kind of ordinary event.
    expect(new Set(events.map((e) => e.action))).toEqual(
      new Set(["store", "get", "remove", "clear_user", "list", "denied", "unauthenticated", "verify_audit", "stream_audit"]),
    );
  });

  it("is the same over the Connect protocol (HTTP/1.1, JSON)", async () => {
    const events = await replay(vault.connectClient, streamRequest({}));
    expectSameEvents(events, await rows());
  });

  it("after_cursor returns exactly the rest", async () => {
    const head = await headId();
    for (const after of [1n, head / 2n, head - 1n, head]) {
      const events = await replay(vault.grpcClient, streamRequest({}, after));
      expectSameEvents(events, await rows({}, after));
      expect(events[0]!.cursor).toBe(after + 1n);
    }
  });

  describe("max_batch packs the events that are ready together into one message", () => {
    /** The responses of a replay that must end by itself. */
    async function responses(client: VaultClient, req: StreamRequest) {
      const got = [];
      for await (const res of client.streamAudit(req, { signal: AbortSignal.timeout(20_000) })) got.push(res);
      return got;
    }

    it.each(["grpcClient", "connectClient", "grpcWebClient"] as const)("over %s: the same events, 1..max_batch per message, in `events`", async (transport) => {
      const messages = await responses(vault[transport], { ...streamRequest({}), maxBatch: 7 });
      const table = await rows();
      for (const m of messages) {
        expect(m.event).toBeUndefined();
        expect(m.events.length).toBeGreaterThanOrEqual(1);
        expect(m.events.length).toBeLessThanOrEqual(7);
      }
      // Batched: far fewer messages than events.
      expect(messages.length).toBeLessThan(table.length / 2);
      const events = messages.flatMap((m) => m.events);
      expectSameEvents(events, table);
      events.forEach((e) => expect(eventHash(Buffer.from(e.prevHash), e.cursor, inputOf(e)).equals(Buffer.from(e.hash))).toBe(true));
    });

    it("max_batch 1 is one event per message in `event`, as without it", async () => {
      const messages = await responses(vault.grpcClient, { ...streamRequest({}), maxBatch: 1 });
      expect(messages.every((m) => m.event !== undefined && m.events.length === 0)).toBe(true);
      expectSameEvents(messages.map((m) => m.event!), await rows());
    });

    it("a filter applies inside batches, and following delivers each commit batched", async () => {
      const head = await headId();
      const ac = new AbortController();
      const got: AuditEvent[] = [];
      const following = (async () => {
        try {
          for await (const res of vault.grpcClient.streamAudit({ ...streamRequest({ actions: ["store"] }, head, true), maxBatch: 50 }, { signal: ac.signal })) got.push(...res.events);
        } catch (err) {
          if (!ac.signal.aborted) throw err;
        }
      })();
      await Promise.all(Array.from({ length: 12 }, (_, i) => store(vault.grpcClient, `batched-${i}`, "gmail")));
      await waitFor(() => got.length === 12, 10_000, "12 store events");
      ac.abort();
      await following;
      expectSameEvents(got, await rows({ actions: ["store"] }, head));
    });

    it("max_batch above 1000 is INVALID_ARGUMENT", async () => {
      const err = await streamFailure(vault.grpcClient, { ...streamRequest({}), maxBatch: 1001 });
      expect(err.code).toBe(Code.InvalidArgument);
      expect(err.rawMessage).toContain("max_batch");
    });
  });

  it("after_cursor beyond the end returns nothing and ends", async () => {
    const head = await headId();
    expect(await replay(vault.grpcClient, streamRequest({}, head + 1_000n))).toEqual([]);
  });

  describe("filters return exactly the matching rows", () => {
    const cases: [string, () => Filter][] = [
      ["user_id", () => ({ userId: "u-a" })],
      ["user_id with a slash", () => ({ userId: "tenant-a/x" })],
      ["integration", () => ({ integration: "outlook" })],
      ["caller", () => ({ caller: gmailAuditorName })],
      ["one action", () => ({ actions: ["remove"] })],
      ["several actions", () => ({ actions: ["store", "clear_user", "denied", "unauthenticated"] })],
      ["user and integration", () => ({ userId: "u-b", integration: "hubspot" })],
      ["caller and actions", () => ({ caller: gmailAuditorName, actions: ["denied"] })],
      ["a user with no events", () => ({ userId: "nobody-at-all" })],
    ];
    it.each(cases)("%s", async (_name, filter) => {
      const f = filter();
      const events = await replay(vault.grpcClient, streamRequest(f));
      const expected = await rows(f);
      expectSameEvents(events, expected);
      if (f.userId !== "nobody-at-all") expect(events.length).toBeGreaterThan(0);
    });

    it("since and until (since inclusive, until exclusive)", async () => {
      const all = await rows();
      const since = all[Math.floor(all.length / 3)]!.occurred_at;
      const until = all[Math.floor((2 * all.length) / 3)]!.occurred_at;
      for (const f of [{ since, until }, { since }, { until }, { since, until, actions: ["store"] }] as Filter[]) {
        const events = await replay(vault.grpcClient, streamRequest(f));
        const expected = await rows(f);
        expectSameEvents(events, expected);
        expect(events.length).toBeGreaterThan(0);
        for (const e of events) {
          const t = timestampDate(e.occurredAt!).getTime();
          if (f.since !== undefined) expect(t).toBeGreaterThanOrEqual(f.since.getTime());
          if (f.until !== undefined) expect(t).toBeLessThan(f.until.getTime());
        }
      }
    });

    it("a filter with after_cursor", async () => {
      const head = await headId();
      const f: Filter = { integration: "gmail" };
      const events = await replay(vault.grpcClient, streamRequest(f, head / 2n));
      expectSameEvents(events, await rows(f, head / 2n));
    });
  });

  describe("invalid requests are INVALID_ARGUMENT", () => {
    const now = new Date();
    const cases: [string, Filter][] = [
      ["an unknown action", { actions: ["get", "read_everything"] }],
      ["an action in the wrong case", { actions: ["GET"] }],
      ["since equal to until", { since: now, until: now }],
      ["since after until", { since: new Date(now.getTime() + 1_000), until: now }],
      ["an invalid user_id filter", { userId: "x".repeat(10_000) }],
      ["an invalid integration filter", { integration: "Not A Name" }],
    ];
    it.each(cases)("%s", async (_name, f) => {
      for (const client of [vault.grpcClient, vault.connectClient]) {
        const err = await streamFailure(client, streamRequest(f, 0n, true));
        expect(err.code, err.message).toBe(Code.InvalidArgument);
      }
    });

    // README: "Every call to TokenVaultService writes exactly one audit event",
    // refused ones too, like a unary call with a bad argument.
    it("an invalid StreamAudit is recorded like any refused call, once", async () => {
      const before = await headId();
      const err = await streamFailure(vault.grpcClient, streamRequest({ actions: ["read_everything"] }));
      expect(err.code).toBe(Code.InvalidArgument);
      const recorded = await rows({}, before);
      expect(recorded.map((r) => [r.action, r.outcome, r.details.rpc])).toEqual([["stream_audit", "invalid_argument", "StreamAudit"]]);
      expect(recorded[0]!.caller).toMatch(/^test-admin-/);
      expect(String(recorded[0]!.details.error)).toContain("filter.actions");
    });
  });
});

// ---------------------------------------------------------------- follow with until

describe("follow with until", () => {
  it("sends the events before until as they commit, then ends by itself once the server's clock passes it", async () => {
    const head = await headId();
    const until = new Date(Date.now() + 2_000);
    const got: AuditEvent[] = [];
    const stream = (async () => {
      for await (const res of vault.grpcClient.streamAudit(streamRequest({ until, actions: ["store"] }, head, true), { signal: AbortSignal.timeout(20_000) })) {
        got.push(res.event!);
      }
    })();
    await store(vault.grpcClient, "until-live", "gmail");
    await waitFor(() => got.length === 1, 10_000, "the live store event");
    await stream; // ends without an abort (the signal above is only a safety net)
    expect(Date.now()).toBeGreaterThanOrEqual(until.getTime());
    expectSameEvents(got, await rows({ actions: ["store"], until }, head));
    expect(got[0]!.userId).toBe("until-live");
  });

  // An until more than 2^31 ms (24.8 days) ahead must not reach setTimeout as
  // is: Node would warn and fire after 1 ms, and a caught-up follower would spin.
  it("an until months ahead does not overflow the wait's timer", async () => {
    const overflows: Error[] = [];
    const onWarning = (w: Error) => {
      if (w.name === "TimeoutOverflowWarning") overflows.push(w);
    };
    process.on("warning", onWarning);
    const ac = new AbortController();
    const got: AuditEvent[] = [];
    try {
      const until = new Date(Date.now() + 90 * 24 * 3_600_000);
      const head = await headId();
      const done = (async () => {
        for await (const res of vault.grpcClient.streamAudit(streamRequest({ until }, head, true), { signal: ac.signal })) got.push(res.event!);
      })().catch((err: unknown) => {
        if (!ac.signal.aborted) throw err;
      });
      await waitFor(() => got.length === 1, 10_000, "the stream's own event");
      await store(vault.grpcClient, "until-far", "gmail");
      await waitFor(() => got.some((e) => e.userId === "until-far"), 10_000, "a live event");
      // Caught up and waiting: for a second, or until the first overflow (each one is printed).
      const idleSince = Date.now();
      await waitFor(() => overflows.length > 0 || Date.now() - idleSince > 1_000, 5_000, "a second of waiting");
      ac.abort();
      await done;
      expect(overflows.map((w) => w.message)).toEqual([]);
    } finally {
      ac.abort();
      process.off("warning", onWarning);
    }
  });
});

// ---------------------------------------------------------------- resume

describe("resume", () => {
  it("followers aborted after k events and restarted from the last cursor see every id exactly once, while writers run", async () => {
    const seed = Number(process.env.AUDIT_STREAM_SEED ?? 4242);
    const random = prng(seed);
    const c = vault.grpcClient;
    let writing = true;
    const writers = Array.from({ length: 3 }, (_, w) =>
      (async () => {
        let n = 0;
        while (writing) {
          const user = `resume-${w}-${n++ % 5}`;
          await store(c, user, "gmail");
          await c.get({ userId: user, integration: "gmail" });
        }
      })(),
    );
    const seen: bigint[] = [];
    let cursor = 0n;
    try {
      for (let round = 0; round < 6; round++) {
        const k = 1 + Math.floor(random() * 150);
        const ac = new AbortController();
        const got: bigint[] = [];
        // Half the rounds stop by breaking out of the loop, half by aborting the call.
        const byBreak = random() < 0.5;
        const client = random() < 0.5 ? vault.grpcClient : vault.connectClient;
        try {
          for await (const res of client.streamAudit({ afterCursor: cursor, follow: true }, { signal: ac.signal })) {
            got.push(res.event!.cursor);
            if (got.length === k) {
              if (!byBreak) ac.abort();
              break;
            }
          }
        } catch (err) {
          if (!ac.signal.aborted) throw err;
        }
        expect(got.length, `seed ${seed} round ${round}`).toBe(k);
        seen.push(...got);
        cursor = got[got.length - 1]!;
        await sleep(random() * 200);
      }
    } finally {
      writing = false;
      await Promise.all(writers);
    }
    // The rest, after the writers stopped: a replay from the last cursor.
    seen.push(...(await replay(vault.connectClient, { afterCursor: cursor })).map((e) => e.cursor));
    const head = await headId();
    expect(seen.length, `seed ${seed}`).toBe(new Set(seen).size);
    expect(seen, `seed ${seed}`).toEqual(Array.from({ length: Number(head) }, (_, i) => BigInt(i + 1)));
  }, 60_000);
});

// ---------------------------------------------------------------- grpc-js

/** A StreamAudit over grpc-js: the messages and how it ended. */
function grpcJsStream(client: GrpcJsVault, request: Record<string, unknown>, secret: string) {
  const md = new grpc.Metadata();
  md.set("authorization", `Bearer ${secret}`);
  const call = client.raw["StreamAudit"]!(request, md) as grpc.ClientReadableStream<{ event: Record<string, unknown> }>;
  const events: Record<string, unknown>[] = [];
  call.on("data", (m: { event: Record<string, unknown> }) => events.push(m.event));
  const ended = new Promise<grpc.ServiceError | undefined>((resolve) => {
    call.on("error", (err: grpc.ServiceError) => resolve(err));
    call.on("end", () => resolve(undefined));
  });
  return { call, events, ended };
}

describe("a plain @grpc/grpc-js client", () => {
  let client: GrpcJsVault;
  beforeAll(() => {
    client = grpcJsClient(vault.port, undefined);
  });
  afterAll(() => client?.close());

  it("replays with snake_case fields, cursors as strings, hashes as bytes", async () => {
    const s = grpcJsStream(client, { after_cursor: "0", follow: false }, vault.secret);
    expect(await s.ended).toBeUndefined();
    const table = await rows();
    expect(s.events.map((e) => e.cursor)).toEqual(table.map((r) => r.id.toString()));
    s.events.forEach((e, i) => {
      const r = table[i]!;
      expect(e.action).toBe(r.action);
      expect(e.caller).toBe(r.caller ?? "");
      expect(e.user_id).toBe(r.user_id ?? "");
      expect(Buffer.isBuffer(e.hash) && (e.hash as Buffer).equals(r.hash)).toBe(true);
      expect(Buffer.isBuffer(e.prev_hash) && (e.prev_hash as Buffer).equals(r.prev_hash)).toBe(true);
    });
  });

  it("batches: max_batch gives `events` lists that decode like any field (the server sends them pre-encoded)", async () => {
    const md = new grpc.Metadata();
    md.set("authorization", `Bearer ${vault.secret}`);
    const call = client.raw["StreamAudit"]!({ after_cursor: "0", follow: false, max_batch: 10 }, md) as grpc.ClientReadableStream<{ event: unknown; events: Record<string, unknown>[] }>;
    const messages: { event: unknown; events: Record<string, unknown>[] }[] = [];
    call.on("data", (m: { event: unknown; events: Record<string, unknown>[] }) => messages.push(m));
    await new Promise<void>((resolve, reject) => {
      call.on("end", resolve);
      call.on("error", reject);
    });
    const table = await rows();
    expect(messages.every((m) => m.event === null && m.events.length >= 1 && m.events.length <= 10)).toBe(true);
    const events = messages.flatMap((m) => m.events);
    expect(events.map((e) => e.cursor)).toEqual(table.map((r) => r.id.toString()));
    events.forEach((e, i) => expect(Buffer.isBuffer(e.hash) && (e.hash as Buffer).equals(table[i]!.hash)).toBe(true));
  });

  it("follows: a new event arrives, and cancel ends the call with CANCELLED", async () => {
    const head = await headId();
    const s = grpcJsStream(client, { after_cursor: head.toString(), follow: true, filter: { actions: ["store"] } }, vault.secret);
    await store(vault.grpcClient, "grpcjs-live", "gmail");
    await waitFor(() => s.events.length === 1, 10_000, "the store event");
    const [row] = await rows({ userId: "grpcjs-live", actions: ["store"] });
    expect(s.events[0]).toMatchObject({ cursor: row!.id.toString(), action: "store", user_id: "grpcjs-live", integration: "gmail" });
    s.call.cancel();
    expect((await s.ended)?.code).toBe(grpc.status.CANCELLED);
  });

  it("an unknown action is status INVALID_ARGUMENT; a wrong secret UNAUTHENTICATED", async () => {
    const bad = grpcJsStream(client, { filter: { actions: ["nope"] } }, vault.secret);
    expect((await bad.ended)?.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(bad.events).toEqual([]);
    const anon = grpcJsStream(client, {}, `tvs_1_${"B".repeat(43)}`);
    expect((await anon.ended)?.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(anon.events).toEqual([]);
  });
});

// ---------------------------------------------------------------- permissions

describe("permissions", () => {
  it("a caller without StreamAudit gets PERMISSION_DENIED, and the refusal is recorded", async () => {
    const reader = await vault.addCaller("get-only", { allow: ["Get"], integrations: ["*"] });
    const before = await headId();
    for (const client of [reader.grpcClient, reader.connectClient]) {
      const err = await streamFailure(client, streamRequest({}, 0n, true));
      expect(err.code).toBe(Code.PermissionDenied);
      expect(err.rawMessage).toContain("StreamAudit");
    }
    const recorded = await rows({}, before);
    expect(recorded.map((r) => [r.action, r.caller, r.outcome, r.details.rpc])).toEqual([
      ["denied", "get-only", "permission_denied", "StreamAudit"],
      ["denied", "get-only", "permission_denied", "StreamAudit"],
    ]);
  });

  it("a caller limited to gmail replays only gmail events", async () => {
    const events = await replay(gmailAuditor.grpcClient, streamRequest({}));
    // Every gmail event up to the stream's own (whose integration is empty, so hidden), nothing else.
    const expected = await rows({ integration: "gmail" });
    expectSameEvents(events, expected);
    expect(events.length).toBeGreaterThan(5);
    expect(events.every((e) => e.integration === "gmail")).toBe(true);
    // Its own filter narrows further; asking for another integration shows nothing of it.
    const own = await replay(gmailAuditor.grpcClient, streamRequest({ integration: "gmail", userId: "u-a" }));
    expectSameEvents(own, await rows({ integration: "gmail", userId: "u-a" }));
    const other = await replay(gmailAuditor.grpcClient, streamRequest({ integration: "outlook" })).catch((err: unknown) => {
      expect(ConnectError.from(err).code).toBe(Code.PermissionDenied);
      return [];
    });
    expect(other).toEqual([]);
  });

  it("a caller limited to gmail following live sees gmail events only", async () => {
    const head = await headId();
    const ac = new AbortController();
    const got: AuditEvent[] = [];
    const done = (async () => {
      for await (const res of gmailAuditor.connectClient.streamAudit({ afterCursor: head, follow: true }, { signal: ac.signal })) got.push(res.event!);
    })().catch((err: unknown) => {
      if (!ac.signal.aborted) throw err;
    });
    const c = vault.grpcClient;
    await store(c, "live-perm", "outlook");
    await store(c, "live-perm", "gmail");
    await c.get({ userId: "live-perm", integration: "outlook" });
    await c.listConnections({ userId: "live-perm" });
    await c.get({ userId: "live-perm", integration: "gmail" });
    await c.clearUser({ userId: "live-perm" });
    await store(c, "live-perm-end", "gmail"); // the last event: once seen, everything before it was decided
    await waitFor(() => got.some((e) => e.userId === "live-perm-end"), 10_000, "the last gmail event");
    ac.abort();
    await done;
    expectSameEvents(got, await rows({ integration: "gmail" }, head));
    expect(got.map((e) => [e.action, e.userId])).toEqual([
      ["store", "live-perm"],
      ["get", "live-perm"],
      ["store", "live-perm-end"],
    ]);
  });

  // README: a caller change "is enforced by every replica within seconds,
  // without a restart", open follow streams included.
  it("a following caller that is revoked is cut off within seconds", async () => {
    const auditor = await vault.addCaller("revoked-auditor", { allow: ["StreamAudit", "Get"], integrations: ["*"] });
    const head = await headId();
    const ac = new AbortController();
    const got: AuditEvent[] = [];
    let ended: Code | "ok" | undefined;
    const done = (async () => {
      for await (const res of auditor.grpcClient.streamAudit({ afterCursor: head, follow: true }, { signal: ac.signal })) got.push(res.event!);
      ended = "ok";
    })().catch((err: unknown) => {
      ended = ConnectError.from(err).code;
    });
    try {
      await waitFor(() => got.length === 1, 10_000, "the stream's own event");
      await revoke(db.pool, "revoked-auditor");
      await vault.callers.reload();
      // Enforced for new calls at once ...
      const refused = await auditor.grpcClient.get({ userId: "u-a", integration: "gmail" }).then(
        () => "ok",
        (err: unknown) => ConnectError.from(err).code,
      );
      expect(refused).toBe(Code.Unauthenticated);
      // ... and the open stream ends (whatever wakes it: here a new event).
      await store(vault.grpcClient, "after-revocation", "gmail");
      await waitFor(() => ended !== undefined, 8_000, "the revoked caller's stream to end");
      expect([Code.Unauthenticated, Code.PermissionDenied]).toContain(ended);
    } finally {
      ac.abort();
      await done;
    }
  });

  it("a caller limited to some users sees only those users' events", async () => {
    const tenant = await vault.addCaller("tenant-a-auditor", { allow: ["StreamAudit"], integrations: ["*"], users: ["tenant-a/*"] });
    const events = await replay(tenant.grpcClient, streamRequest({}));
    expectSameEvents(events, await rows({}, 0n, "user_id like 'tenant-a/%'"));
    expect(events.length).toBeGreaterThan(0);
  });
});
