/**
 * The audit hash chain, in process, on real PostgreSQL through a started vault:
 *
 * - events written by real calls (Store, Get, ListConnections, Remove ...) verify
 *   intact, with the right count and head;
 * - SQL tampering is named at the FIRST bad id with its kind: an altered column
 *   ("altered"), a deleted row ("missing"), two swapped rows ("reordered"),
 *   deleted newest rows ("missing", through audit_head), a row rewritten with a
 *   consistent hash ("altered" at the next id, or at the head);
 * - verification from a trusted cursor checks only the rest;
 * - prune checkpoints keep the rest verifiable, also when nothing is left, a
 *   checkpoint no audit_prune event made is a forgery ("missing"), and
 *   the chain goes on after them;
 * - a verification running while events are written reports no false failure;
 * - the VerifyAudit RPC gives verifyAuditChain's answer and is permission-checked;
 * - the canonical encoding hashes the same after a round trip through jsonb.
 *
 * Each case gets a fresh database (a clone of the migrated template).
 */
import { afterAll, describe, expect, it } from "vitest";
import { Code, ConnectError } from "@connectrpc/connect";
import { setTimeout as sleep } from "node:timers/promises";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { secretToken, testKeyRing } from "../helpers/secrets.js";
import { startVault, type TestVault } from "../helpers/server.js";
import { verifyAuditChain, type VerifyResult } from "../../src/audit/verify.js";
import { canonicalEncoding, detailText, eventHash, genesisHash, type AuditEventInput, type DetailValue } from "../../src/audit/chain.js";
import { createAuditWriter } from "../../src/audit/writer.js";
import { selectAuditEvent, selectAuditHead, selectLatestCheckpoint } from "../../src/db/queries/audit.js";
import { pruneAudit } from "../../src/audit/prune.js";
import { withTransaction } from "../../src/db/transaction.js";
import { createLogger } from "../../src/log.js";

const databases: TestDatabase[] = [];
const vaults: TestVault[] = [];

afterAll(async () => {
  for (const vault of vaults) await vault.close().catch(() => {});
  for (const db of databases) await db.drop();
});

/** A fresh database and a vault serving it. */
async function fresh(): Promise<{ db: TestDatabase; vault: TestVault }> {
  const db = await createTestDatabase();
  databases.push(db);
  const vault = await startVault({ pool: db.pool, keyRing: testKeyRing() });
  vaults.push(vault);
  return { db, vault };
}

/** Ignores the call's error: a refused or not-found call writes its event too. */
async function settle(call: Promise<unknown>): Promise<void> {
  await call.catch(() => undefined);
}

/**
 * Makes `count` calls, each writing exactly one event: per user a Store, a Get,
 * a ListConnections, a Get of a missing integration (not_found) and a Remove.
 */
async function makeCalls(vault: TestVault, count: number, prefix = "user"): Promise<void> {
  const client = vault.grpcClient;
  for (let i = 0; i < count; i++) {
    const userId = `${prefix}-${Math.floor(i / 5)}`;
    switch (i % 5) {
      case 0:
        await client.store({ userId, integration: "gmail", tokenSet: { accessToken: secretToken(), refreshToken: secretToken() } });
        break;
      case 1:
        await client.get({ userId, integration: "gmail" });
        break;
      case 2:
        await client.listConnections({ userId });
        break;
      case 3:
        await settle(client.get({ userId, integration: "outlook" }));
        break;
      default:
        await client.remove({ userId, integration: "gmail" });
    }
  }
}

/** A database whose log holds exactly events 1..count, written by real calls; the vault is closed. */
async function logOf(count: number): Promise<TestDatabase> {
  const { db, vault } = await fresh();
  await makeCalls(vault, count);
  await vault.close();
  const ids = await db.pool.query<{ n: number; max: string }>("select count(*)::int as n, max(id)::text as max from audit_events");
  expect(ids.rows[0]).toEqual({ n: count, max: String(count) });
  return db;
}

function expectOk(result: VerifyResult, checked: number, headId: number): void {
  expect(result).toEqual({ ok: true, checked, headId: BigInt(headId) });
}

