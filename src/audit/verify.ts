/**
 * Recomputes the audit hash chain and names the first event that is not what
 * was written: "missing" (an id is absent, or the newest events are gone),
 * "reordered" (an event links to a hash other than its predecessor's, one
 * found elsewhere in the log), or "altered" (its content no longer matches its
 * hash, or it links to a hash no event has).
 */
import type { Pool } from "pg";
import { selectAuditEvent, selectAuditHead, selectAuditIdByHash, selectAuditRange, selectCheckpointAt, selectLatestCheckpoint } from "../db/queries/audit.js";
import { eventHash, genesisHash } from "./chain.js";

/** The outcome of {@link verifyAuditChain}. */
export interface VerifyResult {
  ok: boolean;
  /** Events checked. */
  checked: number;
  /** The newest id according to audit_head. */
  headId: bigint;
  /** When not ok: the first bad id. */
  firstBadId?: bigint;
  /** When not ok: "altered", "missing" or "reordered", then why. */
  problem?: string;
}

const pageSize = 2000;

/** Verifies from `fromId` (trusting the event before it), or from the start of what is kept. */
export async function verifyAuditChain(pool: Pool, fromId?: bigint): Promise<VerifyResult> {
  const head = await selectAuditHead(pool);
  // The anchor: the id and hash the first checked event must follow.
  let expectedId: bigint;
  let expectedPrev: Buffer;
  // A checkpoint is trusted only if the chain itself records the prune that
  // made it: otherwise deleting the oldest events and inserting a checkpoint
  // (whose hash is the next event's prev_hash) would pass unnoticed.
  let unconfirmedCheckpoint: bigint | undefined;
  if (fromId === undefined || fromId <= 1n) {
    const checkpoint = await selectLatestCheckpoint(pool);
    unconfirmedCheckpoint = checkpoint?.lastId;
    expectedId = (checkpoint?.lastId ?? 0n) + 1n;
    expectedPrev = checkpoint?.lastHash ?? genesisHash;
  } else {
    const before = await selectAuditEvent(pool, fromId - 1n);
    const checkpoint = before === undefined ? await selectCheckpointAt(pool, fromId - 1n) : undefined;
    const anchor = before?.hash ?? checkpoint?.lastHash;
    if (anchor === undefined) {
      return { ok: false, checked: 0, headId: head.lastId, firstBadId: fromId - 1n, problem: `missing: event ${fromId - 1n}, the anchor to start from, is not in the log` };
    }
    expectedId = fromId;
    expectedPrev = anchor;
  }

  let checked = 0;
  // Events committed after this check began are left to the next check.
  scan: for (;;) {
    const page = await selectAuditRange(pool, expectedId, pageSize);
    // Hashes of this page, to tell a reordering from an alteration (others are looked up).
    const nearby = new Map(page.map((e) => [e.hash.toString("hex"), e.id]));
    for (const event of page) {
      if (event.id > head.lastId) break scan;
      if (event.id !== expectedId) {
        return bad(expectedId, `missing: events ${expectedId}..${event.id - 1n} are not in the log`);
      }
      if (!event.prevHash.equals(expectedPrev)) {
        const linkedTo = nearby.get(event.prevHash.toString("hex")) ?? (await selectAuditIdByHash(pool, event.prevHash));
        if (linkedTo !== undefined && linkedTo !== event.id) {
          return bad(event.id, `reordered: event ${event.id} follows event ${linkedTo} in the chain, not event ${event.id - 1n}`);
        }
        return bad(event.id, `altered: event ${event.id} does not link to event ${event.id - 1n} (one of them was rewritten)`);
      }
      if (!eventHash(event.prevHash, event.id, event).equals(event.hash)) {
        return bad(event.id, `altered: event ${event.id}'s content does not match its hash`);
      }
      if (event.action === "audit_prune" && event.details.checkpoint === unconfirmedCheckpoint?.toString()) unconfirmedCheckpoint = undefined;
      expectedPrev = event.hash;
      expectedId = event.id + 1n;
      checked += 1;
    }
    if (page.length < pageSize) break;
  }
  // The tail: audit_head remembers the newest event, so deleting the latest
  // events (or rewriting the head) shows.
  if (expectedId - 1n < head.lastId) {
    return bad(expectedId, `missing: events ${expectedId}..${head.lastId} are not in the log (the head says ${head.lastId})`);
  }
  if (expectedId - 1n > head.lastId || !expectedPrev.equals(head.lastHash)) {
    return bad(head.lastId, `altered: the chain head (id ${head.lastId}) does not match the newest event`);
  }
  if (unconfirmedCheckpoint !== undefined) {
    return bad(unconfirmedCheckpoint + 1n, `missing: events up to ${unconfirmedCheckpoint} are gone, and no audit_prune event in the log made that checkpoint`);
  }
  return { ok: true, checked, headId: head.lastId };

  function bad(id: bigint, problem: string): VerifyResult {
    return { ok: false, checked, headId: head.lastId, firstBadId: id, problem };
  }
}
