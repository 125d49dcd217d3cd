/**
 * StreamAudit with `follow`: live events across servers and processes, the
 * handover from replay to live, slow consumers and shutdown. Real PostgreSQL,
 * real servers (in-process vaults on listen(0) and a `tokenvault serve` child
 * process on the same database), real clients (Connect over gRPC, Connect over
 * HTTP/1.1, gRPC-Web, plain @grpc/grpc-js).
 *
 * What it proves:
 * - A follower on server A receives events written through another process
 *   within seconds, by NOTIFY (A's poll is set to a minute), in id order with
 *   no gap.
 * - Handover (seeded property test): while writers on both servers run,
 *   followers started at random moments from random cursors (0, mid-log, the
 *   head) on either server each receive exactly the ids after their cursor,
 *   contiguous, without duplicates, up to the final head, whatever ring size.
 *   Replay a failing round with AUDIT_STREAM_SEED=<seed>.
 * - A slow consumer (grpc-js, paused) costs no memory: the feed's ring stays
 *   within ringSize and the heap barely grows while 2000 events are written;
 *   once it reads again its stream ends RESOURCE_EXHAUSTED with the resume
 *   cursor (trailer and AuditResumeInfo detail), from which the rest follows
 *   with no gap. A follower that starts far more than maxLag behind is not
 *   lagging: it catches up and goes live.
 * - Shutdown (vault.close(), and SIGTERM of a serve process) ends followers of
 *   every protocol with UNAVAILABLE and the resume cursor; resuming on another
 *   server continues with no gap.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import v8 from "node:v8";
import vm from "node:vm";
import { setTimeout as sleep } from "node:timers/promises";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { fromBinary } from "@bufbuild/protobuf";
import { AnySchema, type Any } from "@bufbuild/protobuf/wkt";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import * as grpc from "@grpc/grpc-js";
import { AuditResumeInfoSchema, TokenVaultService, type AuditEvent } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { KeyRing } from "../../src/crypto/key-ring.js";
import { addCaller } from "../../src/auth/caller-admin.js";
import { rpcNames } from "../../src/auth/policy.js";
import { resumeAfterHeader } from "../../src/vault/stream-audit.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { prng } from "../helpers/random.js";
import { secretToken } from "../helpers/secrets.js";
import { bearer, grpcJsClient, startVault, type GrpcJsVault, type TestVault } from "../helpers/server.js";
import { cleanupCli, cliEnv, newKey, startServe, tempDir, type ServeProcess } from "../cli/helpers.js";

type VaultClient = Client<typeof TokenVaultService>;

let db: TestDatabase;
/** The key both the in-process vaults and the serve process seal with. */
const key = newKey("k1");
const keyRing = () => new KeyRing([{ id: key.id, bytes: Buffer.from(key.base64, "base64") }]);
/** Server B: a `tokenvault serve` process on the same database. */
let procB: ServeProcess;
const procBCaller = "proc-b-client";
let procBSecret: string;

// ---------------------------------------------------------------- helpers

/** Clients of a server at `baseUrl` acting as `secret`, one per protocol, each with connections of its own. */
function clientsOf(baseUrl: string, secret: string) {
  const interceptors = [bearer(secret)];
  return {
    grpc: createClient(TokenVaultService, createGrpcTransport({ baseUrl, interceptors })),
    connect: createClient(TokenVaultService, createConnectTransport({ baseUrl, httpVersion: "1.1", interceptors })),
    grpcWeb: createClient(TokenVaultService, createGrpcWebTransport({ baseUrl, httpVersion: "1.1", interceptors })),
  };
}
type Protocol = keyof ReturnType<typeof clientsOf>;
const protocols: Protocol[] = ["grpc", "connect", "grpcWeb"];

async function headId(): Promise<bigint> {
  const r = await db.pool.query<{ last_id: string }>("select last_id from audit_head");
  return BigInt(r.rows[0]!.last_id);
}

