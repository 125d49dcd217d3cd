/**
 * Runs once per `vitest run`: finds a PostgreSQL (TEST_DATABASE_URL, or an
 * embedded one in a temporary folder), migrates a template database once, and
 * hands its name to the test files, which each clone their own database from
 * it (test/helpers/db.ts).
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import pg from "pg";
import type { TestProject } from "vitest/node";
import { startEmbeddedPostgres, type EmbeddedDatabase } from "../../src/db/embedded.js";
import { migrate } from "../../src/db/migrate.js";
import { createLogger } from "../../src/log.js";

declare module "vitest" {
  export interface ProvidedContext {
    /** A URL to a maintenance database with the right to create databases. */
    adminUrl: string;
    /** The migrated template database to clone. */
    templateDatabase: string;
  }
}

let embedded: EmbeddedDatabase | undefined;
let dataDir: string | undefined;
let adminUrl: string;
let templateDatabase: string;

export async function setup(project: TestProject): Promise<void> {
  const external = process.env.TEST_DATABASE_URL?.trim();
  if (external) {
    adminUrl = await ensureDatabaseExists(external);
  } else {
    dataDir = mkdtempSync(path.join(tmpdir(), "tokenvault-test-"));
    embedded = await startEmbeddedPostgres(dataDir, 0, createLogger("silent"));
    adminUrl = embedded.adminUrl;
  }
  templateDatabase = `tv_template_${process.pid}_${Date.now().toString(36)}`;
  await adminQuery(adminUrl, `create database ${templateDatabase}`);
  await migrate(withDatabase(adminUrl, templateDatabase), { direction: "up" });
  project.provide("adminUrl", adminUrl);
  project.provide("templateDatabase", templateDatabase);
}

export async function teardown(): Promise<void> {
  await adminQuery(adminUrl, `drop database if exists ${templateDatabase} with (force)`).catch(() => {});
  if (embedded !== undefined) await embedded.stop();
  if (dataDir !== undefined) rmSync(dataDir, { recursive: true, force: true });
}

/** The same server URL pointing at another database. */
export function withDatabase(url: string, database: string): string {
  const u = new URL(url);
  u.pathname = `/${database}`;
  return u.toString();
}

/** Runs one statement on a short-lived connection (CREATE/DROP DATABASE cannot run in a pool transaction). */
export async function adminQuery(url: string, sql: string): Promise<void> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    await client.query(sql);
  } finally {
    await client.end();
  }
}

/** TEST_DATABASE_URL may name a database that does not exist yet: create it. */
async function ensureDatabaseExists(url: string): Promise<string> {
  try {
    await adminQuery(url, "select 1");
  } catch (err) {
    if ((err as { code?: string }).code !== "3D000") throw err;
    const name = decodeURIComponent(new URL(url).pathname.slice(1));
    await adminQuery(withDatabase(url, "postgres"), `create database "${name.replace(/"/g, '""')}"`);
  }
  return url;
}