function expectBad(result: VerifyResult, firstBadId: number, kind: "altered" | "missing" | "reordered", headId: number): void {
  expect(result.ok, JSON.stringify(result, (_k, v: unknown) => (typeof v === "bigint" ? v.toString() : v))).toBe(false);
  expect(result.firstBadId).toBe(BigInt(firstBadId));
  expect(result.problem).toMatch(new RegExp(`^${kind}: `));
  expect(result.headId).toBe(BigInt(headId));
}

/** Swaps the rows at ids a and b through a temporary negative id. */
async function swapRows(db: TestDatabase, a: number, b: number): Promise<void> {
  await withTransaction(db.pool, async (client) => {
    await client.query("update audit_events set id = $1 where id = $2", [-a, a]);
    await client.query("update audit_events set id = $1 where id = $2", [a, b]);
    await client.query("update audit_events set id = $1 where id = $2", [b, -a]);
  });
}

describe("an untouched log", () => {
  it("events written by real calls verify ok, with the right count and head", async () => {
    const { db, vault } = await fresh();
    expectOk(await verifyAuditChain(db.pool), 0, 0); // nothing written yet
    await makeCalls(vault, 12);
    expectOk(await verifyAuditChain(db.pool), 12, 12);

    // The chain as stored: gapless ids from 1, each linking to its predecessor's hash, the head on the last.
    const rows = await db.pool.query<{ id: string; action: string; outcome: string; prev_hash: Buffer; hash: Buffer }>(
      "select id, action, outcome, prev_hash, hash from audit_events order by id",
    );
    expect(rows.rows.map((r) => Number(r.id))).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    expect(rows.rows.slice(0, 5).map((r) => [r.action, r.outcome])).toEqual([
      ["store", "ok"],
      ["get", "ok"],
      ["list", "ok"],
      ["get", "not_found"],
      ["remove", "ok"],
    ]);
    expect(rows.rows[0]!.prev_hash).toEqual(genesisHash);
    for (let i = 1; i < rows.rows.length; i++) expect(rows.rows[i]!.prev_hash).toEqual(rows.rows[i - 1]!.hash);
    const head = await selectAuditHead(db.pool);
    expect(head).toEqual({ lastId: 12n, lastHash: rows.rows[11]!.hash });

    // Refused calls are events of the chain too.
    const { grpcClient: stranger } = vault.clientsWith("tvs_1_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    await settle(stranger.get({ userId: "user-0", integration: "gmail" }));
    const reader = await vault.addCaller("reader-only", { allow: ["Get"], integrations: ["gmail"] });
    await settle(reader.grpcClient.listConnections({ userId: "user-0" }));
    const refused = await db.pool.query<{ action: string; outcome: string }>("select action, outcome from audit_events where id > 12 order by id");
    expect(refused.rows).toEqual([
      { action: "unauthenticated", outcome: "unauthenticated" },
      { action: "denied", outcome: "permission_denied" },
    ]);
    expectOk(await verifyAuditChain(db.pool), 14, 14);
  });

  it("a user id in any script round-trips and verifies", async () => {
    const { db, vault } = await fresh();
    for (const userId of ["ユーザー-東京", "пользователь", "😀-👩‍👩‍👧-🇫🇷", "e\u0301-composed-é", "مستخدم", "tab-free \u2028 line-sep"]) {
      await vault.grpcClient.store({ userId, integration: "gmail", tokenSet: { accessToken: secretToken() } });
      await vault.grpcClient.get({ userId, integration: "gmail" });
    }
    expectOk(await verifyAuditChain(db.pool), 12, 12);
  });
});

describe("tampering is named at the first bad id", () => {
  it.each([
    ["user_id", "update audit_events set user_id = 'mallory' where id = 5"],
    ["outcome", "update audit_events set outcome = 'ok' where id = 4"], // the not_found Get made to look served
    ["details", `update audit_events set details = details || '{"rpc": "ListConnections"}'::jsonb where id = 5`],
    ["caller", "update audit_events set caller = 'someone-else' where id = 6"],
    ["action", "update audit_events set action = 'list' where id = 7"],
    ["integration", "update audit_events set integration = 'outlook' where id = 2"], // the Get of gmail
    ["occurred_at", "update audit_events set occurred_at = occurred_at - interval '1 day' where id = 8"],
    ["request_id", "update audit_events set request_id = 'forged' where id = 9"],
    ["peer", "update audit_events set peer = '10.9.9.9' where id = 2"],
    ["hash", "update audit_events set hash = sha256(hash) where id = 6"],
  ])("one changed column (%s) of one row: altered at that id", async (_column, statement) => {
    const db = await logOf(10);
    const id = Number(/where id = (\d+)/.exec(statement)![1]);
    const changed = await db.pool.query(statement);
    expect(changed.rowCount).toBe(1);
    const result = await verifyAuditChain(db.pool);
    expectBad(result, id, "altered", 10);
    expect(result.checked).toBe(id - 1);
  });

  it("the first of two altered rows is the one named", async () => {
    const db = await logOf(10);
    await db.pool.query("update audit_events set user_id = 'x' where id in (4, 8)");
    expectBad(await verifyAuditChain(db.pool), 4, "altered", 10);
  });

  it("a deleted row in the middle: missing at its id", async () => {
    const db = await logOf(10);
    await db.pool.query("delete from audit_events where id = 6");
    const result = await verifyAuditChain(db.pool);
    expectBad(result, 6, "missing", 10);
    expect(result.checked).toBe(5);
    expect(result.problem).toContain("6..6");
  });

  it("several deleted rows in the middle: missing at the first", async () => {
    const db = await logOf(10);
    await db.pool.query("delete from audit_events where id between 3 and 5");
    const result = await verifyAuditChain(db.pool);
    expectBad(result, 3, "missing", 10);
    expect(result.problem).toContain("3..5");
  });

  it("the first event deleted: missing at 1", async () => {
    const db = await logOf(6);
    await db.pool.query("delete from audit_events where id = 1");
    expectBad(await verifyAuditChain(db.pool), 1, "missing", 6);
  });

  it("two swapped rows (5 and 7): reordered at the lower id", async () => {
    const db = await logOf(10);
    await swapRows(db, 5, 7);
    const result = await verifyAuditChain(db.pool);
    expectBad(result, 5, "reordered", 10);
    expect(result.checked).toBe(4);
  });

  it("two swapped neighbours (3 and 4): reordered at the lower id", async () => {
    const db = await logOf(8);
    await swapRows(db, 3, 4);
    expectBad(await verifyAuditChain(db.pool), 3, "reordered", 8);
  });

  // verify.ts reads the chain in pages of 2000; a wrong prev_hash not found on
  // the page is looked up in the table, so a swap across pages is a reordering too.
  it("two rows swapped across verify's page boundary (2000 and 2001): reordered at the lower id", async () => {
    const db = await createTestDatabase();
    databases.push(db);
    const writer = createAuditWriter({ pool: db.pool, logger: createLogger("silent"), maxBatch: 256, maxWaitMs: 0, maxQueue: 5_000, lockTimeoutMs: 5_000 });
    await Promise.all(
      Array.from({ length: 2004 }, (_, i) =>
        writer.record({ occurredAt: new Date(), caller: "bulk", action: "get", userId: `u-${i}`, integration: "gmail", outcome: "ok", requestId: null, peer: null, details: { rpc: "Get" } }),
      ),
    );
    await writer.close();
    expectOk(await verifyAuditChain(db.pool), 2004, 2004);
    await swapRows(db, 1999, 2000); // within the first page: recognised
    expectBad(await verifyAuditChain(db.pool), 1999, "reordered", 2004);
    await swapRows(db, 1999, 2000);
    await swapRows(db, 2000, 2001); // across the boundary
    expectBad(await verifyAuditChain(db.pool), 2000, "reordered", 2004);
  });

  it("the newest rows deleted: missing from the first of them (audit_head remembers the end)", async () => {
    const db = await logOf(10);
    await db.pool.query("delete from audit_events where id >= 9");
    const result = await verifyAuditChain(db.pool);
    expectBad(result, 9, "missing", 10);
    expect(result.checked).toBe(8);
    expect(result.problem).toContain("9..10");
  });

  it("every row deleted (without a prune): missing from 1", async () => {
    const db = await logOf(5);
    await db.pool.query("delete from audit_events");
    expectBad(await verifyAuditChain(db.pool), 1, "missing", 5);
  });

  it("a row rewritten with a consistently recomputed hash: altered at the next id", async () => {
    const db = await logOf(10);
    const original = (await selectAuditEvent(db.pool, 5n))!;
    const forged: AuditEventInput = { ...original, userId: "mallory", outcome: "ok" };
    const forgedHash = eventHash(original.prevHash, 5n, forged);
    await db.pool.query("update audit_events set user_id = $1, outcome = $2, hash = $3 where id = 5", [forged.userId, forged.outcome, forgedHash]);

    const result = await verifyAuditChain(db.pool);
    expectBad(result, 6, "altered", 10);
    // Event 5 itself is self-consistent, so it counts among the intact ones.
    expect(result.checked).toBe(5);
  });

  it("the newest row rewritten with a consistent hash: altered at the head", async () => {
    const db = await logOf(10);
    const original = (await selectAuditEvent(db.pool, 10n))!;
    const forged: AuditEventInput = { ...original, details: { rpc: "Get", forged: true } };
    await db.pool.query("update audit_events set details = $1::jsonb, hash = $2 where id = 10", [
      JSON.stringify(forged.details),
      eventHash(original.prevHash, 10n, forged),
    ]);
    const result = await verifyAuditChain(db.pool);
    expectBad(result, 10, "altered", 10);
    expect(result.problem).toContain("head");
  });

  it("a rewritten head hash: altered at the head", async () => {
    const db = await logOf(6);
    await db.pool.query("update audit_head set last_hash = sha256(last_hash)");
    expectBad(await verifyAuditChain(db.pool), 6, "altered", 6);
  });

  it("restoring the tampered value makes the chain verify again (the check is on content, not on history)", async () => {
    const db = await logOf(6);
    const before = (await db.pool.query<{ user_id: string }>("select user_id from audit_events where id = 2")).rows[0]!.user_id;
    await db.pool.query("update audit_events set user_id = 'x' where id = 2");
    expectBad(await verifyAuditChain(db.pool), 2, "altered", 6);
    await db.pool.query("update audit_events set user_id = $1 where id = 2", [before]);
    expectOk(await verifyAuditChain(db.pool), 6, 6);
  });

  // Any change of a stored column must show, even a details key named
  // "__proto__" (an ordinary key to the canonical encoding).
  it("an added details key named __proto__ is detected as altered", async () => {
    const db = await logOf(6);
    await db.pool.query(`update audit_events set details = details || '{"__proto__": {"forged": true}}'::jsonb where id = 3`);
    expectBad(await verifyAuditChain(db.pool), 3, "altered", 6);
  });
});

describe("verification from a trusted cursor", () => {
  it("checks only the events from `fromId` on, anchored at the event before it", async () => {
    const db = await logOf(10);
    await db.pool.query("update audit_events set user_id = 'x' where id = 3");

    expectBad(await verifyAuditChain(db.pool), 3, "altered", 10);
    expectBad(await verifyAuditChain(db.pool, 0n), 3, "altered", 10);
    expectBad(await verifyAuditChain(db.pool, 1n), 3, "altered", 10);
    expectBad(await verifyAuditChain(db.pool, 3n), 3, "altered", 10);
    // Event 3 is before the start: trusted as the anchor, its hash is taken as is.
    expectOk(await verifyAuditChain(db.pool, 4n), 7, 10);
    expectOk(await verifyAuditChain(db.pool, 5n), 6, 10);
    expectOk(await verifyAuditChain(db.pool, 10n), 1, 10);
    // Right after the head: nothing to check, and the anchor is the head.
    expectOk(await verifyAuditChain(db.pool, 11n), 0, 10);
  });

  it("still finds tampering after the start, and missing newest events", async () => {
    const db = await logOf(10);
    await db.pool.query("update audit_events set outcome = 'internal' where id = 7");
    expectBad(await verifyAuditChain(db.pool, 5n), 7, "altered", 10);
    await db.pool.query("delete from audit_events where id >= 7");
    expectBad(await verifyAuditChain(db.pool, 5n), 7, "missing", 10);
  });

  it("a start whose anchor event is gone is reported missing at the anchor", async () => {
    const db = await logOf(10);
    await db.pool.query("delete from audit_events where id = 4");
    expectBad(await verifyAuditChain(db.pool, 5n), 4, "missing", 10);
  });
});

describe("prune", () => {
  /** Events 1..5, then (strictly later) events 6..10; returns a time between them. */
  async function twoGenerations(vault: TestVault): Promise<Date> {
    await makeCalls(vault, 5, "old");
    await sleep(5); // so that the cut time differs from both generations' millisecond timestamps
    const cut = new Date();
    await sleep(5);
    await makeCalls(vault, 5, "new");
    return cut;
  }

  /** Prunes as `tokenvault audit prune` does: deletion, checkpoint and audit_prune event in one transaction. */
  const prune = (db: TestDatabase, before: Date) => pruneAudit(db.pool, before, { lockTimeoutMs: 5_000, by: "test" });

  it("deletes the events before the date, records a checkpoint and an audit_prune event naming it; the rest verifies", async () => {
    const { db, vault } = await fresh();
    const cut = await twoGenerations(vault);
    const hash5 = (await selectAuditEvent(db.pool, 5n))!.hash;

    const checkpoint = await prune(db, cut);
    expect(checkpoint).toEqual({ lastId: 5n, lastHash: hash5, prunedCount: 5n, prunedBefore: cut });
    expect(await selectLatestCheckpoint(db.pool)).toEqual(checkpoint);
    const kept = await db.pool.query<{ id: string; user_id: string | null; action: string; details: Record<string, unknown> }>(
      "select id, user_id, action, details from audit_events order by id",
    );
    expect(kept.rows.map((r) => Number(r.id))).toEqual([6, 7, 8, 9, 10, 11]);
    expect(kept.rows.slice(0, 5).every((r) => r.user_id!.startsWith("new-"))).toBe(true);
    expect(kept.rows[5]).toMatchObject({ action: "audit_prune", details: { by: "test", checkpoint: "5", pruned: "5", before: cut.toISOString() } });

    expectOk(await verifyAuditChain(db.pool), 6, 11);
    // From the checkpoint explicitly: the checkpoint is the anchor of event 6.
    expectOk(await verifyAuditChain(db.pool, 6n), 6, 11);
    expectOk(await verifyAuditChain(db.pool, 8n), 4, 11);

    // Tampering after the checkpoint still shows, at the first kept event too.
    await db.pool.query("update audit_events set user_id = 'x' where id = 6");
    expectBad(await verifyAuditChain(db.pool), 6, "altered", 11);
  });

  it("a deleted first kept event after a prune is missing, not hidden by the checkpoint", async () => {
    const { db, vault } = await fresh();
    const cut = await twoGenerations(vault);
    await prune(db, cut);
    await db.pool.query("delete from audit_events where id = 6");
    expectBad(await verifyAuditChain(db.pool), 6, "missing", 11);
  });

  it("a forged checkpoint (oldest events deleted, checkpoint inserted by hand) is missing: no audit_prune event made it", async () => {
    const { db, vault } = await fresh();
    await makeCalls(vault, 10);
    // The forger reads the cut's hash from the next event's prev_hash: no later hash needs rewriting.
    const hash5 = (await selectAuditEvent(db.pool, 6n))!.prevHash;
    await db.pool.query("delete from audit_events where id <= 5");
    await db.pool.query("insert into audit_checkpoints (last_id, last_hash, pruned_count, pruned_before) values (5, $1, 5, now())", [hash5]);
    expectBad(await verifyAuditChain(db.pool), 6, "missing", 10);
  });

  it("a prune with nothing older does nothing", async () => {
    const { db, vault } = await fresh();
    const before = new Date(Date.now() - 60_000);
    await makeCalls(vault, 4);
    expect(await prune(db, before)).toBeUndefined();
    expect(await selectLatestCheckpoint(db.pool)).toBeUndefined();
    expectOk(await verifyAuditChain(db.pool), 4, 4);
  });

  it("a prune of everything leaves only its own event, and events written after it continue the chain", async () => {
    const { db, vault } = await fresh();
    await makeCalls(vault, 7);
    const head = await selectAuditHead(db.pool);
    await sleep(2);
    const checkpoint = await prune(db, new Date());
    expect(checkpoint).toMatchObject({ lastId: 7n, lastHash: head.lastHash, prunedCount: 7n });
    const left = await db.pool.query<{ id: string; action: string }>("select id, action from audit_events");
    expect(left.rows).toEqual([{ id: "8", action: "audit_prune" }]);
    expectOk(await verifyAuditChain(db.pool), 1, 8);

    // The chain goes on from the head: ids keep increasing, the next event links to the prune's.
    await makeCalls(vault, 3, "after");
    const next = (await selectAuditEvent(db.pool, 9n))!;
    expect(next.prevHash).toEqual((await selectAuditEvent(db.pool, 8n))!.hash);
    expect((await db.pool.query<{ id: string }>("select id from audit_events order by id")).rows.map((r) => Number(r.id))).toEqual([8, 9, 10, 11]);
    expectOk(await verifyAuditChain(db.pool), 4, 11);
    expectOk(await verifyAuditChain(db.pool, 9n), 3, 11);
  });

  it("events written after a partial prune continue the chain, and a second prune moves the checkpoint", async () => {
    const { db, vault } = await fresh();
    const firstCut = await twoGenerations(vault);
    await prune(db, firstCut); // 1..5 go; 11 is the prune's event
    await sleep(5);
    const secondCut = new Date();
    await sleep(5);
    await makeCalls(vault, 4, "newer"); // 12..15
    expectOk(await verifyAuditChain(db.pool), 10, 15);

    const second = await prune(db, secondCut);
    expect(second).toMatchObject({ lastId: 11n, prunedCount: 6n });
    expect((await selectLatestCheckpoint(db.pool))?.lastId).toBe(11n);
    expectOk(await verifyAuditChain(db.pool), 5, 16);
    expectOk(await verifyAuditChain(db.pool, 12n), 5, 16);
  });
});

describe("verification while events are written", () => {
  it("reports no false failure: each run checks exactly the events up to the head it read", async () => {
    const { db, vault } = await fresh();
    await makeCalls(vault, 10);
    let writing = true;
    const writers = Promise.all(
      Array.from({ length: 6 }, async (_, w) => {
        for (let i = 0; i < 30; i++) await vault.grpcClient.listConnections({ userId: `busy-${w}` });
      }),
    ).finally(() => {
      writing = false;
    });
    const results: VerifyResult[] = [];
    const rpcResults: { ok: boolean; problem: string; checked: bigint; headCursor: bigint }[] = [];
    do {
      results.push(await verifyAuditChain(db.pool));
      rpcResults.push(await vault.grpcClient.verifyAudit({}));
    } while (writing);
    await writers;

    for (const r of results) {
      expect(r.ok, r.problem).toBe(true);
      expect(r.checked).toBe(Number(r.headId)); // no prune: everything up to the head, nothing beyond
    }
    for (const r of rpcResults) {
      expect(r.ok, r.problem).toBe(true);
      expect(r.checked).toBe(r.headCursor);
    }
    const total = 10 + 6 * 30 + rpcResults.length;
    expectOk(await verifyAuditChain(db.pool), total, total);
  });

  it("rows beyond the head it read (committed after it began) are left to the next check", async () => {
    // What a check sees when a batch commits between its reading the head and
    // reading the rows: valid events beyond the head. Made here directly, so the
    // situation does not depend on timing.
    const db = await logOf(6);
    const head = await selectAuditHead(db.pool);
    const event: AuditEventInput = {
      occurredAt: new Date(),
      caller: "late",
      action: "get",
      userId: "u",
      integration: "gmail",
      outcome: "ok",
      requestId: "r",
      peer: null,
      details: { rpc: "Get" },
    };
    await db.pool.query(
      `insert into audit_events (id, occurred_at, caller, action, user_id, integration, outcome, request_id, peer, details, prev_hash, hash)
       values (7, $1, 'late', 'get', 'u', 'gmail', 'ok', 'r', null, '{"rpc": "Get"}', $2, $3)`,
      [event.occurredAt, head.lastHash, eventHash(head.lastHash, 7n, event)],
    );
    expectOk(await verifyAuditChain(db.pool), 6, 6);
    // Once the head moves on (the batch's commit), the next check includes it.
    await db.pool.query("update audit_head set last_id = 7, last_hash = (select hash from audit_events where id = 7)");
    expectOk(await verifyAuditChain(db.pool), 7, 7);
  });
});

describe("the VerifyAudit RPC", () => {
  it("returns what verifyAuditChain finds: ok, checked, first bad cursor, problem, head", async () => {
    const { db, vault } = await fresh();
    await makeCalls(vault, 8);

    const local = await verifyAuditChain(db.pool);
    const remote = await vault.grpcClient.verifyAudit({});
    expect(remote).toMatchObject({ ok: true, checked: 8n, firstBadCursor: 0n, problem: "", headCursor: 8n });
    expect(local).toEqual({ ok: true, checked: 8, headId: 8n });
    // The RPC wrote its own event once it had its answer.
    const own = (await selectAuditEvent(db.pool, 9n))!;
    expect(own).toMatchObject({ action: "verify_audit", outcome: "ok", caller: expect.stringMatching(/^test-admin-/), details: { rpc: "VerifyAudit", ok: true, checked: 8 } });

    // Over the Connect protocol too, and from a cursor.
    const fromLocal = await verifyAuditChain(db.pool, 4n);
    const fromRemote = await vault.connectClient.verifyAudit({ fromCursor: 4n });
    expect(fromRemote).toMatchObject({ ok: true, checked: BigInt(fromLocal.checked), headCursor: fromLocal.headId, firstBadCursor: 0n, problem: "" });
    expect(fromLocal.checked).toBe(6);

    // After tampering: the same failure.
    const user5 = (await selectAuditEvent(db.pool, 5n))!.userId;
    await db.pool.query("update audit_events set user_id = 'x' where id = 5");
    const badLocal = await verifyAuditChain(db.pool);
    const badRemote = await vault.grpcClient.verifyAudit({});
    expectBad(badLocal, 5, "altered", 10);
    expect(badRemote).toMatchObject({
      ok: false,
      checked: BigInt(badLocal.checked),
      firstBadCursor: badLocal.firstBadId,
      problem: badLocal.problem,
      headCursor: badLocal.headId,
    });
    const recorded = (await selectAuditEvent(db.pool, 11n))!;
    expect(recorded).toMatchObject({ action: "verify_audit", outcome: "ok", details: { rpc: "VerifyAudit", ok: false, checked: 4 } });

    // Swapped rows and a missing tail, through the API.
    await db.pool.query("update audit_events set user_id = $1 where id = 5", [user5]);
    expect(await vault.grpcClient.verifyAudit({})).toMatchObject({ ok: true, checked: 11n, headCursor: 11n });
    await swapRows(db, 2, 3);
    expect(await vault.grpcClient.verifyAudit({})).toMatchObject({ ok: false, firstBadCursor: 2n, problem: expect.stringMatching(/^reordered: /), headCursor: 12n });
    await swapRows(db, 2, 3);
    await db.pool.query("delete from audit_events where id >= 12");
    expect(await vault.grpcClient.verifyAudit({})).toMatchObject({ ok: false, firstBadCursor: 12n, problem: expect.stringMatching(/^missing: /), headCursor: 13n });
  });

  it("a caller without the VerifyAudit permission gets PERMISSION_DENIED, recorded as denied", async () => {
    const { db, vault } = await fresh();
    await makeCalls(vault, 3);
    const streamer = await vault.addCaller("streamer", { allow: ["StreamAudit", "Get", "Store", "ListConnections"], integrations: ["*"] });
    let error: ConnectError | undefined;
    try {
      await streamer.grpcClient.verifyAudit({});
    } catch (err) {
      error = ConnectError.from(err);
    }
    expect(error?.code).toBe(Code.PermissionDenied);
    expect(error?.rawMessage).toContain("VerifyAudit");
    expect(await selectAuditEvent(db.pool, 4n)).toMatchObject({
      action: "denied",
      caller: "streamer",
      outcome: "permission_denied",
      details: { rpc: "VerifyAudit" },
    });
    // An auditor allowed only VerifyAudit may verify.
    const auditor = await vault.addCaller("auditor", { allow: ["VerifyAudit"], integrations: ["*"] });
    expect(await auditor.connectClient.verifyAudit({})).toMatchObject({ ok: true, checked: 4n, headCursor: 4n });
    // Without a credential: UNAUTHENTICATED.
    let anonymous: ConnectError | undefined;
    try {
      await vault.clientsWith(undefined).grpcClient.verifyAudit({});
    } catch (err) {
      anonymous = ConnectError.from(err);
    }
    expect(anonymous?.code).toBe(Code.Unauthenticated);
    expectOk(await verifyAuditChain(db.pool), 6, 6);
  });
});

describe("the canonical encoding", () => {
  const details: Record<string, DetailValue> = {
    zeta: { b: [3, { y: "2", x: 1, aa: [] }], a: null, "": "empty key" },
    alpha: ["z", "a", { ü: true, a: false, Z: "upper", aa: { c: 1, b: 2 } }],
    ключ: "значение",
    emoji: "😀 👩‍👩‍👧 🇫🇷",
    cjk: "東京都",
    rtl: "مرحبا",
    combining: "e\u0301 vs é",
    separators: "a\u2028b\u2029c",
    quoting: 'he said "hi" \\ and \u00a0 left',
    controls: "tab\tnewline\ncr\r",
    nested: { deeper: { deepest: [[], {}, [{}], [[null]]] } },
    numbers: [0, -42, 3.14159, 0.1, 1e21, 123456789, -0.5],
    flags: [true, false],
    long: "x".repeat(2000),
    nul: detailText("before\u0000after"),
  };

  /** The same object with every object's keys inserted in reverse order. */
  function reversed(value: DetailValue): DetailValue {
    if (Array.isArray(value)) return value.map(reversed);
    if (value !== null && typeof value === "object") {
      return Object.fromEntries(Object.keys(value).reverse().map((k) => [k, reversed(value[k]!)]));
    }
    return value;
  }

  const input = (d: Record<string, DetailValue>): AuditEventInput => ({
    occurredAt: new Date("2026-03-04T05:06:07.089Z"),
    caller: "auditor-ü",
    action: "get",
    userId: "ユーザー-😀",
    integration: "gmail",
    outcome: "ok",
    requestId: "req-1",
    peer: "::1",
    details: d,
  });

  it("does not depend on the order of keys", () => {
    const other = reversed(details) as Record<string, DetailValue>;
    expect(JSON.stringify(Object.keys(other))).not.toBe(JSON.stringify(Object.keys(details)));
    expect(canonicalEncoding(7n, input(other))).toBe(canonicalEncoding(7n, input(details)));
    expect(eventHash(genesisHash, 7n, input(other))).toEqual(eventHash(genesisHash, 7n, input(details)));
    // ... but on the position, the predecessor and every field.
    expect(eventHash(genesisHash, 8n, input(details))).not.toEqual(eventHash(genesisHash, 7n, input(details)));
    expect(eventHash(Buffer.alloc(32, 1), 7n, input(details))).not.toEqual(eventHash(genesisHash, 7n, input(details)));
    expect(eventHash(genesisHash, 7n, { ...input(details), peer: null })).not.toEqual(eventHash(genesisHash, 7n, input(details)));
    expect(detailText("a\u0000b")).toBe("a\uFFFDb");
  });

  it("hashes the same after a round trip through PostgreSQL (jsonb reorders keys)", async () => {
    const db = await createTestDatabase();
    databases.push(db);
    const writer = createAuditWriter({ pool: db.pool, logger: createLogger("silent"), maxBatch: 8, maxWaitMs: 0, maxQueue: 100, lockTimeoutMs: 5_000 });
    const written = await Promise.all([
      writer.record(input(details)),
      writer.record(input(reversed(details) as Record<string, DetailValue>)),
      writer.record({ ...input({}), caller: null, userId: null, integration: null, requestId: null, peer: null }),
    ]);
    await writer.close();
    expect(written.map((e) => e.id)).toEqual([1n, 2n, 3n]);

    // jsonb does reorder: the stored text is not what was sent.
    const text = await db.pool.query<{ t: string }>("select details::text as t from audit_events where id = 1");
    expect(text.rows[0]!.t).not.toBe(JSON.stringify(details));

    for (const w of written) {
      const back = (await selectAuditEvent(db.pool, w.id))!;
      expect(back.details).toEqual(w.details);
      expect(back.occurredAt).toEqual(w.occurredAt);
      expect(canonicalEncoding(w.id, back)).toBe(canonicalEncoding(w.id, w));
      expect(back.hash).toEqual(w.hash);
      expect(eventHash(back.prevHash, back.id, back)).toEqual(back.hash);
    }
    expectOk(await verifyAuditChain(db.pool), 3, 3);
  });

  // details must never be given a string PostgreSQL's jsonb refuses: a
  // filter.caller that is not a caller name is INVALID_ARGUMENT (and recorded).
  it("a NUL in a StreamAudit filter is refused or made storable, never an audit outage", async () => {
    const { db, vault } = await fresh();
    await makeCalls(vault, 2);
    let result = "ok";
    try {
      for await (const _ of vault.grpcClient.streamAudit({ filter: { caller: "a\u0000b" } })) void _;
    } catch (err) {
      result = Code[ConnectError.from(err).code];
    }
    expect(["ok", "InvalidArgument"]).toContain(result);
    expect((await verifyAuditChain(db.pool)).ok).toBe(true);
  });
});
