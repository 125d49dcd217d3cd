/**
 * Every replica's view of the callers table: all active callers in memory,
 * reloaded when PostgreSQL notifies a change (within milliseconds) and on a
 * timer (the guarantee, in case a notification is lost). A call is checked
 * against memory, so authentication costs no database round trip.
 */
import type { Pool } from "pg";
import { selectCallers } from "../db/queries/callers.js";
import { createListener, type Listener } from "../db/listener.js";
import type { Logger } from "../log.js";
import { claimedCallerId, secretMatches } from "./credentials.js";
import { callerFromRow, type Caller } from "./policy.js";

/** Looks callers up by credential. */
export interface CallerRegistry {
  /** The caller a bearer secret proves, or undefined (unknown, wrong or revoked: indistinguishable). */
  bySecret(secret: string): Caller | undefined;
  /** The active caller with this id, for naming who a failed credential claimed to be (never for authentication). */
  byId(id: string): Caller | undefined;
  /** The caller bound to a verified client-certificate identity. */
  byCertIdentity(identity: string): Caller | undefined;
  /** How many active callers there are. */
  readonly size: number;
  /** Re-reads the table now. */
  reload(): Promise<void>;
  close(): Promise<void>;
}

/** Options of {@link createCallerRegistry}. */
export interface CallerRegistryOptions {
  pool: Pool;
  logger: Logger;
  /** Listen for changes on this URL (a dedicated connection); omit to rely on the timer alone. */
  listenUrl?: string;
  reloadIntervalMs: number;
}

/** Loads the callers and keeps them fresh. */
export async function createCallerRegistry(options: CallerRegistryOptions): Promise<CallerRegistry> {
  let byId = new Map<string, Caller>();
  let byCert = new Map<string, Caller>();
  let loading: Promise<void> | undefined;
  let again = false;

  const load = async () => {
    const callers = (await selectCallers(options.pool)).filter((r) => r.revoked_at === null).map(callerFromRow);
    byId = new Map(callers.map((c) => [c.id, c]));
    byCert = new Map(callers.filter((c) => c.certIdentity !== null).map((c) => [c.certIdentity!, c]));
  };
  // Coalesce bursts: at most one load running and one queued behind it.
  const reload = (): Promise<void> => {
    if (loading !== undefined) {
      again = true;
      return loading;
    }
    loading = load()
      .catch((err: { code?: string }) => options.logger.warn({ code: err.code }, "reloading callers failed; keeping the previous set"))
      .finally(() => {
        loading = undefined;
        if (again) {
          again = false;
          void reload();
        }
      });
    return loading;
  };

  await load();
  const timer = setInterval(() => void reload(), options.reloadIntervalMs);
  timer.unref();
  let listener: Listener | undefined;
  if (options.listenUrl !== undefined) {
    listener = await createListener({
      connectionString: options.listenUrl,
      channels: ["tokenvault_callers"],
      logger: options.logger,
      onNotify: () => void reload(),
      onConnect: () => void reload(),
    });
  }

  return {
    bySecret(secret) {
      const id = claimedCallerId(secret);
      const caller = id === undefined ? undefined : byId.get(id);
      // Always hash and compare, so an unknown caller costs the same as a wrong secret.
      return secretMatches(secret, caller?.secretHash ?? null) ? caller : undefined;
    },
    byId: (id) => byId.get(id),
    byCertIdentity: (identity) => byCert.get(identity),
    get size() {
      return byId.size;
    },
    reload,
    async close() {
      clearInterval(timer);
      await listener?.close();
    },
  };
}
