/**
 * A benchmark server, run in its own process so its CPU and RSS are its own.
 *
 *   BENCH_MODE=echo            variant E (lib/echo-server.ts)
 *   BENCH_MODE=vault           the real vault: buildServer with the production
 *                              wiring of `tokenvault serve` (config from the
 *                              environment, pool, callers, durable audit log,
 *                              refresher), minus migrations (done by the bench)
 *   BENCH_MODE=vault-noaudit   the same with deps.audit.writer replaced by the
 *                              bench-only no-op writer (variant G0)
 *
 * Reports per-window figures over IPC: CPU used, pool occupancy and waiters,
 * audit batches, event-loop delay, RSS.
 */
import { monitorEventLoopDelay } from "node:perf_hooks";
import { loadConfig } from "../src/config.js";
import { KeyRing, parseKeyList } from "../src/crypto/key-ring.js";
import { createPool } from "../src/db/pool.js";
import { verifyKeyRing } from "../src/keys/verify.js";
import { createLogger } from "../src/log.js";
import { createCallerRegistry } from "../src/auth/caller-registry.js";
import { openAuditLog } from "../src/audit/log.js";
import { loadCatalogue } from "../src/providers/catalogue.js";
import { createRefresher } from "../src/refresh/refresher.js";
import { buildServer } from "../src/vault/server.js";
import type { AuditDeps } from "../src/vault/deps.js";
import { announceReady, serveIpc } from "./lib/ipc.js";
import { startEchoServer } from "./lib/echo-server.js";
import { createNoopAuditWriter } from "./lib/noop-audit.js";
import { Samples, summarise } from "./lib/stats.js";

const mode = process.env.BENCH_MODE ?? "vault";

interface PoolLike {
  totalCount: number;
  idleCount: number;
  waitingCount: number;
  connect: (...args: unknown[]) => unknown;
}

let pool: PoolLike | undefined;
let auditStats: () => { batches: number; events: number; largestBatch: number } = () => ({ batches: 0, events: 0, largestBatch: 0 });
let stop: () => Promise<void> = async () => {};
let port = 0;

// Pool acquire timing (BENCH_POOL_TIMING=1): wraps this process's pool.connect,
// which pool.query uses too, to time how long each checkout waits.
let poolWaits = new Samples();
function instrumentPool(p: PoolLike): void {
  const original = p.connect.bind(p) as (cb?: (...a: unknown[]) => void) => unknown;
  p.connect = (cb?: unknown) => {
    const started = performance.now();
    if (typeof cb === "function") {
      return original((...a: unknown[]) => {
        poolWaits.push(performance.now() - started);
        (cb as (...a: unknown[]) => void)(...a);
      });
    }
    return (original() as Promise<unknown>).then((client) => {
      poolWaits.push(performance.now() - started);
      return client;
    });
  };
}

if (mode === "echo") {
  const template = Buffer.from(process.env.BENCH_TEMPLATE ?? "", "base64");
  const echo = await startEchoServer(template, 256 * 1024);
  port = echo.port;
  stop = () => echo.close();
} else {
  const url = process.env.BENCH_DB_URL!;
  // The production configuration path, from this environment plus the bench's database and keys.
  const config = loadConfig({
    ...process.env,
    DATABASE_URL: url,
    TOKENVAULT_KEYS: process.env.BENCH_KEYS,
    TOKENVAULT_KEYS_FILE: undefined,
    TOKENVAULT_LOG_LEVEL: process.env.BENCH_LOG_LEVEL ?? process.env.TOKENVAULT_LOG_LEVEL ?? "info",
  });
  const logger = createLogger(config.logLevel);
  const keyRing = new KeyRing(parseKeyList(process.env.BENCH_KEYS!));
  const pgPool = createPool({ connectionString: url, max: config.dbPoolMax, logger, asynchronousCommit: true });
  await verifyKeyRing(pgPool, keyRing);
  const callers = await createCallerRegistry({ pool: pgPool, logger, listenUrl: url, reloadIntervalMs: config.callersReloadMs });
  const catalogue = loadCatalogue({ overrideFile: config.providersFile, settings: config.providerSettings });
  const now = () => new Date();
  const refresher = createRefresher({ pool: pgPool, keyRing, catalogue, now, settings: config.refresh });
  const auditLog = await openAuditLog({ pool: pgPool, logger, listenUrl: url, settings: config.audit });
  const audit: AuditDeps = mode === "vault-noaudit" ? { writer: createNoopAuditWriter(), feed: auditLog.feed, maxLag: auditLog.maxLag } : auditLog;
  auditStats = () => audit.writer.stats();
  const server = buildServer({
    deps: { pool: pgPool, keyRing, now, audit, refresher, catalogue, refreshTimeoutMs: config.refresh.providerTimeoutMs },
    logger,
    callers,
    openServices: config.openServices,
    maxMessageBytes: config.maxMessageBytes,
  });
  port = await server.listen(0, "127.0.0.1");
  pool = pgPool as unknown as PoolLike;
  if (process.env.BENCH_POOL_TIMING === "1") instrumentPool(pool);
  stop = async () => {
    await server.close(2_000);
    await auditLog.close();
    await callers.close();
    await pgPool.end();
  };
}

