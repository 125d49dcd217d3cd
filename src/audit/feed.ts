/**
 * The live audit feed of one process: what StreamAudit followers read once
 * they have caught up with the table.
 *
 * It knows the newest committed id (`head`) and keeps the latest events in a
 * ring, contiguous by id. Events reach it three ways: this process's writer
 * hands over each committed batch; a NOTIFY from any replica's batch makes it
 * read the new rows; and a periodic look at audit_head catches anything whose
 * notification was lost (the table is the truth, a notification only a hint).
 * Because ids commit in order, "every id <= head" is always committed, so a
 * follower that reads the ring or the table up to head never skips an event.
 *
 * With no follower registered the ring is not filled: the feed only tracks
 * head, and followers that fall behind the ring read the table instead.
 */
import type { Pool } from "pg";
import type { Logger } from "../log.js";
import { createListener, type Listener } from "../db/listener.js";
import { auditChannel, selectAuditEvents, selectAuditHead } from "../db/queries/audit.js";
import type { AuditEvent } from "./chain.js";

/** Options of {@link createAuditFeed}. */
export interface AuditFeedOptions {
  pool: Pool;
  logger: Logger;
  /** LISTEN on this database URL (a dedicated connection); without it, only polling and local batches. */
  listenUrl?: string | undefined;
  /** How many recent events stay in memory. */
  ringSize: number;
  /** How often audit_head is read in case a notification was missed. */
  pollMs: number;
}

/** The feed followers wait on. */
export interface AuditFeed {
  /** The newest id known to be committed. */
  head(): bigint;
  /** Events with cursor < id <= head held in memory, at most `limit`; undefined when the ring does not reach back to cursor + 1. */
  after(cursor: bigint, limit: number): readonly AuditEvent[] | undefined;
  /** Resolves once head passes `cursor`, the feed is ending streams, `signal` aborts, or `timeoutMs` passes. */
  waitBeyond(cursor: bigint, signal: AbortSignal, timeoutMs?: number): Promise<void>;
  /** Registers a follower (the ring is kept only while there is one); returns its unregister function. */
  register(): () => void;
  /** Hands over a batch this process just committed. */
  push(events: readonly AuditEvent[]): void;
  /** True once {@link endStreams} was called: followers must end with a resumable status. */
  readonly ending: boolean;
  /** Tells every follower to end (server shutdown). */
  endStreams(): void;
  /** Stops listening and polling. */
  close(): Promise<void>;
}

/** Starts the feed at the current head. */
export async function createAuditFeed(options: AuditFeedOptions): Promise<AuditFeed> {
  let head = (await selectAuditHead(options.pool)).lastId;
  let ring: AuditEvent[] = [];
  let followers = 0;
  let ending = false;
  let closed = false;
  let waiters = new Set<() => void>();
  let syncing: Promise<void> | undefined;
  let syncAgain = false;

  const wake = () => {
    const now = waiters;
    waiters = new Set();
    for (const w of now) w();
  };

  const append = (events: readonly AuditEvent[]) => {
    for (const e of events) {
      if (e.id !== head + 1n) break;
      if (followers > 0) ring.push(e);
      head = e.id;
    }
    if (ring.length > options.ringSize) ring = ring.slice(ring.length - options.ringSize);
    wake();
  };

  /** Moves head to `target`, loading the rows when someone follows. */
  const catchUp = async (target: bigint) => {
    while (head < target && !closed) {
      if (followers === 0) {
        ring = [];
        head = target;
        wake();
        return;
      }
      const rows = await selectAuditEvents(options.pool, head, target, {}, 1000);
      // Every id <= target has committed, so a hole means a prune removed
      // those events: start the ring again after it.
      const first = rows[0]?.id ?? target + 1n;
      if (first > head + 1n) {
        ring = [];
        head = first - 1n;
      }
      append(rows);
    }
  };

  const sync = async (target?: bigint): Promise<void> => {
    if (syncing !== undefined) {
      syncAgain = true;
      return syncing;
    }
    syncing = (async () => {
      do {
        syncAgain = false;
        try {
          await catchUp(target ?? (await selectAuditHead(options.pool)).lastId);
        } catch (err) {
          options.logger.warn({ code: (err as { code?: string }).code, message: (err as Error).message }, "audit feed could not read new events; retrying on the next poll");
        }
        target = undefined;
      } while (syncAgain && !closed);
    })().finally(() => {
      syncing = undefined;
    });
    return syncing;
  };

  let listener: Listener | undefined;
  if (options.listenUrl !== undefined) {
    listener = await createListener({
      connectionString: options.listenUrl,
      channels: [auditChannel],
      logger: options.logger,
      onNotify: (_channel, payload) => {
        const id = /^[0-9]+$/.test(payload) ? BigInt(payload) : undefined;
        if (id === undefined || id > head) void sync(id);
      },
      // Notifications sent while disconnected are lost: look at the table.
      onConnect: () => void sync(),
    });
  }
  const poll = setInterval(() => void sync(), options.pollMs);
  poll.unref();

  return {
    head: () => head,
    after(cursor, limit) {
      if (cursor >= head) return [];
      const start = ring.length === 0 ? head + 1n : ring[0]!.id;
      if (cursor + 1n < start) return undefined;
      const from = Number(cursor + 1n - start);
      return ring.slice(from, from + limit);
    },
    waitBeyond(cursor, signal, timeoutMs) {
      if (head > cursor || ending || signal.aborted) return Promise.resolve();
      return new Promise<void>((resolve) => {
        const done = () => {
          waiters.delete(check);
          signal.removeEventListener("abort", done);
          clearTimeout(timer);
          resolve();
        };
        const check = () => (head > cursor || ending ? done() : waiters.add(check));
        // setTimeout takes at most 2^31-1 ms; the caller waits again after a wake-up.
        const timer = timeoutMs === undefined ? undefined : setTimeout(done, Math.min(timeoutMs, 2_147_483_647));
        signal.addEventListener("abort", done, { once: true });
        waiters.add(check);
      });
    },
    register() {
      followers += 1;
      let registered = true;
      return () => {
        if (!registered) return;
        registered = false;
        followers -= 1;
        if (followers === 0) ring = [];
      };
    },
    push(events) {
      if (events.length === 0) return;
      if (events[0]!.id === head + 1n) append(events);
      else if (events[events.length - 1]!.id > head) void sync(events[events.length - 1]!.id);
    },
    get ending() {
      return ending;
    },
    endStreams() {
      ending = true;
      wake();
    },
    async close() {
      closed = true;
      ending = true;
      clearInterval(poll);
      wake();
      await listener?.close();
      await syncing;
    },
  };
}
