/**
 * `tokenvault callers ...` as operators run it: real child processes on a test
 * database, and real `serve` processes that must enforce what the CLI changed,
 * without a restart: add/list/show, invalid input, rotate-secret and revoke,
 * a policy change reaching two servers on one database, `callers apply`,
 * bind-cert, a production vault that starts with no callers, and no secret
 * kept in clear or printed by a server.
 */
import { createHash } from "node:crypto";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import pg from "pg";
import { PG_MIGRATE_LOCK_ID } from "node-pg-migrate";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import type { TokenVaultService } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import type { CallerRow } from "../../src/db/queries/callers.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { secretToken } from "../helpers/secrets.js";
import {
  addCallerWithCli,
  allOutput,
  callerSecretPattern,
  cleanupCli,
  cliEnv,
  everyRpc,
  listeningMessage,
  newKey,
  outcome,
  printed,
  runCli,
  spawnCli,
  startServe,
  tempDir,
  vaultClient,
  type CliResult,
  type ServeProcess,
} from "./helpers.js";

const databases: TestDatabase[] = [];
/** Every secret a command of this file printed (the CLI prints each once, by design). */
const issued: string[] = [];
/** Credentials presented to servers that are not secrets of any caller: servers must not print these either. */
const presented: string[] = [];
/** One key ring for every process, so that several servers can share a database. */
const ringKey = newKey("k1");
/** Measured delays from a committed change to its enforcement, for the report at the end. */
const delays: string[] = [];

async function database(): Promise<TestDatabase> {
  const db = await createTestDatabase();
  databases.push(db);
  return db;
}

/** The environment of `callers` and `serve` processes on `db`. */
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

/** `callers add` through the CLI; remembers the secret. */
async function add(name: string, e: Record<string, string>, allow = everyRpc, integrations = "*"): Promise<string> {
  const secret = await addCallerWithCli(name, e, allow, integrations);
  issued.push(secret);
  return secret;
}

function sha256(secret: string): Buffer {
  return createHash("sha256").update(secret, "utf8").digest();
}

/** The 43 random characters of a secret (what must never show up on its own either). */
function randomPart(secret: string): string {
  return callerSecretPattern.exec(secret)![2]!;
}

async function callerRow(db: TestDatabase, name: string): Promise<CallerRow | undefined> {
  const result = await db.pool.query<CallerRow>("select * from callers where name = $1", [name]);
  return result.rows[0];
}

/** Every row of the callers table, in id order. */
async function snapshot(db: TestDatabase): Promise<CallerRow[]> {
  return (await db.pool.query<CallerRow>("select * from callers order by id")).rows;
}

/** The rows without updated_at: what a caller's identity, credentials and policy are. */
function withoutUpdatedAt(rows: CallerRow[]): Omit<CallerRow, "updated_at">[] {
  return rows.map(({ updated_at: _ignored, ...rest }) => rest);
}

/** "<Code>: <message>" of a failed call, or "ok". */
async function failure(call: Promise<unknown>): Promise<string> {
  try {
    await call;
    return "ok";
  } catch (err) {
    const e = ConnectError.from(err);
    return `${Code[e.code]}: ${e.rawMessage}`;
  }
}

const clients = new Map<string, Client<typeof TokenVaultService>>();

/** One client (one connection) per server and credential, reused by every poll. */
function client(server: ServeProcess, secret: string | undefined): Client<typeof TokenVaultService> {
  const id = `${server.baseUrl} ${secret ?? "-"}`;
  let c = clients.get(id);
  if (c === undefined) clients.set(id, (c = vaultClient(server.baseUrl, secret)));
  return c;
}

