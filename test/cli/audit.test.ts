/**
 * The auditors' commands as child processes on a test database:
 *
 * - `audit verify` prints "OK: N events checked ..." (exit 0), names the first
 *   bad event and its kind after SQL tampering (exit 1), honours --from, and
 *   refuses a bad --from as a usage error (exit 2);
 * - `audit prune --before DATE` deletes only older events, prints the count,
 *   records an audit_prune event, and leaves a log that verifies;
 * - `audit tail` against a running `serve`, as a caller named by
 *   TOKENVAULT_CALLER_SECRET: one JSON line per event (matching the table),
 *   filters, --follow until SIGINT (exit 0), and a refusal (exit 1) for a
 *   caller without StreamAudit;
 * - `keys rotate` records exactly one key_rotation event per run;
 * - no command prints a stored token or another command's secret.
 */
import { writeFileSync } from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KeyRing } from "../../src/crypto/key-ring.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { secretMarker, secretToken } from "../helpers/secrets.js";
import { startVault } from "../helpers/server.js";
import {
  addCallerWithCli,
  cleanupCli,
  cliEnv,
  everyRpc,
  linesContaining,
  newKey,
  printed,
  runCli,
  spawnCli,
  startServe,
  tempDir,
  vaultClient,
  type CliProcess,
  type CliResult,
  type ServeProcess,
  type TestKey,
} from "./helpers.js";

const databases: TestDatabase[] = [];
/** One key ring for every process and in-process vault of this file. */
const ringKey = newKey("k1");
/** Key material that no process may print. */
const secretKeys: string[] = [ringKey.base64];
/** Caller secrets: only the `callers add` that made one may print it. */
const callerSecrets: string[] = [];

const usage = "usage: tokenvault <command>";

async function database(): Promise<TestDatabase> {
  const db = await createTestDatabase();
  databases.push(db);
  return db;
}

function ringOf(...keys: TestKey[]): KeyRing {
  return new KeyRing(keys.map((k) => ({ id: k.id, bytes: Buffer.from(k.base64, "base64") })));
}

/** The environment of every process on `db`. */
function env(db: TestDatabase, extra: Record<string, string> = {}): Record<string, string> {
  return cliEnv({
    DATABASE_URL: db.url,
    TOKENVAULT_KEYS: ringKey.entry,
    TOKENVAULT_PORT: "0",
    TOKENVAULT_LOG_LEVEL: "info",
    TOKENVAULT_DATA_DIR: tempDir(),
    ...extra,
  });
}

/**
 * Writes `count` events through an in-process vault on `db` (one per call:
 * Store, Get, ListConnections in turn, per user `${prefix}-N`).
 */
async function seed(db: TestDatabase, count: number, prefix = "user"): Promise<void> {
  const vault = await startVault({ pool: db.pool, keyRing: ringOf(ringKey) });
  try {
    for (let i = 0; i < count; i++) {
      const userId = `${prefix}-${Math.floor(i / 3)}`;
      if (i % 3 === 0) await vault.grpcClient.store({ userId, integration: "gmail", tokenSet: { accessToken: secretToken(), refreshToken: secretToken() } });
      else if (i % 3 === 1) await vault.grpcClient.get({ userId, integration: "gmail" });
      else await vault.grpcClient.listConnections({ userId });
    }
  } finally {
    await vault.close();
  }
}

async function eventIds(db: TestDatabase): Promise<number[]> {
  return (await db.pool.query<{ id: string }>("select id from audit_events order by id")).rows.map((r) => Number(r.id));
}

async function verify(db: TestDatabase, ...args: string[]): Promise<CliResult> {
  return runCli(["audit", "verify", ...args], env(db));
}

function expectVerifyOk(result: CliResult, checked: number, head: number): void {
  expect(result.code, result.stdout + result.stderr).toBe(0);
  expect(printed(result.stdout)).toEqual([`OK: ${checked} events checked, chain intact up to ${head}`]);
}

