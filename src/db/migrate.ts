/**
 * Schema migrations: plain SQL files in migrations/ (an "-- Up Migration" and a
 * "-- Down Migration" section each), applied by node-pg-migrate under its
 * advisory lock, so replicas starting together migrate once.
 */
import { readdirSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { runner } from "node-pg-migrate";
import pg from "pg";
import type { Logger } from "../log.js";

/** The migrations folder, found from this file in src/db or dist/db alike. */
export const migrationsDir = fileURLToPath(new URL("../../migrations", import.meta.url));
/** The table where node-pg-migrate records what ran. */
export const migrationsTable = "tokenvault_migrations";

/** Which way to migrate, and how many steps (all pending by default for up, one for down). */
export interface MigrateOptions {
  direction: "up" | "down";
  count?: number;
  logger?: Logger;
}

/** Runs migrations and returns the names of those applied or reverted. */
export async function migrate(databaseUrl: string, options: MigrateOptions): Promise<string[]> {
  const ran = await runner({
    databaseUrl,
    dir: migrationsDir,
    migrationsTable,
    direction: options.direction,
    count: options.count ?? (options.direction === "up" ? Infinity : 1),
    checkOrder: true,
    singleTransaction: true,
    // Replicas starting together (or a CLI command beside a starting serve)
    // queue on the lock instead of failing.
    advisoryLockMode: "wait",
    verbose: false,
    log: (message) => options.logger?.debug({ migration: message }, "migration"),
  });
  return ran.map((m) => m.name);
}

/** One migration and whether it has been applied. */
export interface MigrationStatus {
  name: string;
  appliedAt: Date | undefined;
}

/** Lists every migration file with when it was applied (undefined when pending). */
export async function migrationStatus(databaseUrl: string): Promise<MigrationStatus[]> {
  const files = readdirSync(migrationsDir)
    .filter((f) => f.endsWith(".sql"))
    .map((f) => f.replace(/\.sql$/, ""))
    .sort();
  const client = new pg.Client({ connectionString: databaseUrl });
  await client.connect();
  try {
    const exists = await client.query<{ present: boolean }>(
      "select to_regclass($1::text) is not null as present",
      [migrationsTable],
    );
    const applied = new Map<string, Date>();
    if (exists.rows[0]?.present === true) {
      const rows = await client.query<{ name: string; run_on: Date }>(`select name, run_on from ${migrationsTable}`);
      for (const row of rows.rows) applied.set(row.name, row.run_on);
    }
    return files.map((name) => ({ name, appliedAt: applied.get(name) }));
  } finally {
    await client.end();
  }
}
