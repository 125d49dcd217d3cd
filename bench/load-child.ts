/**
 * The load generator, in its own process: a Node gRPC client (Connect-node's
 * createGrpcTransport, HTTP/2) keeping N requests in flight (closed loop), or
 * sending at a fixed rate (open loop), and the W variant (a Get's database
 * work straight on a pg pool). Jobs arrive over IPC; results are summaries.
 */
import { create, toBinary } from "@bufbuild/protobuf";
import { DurationSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import pg from "pg";
import { GetRequestSchema, GetResponseSchema, StoreRequestSchema, TokenVaultService } from "../src/gen/tokenvault/v1/tokenvault_pb.js";
import { announceReady, serveIpc } from "./lib/ipc.js";
import { Samples, summarise, type LatencySummary } from "./lib/stats.js";
import { benchIntegration, benchScopes, makeTokenSets, prng, userId } from "./lib/tokens.js";
import { runDatabaseWork, type DatabaseWork } from "./lib/w-work.js";

type VaultClient = Client<typeof TokenVaultService>;

/** What one load job measured. */
export interface LoadResult {
  /** Calls that completed inside the measured window. */
  requests: number;
  ok: number;
  errors: Record<string, number>;
  errorSample?: string;
  seconds: number;
  /** Successful calls per second in the window. */
  rps: number;
  /** Latency of successful calls, from the moment each was sent. */
  latency: LatencySummary;
  /** Open loop only: latency from each call's scheduled time (includes the generator's own lateness). */
  latencyFromSchedule?: LatencySummary;
  /** Open loop only: the rate asked for. */
  targetRate?: number;
}

function bearer(secret: string): Interceptor {
  return (next) => (req) => {
    req.header.set("authorization", `Bearer ${secret}`);
    return next(req);
  };
}

const clientCache = new Map<string, VaultClient[]>();
function clientsFor(baseUrl: string, secret: string, connections: number): VaultClient[] {
  const key = `${baseUrl}|${secret}|${connections}`;
  let clients = clientCache.get(key);
  if (clients === undefined) {
    // One transport is one HTTP/2 connection; requests are spread over them.
    clients = Array.from({ length: connections }, () =>
      createClient(TokenVaultService, createGrpcTransport({ baseUrl, interceptors: [bearer(secret)] })),
    );
    clientCache.set(key, clients);
  }
  return clients;
}

type Call = (client: VaultClient, random: () => number) => Promise<unknown>;

interface RpcJob {
  baseUrl: string;
  secret: string;
  method: "get" | "store";
  prefix: string;
  keyCount: number;
  concurrency: number;
  connections: number;
  seconds: number;
  warmupSeconds: number;
  /** Open loop at this many calls per second; closed loop when absent. */
  rate?: number;
  seed?: number;
}

const storeTokenSets = makeTokenSets(64);

function callFor(job: RpcJob): Call {
  if (job.method === "get") {
    return (client, random) => client.get({ userId: userId(job.prefix, Math.floor(random() * job.keyCount)), integration: benchIntegration });
  }
  return (client, random) => {
    const set = storeTokenSets[Math.floor(random() * storeTokenSets.length)]!;
    return client.store(
      create(StoreRequestSchema, {
        userId: userId(job.prefix, Math.floor(random() * job.keyCount)),
        integration: benchIntegration,
        tokenSet: {
          accessToken: set.accessToken,
          refreshToken: set.refreshToken,
          tokenType: "Bearer",
          scopes: benchScopes,
          expiry: { case: "expiresIn", value: create(DurationSchema, { seconds: 3599n }) },
        },
        metadata: { ipAddress: "203.0.113.7", userAgent: "tokenvault-bench" },
      }),
    );
  };
}

class Outcomes {
  ok = 0;
  errors: Record<string, number> = {};
  errorSample: string | undefined;
  latency = new Samples();
  fromSchedule = new Samples();
  fail(err: unknown) {
    const code = err instanceof ConnectError ? Code[err.code] : err instanceof Error ? err.name : "unknown";
    this.errors[code!] = (this.errors[code!] ?? 0) + 1;
    this.errorSample ??= err instanceof Error ? err.message.slice(0, 300) : String(err);
  }
  result(seconds: number, extra: Partial<LoadResult> = {}): LoadResult {
    const failed = Object.values(this.errors).reduce((a, b) => a + b, 0);
    return {
      requests: this.ok + failed,
      ok: this.ok,
      errors: this.errors,
      ...(this.errorSample === undefined ? {} : { errorSample: this.errorSample }),
      seconds,
      rps: this.ok / seconds,
      latency: summarise(this.latency.values()),
      ...extra,
    };
  }
}

/** N workers, each sending its next call when the last one answered. */
async function closedLoop(run: (random: () => number, worker: number) => Promise<unknown>, job: { concurrency: number; seconds: number; warmupSeconds: number; seed?: number }): Promise<LoadResult> {
  const outcomes = new Outcomes();
  const measureFrom = performance.now() + job.warmupSeconds * 1000;
  const end = measureFrom + job.seconds * 1000;
  const worker = async (i: number) => {
    const random = prng((job.seed ?? 1) * 7919 + i * 104729);
    for (;;) {
      const started = performance.now();
      if (started >= end) return;
      let failure: unknown;
      try {
        await run(random, i);
      } catch (err) {
        failure = err;
      }
      const finished = performance.now();
      // Counted by completion time inside the window.
      if (finished < measureFrom || finished > end) continue;
      if (failure === undefined) {
        outcomes.ok += 1;
        outcomes.latency.push(finished - started);
      } else outcomes.fail(failure);
    }
  };
  await Promise.all(Array.from({ length: job.concurrency }, (_, i) => worker(i)));
  return outcomes.result(job.seconds);
}

/** Calls sent at a fixed rate whatever the answers (no coordinated omission), at most 20k outstanding. */
async function openLoop(run: (random: () => number, worker: number) => Promise<unknown>, job: { rate: number; seconds: number; warmupSeconds: number; seed?: number }): Promise<LoadResult> {
  const outcomes = new Outcomes();
  const random = prng((job.seed ?? 1) * 31337);
  const interval = 1000 / job.rate;
  const start = performance.now();
  const measureFrom = start + job.warmupSeconds * 1000;
  const end = measureFrom + job.seconds * 1000;
  let next = start;
  let inFlight = 0;
  let sent = 0;
  let skipped = 0;
  await new Promise<void>((resolve) => {
    const tick = () => {
      const now = performance.now();
      while (next <= now && next < end) {
        const scheduled = next;
        next += interval;
        if (inFlight >= 20_000) {
          skipped += 1;
          continue;
        }
        inFlight += 1;
        sent += 1;
        const sentAt = performance.now();
        void run(random, sent).then(
            () => {
              inFlight -= 1;
              const finished = performance.now();
              if (scheduled >= measureFrom) {
                outcomes.ok += 1;
                outcomes.latency.push(finished - sentAt);
                outcomes.fromSchedule.push(finished - scheduled);
              }
            },
            (err: unknown) => {
              inFlight -= 1;
              if (scheduled >= measureFrom) outcomes.fail(err);
            },
          );
      }
      if (next >= end) resolve();
      else setTimeout(tick, Math.max(0, next - performance.now() - 0.2));
    };
    tick();
  });
  // Wait for what is still in flight (bounded).
  const deadline = Date.now() + 30_000;
  while (inFlight > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
  const r = outcomes.result(job.seconds, { targetRate: job.rate, latencyFromSchedule: summarise(outcomes.fromSchedule.values()) });
  if (skipped > 0) r.errors.generator_skipped = skipped;
  return r;
}

const workPools = new Map<string, pg.Pool>();

serveIpc({
  rpc: async (m) => {
    const job = m as unknown as RpcJob;
    const clients = clientsFor(job.baseUrl, job.secret, job.connections);
    const call = callFor(job);
    const run = (random: () => number, worker: number) => call(clients[worker % clients.length]!, random);
    return job.rate === undefined ? closedLoop(run, job) : openLoop(run, { ...job, rate: job.rate });
  },
  w: async (m) => {
    const job = m as unknown as DatabaseWork & { dbUrl: string; poolMax: number; concurrency: number; seconds: number; warmupSeconds: number; seed?: number };
    let pool = workPools.get(job.dbUrl);
    if (pool === undefined) {
      // The audit writer's durability (synchronous_commit on), whatever the server's default.
      pool = new pg.Pool({ connectionString: job.dbUrl, max: job.poolMax, application_name: "tokenvault-bench-w", options: "-c synchronous_commit=on" });
      workPools.set(job.dbUrl, pool);
    }
    const p = pool;
    return closedLoop((random) => runDatabaseWork(p, job, random), job);
  },
  /** One Get's response as bytes (the E template) and its size. */
  "sample-get": async (m) => {
    const [client] = clientsFor(m.baseUrl as string, m.secret as string, 1);
    const res = await client!.get(create(GetRequestSchema, { userId: m.userId as string, integration: benchIntegration }));
    const bytes = toBinary(GetResponseSchema, res);
    return { base64: Buffer.from(bytes).toString("base64"), bytes: bytes.length };
  },
  stop: async () => {
    for (const p of workPools.values()) await p.end();
    setTimeout(() => process.exit(0), 20);
    return {};
  },
});
announceReady({ pid: process.pid });
