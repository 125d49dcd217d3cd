/**
 * `npm run bench`: TokenVault's benchmark (see bench/README.md).
 *
 * One run on this machine: seeds three databases, starts every server in its
 * own process and the load generators in theirs, then measures every variant
 * in rounds, rotating the order each round so that drift (PostgreSQL
 * checkpoints, autovacuum, other work on the machine) hits all variants alike.
 * Prints a table and the ratios against the targets, and writes
 * bench/results/latest.json.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { create, toBinary } from "@bufbuild/protobuf";
import { GetRequestSchema } from "../src/gen/tokenvault/v1/tokenvault_pb.js";
import { createLogger } from "../src/log.js";
import { openBenchServer, queryRows } from "./lib/db.js";
import type { Child } from "./lib/ipc.js";
import { cpuDelta, cpuSnapshot, describeMachine, memoryOf } from "./lib/machine.js";
import { grpcCheck, grpcFrame, h2loadVersion, runH2load, writeBodyFile, type H2loadResult } from "./lib/h2load.js";
import { buildChildren } from "./lib/build.js";
import { benchKeys, cleanUpDatabases, loadSettings, prepareDatabase, startHelperChild, startServerChild, type BenchDatabase, type ServerChild } from "./lib/setup.js";
import { median, round, type LatencySummary } from "./lib/stats.js";
import { benchIntegration, getPrefix, storePrefix } from "./lib/tokens.js";
import type { LoadResult } from "./load-child.js";

const settings = loadSettings();
const say = (line = "") => process.stdout.write(line + "\n");
const logger = createLogger("warn");
const runStarted = performance.now();

/** Figures a server child reports for one measurement window. */
interface ServerWindow {
  seconds: number;
  cpuUserMs: number;
  cpuSystemMs: number;
  auditBatches: number;
  auditEvents: number;
  poolMeanWaiting: number;
  poolMaxWaiting: number;
  poolMeanBusy: number;
  eventLoopDelayMs: { p50: number; p99: number; max: number };
  rssMb: number;
  heapUsedMb: number;
  heapTotalMb: number;
  externalMb: number;
  maxRssMb: number;
}

/** One variant measured in one round. */
interface Measurement {
  variant: string;
  round: number;
  rps: number;
  ok: number;
  errors: Record<string, number>;
  errorSample?: string;
  latency?: LatencySummary;
  /** h2load's mean and max (it gives no percentiles). */
  h2load?: H2loadResult;
  server?: ServerWindow;
  cpu: ReturnType<typeof cpuDelta>;
  /** CPU per successful request, in microseconds. */
  cpuPerRequestUs: { server?: number; postgres: number; client?: number };
  followers?: { count: number; auditEventsInWindow: number; minDelivered: number; maxDelivered: number; deliveredShare: number; endedEarly: number; statuses: string[] };
}

interface Variant {
  name: string;
  description: string;
  measure(seconds: number, settle: number, round: number): Promise<Measurement>;
}

const dbNames = { main: "tokenvault_bench_main", small: "tokenvault_bench_1k", large: "tokenvault_bench_1m" };