/** `intact`: the events checked before the bad one (all before it, when checking from the start). */
function expectVerifyFailed(result: CliResult, id: number, kind: "altered" | "missing" | "reordered", intact = id - 1): void {
  expect(result.code, result.stdout + result.stderr).toBe(1);
  const lines = printed(result.stdout);
  expect(lines).toHaveLength(1);
  expect(lines[0]).toMatch(new RegExp(`^FAILED at event ${id}: ${kind}: .+ \\(${intact} events before it are intact\\)$`));
}

function expectUsageError(result: CliResult, message: string | RegExp): void {
  expect(result.code, result.stdout + result.stderr).toBe(2);
  if (typeof message === "string") expect(result.stderr).toContain(message);
  else expect(result.stderr).toMatch(message);
  expect(result.stderr).toContain(usage);
}

afterAll(async () => {
  await cleanupCli();
  for (const db of databases) await db.drop();
});

describe("audit verify", () => {
  it("prints OK with the events checked and the head, exit 0 (an empty log too)", async () => {
    const db = await database();
    expectVerifyOk(await verify(db), 0, 0);
    await seed(db, 6);
    expectVerifyOk(await verify(db), 6, 6);
  }, 60_000);

  it("after tampering exits 1 naming the first bad event and its kind; once undone it is OK again", async () => {
    const db = await database();
    await seed(db, 7);

    // altered: one column of one row
    const original = (await db.pool.query<{ user_id: string }>("select user_id from audit_events where id = 3")).rows[0]!.user_id;
    await db.pool.query("update audit_events set user_id = 'mallory' where id = 3");
    expectVerifyFailed(await verify(db), 3, "altered");
    await db.pool.query("update audit_events set user_id = $1 where id = 3", [original]);
    expectVerifyOk(await verify(db), 7, 7);

    // missing: a row in the middle taken out of the log (moved to a negative id, then back)
    await db.pool.query("update audit_events set id = -5 where id = 5");
    expectVerifyFailed(await verify(db), 5, "missing");
    await db.pool.query("update audit_events set id = 5 where id = -5");

    // reordered: two rows swapped
    const swap = async (a: number, b: number) => {
      await db.pool.query("update audit_events set id = $1 where id = $2", [-a, a]);
      await db.pool.query("update audit_events set id = $1 where id = $2", [a, b]);
      await db.pool.query("update audit_events set id = $1 where id = $2", [b, -a]);
    };
    await swap(2, 4);
    expectVerifyFailed(await verify(db), 2, "reordered");
    await swap(2, 4);

    // missing: the newest events (audit_head still says 7)
    await db.pool.query("update audit_events set id = -id where id >= 6");
    expectVerifyFailed(await verify(db), 6, "missing");
    await db.pool.query("update audit_events set id = -id where id <= -6");

    expectVerifyOk(await verify(db), 7, 7);
  }, 120_000);

  it("--from CURSOR checks from that event on, trusting the one before it", async () => {
    const db = await database();
    await seed(db, 6);
    await db.pool.query("update audit_events set outcome = 'internal' where id = 2");
    expectVerifyFailed(await verify(db), 2, "altered");
    expectVerifyFailed(await verify(db, "--from", "0"), 2, "altered");
    expectVerifyFailed(await verify(db, "--from", "2"), 2, "altered", 0);
    expectVerifyOk(await verify(db, "--from", "3"), 4, 6);
    expectVerifyOk(await verify(db, "--from=6"), 1, 6);
  }, 60_000);

  it("a bad --from value is a usage error (exit 2)", async () => {
    const db = await database();
    for (const value of ["abc", "-1", "1.5", "", "12345678901234567890", "0x10"]) {
      const result = await verify(db, `--from=${value}`);
      expectUsageError(result, "--from must be an event cursor (a whole number)");
      expect(printed(result.stdout)).toEqual([]);
    }
    // and --from without a value
    expectUsageError(await verify(db, "--from"), /--from/);
  }, 120_000);
});

