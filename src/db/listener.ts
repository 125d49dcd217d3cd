/**
 * LISTEN on a dedicated connection, reconnecting with backoff when it drops.
 * A notification is only a hint that something changed: consumers re-read the
 * table, and also re-read after every reconnect, since notifications sent while
 * the connection was down are lost.
 */
import pg from "pg";
import type { Logger } from "../log.js";

/** Options of {@link createListener}. */
export interface ListenerOptions {
  connectionString: string;
  channels: readonly string[];
  logger: Logger;
  /** Called for each notification on any channel. */
  onNotify: (channel: string, payload: string) => void;
  /** Called after each (re)connection, once LISTEN is in place. */
  onConnect?: () => void;
}

/** A running listener. */
export interface Listener {
  close(): Promise<void>;
}

/** Starts listening; resolves once the first LISTEN is in place (or rejects when it cannot connect at all). */
export async function createListener(options: ListenerOptions): Promise<Listener> {
  let client: pg.Client | undefined;
  let closed = false;
  let retryTimer: NodeJS.Timeout | undefined;
  let attempt = 0;

  const connect = async (): Promise<void> => {
    const c = new pg.Client({ connectionString: options.connectionString, application_name: "tokenvault-listener" });
    c.on("notification", (n) => options.onNotify(n.channel, n.payload ?? ""));
    c.on("error", (err) => {
      options.logger.warn({ code: (err as { code?: string }).code }, "notification connection failed; reconnecting");
      scheduleReconnect(c);
    });
    c.on("end", () => scheduleReconnect(c));
    await c.connect();
    for (const channel of options.channels) await c.query(`listen ${pg.escapeIdentifier(channel)}`);
    client = c;
    attempt = 0;
    options.onConnect?.();
  };

  /** Retries with capped exponential backoff; `failed` is the client that broke, if any. */
  const scheduleReconnect = (failed?: pg.Client) => {
    if (closed || retryTimer !== undefined || (failed !== undefined && client !== failed)) return;
    client = undefined;
    failed?.end().catch(() => {});
    const delay = Math.min(30_000, 250 * 2 ** attempt++) * (0.5 + Math.random() / 2);
    retryTimer = setTimeout(() => {
      retryTimer = undefined;
      connect().catch((err: { code?: string }) => {
        options.logger.warn({ code: err.code }, "notification connection failed; retrying");
        scheduleReconnect();
      });
    }, delay);
    retryTimer.unref();
  };

  await connect();
  return {
    async close() {
      closed = true;
      if (retryTimer !== undefined) clearTimeout(retryTimer);
      await client?.end().catch(() => {});
    },
  };
}