/** id -> hash of every event in the table. */
async function tableHashes(): Promise<Map<bigint, Buffer>> {
  const r = await db.pool.query<{ id: string; hash: Buffer }>("select id, hash from audit_events order by id");
  return new Map(r.rows.map((row) => [BigInt(row.id), row.hash]));
}

async function waitFor(condition: () => boolean | Promise<boolean>, timeoutMs: number, what: () => string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what()}`);
    await sleep(20);
  }
}

/** first+1 .. last. */
function range(first: bigint, last: bigint): bigint[] {
  return Array.from({ length: Math.max(0, Number(last - first)) }, (_, i) => first + 1n + BigInt(i));
}

/** A running follower (follow: true) through a Connect client. */
interface Follower {
  readonly label: string;
  readonly start: bigint;
  readonly events: AuditEvent[];
  /** The last cursor received (start when none). */
  last(): bigint;
  /** Set once the stream has ended: undefined when it ended OK or by abort(). */
  readonly ended: Promise<ConnectError | undefined>;
  /** The error it ended with, as soon as it has ended (not by abort). */
  error(): ConnectError | undefined;
  abort(): Promise<void>;
}

function follow(client: VaultClient, start: bigint, label: string): Follower {
  const ac = new AbortController();
  const events: AuditEvent[] = [];
  let failure: ConnectError | undefined;
  const ended = (async () => {
    try {
      for await (const res of client.streamAudit({ afterCursor: start, follow: true }, { signal: ac.signal })) events.push(res.event!);
      return undefined;
    } catch (err) {
      if (ac.signal.aborted) return undefined;
      failure = ConnectError.from(err);
      return failure;
    }
  })();
  return {
    label,
    start,
    events,
    last: () => (events.length === 0 ? start : events[events.length - 1]!.cursor),
    ended,
    error: () => failure,
    async abort() {
      ac.abort();
      await ended;
    },
  };
}

/** Waits until every follower has received `target`; fails at once when one ends instead. */
async function allReach(followers: readonly Follower[], target: bigint, timeoutMs: number, context: string): Promise<void> {
  await waitFor(
    () => {
      for (const f of followers) {
        const err = f.error();
        if (err !== undefined) throw new Error(`${context}: follower ${f.label} ended early at ${f.last()} with ${Code[err.code]}: ${err.message}`);
      }
      return followers.every((f) => f.last() >= target);
    },
    timeoutMs,
    () => `${context}: every follower to reach ${target}; at ${followers.map((f) => `${f.label}=${f.last()}`).join(", ")}`,
  );
}

/**
 * Waits until every follower has received an event. A stream commits its own
 * stream_audit event before it sends anything, so after this (and with the
 * writers stopped) the head is final.
 */
async function allStarted(followers: readonly Follower[], timeoutMs: number, context: string): Promise<void> {
  await waitFor(
    () => {
      for (const f of followers) {
        const err = f.error();
        if (err !== undefined) throw new Error(`${context}: follower ${f.label} ended before its first event with ${Code[err.code]}: ${err.message}`);
      }
      return followers.every((f) => f.events.length > 0);
    },
    timeoutMs,
    () => `${context}: a first event on every follower; none yet on ${followers.filter((f) => f.events.length === 0).map((f) => f.label).join(", ")}`,
  );
}

/** The follower got exactly start+1..last, and each event is the table's. */
function expectContiguous(f: { label: string; start: bigint; events: AuditEvent[] }, last: bigint, hashes: Map<bigint, Buffer>, context: string): void {
  const cursors = f.events.map((e) => e.cursor);
  const expected = range(f.start, last);
  if (cursors.length !== expected.length || cursors.some((c, i) => c !== expected[i])) {
    const firstBad = cursors.findIndex((c, i) => c !== expected[i]);
    throw new Error(
      `${context}: follower ${f.label} from ${f.start} got ${cursors.length} events, expected ${expected.length} (${f.start + 1n}..${last}); ` +
        `first difference at index ${firstBad}: got ${cursors[firstBad]}, expected ${expected[firstBad]}`,
    );
  }
  for (const e of f.events) {
    const hash = hashes.get(e.cursor);
    if (hash === undefined || !hash.equals(Buffer.from(e.hash))) throw new Error(`${context}: follower ${f.label}: event ${e.cursor} differs from the table`);
  }
}

async function storeAndGet(client: VaultClient, userId: string, integration: string): Promise<void> {
  await client.store({ userId, integration, tokenSet: { accessToken: secretToken(), refreshToken: secretToken("refresh") } });
  await client.get({ userId, integration });
}

/** Loops Store/Get through `clients` (round robin per writer) until stop() is called. */
function startWriters(clients: VaultClient[], count: number, tag: string) {
  let running = true;
  let ops = 0;
  const loops = Array.from({ length: count }, (_, w) =>
    (async () => {
      const client = clients[w % clients.length]!;
      let n = 0;
      while (running) {
        const userId = `${tag}-${w}-${n++ % 7}`;
        const integration = n % 2 === 0 ? "gmail" : "outlook";
        await client.store({ userId, integration, tokenSet: { accessToken: secretToken(), refreshToken: secretToken("refresh") } });
        // A few reads at once: they share batches with the other writers' calls.
        await Promise.all([1, 2, 3].map(() => client.get({ userId, integration })));
        ops += 4;
      }
    })(),
  );
  return {
    ops: () => ops,
    async stop() {
      running = false;
      await Promise.all(loops);
    },
  };
}

/** The resume cursor of a Connect error: its trailer and its AuditResumeInfo detail, which must agree. */
function resumeCursor(err: ConnectError): bigint {
  const trailer = err.metadata.get(resumeAfterHeader);
  const details = err.findDetails(AuditResumeInfoSchema);
  expect(trailer, `trailer ${resumeAfterHeader} of ${err.message}`).toMatch(/^[0-9]+$/);
  expect(details).toHaveLength(1);
  expect(details[0]!.resumeAfterCursor).toBe(BigInt(trailer!));
  return BigInt(trailer!);
}

/** Decodes google.rpc.Status {code = 1, message = 2, details = 3} from grpc-status-details-bin by hand. */
function rpcStatusDetails(err: grpc.ServiceError): Any[] {
  const [bin] = err.metadata.get("grpc-status-details-bin");
  expect(Buffer.isBuffer(bin)).toBe(true);
  const reader = new BinaryReader(bin as Buffer);
  const details: Any[] = [];
  while (reader.pos < reader.len) {
    const [fieldNo, wireType] = reader.tag();
    if (fieldNo === 3 && wireType === WireType.LengthDelimited) details.push(fromBinary(AnySchema, reader.bytes()));
    else reader.skip(wireType);
  }
  return details;
}

/** The resume cursor a grpc-js client reads: the trailer and the AuditResumeInfo in grpc-status-details-bin. */
function grpcJsResumeCursor(err: grpc.ServiceError): bigint {
  const [trailer] = err.metadata.get(resumeAfterHeader);
  expect(String(trailer)).toMatch(/^[0-9]+$/);
  const infos = rpcStatusDetails(err).filter((a) => a.typeUrl.endsWith("/tokenvault.v1.AuditResumeInfo"));
  expect(infos).toHaveLength(1);
  expect(fromBinary(AuditResumeInfoSchema, infos[0]!.value).resumeAfterCursor).toBe(BigInt(String(trailer)));
  return BigInt(String(trailer));
}

/** A follower over grpc-js: cursors as strings, ended with the ServiceError or undefined. */
function grpcJsFollow(client: GrpcJsVault, secret: string, start: bigint) {
  const md = new grpc.Metadata();
  md.set("authorization", `Bearer ${secret}`);
  const call = client.raw["StreamAudit"]!({ after_cursor: start.toString(), follow: true }, md) as grpc.ClientReadableStream<{
    event: { cursor: string; hash: Buffer };
  }>;
  const events: { cursor: bigint; hash: Buffer }[] = [];
  call.on("data", (m: { event: { cursor: string; hash: Buffer } }) => events.push({ cursor: BigInt(m.event.cursor), hash: m.event.hash }));
  const ended = new Promise<grpc.ServiceError | undefined>((resolve) => {
    call.on("error", (err: grpc.ServiceError) => resolve(err));
    call.on("end", () => resolve(undefined));
  });
  return { call, events, ended, last: () => (events.length === 0 ? start : events[events.length - 1]!.cursor) };
}

/** A full garbage collection, when the flag can be set at run time. */
function collectGarbage(): void {
  v8.setFlagsFromString("--expose-gc");
  const gc = vm.runInNewContext("gc") as (() => void) | undefined;
  gc?.();
  gc?.();
}

// ---------------------------------------------------------------- setup

beforeAll(async () => {
  db = await createTestDatabase();
  // The caller exists before B starts, so B's registry has it from its first load.
  procBSecret = (await addCaller(db.pool, procBCaller, { allow: rpcNames, integrations: ["*"] })).secret;
  procB = await startServe(
    cliEnv({
      DATABASE_URL: db.url,
      TOKENVAULT_KEYS: key.entry,
      TOKENVAULT_PORT: "0",
      TOKENVAULT_LOG_LEVEL: "info",
      TOKENVAULT_DATA_DIR: tempDir(),
      // A small ring: B's followers keep switching between ring and table.
      TOKENVAULT_AUDIT_RING_SIZE: "32",
      TOKENVAULT_SHUTDOWN_GRACE_MS: "5000",
    }),
    60_000,
  );
}, 120_000);

afterAll(async () => {
  await cleanupCli();
  await db?.drop();
});

// ---------------------------------------------------------------- another process

describe("events written by another process", () => {
  it("reach a follower on server A within seconds through NOTIFY, in id order with no gap", async () => {
    // A polls once a minute: only a notification can bring B's events in time.
    const a = await startVault({ pool: db.pool, keyRing: keyRing(), listenUrl: db.url, audit: { pollMs: 60_000 } });
    const b = clientsOf(procB.baseUrl, procBSecret).grpc;
    try {
      const start = await headId();
      const f = follow(a.grpcClient, start, "A");
      await allReach([f], start + 1n, 10_000, "own event");

      // One event through B: it arrives within a few seconds.
      await b.store({ userId: "cross-1", integration: "gmail", tokenSet: { accessToken: secretToken() } });
      const one = await headId();
      await allReach([f], one, 5_000, "a single event written through process B");
      expect(f.events[f.events.length - 1]).toMatchObject({ cursor: one, caller: procBCaller, action: "store", userId: "cross-1" });

      // A burst through B, concurrent calls sharing batches.
      await Promise.all(Array.from({ length: 40 }, (_, i) => storeAndGet(b, `cross-${i % 8}`, i % 2 === 0 ? "gmail" : "hubspot")));
      const final = await headId();
      await allReach([f], final, 10_000, "a burst written through process B");
      await f.abort();
      expectContiguous(f, final, await tableHashes(), "cross-process");
      expect(f.events.filter((e) => e.caller === procBCaller)).toHaveLength(81);
    } finally {
      await a.close();
    }
    expect(a.logs.leaks()).toEqual([]);
  }, 60_000);
});

// ---------------------------------------------------------------- handover

describe("handover from replay to live (seeded property test)", () => {
  const seeds = process.env.AUDIT_STREAM_SEED ? [Number(process.env.AUDIT_STREAM_SEED)] : [11, 23, 37, 51];

  it.each(seeds)("seed %i: every follower gets exactly the ids after its cursor, contiguous, up to the final head", async (seed) => {
    const random = prng(seed);
    const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)]!;
    const ringSize = pick([16, 64, 4096]);
    const pollMs = pick([50, 1_000]);
    const context = `seed ${seed} (A ringSize ${ringSize}, pollMs ${pollMs})`;
    const a = await startVault({ pool: db.pool, keyRing: keyRing(), listenUrl: db.url, audit: { ringSize, pollMs } });
    const onA = clientsOf(a.baseUrl, a.secret);
    const onB = clientsOf(procB.baseUrl, procBSecret);
    const followers: Follower[] = [];
    const writeMs = 2_000;
    let writers: ReturnType<typeof startWriters> | undefined;
    try {
      // Five writer loops spread over both servers.
      writers = startWriters([onA.grpc, onB.grpc, onA.connect, onB.grpc, onA.grpc], 5, `handover-${seed}`);
      const starts = Array.from({ length: 7 }, (_, i) => {
        const at = random() * writeMs;
        const server = random() < 0.6 ? "A" : "B";
        const protocol = pick(protocols);
        const from = random();
        return (async () => {
          await sleep(at);
          const head = await headId();
          const start = from < 0.25 ? 0n : from < 0.5 ? head : BigInt(Math.floor(Number(head) * random()));
          const client = (server === "A" ? onA : onB)[protocol];
          followers.push(follow(client, start, `#${i}@${server}/${protocol}/from${start}/at${Math.round(at)}ms`));
        })();
      });
      await Promise.all(starts);
      // The last follower too must go from replay to live while events keep coming.
      await sleep(500 + random() * 500);
      await writers.stop();
      writers = undefined;
      await allStarted(followers, 30_000, context);
      const final = await headId();
      await allReach(followers, final, 60_000, context);
      // Nothing more may come: wait a moment, then stop.
      await sleep(200);
      await Promise.all(followers.map((f) => f.abort()));
      const hashes = await tableHashes();
      expect([...hashes.keys()]).toEqual(range(0n, final));
      for (const f of followers) expectContiguous(f, final, hashes, context);
      // The log grew while followers started: the handover happened under load.
      expect(final - followers.reduce((min, f) => (f.start < min ? f.start : min), final)).toBeGreaterThan(20n);
    } finally {
      await writers?.stop();
      await Promise.all(followers.map((f) => f.abort()));
      await a.close();
    }
  }, 120_000);
});

