/**
 * The PostgreSQL connection pool. Raw `pg`; every statement lives in queries/.
 */
import pg from "pg";
import type { Logger } from "../log.js";

export type { Pool, PoolClient } from "pg";

// Return int8 (bigint) columns as strings, never as lossy JS numbers; row types say so.
pg.types.setTypeParser(pg.types.builtins.INT8, (v) => v);

/** Pool settings; the URL may carry credentials and is never logged. */
export interface PoolOptions {
  connectionString: string;
  max: number;
  logger: Logger;
  applicationName?: string;
  /**
   * Commit without waiting for the WAL flush (`synchronous_commit = off`),
   * except in transactions that ask for it. For the vault's pool: every call's
   * audit event commits synchronously after its statements and before its
   * response, and that flush covers the WAL written before it, so the answer
   * still leaves only once the change is durable; what is saved is a second
   * flush per call (a Get's last-used mark, a Store's upsert).
   */
  asynchronousCommit?: boolean;
}

/** Creates the pool. Idle-client errors (a server restart) are logged, not thrown. */
export function createPool(options: PoolOptions): pg.Pool {
  const pool = new pg.Pool({
    connectionString: options.connectionString,
    max: options.max,
    application_name: options.applicationName ?? "tokenvault",
    connectionTimeoutMillis: 5_000,
    idleTimeoutMillis: 30_000,
    // A hung statement must not pin a pool slot forever.
    statement_timeout: 15_000,
    ...(options.asynchronousCommit === true ? { options: "-c synchronous_commit=off" } : {}),
  });
  pool.on("error", (err) => {
    options.logger.warn({ code: (err as { code?: string }).code }, "idle database connection failed");
  });
  return pool;
}