/** Polls `probe` until it returns true; resolves with the milliseconds it took; rejects after `timeoutMs`. */
async function until(probe: () => Promise<boolean>, timeoutMs: number, what: string): Promise<number> {
  const started = Date.now();
  while (!(await probe())) {
    if (Date.now() - started > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(10);
  }
  return Date.now() - started;
}

/**
 * Polls `probe` (an outcome) from now on until it returns `want` or `deadline`
 * (epoch ms) passes. Resolves with when `want` was first seen and every
 * distinct outcome in order, so a test can tell "ok, then denied" from a
 * flicker through anything else.
 */
async function watchFor(probe: () => Promise<string>, want: string, deadline: () => number): Promise<{ at: number | undefined; seen: string[] }> {
  const seen: string[] = [];
  for (;;) {
    const got = await probe();
    if (seen.at(-1) !== got) seen.push(got);
    if (got === want) return { at: Date.now(), seen };
    if (Date.now() > deadline()) return { at: undefined, seen };
    await sleep(10);
  }
}

/**
 * A command that must fail: exit `code`, a first stderr line `tokenvault: ...`
 * matching `pattern`, no stack, and nothing printed on stdout (no secret).
 * A CallerAdminError (exit 1) is exactly one line; a usage error (exit 2) is
 * its line followed by the usage.
 */
function expectFailure(result: CliResult, code: 1 | 2, pattern: RegExp): void {
  const output = `stdout: ${result.stdout}\nstderr: ${result.stderr}`;
  expect(result.code, output).toBe(code);
  const lines = result.stderr.trimEnd().split("\n");
  expect(lines[0], output).toMatch(/^tokenvault: \S/);
  expect(lines[0], output).toMatch(pattern);
  if (code === 1) expect(lines, output).toHaveLength(1);
  else expect(result.stderr).toContain("usage: tokenvault <command>");
  expect(result.stderr).not.toMatch(/^\s+at /m);
  expect(printed(result.stdout), output).toEqual([]);
  expect(result.stdout + result.stderr).not.toMatch(/tvs_\d+_/);
}

/**
 * Runs CLI commands a few at a time (each is a Node process; the machine may
 * have two cores). They run with TOKENVAULT_MIGRATE_ON_START=false: every
 * `callers` command migrates first, and concurrent ones fail on the migration
 * lock today (see "concurrent commands" below), which is not what these runs test.
 */
async function runAll(commands: readonly (readonly string[])[], e: Record<string, string>, concurrency = 4): Promise<CliResult[]> {
  const noMigrate = { ...e, TOKENVAULT_MIGRATE_ON_START: "false" };
  const results: CliResult[] = [];
  for (let i = 0; i < commands.length; i += concurrency) {
    results.push(...(await Promise.all(commands.slice(i, i + concurrency).map((args) => runCli(args, noMigrate)))));
  }
  return results;
}

/** How many sessions on `db` wait for an advisory lock (the migration lock, here). */
async function lockWaiters(db: TestDatabase): Promise<number> {
  const waiting = await db.pool.query<{ n: number }>(
    `select count(*)::int as n from pg_locks
     where locktype = 'advisory' and not granted and database = (select oid from pg_database where datname = current_database())`,
  );
  return waiting.rows[0]!.n;
}

function writeJson(value: unknown, name = "callers.json"): string {
  const file = path.join(tempDir("tokenvault-callers-file-"), name);
  writeFileSync(file, typeof value === "string" ? value : JSON.stringify(value, null, 2));
  return file;
}

afterAll(async () => {
  await cleanupCli();
  for (const db of databases) await db.drop();
  if (delays.length > 0) console.info(`measured policy propagation:\n  ${delays.join("\n  ")}`);
});

describe("callers add, list and show", () => {
  let db: TestDatabase;
  let e: Record<string, string>;
  let billingSecret: string;

  beforeAll(async () => {
    db = await database();
    e = env(db);
  });

  it("add prints exactly one line, the secret tvs_<id>_<43 chars>; only its SHA-256 is stored", async () => {
    const result = await runCli(["callers", "add", "billing", "--allow", "Get,ListConnections", "--integrations", "gmail,outlook"], e);
    expect(result.code, result.stderr).toBe(0);
    const lines = printed(result.stdout);
    expect(lines).toHaveLength(1);
    billingSecret = lines[0]!;
    issued.push(billingSecret);
    const match = callerSecretPattern.exec(billingSecret);
    expect(match, billingSecret).not.toBeNull();
    // Printed once in all: not echoed in the hint on stderr.
    expect((result.stdout + result.stderr).split(billingSecret)).toHaveLength(2);
    expect(result.stderr).toContain('caller "billing" added');
    expect(result.stderr).toMatch(/shown once/);

    const row = await callerRow(db, "billing");
    expect(row).toMatchObject({
      id: match![1],
      allowed_rpcs: ["Get", "ListConnections"],
      allowed_integrations: ["gmail", "outlook"],
      allowed_users: null,
      may_receive_refresh_token: false,
      cert_identity: null,
      revoked_at: null,
    });
    expect(row!.secret_hash).toEqual(sha256(billingSecret));
  });

  it("add takes --users and --refresh-tokens", async () => {
    const result = await runCli(
      ["callers", "add", "tenant-reader", "--allow", "Get", "--integrations", "*", "--users", "tenant-a/*,u-1", "--refresh-tokens"],
      e,
    );
    expect(result.code, result.stderr).toBe(0);
    const secret = printed(result.stdout)[0]!;
    expect(secret).toMatch(callerSecretPattern);
    issued.push(secret);
    expect(await callerRow(db, "tenant-reader")).toMatchObject({
      allowed_rpcs: ["Get"],
      allowed_integrations: ["*"],
      allowed_users: ["tenant-a/*", "u-1"],
      may_receive_refresh_token: true,
    });
  });

  it("list and show print the policy and the kind of credential, never a secret or its hash", async () => {
    const [list, show] = await runAll([["callers", "list"], ["callers", "show", "billing"]], e);
    expect(list!.code, list!.stderr).toBe(0);
    expect(show!.code, show!.stderr).toBe(0);
    expect(printed(list!.stdout)).toEqual([
      "billing  (active)",
      "  allow:          Get,ListConnections",
      "  integrations:   gmail,outlook",
      "  users:          *",
      "  refresh tokens: no",
      "  credentials:    secret",
      "tenant-reader  (active)",
      "  allow:          Get",
      "  integrations:   *",
      "  users:          tenant-a/*,u-1",
      "  refresh tokens: yes",
      "  credentials:    secret",
    ]);
    const shown = printed(show!.stdout);
    expect(shown.slice(0, 6)).toEqual(printed(list!.stdout).slice(0, 6));
    expect(shown.slice(6)).toEqual([
      expect.stringMatching(/^ {2}created: {8}\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/),
      expect.stringMatching(/^ {2}updated: {8}\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/),
    ]);

    const hash = sha256(billingSecret);
    for (const result of [list!, show!]) {
      const output = result.stdout + result.stderr;
      expect(output).not.toMatch(/tvs_/);
      for (const secret of issued) expect(output).not.toContain(randomPart(secret));
      expect(output).not.toContain(hash.toString("hex"));
      expect(output).not.toContain(hash.toString("base64"));
      expect(output).not.toContain(hash.toString("base64url"));
    }
  });

  it("invalid names, unknown RPCs, missing flags or names: non-zero with one clear line, and nothing created", async () => {
    const before = await snapshot(db);
    const cases: [string[], 1 | 2, RegExp][] = [
      [["add", "Billing", "--allow", "Get", "--integrations", "gmail"], 1, /caller name "Billing" is invalid/],
      [["add", "two words", "--allow", "Get", "--integrations", "gmail"], 1, /caller name "two words" is invalid/],
      [["add", "x".repeat(65), "--allow", "Get", "--integrations", "gmail"], 1, /caller name "x{65}" is invalid/],
      [["add", "newbie", "--allow", "Get,Teleport", "--integrations", "gmail"], 1, /unknown RPC Teleport: use Store, Get, Remove, ClearUser, ListConnections/],
      [["add", "newbie", "--allow", "get", "--integrations", "gmail"], 1, /unknown RPC get/],
      [["add", "newbie", "--allow", "", "--integrations", "gmail"], 1, /at least one RPC/],
      [["add", "newbie", "--allow", "Get", "--integrations", "Gmail!"], 1, /integration "Gmail!" is not a valid name/],
      [["add", "newbie", "--allow", "Get", "--integrations", ""], 1, /at least one integration/],
      [["add", "newbie", "--allow", "Get", "--integrations", "gmail", "--users", "*"], 1, /users must be user ids or prefixes/],
      [["add", "newbie", "--integrations", "gmail"], 2, /callers add needs --allow RPC,\.\.\. and --integrations/],
      [["add", "newbie", "--allow", "Get"], 2, /callers add needs --allow RPC,\.\.\. and --integrations/],
      [["add", "--allow", "Get", "--integrations", "gmail"], 2, /callers add needs a caller NAME/],
      [["add", "newbie", "--allow", "Get", "--integrations", "gmail", "--frobnicate"], 2, /--frobnicate/],
      [["show"], 2, /callers show needs a caller NAME/],
      [["show", "nobody"], 2, /no caller named "nobody"/],
      [["revoke", "nobody"], 1, /no active caller named "nobody"/],
      [["rotate-secret", "nobody"], 1, /no active caller named "nobody"/],
      [["bind-cert", "billing"], 2, /callers bind-cert needs --identity/],
      [["bind-cert", "nobody", "--identity", "spiffe://example.org/nobody"], 1, /no caller named "nobody"/],
      [["bind-cert", "billing", "--identity", " "], 1, /identity must be 1\.\.1024 characters/],
      [["frobnicate"], 2, /unknown callers action "frobnicate"/],
    ];
    const results = await runAll(cases.map(([args]) => ["callers", ...args]), e);
    cases.forEach(([args, code, pattern], i) => {
      try {
        expectFailure(results[i]!, code, pattern);
      } catch (err) {
        throw new Error(`callers ${args.join(" ")}: ${(err as Error).message}`);
      }
    });
    expect(await snapshot(db)).toEqual(before);
  }, 120_000);

  it("adding a name that exists fails and leaves that caller and its secret as they were", async () => {
    const before = await callerRow(db, "billing");
    const result = await runCli(["callers", "add", "billing", "--allow", everyRpc, "--integrations", "*"], e);
    expectFailure(result, 1, /caller "billing" exists already/);
    expect(await callerRow(db, "billing")).toEqual(before);
    expect(before!.secret_hash).toEqual(sha256(billingSecret));
  });
});

describe("rotate-secret and revoke, against a running serve", () => {
  it("the old secret stops working and the new one works; a revoked caller's secret gets UNAUTHENTICATED, the same answer as a made-up one", async () => {
    const db = await database();
    const e = env(db);
    const oldSecret = await add("rotator", e, "Get,ListConnections", "gmail,outlook");
    const server = await startServe(e);
    const list = (secret: string | undefined) => client(server, secret).listConnections({ userId: "rotation-user" });
    expect(await outcome(list(oldSecret))).toBe("ok");

    const rotate = await runCli(["callers", "rotate-secret", "rotator"], e);
    expect(rotate.code, rotate.stderr).toBe(0);
    const lines = printed(rotate.stdout);
    expect(lines).toHaveLength(1);
    const newSecret = lines[0]!;
    issued.push(newSecret);
    // The same caller (id), a new secret.
    expect(callerSecretPattern.exec(newSecret)?.[1]).toBe(callerSecretPattern.exec(oldSecret)?.[1]);
    expect(newSecret).not.toBe(oldSecret);
    expect(rotate.stderr).toMatch(/old one no longer works/);
    expect(rotate.stderr).not.toContain(newSecret);
    expect((await callerRow(db, "rotator"))!.secret_hash).toEqual(sha256(newSecret));

    const rotatedMs = await until(async () => (await outcome(list(oldSecret))) === "Unauthenticated", 10_000, "the old secret to stop working");
    delays.push(`rotate-secret: old secret refused ${rotatedMs} ms after the CLI exited (serve, default reload interval)`);
    expect(await outcome(list(newSecret))).toBe("ok");
    const rotatedAnswer = await failure(list(oldSecret));

    const revoke = await runCli(["callers", "revoke", "rotator"], e);
    expect(revoke.code, revoke.stderr).toBe(0);
    expect(printed(revoke.stdout)).toEqual(['caller "rotator" revoked']);
    expect((await callerRow(db, "rotator"))!.revoked_at).toBeInstanceOf(Date);
    const revokedMs = await until(async () => (await outcome(list(newSecret))) === "Unauthenticated", 10_000, "the revoked secret to stop working");
    delays.push(`revoke: secret refused ${revokedMs} ms after the CLI exited`);
    expect(await outcome(list(oldSecret))).toBe("Unauthenticated");

    // One answer whatever the cause: it reveals nothing about which callers exist.
    const id = callerSecretPattern.exec(newSecret)![1]!;
    const madeUp = [`tvs_999999999_${"A".repeat(43)}`, `tvs_${id}_${"B".repeat(43)}`, "not-a-tokenvault-secret"];
    presented.push(...madeUp);
    const answers = [
      rotatedAnswer,
      await failure(list(newSecret)),
      await failure(list(undefined)),
      ...(await Promise.all(madeUp.map((s) => failure(list(s))))),
    ];
    expect(answers[0]).toMatch(/^Unauthenticated: missing or invalid credentials/);
    expect(new Set(answers)).toEqual(new Set([answers[0]]));

    // A revoked caller cannot be revoked or rotated again, and lists as revoked.
    const [again, rotateRevoked, listed] = await runAll(
      [["callers", "revoke", "rotator"], ["callers", "rotate-secret", "rotator"], ["callers", "list"]],
      e,
    );
    expectFailure(again!, 1, /no active caller named "rotator"/);
    expectFailure(rotateRevoked!, 1, /no active caller named "rotator"/);
    expect(printed(listed!.stdout)[0]).toMatch(/^rotator {2}\(revoked \d{4}-\d\d-\d\dT[\d:.]+Z\)$/);
    expect((await callerRow(db, "rotator"))!.secret_hash).toEqual(sha256(newSecret));

    expect(server.exited()).toBe(false);
    expect(server.logs().filter((l) => l.msg === listeningMessage)).toHaveLength(1);
  }, 90_000);
});

describe("a policy change reaches every server on the database without a restart", () => {
  it("two serve processes: `callers apply` takes Get from X, then `callers revoke` takes X away; both servers enforce each within seconds (NOTIFY)", async () => {
    const db = await database();
    // A reload timer far beyond the test: only the NOTIFY path can make the change visible in time.
    const e = env(db, { TOKENVAULT_CALLERS_RELOAD_MS: "600000" });
    const opsSecret = await add("ops", e, everyRpc, "*");
    const xSecret = await add("x", e, "Get,ListConnections", "gmail");
    const a = await startServe(e);
    const b = await startServe(e);
    expect(a.port).not.toBe(b.port);

    const accessToken = secretToken("propagation");
    await client(a, opsSecret).store({ userId: "x-user", integration: "gmail", tokenSet: { accessToken } });
    const getAs = (server: ServeProcess, secret: string, integration = "gmail") =>
      client(server, secret).get({ userId: "x-user", integration });
    for (const server of [a, b]) {
      expect((await getAs(server, xSecret)).accessToken).toBe(accessToken);
      // The policy is enforced, not just the secret: X has no outlook.
      expect(await outcome(getAs(server, xSecret, "outlook"))).toBe("PermissionDenied");
    }

    // Watch both servers from before the change until each denies Get.
    let deadline = Number.POSITIVE_INFINITY;
    const probe = (server: ServeProcess) => () => outcome(getAs(server, xSecret));
    const watchA = watchFor(probe(a), "PermissionDenied", () => deadline);
    const watchB = watchFor(probe(b), "PermissionDenied", () => deadline);
    const file = writeJson({
      callers: {
        ops: { allow: everyRpc.split(","), integrations: ["*"] },
        x: { allow: ["ListConnections"], integrations: ["gmail"] },
      },
    });
    const apply = await runCli(["callers", "apply", file], e);
    const appliedExitAt = Date.now();
    deadline = appliedExitAt + 10_000;
    expect(apply.code, apply.stderr).toBe(0);
    // ops is already as the file says, so only x is reported.
    expect(printed(apply.stdout)).toEqual(["updated x"]);
    const [seenA, seenB] = await Promise.all([watchA, watchB]);
    const changedAt = (await callerRow(db, "x"))!.updated_at.getTime();
    expect(seenA, "server A").toEqual({ at: expect.any(Number), seen: ["ok", "PermissionDenied"] });
    expect(seenB, "server B").toEqual({ at: expect.any(Number), seen: ["ok", "PermissionDenied"] });
    delays.push(
      `apply (Get taken away), two servers, reload timer 600 s: A denied ${seenA.at! - changedAt} ms and B ${seenB.at! - changedAt} ms ` +
        `after the apply transaction began (the CLI process exited at +${appliedExitAt - changedAt} ms)`,
    );
    for (const server of [a, b]) {
      expect(await failure(getAs(server, xSecret))).toBe('PermissionDenied: caller "x" may not call Get');
      // The rest of X's policy, and the other caller, are untouched.
      expect(await outcome(client(server, xSecret).listConnections({ userId: "x-user" }))).toBe("ok");
      expect((await getAs(server, opsSecret)).accessToken).toBe(accessToken);
    }

    // Revoke X: both servers answer UNAUTHENTICATED.
    deadline = Number.POSITIVE_INFINITY;
    const listAs = (server: ServeProcess) => () => outcome(client(server, xSecret).listConnections({ userId: "x-user" }));
    const revokeA = watchFor(listAs(a), "Unauthenticated", () => deadline);
    const revokeB = watchFor(listAs(b), "Unauthenticated", () => deadline);
    const revoke = await runCli(["callers", "revoke", "x"], e);
    const revokedExitAt = Date.now();
    deadline = revokedExitAt + 10_000;
    expect(revoke.code, revoke.stderr).toBe(0);
    const [goneA, goneB] = await Promise.all([revokeA, revokeB]);
    const revokedAt = (await callerRow(db, "x"))!.revoked_at!.getTime();
    expect(goneA, "server A").toEqual({ at: expect.any(Number), seen: ["ok", "Unauthenticated"] });
    expect(goneB, "server B").toEqual({ at: expect.any(Number), seen: ["ok", "Unauthenticated"] });
    delays.push(
      `revoke, two servers: A refused ${goneA.at! - revokedAt} ms and B ${goneB.at! - revokedAt} ms after the revoking transaction began ` +
        `(the CLI process exited at +${revokedExitAt - revokedAt} ms)`,
    );
    // Well under the deadline: this is NOTIFY, not a timer.
    expect(Math.max(seenA.at!, seenB.at!) - changedAt).toBeLessThan(5_000);
    expect(Math.max(goneA.at!, goneB.at!) - revokedAt).toBeLessThan(5_000);

    // Neither server restarted.
    for (const server of [a, b]) {
      expect(server.exited()).toBe(false);
      expect(server.logs().filter((l) => l.msg === listeningMessage)).toHaveLength(1);
    }
  }, 90_000);
});

describe("callers apply", () => {
  it("creates missing callers (secret printed once), updates the others, revokes active callers not in the file; a second apply changes nothing and prints no secret", async () => {
    const db = await database();
    const e = env(db);
    const keepSecret = await add("keep", e, "Get", "gmail");
    await add("gone", e, "Get", "gmail");
    const file = writeJson({
      callers: {
        keep: { allow: ["Get", "ListConnections"], integrations: ["gmail", "outlook"], users: ["tenant-a/*"] },
        fresh: { allow: ["Store"], integrations: ["*"], refreshTokens: true },
      },
    });

    const first = await runCli(["callers", "apply", file], e);
    expect(first.code, first.stderr).toBe(0);
    const lines = printed(first.stdout);
    expect(lines).toEqual([expect.stringMatching(/^created fresh {2}secret tvs_\S+$/), "updated keep", "revoked gone"]);
    const freshSecret = lines[0]!.split("  secret ")[1]!;
    expect(freshSecret).toMatch(callerSecretPattern);
    issued.push(freshSecret);
    expect((first.stdout + first.stderr).split(freshSecret)).toHaveLength(2);
    expect(first.stderr).toMatch(/shown once/);

    const fresh = await callerRow(db, "fresh");
    expect(fresh).toMatchObject({
      id: callerSecretPattern.exec(freshSecret)![1],
      allowed_rpcs: ["Store"],
      allowed_integrations: ["*"],
      allowed_users: null,
      may_receive_refresh_token: true,
      revoked_at: null,
    });
    expect(fresh!.secret_hash).toEqual(sha256(freshSecret));
    const keep = await callerRow(db, "keep");
    expect(keep).toMatchObject({
      allowed_rpcs: ["Get", "ListConnections"],
      allowed_integrations: ["gmail", "outlook"],
      allowed_users: ["tenant-a/*"],
      may_receive_refresh_token: false,
      revoked_at: null,
    });
    // An update keeps the caller's secret.
    expect(keep!.secret_hash).toEqual(sha256(keepSecret));
    expect((await callerRow(db, "gone"))!.revoked_at).toBeInstanceOf(Date);

    const before = await snapshot(db);
    const second = await runCli(["callers", "apply", file], e);
    expect(second.code, second.stderr).toBe(0);
    const again = printed(second.stdout);
    expect(again.filter((l) => !l.startsWith("updated "))).toEqual([]);
    expect(second.stdout + second.stderr).not.toMatch(/tvs_|created|revoked/);
    expect(withoutUpdatedAt(await snapshot(db))).toEqual(withoutUpdatedAt(before));
  }, 60_000);

  it("an invalid file is refused with one line, and the callers table is left exactly as it was", async () => {
    const db = await database();
    const e = env(db);
    await add("steady", e, "Get", "gmail");
    const steady = { allow: ["Get"], integrations: ["gmail"] };
    const before = await snapshot(db);
    const missing = path.join(tempDir(), "no-such-file.json");
    const cases: [string, 1 | 2, RegExp][] = [
      [writeJson('{"callers": {"steady": '), 1, /cannot read .* as JSON/],
      [writeJson({ version: 1 }), 1, /must hold \{"callers"/],
      [writeJson({ callers: [] }), 1, /must hold \{"callers"/],
      [writeJson({ callers: { steady, newbie: { allow: ["Get"] } } }), 1, /caller "newbie" in .* needs "allow" and "integrations" lists/],
      [writeJson({ callers: { steady, "New Bie": steady } }), 1, /caller name "New Bie" is invalid/],
      [writeJson({ callers: { newbie: { allow: ["Get", "Teleport"], integrations: ["*"] } } }), 1, /unknown RPC Teleport/],
      [writeJson({ callers: { newbie: { allow: [], integrations: ["*"] } } }), 1, /at least one RPC/],
      [missing, 1, /cannot read .*no-such-file\.json/],
    ];
    const results = await runAll([...cases.map(([file]) => ["callers", "apply", file]), ["callers", "apply"]], e);
    cases.forEach(([file, code, pattern], i) => {
      try {
        expectFailure(results[i]!, code, pattern);
      } catch (err) {
        throw new Error(`callers apply ${file}: ${(err as Error).message}`);
      }
    });
    expectFailure(results.at(-1)!, 2, /callers apply needs a FILE/);
    expect(await snapshot(db)).toEqual(before);
  }, 90_000);

  describe("a failure half-way through the transaction", () => {
    let db: TestDatabase;
    let result: CliResult;
    let before: CallerRow[];

    it("rolls everything back: no caller created, no policy changed, no secret printed", async () => {
      db = await database();
      const e = env(db);
      await add("holder", e, "Get", "gmail");
      await add("keep", e, "Get", "gmail");
      const bind = await runCli(["callers", "bind-cert", "holder", "--identity", "spiffe://example.org/taken"], e);
      expect(bind.code, bind.stderr).toBe(0);
      before = await snapshot(db);
      // "aaa-new" is created and "keep" updated before keep's identity, bound to holder already, fails.
      const file = writeJson({
        callers: {
          "aaa-new": { allow: ["Get"], integrations: ["*"] },
          keep: { allow: ["Get", "Store"], integrations: ["*"], certIdentity: "spiffe://example.org/taken" },
          holder: { allow: ["Get"], integrations: ["gmail"] },
        },
      });
      result = await runCli(["callers", "apply", file], e);
      expect(result.code, result.stderr).toBe(1);
      expect(result.stderr.trimEnd().split("\n")).toHaveLength(1);
      expect(printed(result.stdout)).toEqual([]);
      expect(result.stdout + result.stderr).not.toMatch(/tvs_/);
      expect(await snapshot(db)).toEqual(before);
      expect(await callerRow(db, "aaa-new")).toBeUndefined();
    }, 60_000);

    // Fails today: see the report. bindCertificate turns the unique violation
    // into a clear CallerAdminError, but applyCallers does not, so the operator
    // gets PostgreSQL's constraint message and code instead.
    it("says which identity is bound to another caller, as bind-cert does", () => {
      expect(result.stderr.trimEnd()).toMatch(/^tokenvault: identity "spiffe:\/\/example\.org\/taken" is bound to another caller already/);
    });
  });

  // Fails today: see the report. updateCallerPolicy un-revokes the caller and
  // keeps its secret hash, so a routine apply of a file that still names a
  // caller revoked because its secret leaked makes that leaked secret valid
  // again, silently ("updated NAME", no new secret).
  it("a revoked caller named in the file does not get its old secret back", async () => {
    const db = await database();
    const e = env(db);
    const oldSecret = await add("comeback", e, "ListConnections", "*");
    const server = await startServe(e);
    const list = (secret: string) => outcome(client(server, secret).listConnections({ userId: "comeback-user" }));
    expect(await list(oldSecret)).toBe("ok");
    const revoke = await runCli(["callers", "revoke", "comeback"], e);
    expect(revoke.code, revoke.stderr).toBe(0);
    await until(async () => (await list(oldSecret)) === "Unauthenticated", 10_000, "the revoked secret to stop working");

    // "marker" is new: once its secret works, the server has loaded the applied state.
    const file = writeJson({
      callers: {
        comeback: { allow: ["ListConnections"], integrations: ["*"] },
        marker: { allow: ["ListConnections"], integrations: ["*"] },
      },
    });
    const apply = await runCli(["callers", "apply", file], e);
    expect(apply.code, apply.stderr).toBe(0);
    const created = printed(apply.stdout).filter((l) => l.startsWith("created "));
    for (const line of created) issued.push(line.split("  secret ")[1]!);
    const markerSecret = created.find((l) => l.startsWith("created marker  secret "))?.split("  secret ")[1];
    expect(markerSecret).toMatch(callerSecretPattern);
    await until(async () => (await list(markerSecret!)) === "ok", 10_000, "the server to load the applied callers");

    expect(await list(oldSecret)).toBe("Unauthenticated");
    const row = await callerRow(db, "comeback");
    if (row!.revoked_at === null) expect(row!.secret_hash).not.toEqual(sha256(oldSecret));
  }, 60_000);
});

describe("callers bind-cert", () => {
  it("binds an identity that `callers show` then shows; binding it to another caller fails with a clear message", async () => {
    const db = await database();
    const e = env(db);
    await add("billing", e, "Get", "gmail");
    await add("other", e, "Get", "gmail");
    const identity = "spiffe://example.org/billing";

    const bind = await runCli(["callers", "bind-cert", "billing", "--identity", identity], e);
    expect(bind.code, bind.stderr).toBe(0);
    expect(printed(bind.stdout)).toEqual([`caller "billing" is bound to certificate identity ${identity}`]);
    const show = await runCli(["callers", "show", "billing"], e);
    expect(show.code, show.stderr).toBe(0);
    expect(printed(show.stdout)).toContain(`  credentials:    secret, certificate ${identity}`);

    const taken = await runCli(["callers", "bind-cert", "other", "--identity", identity], e);
    expectFailure(taken, 1, new RegExp(`identity "${identity.replace(/[./]/g, "\\$&")}" is bound to another caller already`));
    expect((await callerRow(db, "billing"))!.cert_identity).toBe(identity);
    expect((await callerRow(db, "other"))!.cert_identity).toBeNull();
    const showOther = await runCli(["callers", "show", "other"], e);
    expect(printed(showOther.stdout)).toContain("  credentials:    secret");
  }, 60_000);
});

describe("production with no callers", () => {
  it("serve starts, warns that no callers are defined, refuses every call, and serves a caller added with the CLI without a restart", async () => {
    const db = await database();
    const e = env(db, { NODE_ENV: "production" });
    const server = await startServe(e);
    const warning = server.logs().find((l) => l.msg?.includes("no callers are defined"));
    expect(warning).toMatchObject({ level: "warn" });
    expect(warning?.msg).toContain("tokenvault callers add");
    // No development caller in production.
    expect(await snapshot(db)).toEqual([]);
    expect(server.logs().some((l) => l.msg?.includes('development caller "dev"'))).toBe(false);

    const list = (secret: string | undefined) => client(server, secret).listConnections({ userId: "prod-user" });
    const guess = `tvs_1_${"A".repeat(43)}`;
    presented.push(guess);
    expect(await outcome(list(undefined))).toBe("Unauthenticated");
    expect(await outcome(list(guess))).toBe("Unauthenticated");

    const secret = await add("first-caller", e, "ListConnections", "*");
    const ms = await until(async () => (await outcome(list(secret))) === "ok", 10_000, "the new caller to be served");
    delays.push(`production, first caller added: served ${ms} ms after the CLI exited`);
    expect(await outcome(list(undefined))).toBe("Unauthenticated");
    expect(server.exited()).toBe(false);
    expect(server.logs().filter((l) => l.msg === listeningMessage)).toHaveLength(1);
  }, 60_000);
});

describe("concurrent commands", () => {
  // Fails today: see the report. Every `callers` command runs the migrations
  // first, and src/db/migrate.ts leaves node-pg-migrate's advisoryLockMode at
  // its default, "fail": while another process holds the migration lock (a
  // replica starting, another operator's or CI job's command), the command
  // fails with "Another migration is already running" instead of waiting.
  it("a callers command started while another process holds the migration lock waits for it and succeeds", async () => {
    const db = await database();
    const e = env(db);
    const other = new pg.Client({ connectionString: db.url });
    await other.connect();
    const proc = spawnCli(["callers", "add", "ci-job", "--allow", "Get", "--integrations", "gmail"], e);
    try {
      await other.query("select pg_advisory_lock($1::bigint)", [PG_MIGRATE_LOCK_ID]);
      // Hold the lock until the command waits for it (or gives up).
      await until(async () => proc.exited() || (await lockWaiters(db)) > 0, 20_000, "the command to wait for the migration lock or exit");
      await other.query("select pg_advisory_unlock($1::bigint)", [PG_MIGRATE_LOCK_ID]);
    } finally {
      await other.end();
    }
    const exit = await proc.exit;
    const result = { ...exit, stdout: proc.stdout(), stderr: proc.stderr() };
    const secret = printed(result.stdout)[0];
    if (secret !== undefined && callerSecretPattern.test(secret)) issued.push(secret);
    expect(result.code, result.stderr).toBe(0);
    expect(secret).toMatch(callerSecretPattern);
    expect(await callerRow(db, "ci-job")).toBeDefined();
  }, 60_000);
});

describe("secrets", () => {
  it("the callers table holds no issued secret in clear, only its SHA-256", async () => {
    expect(issued.length).toBeGreaterThanOrEqual(15);
    let rows = 0;
    const hashesFound = new Set<string>();
    for (const db of databases) {
      const result = await db.pool.query<{ row: string }>("select c::text as row from callers c");
      for (const { row } of result.rows) {
        rows++;
        for (const secret of issued) {
          expect(row).not.toContain(secret);
          expect(row).not.toContain(randomPart(secret));
          if (row.includes(sha256(secret).toString("hex"))) hashesFound.add(secret);
        }
      }
    }
    expect(rows).toBeGreaterThanOrEqual(15);
    // Not a vacuous scan: the rows read are those callers' rows (all but the
    // rotated-away secret, and the revived caller's if a fix gives it a new one).
    expect(hashesFound.size).toBeGreaterThanOrEqual(issued.length - 2);
  });

  it("no serve process printed a caller secret or a credential presented to it", () => {
    const serves = allOutput().filter((o) => o.args[0] === "serve");
    expect(serves.length).toBeGreaterThanOrEqual(5);
    const needles = [...issued, ...issued.map(randomPart), ...presented];
    for (const { stdout, stderr } of serves) {
      for (const needle of needles) expect(stdout + stderr).not.toContain(needle);
    }
    // The servers did log authenticated calls, by caller name.
    const callLines = serves.flatMap((o) => o.stdout.split("\n")).filter((l) => l.includes('"msg":"call"'));
    expect(callLines.some((l) => l.includes('"caller":"x"'))).toBe(true);
    expect(callLines.some((l) => l.includes('"code":"Unauthenticated"'))).toBe(true);
  });
});
