/**
 * The operator commands as child processes: `migrate up|down|status`,
 * `keys generate|status|rotate`, and usage errors. (`callers ...`: callers.test.ts.)
 */
import { chmodSync, existsSync, readFileSync, statSync, writeFileSync } from "node:fs";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { KeyRing } from "../../src/crypto/key-ring.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { secretMarker, secretToken } from "../helpers/secrets.js";
import { startVault } from "../helpers/server.js";
import {
  addCallerWithCli,
  cleanupCli,
  cliEnv,
  linesContaining,
  newKey,
  outcome,
  printed,
  runCli,
  startServe,
  tempDir,
  vaultClient,
  type TestKey,
} from "./helpers.js";

const databases: TestDatabase[] = [];
/** Key material handed to processes that must never print it (generate prints its own new key by design). */
const secretKeys: string[] = [];
/** Caller secrets: only the `callers add` that made one may print it. */
const callerSecrets: string[] = [];

async function database(): Promise<TestDatabase> {
  const db = await createTestDatabase();
  databases.push(db);
  return db;
}

function key(id: string): TestKey {
  const k = newKey(id);
  secretKeys.push(k.base64);
  return k;
}

function env(settings: Record<string, string | undefined> = {}) {
  return cliEnv({ TOKENVAULT_LOG_LEVEL: "info", TOKENVAULT_DATA_DIR: tempDir(), ...settings });
}

async function tableExists(db: TestDatabase, table: string): Promise<boolean> {
  const r = await db.pool.query<{ present: boolean }>("select to_regclass($1::text) is not null as present", [table]);
  return r.rows[0]!.present;
}

afterAll(async () => {
  await cleanupCli();
  for (const db of databases) await db.drop();
});

describe("migrate", () => {
  const applied = (name: string) => new RegExp(`^applied  ${name}  \\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\d\\.\\d{3}Z$`);

  it("status on a fresh clone lists every migration as applied", async () => {
    const db = await database();
    const result = await runCli(["migrate", "status"], env({ DATABASE_URL: db.url }));
    expect(result.code, result.stderr).toBe(0);
    const lines = printed(result.stdout);
    expect(lines).toHaveLength(5);
    expect(lines[0]).toMatch(applied("0001_connections"));
    expect(lines[1]).toMatch(applied("0002_encryption_keys"));
    expect(lines[2]).toMatch(applied("0003_callers"));
    expect(lines[3]).toMatch(applied("0004_audit"));
    expect(lines[4]).toMatch(applied("0005_refresh"));
  });

  it("down reverts one migration at a time, status shows them pending, up applies them again", async () => {
    const db = await database();
    const e = env({ DATABASE_URL: db.url });

    const down0 = await runCli(["migrate", "down"], e);
    expect(down0.code, down0.stderr).toBe(0);
    expect(printed(down0.stdout)).toEqual(["reverted  0005_refresh"]);
    const columns = await db.pool.query("select 1 from information_schema.columns where table_name = 'connections' and column_name = 'refresh_retry_at'");
    expect(columns.rowCount).toBe(0);

    const down = await runCli(["migrate", "down"], e);
    expect(down.code, down.stderr).toBe(0);
    expect(printed(down.stdout)).toEqual(["reverted  0004_audit"]);
    expect(await tableExists(db, "audit_events")).toBe(false);
    expect(await tableExists(db, "audit_head")).toBe(false);
    expect(await tableExists(db, "callers")).toBe(true);

    // One more step down takes the callers table and its trigger function.
    const down2 = await runCli(["migrate", "down"], e);
    expect(down2.code, down2.stderr).toBe(0);
    expect(printed(down2.stdout)).toEqual(["reverted  0003_callers"]);
    expect(await tableExists(db, "callers")).toBe(false);
    expect(await tableExists(db, "encryption_keys")).toBe(true);
    const fn = await db.pool.query("select 1 from pg_proc where proname = 'notify_callers_changed'");
    expect(fn.rowCount).toBe(0);

    const pending = await runCli(["migrate", "status"], e);
    expect(pending.code, pending.stderr).toBe(0);
    const lines = printed(pending.stdout);
    expect(lines).toHaveLength(5);
    expect(lines[0]).toMatch(applied("0001_connections"));
    expect(lines[1]).toMatch(applied("0002_encryption_keys"));
    expect(lines[2]).toBe("pending  0003_callers");
    expect(lines[3]).toBe("pending  0004_audit");
    expect(lines[4]).toBe("pending  0005_refresh");

    const up = await runCli(["migrate", "up"], e);
    expect(up.code, up.stderr).toBe(0);
    expect(printed(up.stdout)).toEqual(["applied  0003_callers", "applied  0004_audit", "applied  0005_refresh"]);
    expect(await tableExists(db, "callers")).toBe(true);
    expect(await tableExists(db, "audit_events")).toBe(true);

    const again = await runCli(["migrate", "status"], e);
    expect(printed(again.stdout).map((l) => l.split("  ")[0])).toEqual(["applied", "applied", "applied", "applied", "applied"]);

    const nothing = await runCli(["migrate", "up"], e);
    expect(nothing.code).toBe(0);
    expect(printed(nothing.stdout)).toEqual(["nothing to do"]);
  }, 60_000);
});

