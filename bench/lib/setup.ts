/**
 * Shared set-up of `npm run bench` and bench/profile.ts: the settings (env
 * knobs), the databases, the key ring, and the forked children.
 */
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { KeyRing, formatKeyList, generateKey, newKeyId, parseKeyList } from "../../src/crypto/key-ring.js";
import type { Logger } from "../../src/log.js";
import { addBenchCaller, dropDatabase, execute, freshDatabase, seedConnections, seededAlready, type BenchServer } from "./db.js";
import { forkChild, type Child } from "./ipc.js";
import { getPrefix } from "./tokens.js";
import { createWAuditTable } from "./w-work.js";

function knob(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === "") return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < 0) throw new Error(`${name} must be a non-negative number, got "${raw}"`);
  return value;
}

/** Every knob, from the environment (see bench/README.md). */
export function loadSettings() {
  const quick = process.env.BENCH_QUICK === "1";
  return {
    quick,
    /** Measured seconds per variant per round. */
    seconds: knob("BENCH_SECONDS", quick ? 2 : 5),
    /** Measured rounds (each runs every variant once, in a rotated order). */
    rounds: knob("BENCH_ROUNDS", quick ? 2 : 3),
    /** Seconds per variant of the unrecorded warm-up round. */
    warmupSeconds: knob("BENCH_WARMUP_SECONDS", quick ? 1 : 2),
    /** Unrecorded load before each measurement, so switching variants settles. */
    settleSeconds: knob("BENCH_SETTLE_SECONDS", quick ? 0.5 : 2),
    /** Requests in flight (closed loop), for every generator. */
    concurrency: knob("BENCH_CONCURRENCY", 32),
    /** HTTP/2 connections the requests are spread over. */
    connections: knob("BENCH_CONNECTIONS", 1),
    /** Stored connections G, G0, W and followers read (>= 100k in a full run). */
    mainRows: knob("BENCH_ROWS", quick ? 10_000 : 100_000),
    /** The small and large data sets of the 1k-vs-1M comparison. */
    smallRows: knob("BENCH_SMALL_ROWS", 1_000),
    largeRows: knob("BENCH_LARGE_ROWS", quick ? 50_000 : 1_000_000),
    /** Distinct keys the Store variant writes (inserts first, then replaces). */
    storeKeys: knob("BENCH_STORE_KEYS", 20_000),
    /** StreamAudit followers of the followers variant. */
    followers: knob("BENCH_FOLLOWERS", 100),
    /** Their StreamAudit max_batch (events per message; 0 or 1: one event per message). */
    followerBatch: knob("BENCH_FOLLOWER_BATCH", 256),
    /** Open-loop seconds at half of G's peak. */
    halfSeconds: knob("BENCH_HALF_SECONDS", quick ? 5 : 20),
    /** Pool size of the vault (TOKENVAULT_DB_POOL_MAX, default 10) and of W. */
    poolMax: knob("TOKENVAULT_DB_POOL_MAX", 10),
    h2load: process.env.BENCH_H2LOAD !== "0",
    /** Keep the databases afterwards (for bench/profile.ts). */
    keepDatabases: process.env.BENCH_KEEP_DB === "1",
    /** Reuse databases seeded by an earlier run with BENCH_KEEP_DB=1 (same sizes). */
    reuseDatabases: process.env.BENCH_REUSE_DB === "1",
    /** Comma-separated variant names to run (default: all). */
    only: (process.env.BENCH_VARIANTS ?? "").split(",").map((s) => s.trim()).filter((s) => s !== ""),
  };
}
export type Settings = ReturnType<typeof loadSettings>;

/** One seeded benchmark database. */
export interface BenchDatabase {
  name: string;
  url: string;
  rows: number;
  /** Bearer secret of its benchmark caller. */
  secret: string;
}

const keysFile = path.join(os.tmpdir(), "tokenvault-bench-keys.txt");

/** The benchmark's key ring: a fresh key, or (when reusing databases) the one they were sealed with. */
export function benchKeys(reuse: boolean): { ring: KeyRing; text: string } {
  if (reuse && existsSync(keysFile)) {
    const text = readFileSync(keysFile, "utf8").trim();
    return { ring: new KeyRing(parseKeyList(text)), text };
  }
  const text = formatKeyList([generateKey(newKeyId(new Date(), "bench"))]);
  writeFileSync(keysFile, text + "\n", { mode: 0o600 });
  return { ring: new KeyRing(parseKeyList(text)), text };
}

/** Creates (or reuses) and seeds database `name` with `rows` connections; adds a caller. */
export async function prepareDatabase(server: BenchServer, ring: KeyRing, name: string, rows: number, reuse: boolean, say: (line: string) => void): Promise<BenchDatabase> {
  const started = performance.now();
  if (reuse && (await seededAlready(server, name, rows))) {
    say(`  ${name}: reusing ${rows.toLocaleString("en")} connections`);
  } else {
    const url = await freshDatabase(server, name);
    let last = 0;
    await seedConnections(url, ring, getPrefix, rows, (done) => {
      if (rows >= 200_000 && done - last >= 200_000) {
        last = done;
        say(`  ${name}: ${done.toLocaleString("en")} / ${rows.toLocaleString("en")} sealed and inserted`);
      }
    });
    say(`  ${name}: ${rows.toLocaleString("en")} connections sealed and inserted in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  }
  const url = server.urlFor(name);
  await execute(url, createWAuditTable);
  const secret = await addBenchCaller(url, `bench-${Date.now().toString(36)}`);
  return { name, url, rows, secret };
}

/** Drops the benchmark databases unless asked to keep them. */
export async function cleanUpDatabases(server: BenchServer, names: string[], keep: boolean): Promise<void> {
  if (keep) return;
  for (const name of names) await dropDatabase(server, name).catch(() => {});
}

/** A running server child and its address. */
export interface ServerChild {
  name: string;
  child: Child;
  port: number;
  baseUrl: string;
}

/** Forks a server child (see bench/server-child.ts) and waits until it listens. */
export async function startServerChild(
  name: string,
  mode: "echo" | "vault" | "vault-noaudit",
  options: { built: boolean; dbUrl?: string; keys?: string; template?: string; nodeFlags?: string[]; env?: Record<string, string> },
): Promise<ServerChild> {
  const extraFlags = (process.env.BENCH_SERVER_NODE_FLAGS ?? "").split(/\s+/).filter((f) => f !== "");
  const child = forkChild(name, "server-child.ts", {
    built: options.built,
    nodeFlags: [...extraFlags, ...(options.nodeFlags ?? [])],
    env: {
      ...process.env,
      BENCH_MODE: mode,
      ...(options.dbUrl === undefined ? {} : { BENCH_DB_URL: options.dbUrl }),
      ...(options.keys === undefined ? {} : { BENCH_KEYS: options.keys }),
      ...(options.template === undefined ? {} : { BENCH_TEMPLATE: options.template }),
      ...options.env,
    },
  });
  const ready = await child.ready;
  const port = ready.port as number;
  return { name, child, port, baseUrl: `http://127.0.0.1:${port}` };
}

/** Forks the load generator or the followers' process. */
export async function startHelperChild(name: string, script: "load-child.ts" | "followers-child.ts", built: boolean): Promise<Child> {
  const child = forkChild(name, script, { built });
  await child.ready;
  return child;
}