// Per-window counters.
const loopDelay = monitorEventLoopDelay({ resolution: 10 });
loopDelay.enable();
let poolSamples = { n: 0, waiting: 0, maxWaiting: 0, busy: 0 };
const sampler = setInterval(() => {
  if (pool === undefined) return;
  poolSamples.n += 1;
  poolSamples.waiting += pool.waitingCount;
  poolSamples.maxWaiting = Math.max(poolSamples.maxWaiting, pool.waitingCount);
  poolSamples.busy += pool.totalCount - pool.idleCount;
}, 20);
sampler.unref();
let windowStart = { cpu: process.cpuUsage(), audit: auditStats(), at: performance.now() };

function memory() {
  const m = process.memoryUsage();
  return {
    rssMb: m.rss / 2 ** 20,
    heapUsedMb: m.heapUsed / 2 ** 20,
    heapTotalMb: m.heapTotal / 2 ** 20,
    externalMb: m.external / 2 ** 20,
    arrayBuffersMb: m.arrayBuffers / 2 ** 20,
    maxRssMb: process.resourceUsage().maxRSS / 1024,
  };
}

serveIpc({
  info: () => ({ mode, port, pid: process.pid, ...memory() }),
  "window-start": () => {
    poolSamples = { n: 0, waiting: 0, maxWaiting: 0, busy: 0 };
    poolWaits = new Samples();
    loopDelay.reset();
    windowStart = { cpu: process.cpuUsage(), audit: auditStats(), at: performance.now() };
    return {};
  },
  "window-end": () => {
    const cpu = process.cpuUsage(windowStart.cpu);
    const a = auditStats();
    const n = Math.max(1, poolSamples.n);
    return {
      seconds: (performance.now() - windowStart.at) / 1000,
      cpuUserMs: cpu.user / 1000,
      cpuSystemMs: cpu.system / 1000,
      auditBatches: a.batches - windowStart.audit.batches,
      auditEvents: a.events - windowStart.audit.events,
      auditLargestBatch: a.largestBatch,
      poolMeanWaiting: poolSamples.waiting / n,
      poolMaxWaiting: poolSamples.maxWaiting,
      poolMeanBusy: poolSamples.busy / n,
      poolAcquireMs: poolWaits.length > 0 ? summarise(poolWaits.values()) : undefined,
      // The histogram records the time between 10 ms ticks: the lag is what exceeds 10 ms.
      eventLoopDelayMs: {
        p50: Math.max(0, loopDelay.percentile(50) / 1e6 - 10),
        p99: Math.max(0, loopDelay.percentile(99) / 1e6 - 10),
        max: Math.max(0, loopDelay.max / 1e6 - 10),
      },
      ...memory(),
    };
  },
  stop: async () => {
    clearInterval(sampler);
    await stop();
    // Exit after the reply is on its way (--cpu-prof writes its profile at exit).
    setTimeout(() => process.exit(0), 50);
    return {};
  },
});
announceReady({ port, pid: process.pid });