// ---------------------------------------------------------------- slow consumer

describe("a slow consumer", () => {
  it("costs no memory while paused, then ends RESOURCE_EXHAUSTED with a cursor the rest follows from", async () => {
    const ringSize = 64;
    const maxLag = 200;
    const s = await startVault({ pool: db.pool, keyRing: keyRing(), listenUrl: db.url, audit: { maxLag, ringSize } });
    const client = grpcJsClient(s.port, undefined);
    try {
      await s.grpcClient.store({ userId: "slow-user", integration: "gmail", tokenSet: { accessToken: secretToken() } });
      const start = await headId();
      const slow = grpcJsFollow(client, s.secret, start);
      await waitFor(() => slow.events.length >= 1, 10_000, () => "the follower's own event");
      // Caught up: now it stops reading.
      slow.call.pause();
      collectGarbage();
      const heapBefore = process.memoryUsage().heapUsed;

      let ringChecks = 0;
      let ringViolations = 0;
      let writing = true;
      const watcher = (async () => {
        while (writing) {
          const head = s.audit.feed.head();
          // The ring is a contiguous suffix ending at head: it reaching back to
          // head - ringSize (i.e. holding ringSize + 1 events) would be too much.
          if (head > BigInt(ringSize) + 1n && s.audit.feed.after(head - BigInt(ringSize) - 1n, 1_000_000) !== undefined) ringViolations += 1;
          ringChecks += 1;
          await sleep(10);
        }
      })();
      const total = 2_000;
      let next = 0;
      await Promise.all(
        Array.from({ length: 16 }, async () => {
          while (next < total) {
            next += 1;
            await s.grpcClient.get({ userId: "slow-user", integration: "gmail" });
          }
        }),
      );
      writing = false;
      await watcher;
      const head = await headId();
      expect(head - start).toBeGreaterThanOrEqual(BigInt(total));
      expect(ringChecks).toBeGreaterThan(5);
      expect(ringViolations).toBe(0);
      // The ring is in use (a follower is registered) and full, never more.
      expect(s.audit.feed.after(head - BigInt(ringSize), 1_000_000)).toHaveLength(ringSize);
      collectGarbage();
      const growth = process.memoryUsage().heapUsed - heapBefore;
      expect(growth, `heap grew ${Math.round(growth / 1024)} KiB`).toBeLessThan(48 * 1024 * 1024);

      // Reading again: what was sent arrives, then RESOURCE_EXHAUSTED.
      slow.call.resume();
      const err = await Promise.race([slow.ended, sleep(20_000).then(() => "timeout" as const)]);
      if (err === "timeout" || err === undefined) throw new Error(`expected RESOURCE_EXHAUSTED, got ${err} after ${slow.events.length} events`);
      expect(err.code, err.details).toBe(grpc.status.RESOURCE_EXHAUSTED);
      const resume = grpcJsResumeCursor(err);
      expect(resume).toBe(slow.last());
      expect(head - resume).toBeGreaterThan(BigInt(maxLag));
      expect(slow.events.map((e) => e.cursor)).toEqual(range(start, resume));
      // While paused it was sent only what flow control let through, not the log.
      expect(slow.events.length).toBeLessThan(total / 2);

      // The rest, from the resume cursor: no gap, no duplicate.
      const rest: AuditEvent[] = [];
      for await (const res of s.grpcClient.streamAudit({ afterCursor: resume })) rest.push(res.event!);
      const end = await headId();
      expect([...slow.events.map((e) => e.cursor), ...rest.map((e) => e.cursor)]).toEqual(range(start, end));
      const hashes = await tableHashes();
      for (const e of slow.events) expect(hashes.get(e.cursor)!.equals(e.hash)).toBe(true);

      // Catching up is not lagging: a follower that starts far more than
      // maxLag behind replays everything and goes live, without RESOURCE_EXHAUSTED.
      const far = follow(s.grpcClient, 0n, "from-0");
      await allStarted([far], 20_000, "far behind");
      const farEnd = await headId();
      expect(farEnd).toBeGreaterThan(BigInt(10 * maxLag));
      await allReach([far], farEnd, 30_000, "far behind");
      await s.grpcClient.get({ userId: "slow-user", integration: "gmail" });
      await allReach([far], farEnd + 1n, 10_000, "far behind, then live");
      await far.abort();
      expectContiguous(far, farEnd + 1n, await tableHashes(), "far behind");
    } finally {
      client.close();
      await s.close();
    }
  }, 120_000);
});