async function main(): Promise<void> {
  say(`TokenVault benchmark${settings.quick ? " (BENCH_QUICK=1: small seeds, short rounds; figures are indicative only)" : ""}`);
  const h2 = settings.h2load ? await h2loadVersion() : undefined;
  if (settings.h2load && h2 === undefined) say("note: h2load not installed (Debian package nghttp2-client): skipping the h2load variants");

  // --- databases -----------------------------------------------------------
  const server = await openBenchServer(logger);
  const machine = describeMachine(server.version, `${server.kind}: ${server.where}`, h2);
  say(`machine: ${machine.cpu_model}, ${machine.cores} cores, ${machine.memory_gb} GiB, ${machine.node_version}, ${server.version.split(" on ")[0]}`);
  say(`database: ${server.where}`);
  say("seeding (connections sealed with src/crypto, each for its own user):");
  const keys = benchKeys(settings.reuseDatabases);
  const children: Child[] = [];
  let servers: Record<string, ServerChild> = {};
  try {
    const main = await prepareDatabase(server, keys.ring, dbNames.main, settings.mainRows, settings.reuseDatabases, say);
    const small = await prepareDatabase(server, keys.ring, dbNames.small, settings.smallRows, settings.reuseDatabases, say);
    const large = await prepareDatabase(server, keys.ring, dbNames.large, settings.largeRows, settings.reuseDatabases, say);
    const setupSeconds = (performance.now() - runStarted) / 1000;

    // --- processes ---------------------------------------------------------
    const built = await buildChildren();
    if (!built) say("note: esbuild not found: children run under tsx, whose loader thread adds to their RSS");
    const load = await startHelperChild("load", "load-child.ts", built);
    children.push(load);
    const followers = await startHelperChild("followers", "followers-child.ts", built);
    children.push(followers);
    const vault = (name: string, mode: "vault" | "vault-noaudit", db: BenchDatabase) => startServerChild(name, mode, { built, dbUrl: db.url, keys: keys.text });
    const G = await vault("G", "vault", main);
    const G0 = await vault("G0", "vault-noaudit", main);
    const G_1k = await vault("G_1k", "vault", small);
    const G_1M = await vault("G_1M", "vault", large);
    servers = { G, G0, G_1k, G_1M };
    for (const s of Object.values(servers)) children.push(s.child);
    // E answers with the bytes of a real Get's response.
    const sample = await load.call<{ base64: string; bytes: number }>("sample-get", { baseUrl: G.baseUrl, secret: main.secret, userId: `${getPrefix}0` });
    const E = await startServerChild("E", "echo", { built, template: sample.base64 });
    servers.E = E;
    children.push(E.child);
    say(`servers: E, G, G0, G_1k, G_1M each in its own process; Get response ${sample.bytes} bytes`);

    const pids = (): Record<string, number> => ({ load: load.pid, followers: followers.pid, ...Object.fromEntries(Object.entries(servers).map(([k, s]) => [k, s.child.pid])) });

    // --- variants ----------------------------------------------------------
    const rpcVariant = (name: string, description: string, target: ServerChild, db: BenchDatabase, method: "get" | "store", prefix: string, keyCount: number): Variant => ({
      name,
      description,
      async measure(seconds, settle, roundNo) {
        const job = { baseUrl: target.baseUrl, secret: db.secret, method, prefix, keyCount, concurrency: settings.concurrency, connections: settings.connections, seed: roundNo + 1 };
        if (settle > 0) await load.call<LoadResult>("rpc", { ...job, seconds: settle, warmupSeconds: 0 });
        return measureWindow(name, roundNo, target, pids(), "load", () => load.call<LoadResult>("rpc", { ...job, seconds, warmupSeconds: 0 }));
      },
    });
    const wVariant: Variant = {
      name: "W",
      description: "a Get's database work straight on a pg pool: the Get's select-and-mark statement + one durable audit insert",
      async measure(seconds, settle, roundNo) {
        const job = { dbUrl: main.url, poolMax: settings.poolMax, prefix: getPrefix, keyCount: main.rows, concurrency: settings.concurrency, seed: roundNo + 1 };
        if (settle > 0) await load.call<LoadResult>("w", { ...job, seconds: settle, warmupSeconds: 0 });
        return measureWindow("W", roundNo, undefined, pids(), "load", () => load.call<LoadResult>("w", { ...job, seconds, warmupSeconds: 0 }));
      },
    };
    const auditHead = async () => BigInt((await queryRows<{ last_id: string }>(main.url, "select last_id from audit_head"))[0]!.last_id);
    const followersVariant: Variant = {
      name: "G_followers",
      description: `G with ${settings.followers} StreamAudit followers (follow: true) reading every event`,
      async measure(seconds, settle, roundNo) {
        const target = G;
        const startHead = await auditHead();
        await followers.call("attach", { baseUrl: target.baseUrl, secret: main.secret, count: settings.followers, afterCursor: startHead.toString(), sessionsCount: 10, maxBatch: settings.followerBatch });
        await new Promise((r) => setTimeout(r, 300));
        const job = { baseUrl: target.baseUrl, secret: main.secret, method: "get", prefix: getPrefix, keyCount: main.rows, concurrency: settings.concurrency, connections: settings.connections, seed: roundNo + 1 };
        if (settle > 0) await load.call<LoadResult>("rpc", { ...job, seconds: settle, warmupSeconds: 0 });
        const before = await auditHead();
        const m = await measureWindow("G_followers", roundNo, target, pids(), "load", () => load.call<LoadResult>("rpc", { ...job, seconds, warmupSeconds: 0 }));
        const after = await auditHead();
        // Give the followers a moment to drain what was committed last.
        await new Promise((r) => setTimeout(r, 300));
        const counts = await followers.call<{ messages: number[]; endedEarly: number; statuses: string[] }>("detach");
        const expected = Number(after - startHead);
        const min = Math.min(...counts.messages);
        m.followers = {
          count: counts.messages.length,
          auditEventsInWindow: Number(after - before),
          minDelivered: min,
          maxDelivered: Math.max(...counts.messages),
          deliveredShare: expected > 0 ? min / expected : NaN,
          endedEarly: counts.endedEarly,
          statuses: [...new Set(counts.statuses)],
        };
        return m;
      },
    };
    const h2Variant = (name: string, target: ServerChild, db: BenchDatabase, bodyFile: string): Variant => ({
      name,
      description: `h2load (non-Node generator), gRPC framing, one fixed key, -c ${settings.connections} -m ${Math.ceil(settings.concurrency / settings.connections)}, against ${target.name}`,
      async measure(seconds, settle, roundNo) {
        return measureWindow(name, roundNo, target, pids(), undefined, async () => {
          const r = await runH2load({
            url: `${target.baseUrl}/tokenvault.v1.TokenVaultService/Get`,
            secret: db.secret,
            bodyFile,
            seconds,
            warmupSeconds: Math.max(1, Math.ceil(settle)),
            connections: settings.connections,
            streams: Math.ceil(settings.concurrency / settings.connections),
          });
          const errors: Record<string, number> = r.failed + r.errored > 0 ? { failed: r.failed, errored: r.errored } : {};
          return { h2load: r, rps: r.rps, ok: r.succeeded, errors, windowSeconds: seconds + Math.max(1, Math.ceil(settle)) };
        });
      },
    });

    let variants: Variant[] = [
      rpcVariant("E", "bare Connect-node echo: same server setup, no interceptors, Get-sized response", E, main, "get", getPrefix, main.rows),
      wVariant,
      rpcVariant("G", `the real Get: bearer caller, durable audit, ${main.rows.toLocaleString("en")} connections, random user per call`, G, main, "get", getPrefix, main.rows),
      rpcVariant("G0", "G with the bench-only no-op audit writer", G0, main, "get", getPrefix, main.rows),
      followersVariant,
      rpcVariant("Store", `Store (seal + upsert + durable audit) over ${settings.storeKeys.toLocaleString("en")} keys`, G, main, "store", storePrefix, settings.storeKeys),
      rpcVariant("G_1k", `G on a database of ${small.rows.toLocaleString("en")} connections`, G_1k, small, "get", getPrefix, small.rows),
      rpcVariant("G_1M", `G on a database of ${large.rows.toLocaleString("en")} connections`, G_1M, large, "get", getPrefix, large.rows),
    ];
    if (h2 !== undefined) {
      const frame = grpcFrame(toBinary(GetRequestSchema, create(GetRequestSchema, { userId: `${getPrefix}42`, integration: benchIntegration })));
      const bodyFile = writeBodyFile("get", frame);
      for (const [name, target] of [["E", E], ["G", G], ["G0", G0]] as const) {
        const check = await grpcCheck(`${target.baseUrl}/tokenvault.v1.TokenVaultService/Get`, main.secret, frame);
        if (check.status !== "0") throw new Error(`the h2load request fails on ${name}: grpc-status ${check.status} ${check.message}`);
      }
      variants.push(
        h2Variant("E_h2load", E, main, bodyFile),
        h2Variant("G_h2load", G, main, bodyFile),
        h2Variant("G0_h2load", G0, main, bodyFile),
      );
    }
    if (settings.only.length > 0) variants = variants.filter((v) => settings.only.includes(v.name));

    // --- rounds ------------------------------------------------------------
    const perRound = variants.length * (settings.seconds + settings.settleSeconds + 0.5);
    say(
      `plan: warm-up round (${settings.warmupSeconds} s each), ${settings.rounds} rounds x ${variants.length} variants x ${settings.seconds} s, ` +
        `then ${settings.halfSeconds} s at half of G's peak; about ${Math.round((settings.rounds * perRound + variants.length * (settings.warmupSeconds + 1) + settings.halfSeconds + 5) / 60 * 10) / 10} more minutes`,
    );
    say(`load: ${settings.concurrency} requests in flight over ${settings.connections} HTTP/2 connection(s); vault pool ${settings.poolMax}`);
    const warmup: Measurement[] = [];
    for (const v of variants) warmup.push(await v.measure(settings.warmupSeconds, 0, -1));
    const results: Measurement[] = [];
    for (let r = 0; r < settings.rounds; r++) {
      const order = variants.map((_, i) => variants[(i + r) % variants.length]!);
      const line: string[] = [];
      for (const v of order) {
        const m = await v.measure(settings.seconds, settings.settleSeconds, r);
        results.push(m);
        line.push(`${v.name} ${Math.round(m.rps)}`);
        const failed = Object.values(m.errors).reduce((a, b) => a + b, 0);
        if (failed > 0) say(`  ! ${v.name}: ${failed} failed calls ${JSON.stringify(m.errors)} ${m.errorSample ?? ""}`);
      }
      say(`round ${r + 1}/${settings.rounds} (calls/s): ${line.join(", ")}`);
    }

    // --- half of peak --------------------------------------------------------
    const peak = median(results.filter((m) => m.variant === "G").map((m) => m.rps));
    let half: (Measurement & { targetRate: number; latencyFromSchedule?: LatencySummary }) | undefined;
    if (Number.isFinite(peak) && peak > 0 && settings.halfSeconds > 0) {
      const rate = Math.max(1, Math.round(peak / 2));
      say(`half of peak: G's peak ${Math.round(peak)} calls/s, open loop at ${rate} calls/s for ${settings.halfSeconds} s`);
      const target = G;
      const job = { baseUrl: target.baseUrl, secret: main.secret, method: "get", prefix: getPrefix, keyCount: main.rows, connections: settings.connections, rate, seed: 99 };
      await load.call<LoadResult>("rpc", { ...job, concurrency: 0, seconds: Math.min(3, settings.halfSeconds / 2), warmupSeconds: 0 });
      let fromSchedule: LatencySummary | undefined;
      const m = await measureWindow("G_half_peak", 0, target, pids(), "load", async () => {
        const r = await load.call<LoadResult>("rpc", { ...job, concurrency: 0, seconds: settings.halfSeconds, warmupSeconds: 0 });
        fromSchedule = r.latencyFromSchedule;
        return r;
      });
      half = { ...m, targetRate: rate, ...(fromSchedule === undefined ? {} : { latencyFromSchedule: fromSchedule }) };
    }

    // --- memory ------------------------------------------------------------
    const rss = Object.fromEntries(
      Object.entries(servers).map(([name, s]) => {
        const mem = memoryOf(s.child.pid);
        return [name, { peak_rss_mb: round(mem?.hwmMb ?? NaN, 1), rss_at_end_mb: round(mem?.rssMb ?? NaN, 1) }];
      }),
    );
    const vaultPeaks = ["G", "G0", "G_1k", "G_1M"].map((k) => rss[k]?.peak_rss_mb ?? NaN).filter((v) => Number.isFinite(v));
    const peakRss = vaultPeaks.length === 0 ? NaN : Math.max(...vaultPeaks);

    // --- figures -----------------------------------------------------------
    const byVariant = (name: string) => results.filter((m) => m.variant === name);
    const paired = (a: string, b: string, f: (x: Measurement) => number) => {
      const ratios: number[] = [];
      for (let r = 0; r < settings.rounds; r++) {
        const x = results.find((m) => m.variant === a && m.round === r);
        const y = results.find((m) => m.variant === b && m.round === r);
        if (x !== undefined && y !== undefined) ratios.push(f(x) / f(y));
      }
      return median(ratios);
    };
    const rps = (m: Measurement) => m.rps;
    const p50 = (m: Measurement) => m.latency?.p50 ?? NaN;
    const ratios = {
      G_over_E: round(paired("G", "E", rps), 3),
      G_over_G0: round(paired("G", "G0", rps), 3),
      followers_over_G: round(paired("G_followers", "G", rps), 3),
      p99_over_p50: round(half?.latency === undefined ? NaN : half.latency.p99 / half.latency.p50, 3),
      G1M_over_G1k: round(paired("G_1M", "G_1k", p50), 3),
      // Extras, not targets.
      G1M_over_G1k_throughput: round(paired("G_1k", "G_1M", rps), 3),
      G_over_W: round(paired("G", "W", rps), 3),
      G_h2load_over_E_h2load: round(paired("G_h2load", "E_h2load", rps), 3),
      G_h2load_over_G0_h2load: round(paired("G_h2load", "G0_h2load", rps), 3),
    };
    const targets = {
      G_over_E: { target: ">= 0.75", value: ratios.G_over_E, met: ratios.G_over_E >= 0.75 },
      G_over_G0: { target: ">= 0.9", value: ratios.G_over_G0, met: ratios.G_over_G0 >= 0.9 },
      followers_over_G: { target: ">= 0.9", value: ratios.followers_over_G, met: ratios.followers_over_G >= 0.9 },
      p99_over_p50: { target: "<= 3", value: ratios.p99_over_p50, met: ratios.p99_over_p50 <= 3 },
      G1M_over_G1k: { target: "<= 1.2", value: ratios.G1M_over_G1k, met: ratios.G1M_over_G1k <= 1.2 },
      peak_rss_mb: { target: "< 200", value: round(peakRss, 1), met: peakRss < 200 },
    };
    const summary = Object.fromEntries(
      variants.map((v) => {
        const ms = byVariant(v.name);
        const med = (f: (m: Measurement) => number | undefined) => round(median(ms.map((m) => f(m) ?? NaN)), 2);
        return [
          v.name,
          {
            description: v.description,
            rps: round(median(ms.map(rps)), 1),
            rps_rounds: ms.map((m) => round(m.rps, 1)),
            latency_ms: ms[0]?.latency === undefined
              ? { mean: med((m) => m.h2load?.meanMs), max: med((m) => m.h2load?.maxMs) }
              : { p50: med((m) => m.latency?.p50), p90: med((m) => m.latency?.p90), p99: med((m) => m.latency?.p99), p999: med((m) => m.latency?.p999), max: med((m) => m.latency?.max) },
            cpu_us_per_call: { server: med((m) => m.cpuPerRequestUs.server), postgres: med((m) => m.cpuPerRequestUs.postgres), client: med((m) => m.cpuPerRequestUs.client) },
            machine_busy: med((m) => m.cpu.machineBusy),
            others_cpu_share: med((m) => m.cpu.othersShare),
            ...(ms[0]?.server === undefined ? {} : {
              server: {
                pool_mean_busy: med((m) => m.server?.poolMeanBusy),
                pool_mean_waiting: med((m) => m.server?.poolMeanWaiting),
                pool_max_waiting: med((m) => m.server?.poolMaxWaiting),
                audit_events_per_batch: med((m) => (m.server !== undefined && m.server.auditBatches > 0 ? m.server.auditEvents / m.server.auditBatches : undefined)),
                event_loop_delay_p99_ms: med((m) => m.server?.eventLoopDelayMs.p99),
              },
            }),
            errors: ms.reduce<Record<string, number>>((acc, m) => {
              for (const [k, n] of Object.entries(m.errors)) acc[k] = (acc[k] ?? 0) + n;
              return acc;
            }, {}),
            ...(ms[0]?.followers === undefined ? {} : { followers: ms.map((m) => m.followers) }),
          },
        ];
      }),
    );

    // --- print ---------------------------------------------------------------
    say();
    const header = ["variant", "calls/s", "per round", "p50 ms", "p99 ms", "srv us/call", "pg us/call", "cli us/call", "pool wait", "errors"];
    const rows = variants.map((v) => {
      const s = summary[v.name]!;
      const lat = s.latency_ms as Record<string, number | undefined>;
      const errs = Object.values(s.errors).reduce((a, b) => a + b, 0);
      return [
        v.name,
        String(Math.round(s.rps)),
        s.rps_rounds.map((x) => Math.round(x)).join("/"),
        lat.p50 !== undefined ? lat.p50.toFixed(2) : `mean ${lat.mean?.toFixed(2)}`,
        lat.p99 !== undefined ? lat.p99.toFixed(2) : `max ${lat.max?.toFixed(1)}`,
        fmt(s.cpu_us_per_call.server),
        fmt(s.cpu_us_per_call.postgres),
        fmt(s.cpu_us_per_call.client),
        "server" in s && s.server !== undefined ? fmt(s.server.pool_mean_waiting, 1) : "",
        String(errs),
      ];
    });
    if (half !== undefined) {
      rows.push([
        "G_half_peak",
        `${Math.round(half.rps)} (asked ${half.targetRate})`,
        "",
        half.latency!.p50.toFixed(2),
        half.latency!.p99.toFixed(2),
        fmt(half.cpuPerRequestUs.server),
        fmt(half.cpuPerRequestUs.postgres),
        fmt(half.cpuPerRequestUs.client),
        fmt(half.server?.poolMeanWaiting, 1),
        String(Object.values(half.errors).reduce((a, b) => a + b, 0)),
      ]);
    }
    printTable(header, rows);
    say("(calls/s: median of the rounds; latency: median of the rounds' percentiles; us/call: CPU per successful call of the server process, of all PostgreSQL processes, of the load generator; pool wait: mean pg pool waiters)");
    if (summary.G_followers?.followers !== undefined) {
      const f = (summary.G_followers.followers as Measurement["followers"][]).filter((x) => x !== undefined);
      say(`followers: ${f[0]?.count} streams; least events delivered per stream / events committed while attached: ${f.map((x) => round(x!.deliveredShare, 3)).join(", ")}${f.some((x) => x!.endedEarly > 0) ? `; streams ended early: ${f.map((x) => x!.endedEarly).join(", ")}` : ""}`);
    }
    if (half?.latencyFromSchedule !== undefined) {
      say(`half of peak, latency from each call's scheduled time: p50 ${half.latencyFromSchedule.p50.toFixed(2)} ms, p99 ${half.latencyFromSchedule.p99.toFixed(2)} ms`);
    }
    const noisy = results.filter((m) => !m.variant.endsWith("_h2load") && m.cpu.othersShare > 0.1);
    if (noisy.length > 0) {
      say(`noise: other work used more than 10% of the machine during ${noisy.length} of ${results.filter((m) => !m.variant.endsWith("_h2load")).length} Node-client measurements ` +
        `(median ${round(median(noisy.map((m) => m.cpu.othersShare)) * 100, 0)}%): figures are less reliable`);
    }
    say(`peak RSS (VmHWM) per server: ${Object.entries(rss).map(([k, v]) => `${k} ${v.peak_rss_mb} MB`).join(", ")}`);
    say();
    say("ratios (per-round pairs, median):");
    for (const [name, t] of Object.entries(targets)) say(`  ${name.padEnd(18)} ${String(t.value).padEnd(8)} target ${t.target.padEnd(7)} ${t.met ? "met" : "MISSED"}`);
    say(`  extras: G1M_over_G1k by throughput ${ratios.G1M_over_G1k_throughput}, G_over_W ${ratios.G_over_W}` +
      (h2 !== undefined ? `, h2load G/E ${ratios.G_h2load_over_E_h2load}, h2load G/G0 ${ratios.G_h2load_over_G0_h2load}` : ""));

    // --- write ---------------------------------------------------------------
    const output = {
      schema: 1,
      quick: settings.quick,
      machine,
      settings: { ...settings, only: settings.only.length > 0 ? settings.only : undefined },
      get_response_bytes: sample.bytes,
      children_run_as: built ? "node on a transpiled copy (bench/.build)" : "node --import tsx",
      setup_seconds: round(setupSeconds, 1),
      total_seconds: round((performance.now() - runStarted) / 1000, 1),
      variants: summary,
      half_peak: half === undefined ? undefined : {
        peak_rps: round(peak, 1),
        target_rps: half.targetRate,
        achieved_rps: round(half.rps, 1),
        latency_ms: roundAll(half.latency),
        latency_from_schedule_ms: roundAll(half.latencyFromSchedule),
        cpu_us_per_call: roundAll(half.cpuPerRequestUs),
        server: half.server === undefined ? undefined : compact({ ...half.server } as unknown as Measurement),
        machine_busy: round(half.cpu.machineBusy, 3),
        others_cpu_share: round(half.cpu.othersShare, 3),
        errors: half.errors,
      },
      rss_mb: rss,
      peak_rss_mb: round(peakRss, 1),
      ratios,
      targets,
      measurements: results.map(compact),
      warmup_measurements: warmup.map(compact),
    };
    const resultsDir = new URL("./results/", import.meta.url);
    mkdirSync(resultsDir, { recursive: true });
    const file = new URL(settings.quick ? "latest-quick.json" : "latest.json", resultsDir);
    writeFileSync(file, JSON.stringify(output, null, 2) + "\n");
    say();
    say(`wrote ${file.pathname.replace(process.cwd() + "/", "")} (${round(output.total_seconds / 60, 1)} min in all)`);
  } finally {
    await Promise.all(children.map((c) => c.stop()));
    await cleanUpDatabases(server, Object.values(dbNames), settings.keepDatabases || settings.reuseDatabases);
    await server.close();
  }
}