describe("audit prune", () => {
  /** 4 events, then (strictly later) 3 more; returns a time between the two. */
  async function twoGenerations(db: TestDatabase): Promise<Date> {
    await seed(db, 4, "old");
    await sleep(5); // so that the cut differs from both generations' millisecond timestamps
    const cut = new Date();
    await sleep(5);
    await seed(db, 3, "new");
    return cut;
  }

  it("--before DATE deletes only older events, prints the count, records audit_prune, and the rest verifies", async () => {
    const db = await database();
    const cut = await twoGenerations(db);
    const hash4 = (await db.pool.query<{ hash: Buffer }>("select hash from audit_events where id = 4")).rows[0]!.hash;

    const result = await runCli(["audit", "prune", "--before", cut.toISOString()], env(db));
    expect(result.code, result.stderr).toBe(0);
    expect(printed(result.stdout)).toEqual(["pruned 4 events up to 4; the rest verifies from that checkpoint"]);

    // Only the older generation went; the newer one and the prune's own event remain.
    expect(await eventIds(db)).toEqual([5, 6, 7, 8]);
    const kept = await db.pool.query<{ id: string; user_id: string | null; occurred_at: Date }>("select id, user_id, occurred_at from audit_events where id <= 7 order by id");
    for (const row of kept.rows) {
      expect(row.user_id).toMatch(/^new-/);
      expect(row.occurred_at.getTime()).toBeGreaterThanOrEqual(cut.getTime());
    }
    const prune = await db.pool.query("select caller, action, user_id, integration, outcome, request_id, peer, details from audit_events where id = 8");
    expect(prune.rows).toEqual([
      {
        caller: null,
        action: "audit_prune",
        user_id: null,
        integration: null,
        outcome: "ok",
        request_id: null,
        peer: null,
        details: { by: "cli", before: cut.toISOString(), pruned: "4", checkpoint: "4" },
      },
    ]);
    const checkpoints = await db.pool.query<{ last_id: string; last_hash: Buffer; pruned_count: string; pruned_before: Date }>(
      "select last_id, last_hash, pruned_count, pruned_before from audit_checkpoints",
    );
    expect(checkpoints.rows).toEqual([{ last_id: "4", last_hash: hash4, pruned_count: "4", pruned_before: cut }]);

    expectVerifyOk(await verify(db), 4, 8);
    expectVerifyOk(await verify(db, "--from", "5"), 4, 8);

    // The same cut again: nothing older is left.
    const again = await runCli(["audit", "prune", "--before", cut.toISOString()], env(db));
    expect(again.code, again.stderr).toBe(0);
    expect(printed(again.stdout)).toEqual([`nothing to prune before ${cut.toISOString()}`]);
    expectVerifyOk(await verify(db), 4, (await eventIds(db)).at(-1)!);
  }, 60_000);

  it("a prune that takes every event leaves only its own event, and the chain verifies and goes on", async () => {
    const db = await database();
    await seed(db, 5);
    const result = await runCli(["audit", "prune", "--before", "2999-01-01"], env(db));
    expect(result.code, result.stderr).toBe(0);
    expect(printed(result.stdout)).toEqual(["pruned 5 events up to 5; the rest verifies from that checkpoint"]);
    expect(await eventIds(db)).toEqual([6]);
    expectVerifyOk(await verify(db), 1, 6);
    await seed(db, 2, "later");
    expect(await eventIds(db)).toEqual([6, 7, 8]);
    expectVerifyOk(await verify(db), 3, 8);
  }, 60_000);

  it("without --before, or with a bad date, is a usage error (exit 2) and deletes nothing", async () => {
    const db = await database();
    await seed(db, 2);
    expectUsageError(await runCli(["audit", "prune"], env(db)), "audit prune needs --before DATE");
    expectUsageError(await runCli(["audit", "prune", "--before", "next tuesday"], env(db)), "--before must be a date");
    expect(await eventIds(db)).toEqual([1, 2]);
  }, 60_000);
});

