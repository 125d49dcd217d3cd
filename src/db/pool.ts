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
  });
  pool.on("error", (err) => {
    options.logger.warn({ code: (err as { code?: string }).code }, "idle database connection failed");
  });
  return pool;
}
