/**
 * The audit log of one process: the group-committing writer and the live feed,
 * wired so that each committed batch reaches this process's followers without
 * a round trip.
 */
import type { Pool } from "pg";
import type { AuditSettings } from "../config.js";
import type { Logger } from "../log.js";
import { createAuditFeed, type AuditFeed } from "./feed.js";
import { createAuditWriter, type AuditWriter } from "./writer.js";
import { commandEvent, type AuditAction, type DetailValue } from "./chain.js";

/** A running audit log. */
export interface AuditLog {
  readonly writer: AuditWriter;
  readonly feed: AuditFeed;
  readonly maxLag: number;
  /** Commits what is waiting, then stops the feed. */
  close(): Promise<void>;
}

/** Opens the audit log on `pool`; `listenUrl` gives followers events from other replicas at once. */
export async function openAuditLog(options: { pool: Pool; logger: Logger; listenUrl?: string | undefined; settings: AuditSettings }): Promise<AuditLog> {
  const { pool, logger, settings } = options;
  const feed = await createAuditFeed({ pool, logger, listenUrl: options.listenUrl, ringSize: settings.ringSize, pollMs: settings.pollMs });
  const writer = createAuditWriter({
    pool,
    logger,
    maxBatch: settings.maxBatch,
    maxWaitMs: settings.maxWaitMs,
    maxQueue: settings.maxQueue,
    lockTimeoutMs: settings.lockTimeoutMs,
    onCommit: (events) => feed.push(events),
  });
  return {
    writer,
    feed,
    maxLag: settings.maxLag,
    async close() {
      await writer.close();
      await feed.close();
    },
  };
}

/**
 * Records one event of an administrative command (key rotation, prune) run
 * from the CLI, durably, before the command reports success.
 */
export async function recordCommandEvent(pool: Pool, logger: Logger, action: AuditAction, details: Record<string, DetailValue>): Promise<void> {
  const writer = createAuditWriter({ pool, logger, maxBatch: 1, maxWaitMs: 0, maxQueue: 1, lockTimeoutMs: 5_000 });
  try {
    await writer.record(commandEvent(action, details));
  } finally {
    await writer.close();
  }
}