describe("audit tail", () => {
  let db: TestDatabase;
  let serve: ServeProcess;
  let app: string;
  let auditor: string;
  let noStream: string;
  const tokens: string[] = [];

  /** The JSON event lines a tail printed (pino log lines, if any, have no cursor). */
  function events(stdout: string): Record<string, unknown>[] {
    return stdout
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter((e) => "cursor" in e);
  }

  function tail(args: string[], secret = auditor): Promise<CliResult> {
    return runCli(["audit", "tail", "--url", serve.baseUrl, ...args], env(db, { TOKENVAULT_CALLER_SECRET: secret }));
  }

  function follow(args: string[], secret = auditor): CliProcess {
    return spawnCli(["audit", "tail", "--follow", "--url", serve.baseUrl, ...args], env(db, { TOKENVAULT_CALLER_SECRET: secret }));
  }

  async function head(): Promise<number> {
    return Number((await db.pool.query<{ last_id: string }>("select last_id from audit_head")).rows[0]!.last_id);
  }

  beforeAll(async () => {
    db = await database();
    const e = env(db);
    // Callers first, so the server knows them from its start.
    app = await addCallerWithCli("app", e, everyRpc);
    auditor = await addCallerWithCli("auditor", e, "StreamAudit");
    noStream = await addCallerWithCli("no-stream", e, "Get,ListConnections,VerifyAudit");
    callerSecrets.push(app, auditor, noStream);
    serve = await startServe(e);
    const client = vaultClient(serve.baseUrl, app);
    for (const [userId, integration] of [["u-1", "gmail"], ["u-2", "outlook"]] as const) {
      const accessToken = secretToken("tail");
      tokens.push(accessToken);
      await client.store({ userId, integration, tokenSet: { accessToken, refreshToken: secretToken() } });
    }
    await client.get({ userId: "u-1", integration: "gmail" }); // 3
    await client.listConnections({ userId: "u-2" }); // 4
    expect(await head()).toBe(4);
  }, 120_000);

  afterAll(async () => {
    serve.kill("SIGTERM");
    await serve.exit;
  });

  it("prints one JSON line per event, in order, as stored: cursor, time, caller, action, user, outcome, ids, details, hashes", async () => {
    const result = await tail([]);
    expect(result.code, result.stderr).toBe(0);
    const lines = events(result.stdout);
    // The four calls, then this tail's own stream_audit event (committed before the replay began).
    expect(lines.map((l) => l.cursor)).toEqual(["1", "2", "3", "4", "5"]);
    expect(lines.map((l) => l.action)).toEqual(["store", "store", "get", "list", "stream_audit"]);

    expect(lines[0]).toMatchObject({ caller: "app", user_id: "u-1", integration: "gmail", outcome: "ok", details: { rpc: "Store" } });
    expect(lines[2]).toMatchObject({
      caller: "app",
      user_id: "u-1",
      integration: "gmail",
      details: { rpc: "Get", refreshed: false, refresh_token_returned: false },
    });
    expect(lines[3]).toMatchObject({ user_id: "u-2", integration: null, details: { rpc: "ListConnections", connections: 1 } });
    expect(lines[4]).toMatchObject({ caller: "auditor", user_id: null, details: { rpc: "StreamAudit", follow: false, after_cursor: "0" } });
    expect(lines[0]!.prev_hash).toBe("0".repeat(64));
    for (let i = 1; i < lines.length; i++) expect(lines[i]!.prev_hash).toBe(lines[i - 1]!.hash);

    // Every line is exactly the stored row.
    const rows = await db.pool.query<Record<string, unknown> & { id: string; occurred_at: Date; prev_hash: Buffer; hash: Buffer }>(
      "select * from audit_events where id <= 5 order by id",
    );
    expect(lines).toEqual(
      rows.rows.map((r) => ({
        cursor: r.id,
        occurred_at: r.occurred_at.toISOString(),
        caller: r.caller,
        action: r.action,
        user_id: r.user_id,
        integration: r.integration,
        outcome: r.outcome,
        request_id: r.request_id,
        peer: r.peer,
        details: r.details,
        prev_hash: r.prev_hash.toString("hex"),
        hash: r.hash.toString("hex"),
      })),
    );
    for (const line of lines) {
      expect(line.request_id).toEqual(expect.any(String));
      expect(line.hash).toMatch(/^[0-9a-f]{64}$/);
    }
  });

  it("filters: --user, --action, --after, --integration, --caller and combinations", async () => {
    const cursors = (r: CliResult) => {
      expect(r.code, r.stderr).toBe(0);
      return events(r.stdout).map((l) => Number(l.cursor));
    };
    // Each tail records its own stream_audit event (6, 7, ...), shown when it matches the filter.
    const byUser = await tail(["--user", "u-1"]); // 6
    expect(cursors(byUser)).toEqual([1, 3, 6]);
    expect(events(byUser.stdout).every((l) => l.user_id === "u-1")).toBe(true);

    expect(cursors(await tail(["--action", "store,get"]))).toEqual([1, 2, 3]); // 7
    expect(cursors(await tail(["--after", "5"]))).toEqual([6, 7, 8]); // 8
    expect(cursors(await tail(["--user", "u-1", "--action", "get"]))).toEqual([3]); // 9
    expect(cursors(await tail(["--integration", "outlook"]))).toEqual([2, 10]); // 10
    expect(cursors(await tail(["--caller", "app"]))).toEqual([1, 2, 3, 4]); // 11
    expect(cursors(await tail(["--caller", "auditor", "--action", "stream_audit", "--after", "9"]))).toEqual([10, 11, 12]); // 12

    // An unknown action is a usage error before anything is asked (no event).
    const bad = await tail(["--action", "store,frobnicate"]);
    expectUsageError(bad, 'unknown action "frobnicate"');
    expect(await head()).toBe(12);
  }, 120_000);

  it("--follow prints new events as they commit, and exits 0 on SIGINT", async () => {
    const from = await head();
    const proc = follow(["--after", String(from)]);
    // Its own event first: the stream is open from here on.
    await proc.waitForLog((l) => l.cursor === String(from + 1) && l.action === "stream_audit");
    const client = vaultClient(serve.baseUrl, app);
    await client.store({ userId: "u-3", integration: "gmail", tokenSet: { accessToken: secretToken("follow") } });
    await client.get({ userId: "u-3", integration: "gmail" });
    await proc.waitForLog((l) => l.action === "get" && l.user_id === "u-3");
    proc.kill("SIGINT");
    expect(await proc.exitCode).toBe(0);

    const lines = events(proc.stdout());
    expect(lines.map((l) => [Number(l.cursor), l.action, l.user_id])).toEqual([
      [from + 1, "stream_audit", null],
      [from + 2, "store", "u-3"],
      [from + 3, "get", "u-3"],
    ]);
    expect(lines[0]!.details).toMatchObject({ follow: true, after_cursor: String(from) });
    expect(proc.stderr()).toBe("");
  }, 60_000);

  it("--follow with a filter prints only matching new events", async () => {
    const from = await head();
    const proc = follow(["--user", "u-5"]);
    await proc.waitForLog((l) => l.action === "stream_audit" && l.user_id === "u-5");
    const client = vaultClient(serve.baseUrl, app);
    await client.store({ userId: "u-4", integration: "gmail", tokenSet: { accessToken: secretToken("hidden") } });
    await client.store({ userId: "u-5", integration: "outlook", tokenSet: { accessToken: secretToken("shown") } });
    await client.get({ userId: "u-5", integration: "outlook" });
    // The Get comes after the u-4 Store in the log, so by now the Store was passed over.
    await proc.waitForLog((l) => l.action === "get" && l.user_id === "u-5");
    proc.kill("SIGINT");
    expect(await proc.exitCode).toBe(0);
    const lines = events(proc.stdout());
    expect(lines.map((l) => [Number(l.cursor), l.action, l.user_id])).toEqual([
      [from + 1, "stream_audit", "u-5"],
      [from + 3, "store", "u-5"],
      [from + 4, "get", "u-5"],
    ]);
  }, 60_000);

  it("the server URL can come from TOKENVAULT_URL, the secret from --secret-file; no secret at all is a usage error", async () => {
    const result = await runCli(["audit", "tail", "--action", "list"], env(db, { TOKENVAULT_CALLER_SECRET: auditor, TOKENVAULT_URL: serve.baseUrl }));
    expect(result.code, result.stderr).toBe(0);
    expect(events(result.stdout).map((l) => l.cursor)).toEqual(["4"]);

    const file = path.join(tempDir(), "auditor-secret");
    writeFileSync(file, `${auditor}\n`, { mode: 0o600 });
    const fromFile = await runCli(["audit", "tail", "--url", serve.baseUrl, "--action", "list", "--secret-file", file], env(db));
    expect(fromFile.code, fromFile.stderr).toBe(0);
    expect(events(fromFile.stdout).map((l) => l.cursor)).toEqual(["4"]);

    // No TOKENVAULT_CALLER_SECRET, no --secret-file, no dev caller file in the data folder.
    const before = await head();
    expectUsageError(await runCli(["audit", "tail", "--url", serve.baseUrl], env(db)), "audit tail needs a caller allowed StreamAudit");
    expect(await head()).toBe(before);
  }, 60_000);

  it("a caller without StreamAudit, or a wrong secret, is refused: exit 1, no events printed", async () => {
    const denied = await tail([], noStream);
    expect(denied.code).toBe(1);
    expect(denied.stderr).toMatch(/^tokenvault: the stream ended: PermissionDenied .*StreamAudit/m);
    expect(events(denied.stdout)).toEqual([]);
    const last = await head();
    const recorded = await db.pool.query("select caller, action, outcome, details->>'rpc' as rpc from audit_events where id = $1", [last]);
    expect(recorded.rows).toEqual([{ caller: "no-stream", action: "denied", outcome: "permission_denied", rpc: "StreamAudit" }]);

    const wrong = await tail([], `${noStream.slice(0, -4)}AAAA`);
    expect(wrong.code).toBe(1);
    expect(wrong.stderr).toMatch(/^tokenvault: the stream ended: Unauthenticated /m);
    expect(events(wrong.stdout)).toEqual([]);
  }, 60_000);

  it("the log written through the server verifies, and tail never printed a token", async () => {
    const h = await head();
    expectVerifyOk(await verify(db), h, h);
    expect(linesContaining(tokens)).toEqual([]);
  }, 60_000);
});

