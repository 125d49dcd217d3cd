/**
 * The audit writer: group commit for audit events.
 *
 * Calls hand their event to `record` and wait. One flush at a time takes up to
 * `maxBatch` waiting events, chains them under the audit_head row lock, inserts
 * them with one statement and commits (synchronous_commit on: durable), then
 * releases every call of the batch. Events that arrive during a flush form the
 * next batch, so under load many calls share one commit (one WAL flush) and
 * when idle an event is written at once (or after `maxWaitMs`, if set).
 *
 * Fail-closed: when a batch cannot commit, each of its calls gets an
 * {@link AuditUnavailableError} and must not return its result. The queue is
 * bounded too: past `maxQueue` waiting events new ones are refused at once
 * rather than piling up while the database is slow.
 */
import type { Pool } from "pg";
import type { Logger } from "../log.js";
import { appendAuditEvents, lockAuditHead } from "../db/queries/audit.js";
import { chainEvents, type AuditEvent, type AuditEventInput } from "./chain.js";

/** The event could not be committed: the call it records must fail. */
export class AuditUnavailableError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "AuditUnavailableError";
  }
}

/** Options of {@link createAuditWriter}. */
export interface AuditWriterOptions {
  pool: Pool;
  logger: Logger;
  /** Most events in one transaction. */
  maxBatch: number;
  /** How long an idle writer waits for more events before flushing (0: flush at once). */
  maxWaitMs: number;
  /** Most events waiting for a flush; more are refused. */
  maxQueue: number;
  /** lock_timeout of the batch transaction: a chain head held longer fails the batch. */
  lockTimeoutMs: number;
  /** Told of every committed batch, in order (the live feed takes it from here). */
  onCommit?: (events: readonly AuditEvent[]) => void;
}

/** Records audit events durably. */
export interface AuditWriter {
  /** Resolves with the committed event; rejects with AuditUnavailableError when it could not be written. */
  record(event: AuditEventInput): Promise<AuditEvent>;
  /** Counters for tests and the benchmark. */
  stats(): { batches: number; events: number; largestBatch: number };
  /** Writes what is waiting, then refuses new events. */
  close(): Promise<void>;
}

interface Waiting {
  event: AuditEventInput;
  resolve: (event: AuditEvent) => void;
  reject: (err: Error) => void;
}

/** Creates a writer; it holds no connection until there is something to write. */
export function createAuditWriter(options: AuditWriterOptions): AuditWriter {
  let queue: Waiting[] = [];
  let flushing: Promise<void> | undefined;
  /** Cancels the scheduled flush, when one is scheduled. */
  let scheduled: (() => void) | undefined;
  let closed = false;
  const counters = { batches: 0, events: 0, largestBatch: 0 };

  const schedule = () => {
    if (flushing !== undefined || scheduled !== undefined || queue.length === 0) return;
    if (options.maxWaitMs > 0 && queue.length < options.maxBatch) {
      const t = setTimeout(startFlush, options.maxWaitMs);
      scheduled = () => clearTimeout(t);
    } else {
      // setImmediate: calls that finished in the same turn join this batch.
      const i = setImmediate(startFlush);
      scheduled = () => clearImmediate(i);
    }
  };

  const startFlush = () => {
    scheduled = undefined;
    const batch = queue.slice(0, options.maxBatch);
    queue = queue.slice(batch.length);
    flushing = flush(batch).finally(() => {
      flushing = undefined;
      schedule();
    });
  };

  const flush = async (batch: Waiting[]): Promise<void> => {
    let client;
    try {
      client = await options.pool.connect();
    } catch (err) {
      fail(batch, err);
      return;
    }
    let broken: Error | undefined;
    try {
      const head = await lockAuditHead(client, options.lockTimeoutMs, { begin: true });
      const events = chainEvents(head, batch.map((w) => w.event));
      await appendAuditEvents(client, events);
      await client.query("commit");
      counters.batches += 1;
      counters.events += events.length;
      counters.largestBatch = Math.max(counters.largestBatch, events.length);
      batch.forEach((w, i) => w.resolve(events[i]!));
      try {
        options.onCommit?.(events);
      } catch (err) {
        // Committed is committed: followers catch up at the next poll.
        options.logger.error({ message: (err as Error).message }, "audit feed could not take a committed batch");
      }
    } catch (err) {
      await client.query("rollback").catch((e: Error) => {
        broken = e;
      });
      fail(batch, err);
    } finally {
      client.release(broken);
    }
  };

  const fail = (batch: Waiting[], err: unknown) => {
    const code = (err as { code?: string }).code;
    options.logger.error({ code, message: (err as Error).message, events: batch.length }, "audit batch failed: its calls fail closed");
    const error = new AuditUnavailableError("the audit log is unavailable", { cause: err });
    for (const w of batch) w.reject(error);
  };

  return {
    record(event) {
      if (closed) return Promise.reject(new AuditUnavailableError("the audit writer is closed"));
      if (queue.length >= options.maxQueue) {
        return Promise.reject(new AuditUnavailableError("the audit log is overloaded"));
      }
      return new Promise<AuditEvent>((resolve, reject) => {
        queue.push({ event, resolve, reject });
        // A full batch does not wait out maxWaitMs.
        if (queue.length >= options.maxBatch && scheduled !== undefined && flushing === undefined) {
          scheduled();
          scheduled = undefined;
        }
        schedule();
      });
    },
    stats: () => ({ ...counters }),
    async close() {
      closed = true;
      while (flushing !== undefined || queue.length > 0 || scheduled !== undefined) {
        if (flushing !== undefined) await flushing;
        else await new Promise((r) => setImmediate(r));
      }
    },
  };
}
