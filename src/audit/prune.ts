/**
 * Retention: delete old events and keep the rest verifiable. The deletion, the
 * checkpoint (the hash where the cut was made) and the audit_prune event that
 * names the checkpoint commit together, so a checkpoint without its event in
 * the chain can only be a forgery (see verify.ts). The chain's head is locked
 * only for the final append, so writers are not held up by a long delete.
 */
import type { Pool } from "pg";
import { appendAuditEvents, lockAuditHead, pruneAuditEvents, type AuditCheckpoint } from "../db/queries/audit.js";
import { withTransaction } from "../db/transaction.js";
import { chainEvents, commandEvent } from "./chain.js";

/** Prunes events older than `before`; returns the checkpoint, or undefined when nothing was old enough. */
export async function pruneAudit(pool: Pool, before: Date, options: { lockTimeoutMs: number; by: string }): Promise<AuditCheckpoint | undefined> {
  return withTransaction(pool, async (client) => {
    const checkpoint = await pruneAuditEvents(client, before);
    if (checkpoint === undefined) return undefined;
    const head = await lockAuditHead(client, options.lockTimeoutMs, { begin: false });
    const events = chainEvents(head, [
      commandEvent("audit_prune", {
        by: options.by,
        before: before.toISOString(),
        pruned: checkpoint.prunedCount.toString(),
        checkpoint: checkpoint.lastId.toString(),
      }),
    ]);
    await appendAuditEvents(client, events);
    return checkpoint;
  });
}