/** Runs `work` inside a measurement window: server counters and CPU of every process around it. */
async function measureWindow(
  variant: string,
  roundNo: number,
  target: ServerChild | undefined,
  pids: Record<string, number>,
  clientName: string | undefined,
  work: () => Promise<LoadResult | { h2load: H2loadResult; rps: number; ok: number; errors: Record<string, number>; windowSeconds: number }>,
): Promise<Measurement> {
  if (target !== undefined) await target.child.call("window-start");
  const before = cpuSnapshot(pids);
  const r = await work();
  const after = cpuSnapshot(pids);
  const server = target === undefined ? undefined : await target.child.call<ServerWindow>("window-end");
  const cpu = cpuDelta(before, after);
  // Calls made over the whole window (h2load's warm-up is inside it, at about the same rate).
  const calls = "h2load" in r ? r.rps * r.windowSeconds : r.ok;
  const per = (ms: number | undefined) => (ms === undefined || calls <= 0 ? undefined : (ms * 1000) / calls);
  const m: Measurement = {
    variant,
    round: roundNo,
    rps: r.rps,
    ok: r.ok,
    errors: r.errors,
    cpu,
    cpuPerRequestUs: {
      server: per(server === undefined ? undefined : server.cpuUserMs + server.cpuSystemMs),
      postgres: per(cpu.postgresMs)!,
      client: per(clientName === undefined ? undefined : cpu.processesMs[clientName]),
    },
  };
  if ("h2load" in r) m.h2load = r.h2load;
  else {
    m.latency = r.latency;
    if (r.errorSample !== undefined) m.errorSample = r.errorSample;
  }
  if (server !== undefined) m.server = server;
  return m;
}

/** A measurement for the JSON file, numbers rounded. */
function compact(m: Measurement): unknown {
  return JSON.parse(JSON.stringify(m, (_k, v: unknown) => (typeof v === "number" ? round(v, 3) : v))) as unknown;
}

function fmt(v: number | undefined, digits = 0): string {
  return v === undefined || !Number.isFinite(v) ? "" : v.toFixed(digits);
}

function roundAll<T extends object | undefined>(o: T): T {
  if (o === undefined) return o;
  return Object.fromEntries(Object.entries(o).map(([k, v]) => [k, typeof v === "number" ? round(v, 3) : v])) as T;
}

function printTable(header: string[], rows: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ");
  say(line(header));
  say(widths.map((w) => "-".repeat(w)).join("  "));
  for (const r of rows) say(line(r));
}

await main();
