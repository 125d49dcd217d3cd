/**
 * `npx tsx bench/profile.ts`: where a Get's time goes.
 *
 * On the main benchmark database (reused when `npm run bench` kept it with
 * BENCH_KEEP_DB=1, else seeded afresh) it runs E, G0, G and G with 100
 * StreamAudit followers (BENCH_PROFILE_VARIANTS) in turn, each in a
 * server child under `node --cpu-prof` with pool checkout timing on, under the
 * same closed-loop load as the benchmark, and reports:
 *   - per variant: calls/s, server CPU per call, pg pool occupancy, waiters
 *     and checkout wait, audit batch sizes, PostgreSQL commits, WAL records,
 *     WAL bytes and WAL syncs per call (pg_stat_database, pg_stat_wal);
 *   - per profile: CPU by area (src/..., pg, Connect, protobuf, pino, node
 *     internals, GC) in microseconds per call, and the top functions by self
 *     and by inclusive time;
 *   - EXPLAIN (ANALYZE, BUFFERS, WAL) of the Get's statement and of the audit
 *     writer's batch (lock of the chain head, then the append), rolled back.
 * Writes bench/results/profile/summary.json next to the .cpuprofile files
 * (open them in Chrome DevTools or speedscope).
 */
import { mkdirSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import pg from "pg";
import { createLogger } from "../src/log.js";
import { selectConnectionForUse } from "../src/db/queries/connections.js";
import { appendAuditEvents, lockAuditHead } from "../src/db/queries/audit.js";
import { chainEvents, type AuditEventInput } from "../src/audit/chain.js";
import { openBenchServer, queryRows } from "./lib/db.js";
import { buildChildren, repoRoot } from "./lib/build.js";
import { summariseProfile } from "./lib/cpuprofile.js";
import { benchKeys, cleanUpDatabases, loadSettings, prepareDatabase, startHelperChild, startServerChild, type ServerChild } from "./lib/setup.js";
import { round } from "./lib/stats.js";
import { benchIntegration, getPrefix } from "./lib/tokens.js";
import type { LoadResult } from "./load-child.js";

const settings = loadSettings();
const seconds = Number(process.env.BENCH_PROFILE_SECONDS ?? (settings.quick ? 5 : 15));
const say = (line = "") => process.stdout.write(line + "\n");
const outDir = path.join(repoRoot, "bench", "results", "profile");
const mainName = "tokenvault_bench_main";

interface DbCounters {
  xact_commit: string;
  blks_hit: string;
  blks_read: string;
  wal_records: string;
  wal_bytes: string;
  wal_sync: string;
  wal_write: string;
}

async function dbCounters(url: string): Promise<DbCounters> {
  return (
    await queryRows<DbCounters>(
      url,
      `select d.xact_commit::text, d.blks_hit::text, d.blks_read::text, w.wal_records::text, w.wal_bytes::text, w.wal_sync::text, w.wal_write::text
       from pg_stat_database d, pg_stat_wal w where d.datname = current_database()`,
    )
  )[0]!;
}

/** Captures the statement a query function sends, without a database. */
async function capture(run: (db: never) => Promise<unknown>): Promise<{ text: string; values: unknown[] }> {
  let captured: { text: string; values: unknown[] } | undefined;
  const fake = {
    query: async (config: string | { text: string; values?: unknown[] }, values?: unknown[]) => {
      captured = typeof config === "string" ? { text: config, values: values ?? [] } : { text: config.text, values: config.values ?? [] };
      return { rows: [] };
    },
  };
  await run(fake as never).catch(() => {});
  return captured!;
}

async function main(): Promise<void> {
  const logger = createLogger("warn");
  const server = await openBenchServer(logger);
  const reuse = process.env.BENCH_REUSE_DB !== "0";
  const keys = benchKeys(reuse);
  say(`database: ${server.where}; ${seconds} s per variant, ${settings.concurrency} in flight`);
  const main = await prepareDatabase(server, keys.ring, mainName, settings.mainRows, reuse, say);
  rmSync(outDir, { recursive: true, force: true });
  mkdirSync(outDir, { recursive: true });
  const built = await buildChildren();
  const load = await startHelperChild("load", "load-child.ts", built);
  const report: Record<string, unknown> = { database: server.where, version: server.version, seconds, concurrency: settings.concurrency, pool_max: settings.poolMax };
  try {
    // A template for E: one real Get from a plain G.
    const plain = await startServerChild("G-template", "vault", { built, dbUrl: main.url, keys: keys.text });
    const sample = await load.call<{ base64: string }>("sample-get", { baseUrl: plain.baseUrl, secret: main.secret, userId: `${getPrefix}0` });
    await plain.child.stop();

    const variants: Record<string, unknown> = {};
    const modes = { E: "echo", G0: "vault-noaudit", G: "vault", G_followers: "vault" } as const;
    const wanted = (process.env.BENCH_PROFILE_VARIANTS ?? "E,G0,G,G_followers").split(",").map((x) => x.trim()) as (keyof typeof modes)[];
    const followers = wanted.includes("G_followers") ? await startHelperChild("followers", "followers-child.ts", built) : undefined;
    for (const name of wanted) {
      const mode = modes[name];
      const dir = path.join(outDir, name);
      mkdirSync(dir, { recursive: true });
      const s: ServerChild = await startServerChild(name, mode, {
        built,
        dbUrl: main.url,
        keys: keys.text,
        template: sample.base64,
        nodeFlags: ["--cpu-prof", `--cpu-prof-dir=${dir}`],
        env: { BENCH_POOL_TIMING: "1" },
      });
      const job = { baseUrl: s.baseUrl, secret: main.secret, method: "get", prefix: getPrefix, keyCount: main.rows, concurrency: settings.concurrency, connections: settings.connections, seed: 5 };
      if (name === "G_followers") {
        const head = (await queryRows<{ last_id: string }>(main.url, "select last_id from audit_head"))[0]!.last_id;
        await followers!.call("attach", { baseUrl: s.baseUrl, secret: main.secret, count: settings.followers, afterCursor: head, sessionsCount: 10, maxBatch: settings.followerBatch });
        await new Promise((r) => setTimeout(r, 300));
      }
      await load.call<LoadResult>("rpc", { ...job, seconds: 2, warmupSeconds: 0 });
      await s.child.call("window-start");
      const before = await dbCounters(main.url);
      const r = await load.call<LoadResult>("rpc", { ...job, seconds, warmupSeconds: 0 });
      const after = await dbCounters(main.url);
      const w = await s.child.call<Record<string, unknown> & { cpuUserMs: number; cpuSystemMs: number; auditEvents: number; auditBatches: number }>("window-end");
      if (name === "G_followers") await followers!.call("detach");
      await s.child.stop();
      const file = readdirSync(dir).find((f) => f.endsWith(".cpuprofile"));
      const calls = Math.max(1, r.ok);
      const delta = (k: keyof DbCounters) => round((Number(after[k]) - Number(before[k])) / calls, 3);
      const cpuPerCall = ((w.cpuUserMs + w.cpuSystemMs) * 1000) / calls;
      const prof = file === undefined ? undefined : summariseProfile(path.join(dir, file), 30);
      variants[name] = {
        rps: round(r.rps, 1),
        latency_ms: r.latency,
        errors: r.errors,
        server_cpu_us_per_call: round(cpuPerCall, 1),
        pool: { mean_busy: w.poolMeanBusy, mean_waiting: w.poolMeanWaiting, max_waiting: w.poolMaxWaiting, checkout_ms: w.poolAcquireMs },
        audit_events_per_batch: w.auditBatches > 0 ? round(w.auditEvents / w.auditBatches, 2) : undefined,
        per_call_in_postgres: { commits: delta("xact_commit"), wal_records: delta("wal_records"), wal_bytes: delta("wal_bytes"), wal_syncs: delta("wal_sync"), wal_writes: delta("wal_write"), blocks_hit: delta("blks_hit"), blocks_read: delta("blks_read") },
        event_loop_delay_ms: w.eventLoopDelayMs,
        memory_mb: { rss: w.rssMb, heap_used: w.heapUsedMb, heap_total: w.heapTotalMb, external: w.externalMb, max_rss: w.maxRssMb },
        profile: prof === undefined ? undefined : {
          file: path.relative(repoRoot, path.join(dir, file!)),
          // The profile covers start-up and warm-up too: areas are scaled to the measured CPU per call by share.
          areas_us_per_call: prof.areas.map((a) => ({ area: a.name, share: a.share, us: round((a.share / 100) * cpuPerCall, 1) })),
          top_self: prof.self,
          top_inclusive: prof.inclusive,
        },
      };
      say(`${name}: ${Math.round(r.rps)} calls/s, server ${Math.round(cpuPerCall)} us CPU/call, ` +
        `commits/call ${delta("xact_commit")}, WAL syncs/call ${delta("wal_sync")}, pool mean busy ${round(w.poolMeanBusy as number, 1)} waiting ${round(w.poolMeanWaiting as number, 1)}` +
        (w.auditBatches > 0 ? `, ${round(w.auditEvents / w.auditBatches, 1)} events/audit batch` : ""));
    }
    report.variants = variants;

    // EXPLAIN of the Get's statement and the audit batch, on the same database.
    const client = new pg.Client({ connectionString: main.url });
    await client.connect();
    try {
      const user = `${getPrefix}${Math.floor(main.rows / 2)}`;
      const select = await capture((db) => selectConnectionForUse(db, user, benchIntegration));
      await client.query("begin");
      const plan1 = await client.query<{ "QUERY PLAN": string }>(`explain (analyze, buffers, wal, verbose off) ${select.text}`, select.values);
      await client.query("rollback");
      const head = await capture((db) => lockAuditHead(db, 5000, { begin: false }));
      const events: AuditEventInput[] = Array.from({ length: 11 }, (_, i) => ({
        occurredAt: new Date(Math.floor(Date.now())),
        caller: "bench",
        action: "get",
        userId: `${getPrefix}${i}`,
        integration: benchIntegration,
        outcome: "ok",
        requestId: `00000000-0000-4000-8000-0000000000${10 + i}`,
        peer: "127.0.0.1",
        details: { rpc: "Get", refreshed: false, refresh_token_returned: false },
      }));
      await client.query("begin");
      const headRow = (await client.query<{ last_id: string; last_hash: Buffer }>("select last_id, last_hash from audit_head")).rows[0]!;
      const chained = chainEvents({ lastId: BigInt(headRow.last_id), lastHash: headRow.last_hash }, events);
      const append = await capture((db) => appendAuditEvents(db, chained));
      // lockAuditHead sends several statements; EXPLAIN the select it ends with.
      const lockSelect = head.text.split(";").map((x) => x.trim()).filter((x) => x.startsWith("select"))[0]!;
      const plan2 = await client.query<{ "QUERY PLAN": string }>(`explain (analyze, buffers, wal) ${lockSelect}`);
      const plan3 = await client.query<{ "QUERY PLAN": string }>(`explain (analyze, buffers, wal) ${append.text}`, append.values);
      await client.query("rollback");
      const lines = (r: pg.QueryResult<{ "QUERY PLAN": string }>) => r.rows.map((x) => x["QUERY PLAN"]);
      report.explain = {
        get_select_connection_for_use: lines(plan1),
        audit_lock_head: lines(plan2),
        audit_append_11_events: lines(plan3),
      };
      say();
      say("EXPLAIN ANALYZE, the Get's statement (selectConnectionForUse):");
      for (const l of lines(plan1)) say(`  ${l}`);
      say("EXPLAIN ANALYZE, the audit batch's append (11 events):");
      for (const l of lines(plan3)) say(`  ${l}`);
    } finally {
      await client.end();
    }

    say();
    for (const [name, v] of Object.entries(variants) as [string, { server_cpu_us_per_call: number; profile?: { areas_us_per_call: { area: string; us: number; share: number }[]; top_self: { name: string; share: number }[]; top_inclusive: { name: string; share: number }[] } }][]) {
      if (v.profile === undefined) continue;
      say(`${name}: server CPU ${v.server_cpu_us_per_call} us/call by area:`);
      for (const a of v.profile.areas_us_per_call.slice(0, 12)) say(`  ${String(a.us).padStart(7)} us  ${String(a.share).padStart(5)} %  ${a.area}`);
      say(`${name}: top inclusive (share of busy CPU):`);
      for (const f of v.profile.top_inclusive.filter((x) => /src\//.test(x.name)).slice(0, 15)) say(`  ${String(f.share).padStart(5)} %  ${f.name}`);
      say(`${name}: top self:`);
      for (const f of v.profile.top_self.slice(0, 15)) say(`  ${String(f.share).padStart(5)} %  ${f.name}`);
      say();
    }
    writeFileSync(path.join(outDir, "summary.json"), JSON.stringify(report, null, 2) + "\n");
    say(`wrote ${path.relative(repoRoot, path.join(outDir, "summary.json"))} and the .cpuprofile files beside it`);
    await followers?.stop();
  } finally {
    await load.stop();
    await cleanUpDatabases(server, [mainName], reuse || settings.keepDatabases);
    await server.close();
  }
}

await main();
