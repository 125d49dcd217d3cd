/**
 * How database failures reach callers: the one table of SQLSTATE codes the
 * service cares about, and their Connect codes. Anything not listed is a bug
 * and becomes `internal`. A pg error message is never sent to a caller.
 * Reference: https://www.postgresql.org/docs/current/errcodes-appendix.html
 */
import { Code } from "@connectrpc/connect";

/** SQLSTATE codes, by what they mean for a caller. */
export const sqlState = {
  /** 40001: the transaction could not be serialized; retry it. */
  serializationFailure: "40001",
  /** 40P01: deadlock detected; retry it. */
  deadlockDetected: "40P01",
  /** 55P03: lock_timeout elapsed waiting for a row or advisory lock. */
  lockNotAvailable: "55P03",
  /** 57014: statement_timeout or a cancel request. */
  queryCanceled: "57014",
  /** 57P01: the server is shutting down (admin shutdown). */
  adminShutdown: "57P01",
  /** 57P03: the server is starting up or in recovery. */
  cannotConnectNow: "57P03",
  /** 53300: too many connections. */
  tooManyConnections: "53300",
  /** 3D000: the database does not exist. */
  invalidCatalogName: "3D000",
  /** 42P01: a table does not exist (migrations not run). */
  undefinedTable: "42P01",
} as const;

/** Transaction failures that succeed when the transaction is simply run again. */
export const retryableStates: ReadonlySet<string> = new Set([sqlState.serializationFailure, sqlState.deadlockDetected]);

/** Node socket errors that mean the database is unreachable. */
const unreachableErrnos = new Set(["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EPIPE", "ENOTFOUND", "EHOSTUNREACH", "EAI_AGAIN"]);

/**
 * The Connect code for a database failure, or undefined when it is not one
 * the service expects (the caller then answers `internal`).
 */
export function connectCodeForDatabaseError(err: unknown): Code | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code !== "string") {
    // pg reports a lost connection or a pool timeout as a plain Error.
    const message = err instanceof Error ? err.message : "";
    if (/Connection terminated|timeout exceeded when trying to connect|Client has encountered a connection error/i.test(message)) {
      return Code.Unavailable;
    }
    return undefined;
  }
  if (unreachableErrnos.has(code)) return Code.Unavailable;
  if (code.startsWith("08")) return Code.Unavailable; // connection exception class
  switch (code) {
    case sqlState.adminShutdown:
    case sqlState.cannotConnectNow:
    case sqlState.tooManyConnections:
    case sqlState.lockNotAvailable:
      return Code.Unavailable;
    case sqlState.serializationFailure:
    case sqlState.deadlockDetected:
      return Code.Aborted;
    case sqlState.queryCanceled:
      return Code.DeadlineExceeded;
    default:
      return undefined;
  }
}
