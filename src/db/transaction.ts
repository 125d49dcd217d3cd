/**
 * withTransaction: connect, begin, run, commit or roll back, release. Retries
 * serialization failures and deadlocks with jittered backoff, as they succeed
 * when simply run again.
 */
import { setTimeout as sleep } from "node:timers/promises";
import type { Pool, PoolClient } from "pg";
import { retryableStates } from "./errors.js";

/** Options for {@link withTransaction}. */
export interface TransactionOptions {
  /** How many times to run `fn` in all when the transaction must be retried. */
  attempts?: number;
  /** `SET LOCAL lock_timeout`, in ms, so a stuck lock fails fast (55P03) instead of waiting forever. */
  lockTimeoutMs?: number;
  /** `SET LOCAL statement_timeout`, in ms, when the pool's default is too short for this transaction. */
  statementTimeoutMs?: number;
}

/** Runs `fn` in one transaction on one pooled client. */
export async function withTransaction<T>(
  pool: Pool,
  fn: (client: PoolClient) => Promise<T>,
  options: TransactionOptions = {},
): Promise<T> {
  const attempts = options.attempts ?? 3;
  for (let attempt = 1; ; attempt++) {
    const client = await pool.connect();
    let broken: Error | undefined;
    try {
      // Durable whatever the pool's default: a transaction (a refresh storing a
      // rotated refresh token) must not be lost once the provider has moved on.
      await client.query("begin; set local synchronous_commit = on");
      if (options.lockTimeoutMs !== undefined) {
        await client.query(`set local lock_timeout = ${Math.max(1, Math.trunc(options.lockTimeoutMs))}`);
      }
      if (options.statementTimeoutMs !== undefined) {
        await client.query(`set local statement_timeout = ${Math.max(1, Math.trunc(options.statementTimeoutMs))}`);
      }
      const result = await fn(client);
      await client.query("commit");
      return result;
    } catch (err) {
      await client.query("rollback").catch((e: Error) => {
        broken = e; // the connection is unusable: drop it from the pool
      });
      const code = (err as { code?: string }).code;
      if (attempt < attempts && code !== undefined && retryableStates.has(code)) {
        await sleep(Math.random() * 20 * 2 ** attempt);
        continue;
      }
      throw err;
    } finally {
      client.release(broken);
    }
  }
}