describe("keys generate", () => {
  const entryPattern = /^([A-Za-z0-9][A-Za-z0-9_-]{0,31}):([A-Za-z0-9+/]{43}=)$/;

  it("prints id:base64 where the base64 is 32 fresh bytes", async () => {
    const first = await runCli(["keys", "generate"], env());
    expect(first.code, first.stderr).toBe(0);
    const lines = printed(first.stdout);
    expect(lines).toHaveLength(1);
    const match = entryPattern.exec(lines[0]!);
    expect(match, lines[0]).not.toBeNull();
    expect(match![1]).toMatch(/^k\d{8}t\d{6}$/);
    const bytes = Buffer.from(match![2]!, "base64");
    expect(bytes).toHaveLength(32);
    expect(bytes.toString("base64")).toBe(match![2]);
    // The hint goes to stderr, so stdout can be piped straight into a secret store.
    expect(first.stderr).toMatch(/TOKENVAULT_KEYS/);

    const second = await runCli(["keys", "generate", "--id", "k2027b"], env());
    expect(second.code, second.stderr).toBe(0);
    const other = entryPattern.exec(printed(second.stdout)[0]!);
    expect(other?.[1]).toBe("k2027b");
    expect(other?.[2]).not.toBe(match![2]);
  });

  it("--prepend FILE puts the new key first, keeps the old ones, and leaves the file 0600", async () => {
    const file = path.join(tempDir(), "keys.json");
    const old = [key("old1"), key("old2")];
    writeFileSync(file, JSON.stringify({ keys: old.map((k) => ({ id: k.id, key: k.base64 })) }), { mode: 0o644 });
    chmodSync(file, 0o644);

    const result = await runCli(["keys", "generate", "--id", "new1", "--prepend", file], env());
    expect(result.code, result.stderr).toBe(0);
    expect(printed(result.stdout)).toEqual([expect.stringContaining(`added key "new1" as the sealing key of ${file}`)]);

    const after = JSON.parse(readFileSync(file, "utf8")) as { development?: boolean; keys: { id: string; key: string }[] };
    expect(after.development).toBeUndefined();
    expect(after.keys.map((k) => k.id)).toEqual(["new1", "old1", "old2"]);
    expect(after.keys.slice(1).map((k) => k.key)).toEqual(old.map((k) => k.base64));
    expect(Buffer.from(after.keys[0]!.key, "base64")).toHaveLength(32);
    expect(old.map((k) => k.base64)).not.toContain(after.keys[0]!.key);
    expect(statSync(file).mode & 0o777).toBe(0o600);
    // The new key went into the file, not to the terminal.
    expect(result.stdout + result.stderr).not.toContain(after.keys[0]!.key);
    secretKeys.push(after.keys[0]!.key);

    // The same id again is a usage error and leaves the file alone.
    const before = readFileSync(file, "utf8");
    const duplicate = await runCli(["keys", "generate", "--id", "old2", "--prepend", file], env());
    expect(duplicate.code).toBe(2);
    expect(duplicate.stderr).toContain('key id "old2" is already in');
    expect(readFileSync(file, "utf8")).toBe(before);
  });

  // The command that makes the first key must not need the configuration it
  // completes: a production environment without a key ring yet must not refuse
  // it with a message telling the operator to run that very command.
  it("works in a production environment that has no key ring yet", async () => {
    const db = await database();
    const result = await runCli(["keys", "generate"], env({ NODE_ENV: "production", DATABASE_URL: db.url }));
    expect(result.code, result.stderr).toBe(0);
    expect(printed(result.stdout)[0]).toMatch(entryPattern);
  });

  it("--prepend to a missing file creates it, 0600, with just the new key", async () => {
    const file = path.join(tempDir(), "nested", "keys.json");
    const result = await runCli(["keys", "generate", "--prepend", file], env());
    expect(result.code, result.stderr).toBe(0);
    expect(existsSync(file)).toBe(true);
    expect(statSync(file).mode & 0o777).toBe(0o600);
    const written = JSON.parse(readFileSync(file, "utf8")) as { keys: { id: string; key: string }[] };
    expect(written.keys).toHaveLength(1);
    expect(Buffer.from(written.keys[0]!.key, "base64")).toHaveLength(32);
    secretKeys.push(written.keys[0]!.key);
  });
});