describe("keys rotate", () => {
  it("records exactly one key_rotation event per run", async () => {
    const db = await database();
    const k2 = newKey("k2");
    secretKeys.push(k2.base64);
    await seed(db, 3); // one Store (sealed under k1), a Get, a List
    const both = env(db, { TOKENVAULT_KEYS: `${k2.entry},${ringKey.entry}` });

    const rotate = await runCli(["keys", "rotate"], both);
    expect(rotate.code, rotate.stderr).toBe(0);
    const rotations = async () =>
      (
        await db.pool.query<{ id: string; caller: string | null; user_id: string | null; integration: string | null; outcome: string; details: Record<string, unknown> }>(
          "select id, caller, user_id, integration, outcome, details from audit_events where action = 'key_rotation' order by id",
        )
      ).rows;
    const first = await rotations();
    expect(first).toEqual([
      { id: "4", caller: null, user_id: null, integration: null, outcome: "ok", details: { by: "cli", to_key: "k2", resealed: 1, ms: expect.any(Number) } },
    ]);
    expect(await eventIds(db)).toEqual([1, 2, 3, 4]);

    // A second run (nothing left to re-seal) is one more event.
    const again = await runCli(["keys", "rotate"], both);
    expect(again.code, again.stderr).toBe(0);
    const second = await rotations();
    expect(second).toHaveLength(2);
    expect(second[1]).toMatchObject({ id: "5", details: { by: "cli", to_key: "k2", resealed: 0 } });
    expectVerifyOk(await verify(db), 5, 5);
  }, 60_000);
});

describe("secrets", () => {
  it("no command printed a token or a key; only `callers add` printed a caller secret", () => {
    expect(linesContaining([secretMarker, ...secretKeys])).toEqual([]);
    expect(callerSecrets.length).toBeGreaterThan(0);
    expect(linesContaining(callerSecrets).filter((l) => !l.startsWith("[tokenvault callers add "))).toEqual([]);
  });
});