// ---------------------------------------------------------------- shutdown

describe("shutdown", () => {
  it("vault.close() ends followers of every protocol with UNAVAILABLE and a cursor; resuming on another server continues with no gap", async () => {
    const a = await startVault({ pool: db.pool, keyRing: keyRing(), listenUrl: db.url });
    const onA = clientsOf(a.baseUrl, a.secret);
    const onB = clientsOf(procB.baseUrl, procBSecret);
    const grpcJs = grpcJsClient(a.port, undefined);
    const writers = startWriters([onB.grpc], 2, "shutdown");
    const resumed: Follower[] = [];
    try {
      const head = await headId();
      const followers = [
        follow(onA.grpc, head, "grpc"),
        follow(onA.connect, head / 2n, "connect"),
        follow(onA.grpcWeb, 0n, "grpcWeb"),
      ];
      const js = grpcJsFollow(grpcJs, a.secret, head);
      await waitFor(() => followers.every((f) => f.last() > head) && js.events.length > 0, 10_000, () => "every follower's first live events");
      await sleep(300);

      await a.close();
      const ends = await Promise.all(followers.map((f) => f.ended));
      const jsEnd = await js.ended;
      const cursors = new Map<string, { start: bigint; events: AuditEvent[]; resume: bigint }>();
      followers.forEach((f, i) => {
        const err = ends[i];
        expect(err?.code, `${f.label}: ${err?.message}`).toBe(Code.Unavailable);
        const resume = resumeCursor(err!);
        expect(resume, f.label).toBe(f.last());
        cursors.set(f.label, { start: f.start, events: f.events, resume });
      });
      expect(jsEnd?.code).toBe(grpc.status.UNAVAILABLE);
      const jsResume = grpcJsResumeCursor(jsEnd!);
      expect(jsResume).toBe(js.last());

      // Resume each on server B (another process) and let the writers go on a little.
      for (const f of followers) resumed.push(follow(onB[f.label as Protocol], cursors.get(f.label)!.resume, `${f.label}-resumed`));
      const jsResumed = follow(onB.grpc, jsResume, "grpcjs-resumed");
      resumed.push(jsResumed);
      await sleep(500);
      await writers.stop();
      await allStarted(resumed, 10_000, "resumed followers' first events");
      const final = await headId();
      await allReach(resumed, final, 30_000, "resumed followers");
      await Promise.all(resumed.map((f) => f.abort()));
      const hashes = await tableHashes();
      for (const f of followers) {
        const r = resumed.find((x) => x.label === `${f.label}-resumed`)!;
        expectContiguous({ label: f.label, start: f.start, events: [...f.events, ...r.events] }, final, hashes, "shutdown");
      }
      const jsAll = [...js.events.map((e) => e.cursor), ...jsResumed.events.map((e) => e.cursor)];
      expect(jsAll).toEqual(range(head, final));
    } finally {
      await writers.stop();
      await Promise.all(resumed.map((f) => f.abort()));
      grpcJs.close();
      await a.close();
    }
  }, 90_000);

  it("SIGTERM of a serve process ends its followers with UNAVAILABLE and a cursor; they resume on another server", async () => {
    const a = await startVault({ pool: db.pool, keyRing: keyRing(), listenUrl: db.url });
    const onB = clientsOf(procB.baseUrl, procBSecret);
    const writers = startWriters([a.grpcClient], 2, "sigterm");
    const resumed: Follower[] = [];
    try {
      const head = await headId();
      const followers = protocols.map((p, i) => follow(onB[p], i === 0 ? 0n : head, p));
      await waitFor(() => followers.every((f) => f.last() > head), 10_000, () => "every follower's first live events");
      await sleep(300);
      procB.kill("SIGTERM");
      const ends = await Promise.all(followers.map((f) => f.ended));
      followers.forEach((f, i) => {
        expect(ends[i]?.code, `${f.label}: ${ends[i]?.message}`).toBe(Code.Unavailable);
        expect(resumeCursor(ends[i]!), f.label).toBe(f.last());
      });
      expect(await procB.exitCode).toBe(0);

      for (const f of followers) resumed.push(follow(a.grpcClient, f.last(), `${f.label}-resumed`));
      await sleep(500);
      await writers.stop();
      await allStarted(resumed, 10_000, "resumed followers' first events");
      const final = await headId();
      await allReach(resumed, final, 30_000, "resumed followers");
      await Promise.all(resumed.map((f) => f.abort()));
      const hashes = await tableHashes();
      followers.forEach((f, i) => {
        expectContiguous({ label: f.label, start: f.start, events: [...f.events, ...resumed[i]!.events] }, final, hashes, "sigterm");
      });
    } finally {
      await writers.stop();
      await Promise.all(resumed.map((f) => f.abort()));
      await a.close();
    }
  }, 90_000);
});