describe("keys status and rotate", () => {
  /** Stores `count` connections sealed under `k` through the in-process server; returns user id -> access token. */
  async function seed(db: TestDatabase, k: TestKey, count: number): Promise<Map<string, string>> {
    const vault = await startVault({ pool: db.pool, keyRing: new KeyRing([{ id: k.id, bytes: Buffer.from(k.base64, "base64") }]) });
    const tokens = new Map<string, string>();
    try {
      for (let i = 0; i < count; i++) {
        const accessToken = secretToken(`rot${i}`);
        await vault.grpcClient.store({ userId: `rotate-user-${i}`, integration: "gmail", tokenSet: { accessToken, refreshToken: secretToken() } });
        tokens.set(`rotate-user-${i}`, accessToken);
      }
    } finally {
      await vault.close();
    }
    return tokens;
  }

  /** key id -> [rows, marks] from `keys status`. */
  function statusRows(stdout: string): Record<string, [number, string]> {
    const rows: Record<string, [number, string]> = {};
    for (const line of printed(stdout)) {
      const m = /^(\S+)\s+(\d+) rows {2}\((.*)\)$/.exec(line);
      expect(m, `unexpected status line: ${line}`).not.toBeNull();
      rows[m![1]!] = [Number(m![2]), m![3]!];
    }
    return rows;
  }

  it("keys status prints the rows of every key id", async () => {
    const db = await database();
    const k1 = key("k1");
    const k2 = key("k2");
    await seed(db, k1, 3);

    const one = await runCli(["keys", "status"], env({ DATABASE_URL: db.url, TOKENVAULT_KEYS: k1.entry }));
    expect(one.code, one.stderr).toBe(0);
    expect(statusRows(one.stdout)).toEqual({ k1: [3, "sealing, in ring"] });

    const two = await runCli(["keys", "status"], env({ DATABASE_URL: db.url, TOKENVAULT_KEYS: `${k2.entry},${k1.entry}` }));
    expect(two.code, two.stderr).toBe(0);
    expect(statusRows(two.stdout)).toEqual({ k2: [0, "sealing, in ring"], k1: [3, "in ring"] });
  });

  // `status` must not verify the ring first: verifyKeyRing throws for a key id
  // in use that the ring lacks, and the "MISSING FROM RING" mark (README:
  // "marking ... ids missing from the ring") is needed exactly then.
  it("keys status marks a key id that seals rows but is missing from the ring", async () => {
    const db = await database();
    const k1 = key("k1");
    const k2 = key("k2");
    await seed(db, k1, 2);
    const result = await runCli(["keys", "status"], env({ DATABASE_URL: db.url, TOKENVAULT_KEYS: k2.entry }));
    expect(result.code, result.stderr).toBe(0);
    expect(statusRows(result.stdout)).toEqual({ k2: [0, "sealing, in ring"], k1: [2, "MISSING FROM RING"] });
  });

  it("keys rotate re-seals the rows under k1 with k2; a server with only k2 then serves them", async () => {
    const db = await database();
    const k1 = key("k1");
    const k2 = key("k2");
    const tokens = await seed(db, k1, 3);
    const both = env({ DATABASE_URL: db.url, TOKENVAULT_KEYS: `${k2.entry},${k1.entry}` });

    const rotate = await runCli(["keys", "rotate", "--batch-size", "2"], both);
    expect(rotate.code, rotate.stderr).toBe(0);
    expect(printed(rotate.stdout)).toEqual([expect.stringMatching(/^rotation done: 3 rows resealed under "k2" in \d+ ms$/)]);
    expect(rotate.stderr.trimEnd().split("\n")).toEqual(["resealed 2/3", "resealed 3/3"]);

    const byKey = await db.pool.query<{ key_id: string; n: number }>("select key_id, count(*)::int as n from connections group by key_id");
    expect(byKey.rows).toEqual([{ key_id: "k2", n: 3 }]);

    const status = await runCli(["keys", "status"], both);
    expect(status.code, status.stderr).toBe(0);
    expect(statusRows(status.stdout)).toEqual({ k2: [3, "sealing, in ring"], k1: [0, "in ring"] });

    const again = await runCli(["keys", "rotate"], both);
    expect(again.code, again.stderr).toBe(0);
    expect(printed(again.stdout)).toEqual([expect.stringMatching(/^rotation done: 0 rows resealed under "k2"/)]);

    // k1 can now be retired: a server with only k2 starts and opens every row.
    const k2Only = env({ DATABASE_URL: db.url, TOKENVAULT_KEYS: k2.entry, TOKENVAULT_PORT: "0" });
    const reader = await addCallerWithCli("rotation-reader", k2Only, "Get", "gmail");
    callerSecrets.push(reader);
    const server = await startServe(k2Only);
    try {
      const client = vaultClient(server.baseUrl, reader);
      expect(await outcome(vaultClient(server.baseUrl, undefined).get({ userId: "rotate-user-0", integration: "gmail" }))).toBe("Unauthenticated");
      for (const [userId, accessToken] of tokens) {
        expect((await client.get({ userId, integration: "gmail" })).accessToken).toBe(accessToken);
      }
    } finally {
      server.kill("SIGTERM");
    }
    expect(await server.exitCode).toBe(0);
  }, 60_000);
});

