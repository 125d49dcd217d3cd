/**
 * A database of the test file's own, cloned from the migrated template that
 * global-setup.ts made, so files run in parallel without seeing each other.
 */
import { randomBytes } from "node:crypto";
import pg from "pg";
import { inject } from "vitest";
import { adminQuery, withDatabase } from "./global-setup.js";

/** A cloned database: its URL, a pool on it, and how to drop it. */
export interface TestDatabase {
  readonly url: string;
  readonly name: string;
  readonly pool: pg.Pool;
  drop(): Promise<void>;
}

/** Clones the template into a fresh database. Call drop() in afterAll. */
export async function createTestDatabase(): Promise<TestDatabase> {
  const adminUrl = inject("adminUrl");
  const name = `tv_test_${randomBytes(6).toString("hex")}`;
  await adminQuery(adminUrl, `create database ${name} template ${inject("templateDatabase")}`);
  const url = withDatabase(adminUrl, name);
  const pool = new pg.Pool({ connectionString: url, max: 10 });
  // drop() ends the pool, whose idle clients may still be closing when pg-pool says it ended, then
  // drops the database WITH (FORCE): a client killed there (57P01, admin shutdown) makes the pool
  // emit "error", an unhandled error without a listener. Only that is expected; anything else still fails.
  pool.on("error", (err: Error & { code?: string }) => {
    if (err.code !== "57P01") throw err;
  });
  return {
    url,
    name,
    pool,
    async drop() {
      await pool.end();
      await adminQuery(adminUrl, `drop database if exists ${name} with (force)`);
    },
  };
}