describe("usage errors", () => {
  const usage = "usage: tokenvault <command>";

  it("an unknown command exits 2 with the usage", async () => {
    const result = await runCli(["frobnicate"], env());
    expect(result.code).toBe(2);
    expect(result.stderr).toMatch(/^tokenvault: unknown command "frobnicate"\n/);
    expect(result.stderr).toContain(usage);
  });

  it("an unknown option or keys action exits 2 with the usage", async () => {
    const flag = await runCli(["keys", "generate", "--frobnicate"], env());
    expect(flag.code).toBe(2);
    expect(flag.stderr).toContain(usage);
    const action = await runCli(["keys", "shuffle"], env());
    expect(action.code).toBe(2);
    expect(action.stderr).toContain('unknown keys action "shuffle"');
    expect(action.stderr).toContain(usage);
  });

  it("no command at all exits 2 and shows the usage; --help exits 0", async () => {
    const none = await runCli([], env());
    expect(none.code).toBe(2);
    expect(none.stdout + none.stderr).toContain(usage);
    const help = await runCli(["--help"], env());
    expect(help.code).toBe(0);
    expect(help.stdout).toContain(usage);
  });
});

describe("secrets", () => {
  it("no command printed a token or a key it was given; only `callers add` printed a caller secret", () => {
    expect(secretKeys.length).toBeGreaterThan(0);
    expect(linesContaining([secretMarker, ...secretKeys])).toEqual([]);
    expect(callerSecrets.length).toBeGreaterThan(0);
    expect(linesContaining(callerSecrets).filter((l) => !l.startsWith("[tokenvault callers add "))).toEqual([]);
  });
});
