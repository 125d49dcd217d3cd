/**
 * Key rotation and the start-up key check against a real database: verifyKeyRing
 * refuses a ring that does not fit the stored rows, rotateKeys re-seals every
 * row online while Gets keep succeeding, resumes after an abort, and stops
 * (without laundering) at a tampered row.
 */
import { afterEach, describe, expect, it } from "vitest";
import pg from "pg";
import { KeyRing, IntegrityError, type KeyMaterial } from "../../src/crypto/key-ring.js";
import { sealSecrets } from "../../src/crypto/token-seal.js";
import { upsertConnection } from "../../src/db/queries/connections.js";
import { keyStatus, rotateKeys, type RotationProgress } from "../../src/keys/rotate.js";
import { KeyMismatchError, verifyKeyRing } from "../../src/keys/verify.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { secretMarker, secretToken, testKeys } from "../helpers/secrets.js";
import { startVault, type TestVault } from "../helpers/server.js";

const [k1, k2, k3] = testKeys("k1", "k2", "k3") as [KeyMaterial, KeyMaterial, KeyMaterial];
const ringOf = (...keys: KeyMaterial[]) => new KeyRing(keys);

/** Everything a test opened, closed after it (vaults first, then databases). */
let vaults: TestVault[] = [];
let pools: pg.Pool[] = [];
let databases: TestDatabase[] = [];
/** Every secret stored in this file, for the log scans. */
const stored: string[] = [];

afterEach(async () => {
  for (const v of vaults) {
    await v.close();
    expect(v.logs.leaks(stored)).toEqual([]);
  }
  for (const p of pools) await p.end();
  for (const d of databases) await d.drop();
  vaults = [];
  pools = [];
  databases = [];
});

async function freshDatabase(): Promise<TestDatabase> {
  const db = await createTestDatabase();
  databases.push(db);
  return db;
}

async function vaultOn(db: TestDatabase, ring: KeyRing): Promise<TestVault> {
  // A pool of the server's own, as a replica would have: rotation runs on db.pool.
  const pool = new pg.Pool({ connectionString: db.url, max: 8 });
  pools.push(pool);
  const vault = await startVault({ pool, keyRing: ring });
  vaults.push(vault);
  return vault;
}

/** Seals and upserts a connection straight through the query layer; returns its access token. */
async function seed(db: TestDatabase, ring: KeyRing, userId: string, integration = "gmail"): Promise<string> {
  const accessToken = secretToken("access");
  const refreshToken = secretToken("refresh");
  stored.push(accessToken, refreshToken);
  const sealed = sealSecrets(ring, { userId, integration }, { accessToken, refreshToken, idToken: undefined, extrasJson: undefined });
  await upsertConnection(db.pool, {
    userId,
    integration,
    keyId: sealed.keyId,
    accessTokenSealed: sealed.accessToken,
    refreshTokenSealed: sealed.refreshToken,
    idTokenSealed: sealed.idToken,
    extrasSealed: sealed.extras,
    tokenType: "Bearer",
    scopes: [],
    expiresAt: null,
    refreshTokenExpiresAt: null,
    ipAddress: null,
    userAgent: null,
  });
  return accessToken;
}

/** Stores `count` connections through the server (ring's current key); returns userId -> access token. */
async function storeMany(vault: TestVault, count: number, prefix: string): Promise<Map<string, string>> {
  const tokens = new Map<string, string>();
  const users = Array.from({ length: count }, (_, i) => `${prefix}-${String(i).padStart(4, "0")}`);
  for (let i = 0; i < users.length; i += 20) {
    await Promise.all(
      users.slice(i, i + 20).map(async (userId) => {
        const accessToken = secretToken("access");
        const refreshToken = secretToken("refresh");
        stored.push(accessToken, refreshToken);
        await vault.grpcClient.store({ userId, integration: "gmail", tokenSet: { accessToken, refreshToken, extras: { s: secretToken("x") } } });
        tokens.set(userId, accessToken);
      }),
    );
  }
  return tokens;
}

async function keyIdOf(db: TestDatabase, userId: string, integration = "gmail"): Promise<string> {
  const { rows } = await db.pool.query<{ key_id: string }>("select key_id from connections where user_id = $1 and integration = $2", [userId, integration]);
  expect(rows).toHaveLength(1);
  return rows[0]!.key_id;
}

async function rowsByKey(db: TestDatabase): Promise<Record<string, number>> {
  const { rows } = await db.pool.query<{ key_id: string; n: string }>("select key_id, count(*) as n from connections group by key_id");
  return Object.fromEntries(rows.map((r) => [r.key_id, Number(r.n)]));
}

/** The error `promise` rejects with; fails when it resolves. */
async function rejection(promise: Promise<unknown>): Promise<Error> {
  const outcome = await promise.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(outcome, "expected a rejection").toBeInstanceOf(Error);
  return outcome as Error;
}

/** Gets every connection through `vault` and checks the token. */
async function expectAllTokens(vault: TestVault, tokens: Map<string, string>): Promise<void> {
  const entries = [...tokens];
  for (let i = 0; i < entries.length; i += 25) {
    await Promise.all(
      entries.slice(i, i + 25).map(async ([userId, token]) => {
        const got = await vault.grpcClient.get({ userId, integration: "gmail" });
        expect(got.accessToken, userId).toBe(token);
      }),
    );
  }
}

describe("verifyKeyRing", () => {
  it("passes on a fresh database and records a check value per key", async () => {
    const db = await freshDatabase();
    const ring = ringOf(k1, k2);
    await verifyKeyRing(db.pool, ring);
    const { rows } = await db.pool.query<{ key_id: string; check_value: Buffer }>("select key_id, check_value from encryption_keys order by key_id");
    expect(rows.map((r) => r.key_id)).toEqual(["k1", "k2"]);
    for (const row of rows) {
      expect(row.check_value.equals(ring.get(row.key_id)!.checkValue)).toBe(true);
      expect(row.check_value.equals(row.key_id === "k1" ? k1.bytes : k2.bytes)).toBe(false);
    }
    // Idempotent: a second start with the same ring passes and records nothing new.
    await verifyKeyRing(db.pool, ring);
    expect((await db.pool.query("select 1 from encryption_keys")).rowCount).toBe(2);
  });

  it("refuses a ring missing a key id that seals rows, naming that id", async () => {
    const db = await freshDatabase();
    await verifyKeyRing(db.pool, ringOf(k1));
    await seed(db, ringOf(k1), "missing-user");
    const err = await rejection(verifyKeyRing(db.pool, ringOf(k2)));
    expect(err).toBeInstanceOf(KeyMismatchError);
    expect(err.message).toContain('"k1"');
    expect(err.message).not.toContain('"k2"');
    expect(err.message).not.toContain(secretMarker);
    // The same ring plus k1 is fine.
    await verifyKeyRing(db.pool, ringOf(k2, k1));
  });

  it("names every missing id, and finds ids sealing rows even without a recorded check value", async () => {
    const db = await freshDatabase();
    await seed(db, ringOf(k1), "u1");
    await seed(db, ringOf(k3), "u3");
    await seed(db, ringOf(k2), "u2");
    const err = await rejection(verifyKeyRing(db.pool, ringOf(k2)));
    expect(err).toBeInstanceOf(KeyMismatchError);
    expect(err.message).toContain('"k1"');
    expect(err.message).toContain('"k3"');
    expect(err.message).not.toContain('"k2"');
  });

  it("refuses a different key under a recorded id, naming the id, and keeps the original check value", async () => {
    const db = await freshDatabase();
    await verifyKeyRing(db.pool, ringOf(k2, k1));
    await seed(db, ringOf(k1), "impostor-user");
    const [impostor] = testKeys("k1") as [KeyMaterial];
    const err = await rejection(verifyKeyRing(db.pool, ringOf(k2, impostor)));
    expect(err).toBeInstanceOf(KeyMismatchError);
    expect(err.message).toContain('"k1"');
    expect(err.message).not.toContain('"k2"');
    for (const encoded of [impostor.bytes.toString("base64"), k1.bytes.toString("base64"), impostor.bytes.toString("hex")]) {
      expect(err.message).not.toContain(encoded);
    }
    // Also refused when that key is the sealing one, and with no row under it.
    const empty = await freshDatabase();
    await verifyKeyRing(empty.pool, ringOf(k1));
    expect(await rejection(verifyKeyRing(empty.pool, ringOf(impostor)))).toBeInstanceOf(KeyMismatchError);
    // The failed attempts did not overwrite what was recorded: the true key still passes.
    await verifyKeyRing(db.pool, ringOf(k2, k1));
    await verifyKeyRing(empty.pool, ringOf(k1));
  });

  it("refuses a wrong key under an id that seals rows but was never recorded, and records nothing", async () => {
    const db = await freshDatabase();
    await seed(db, ringOf(k1), "unrecorded-user"); // rows under k1, no check value recorded
    const [impostor] = testKeys("k1") as [KeyMaterial];
    const err = await rejection(verifyKeyRing(db.pool, ringOf(impostor)));
    expect(err).toBeInstanceOf(KeyMismatchError);
    expect(err.message).toContain('"k1"');
    const recorded = await db.pool.query("select key_id from encryption_keys where key_id = 'k1'");
    expect(recorded.rowCount).toBe(0);
    await verifyKeyRing(db.pool, ringOf(k1)); // the true key opens the rows and gets recorded
    expect((await db.pool.query("select key_id from encryption_keys where key_id = 'k1'")).rowCount).toBe(1);
  });
});

describe("rotateKeys", () => {
  it("re-seals 300 rows online while concurrent Gets keep returning the right tokens", async () => {
    const db = await freshDatabase();
    await verifyKeyRing(db.pool, ringOf(k1));
    const oldVault = await vaultOn(db, ringOf(k1));
    const tokens = await storeMany(oldVault, 300, "rot");
    expect(await rowsByKey(db)).toEqual({ k1: 300 });

    // Before rotation the old key cannot be dropped.
    expect(await rejection(verifyKeyRing(db.pool, ringOf(k2)))).toBeInstanceOf(KeyMismatchError);

    const ring = ringOf(k2, k1);
    await verifyKeyRing(db.pool, ring);
    const vault = await vaultOn(db, ring);
    const users = [...tokens.keys()];

    let rotating = false;
    let stop = false;
    let gets = 0;
    let getsDuringRotation = 0;
    const failures: string[] = [];
    const loop = async (loopIndex: number) => {
      const client = loopIndex % 2 === 0 ? vault.grpcClient : vault.connectClient;
      while (!stop) {
        const userId = users[Math.floor(Math.random() * users.length)]!;
        try {
          const got = await client.get({ userId, integration: "gmail" });
          if (got.accessToken !== tokens.get(userId)) failures.push(`${userId}: wrong token`);
        } catch (err) {
          failures.push(`${userId}: ${String((err as Error).message)}`);
        }
        gets++;
        if (rotating) getsDuringRotation++;
      }
    };
    const loops = Array.from({ length: 4 }, (_, i) => loop(i));

    const reports: RotationProgress[] = [];
    const getsAtReport: number[] = [];
    rotating = true;
    let result: RotationProgress;
    try {
      result = await rotateKeys(db.pool, ring, {
        batchSize: 25,
        onProgress: (p) => {
          reports.push(p);
          getsAtReport.push(gets);
        },
      });
    } finally {
      rotating = false;
      stop = true;
      await Promise.all(loops);
    }

    expect(failures).toEqual([]);
    expect(gets).toBeGreaterThan(0);
    expect(getsDuringRotation).toBeGreaterThan(0);
    // Gets completed while the table held rows under both keys (between the first and last batch).
    expect(getsAtReport.at(-1)!).toBeGreaterThan(getsAtReport[0]!);

    expect(result).toEqual({ resealed: 300, total: 300 });
    expect(reports.length).toBeGreaterThanOrEqual(300 / 25);
    let previous: RotationProgress = { resealed: 0, total: 0 };
    for (const r of reports) {
      // Monotonic, at most one batch per report, never past the total.
      expect(r.resealed).toBeGreaterThan(previous.resealed);
      expect(r.resealed - previous.resealed).toBeLessThanOrEqual(25);
      expect(r.total).toBeGreaterThanOrEqual(previous.total);
      expect(r.resealed).toBeLessThanOrEqual(r.total);
      previous = r;
    }
    expect(reports.at(-1)).toEqual({ resealed: 300, total: 300 });

    const status = await keyStatus(db.pool, ring);
    expect(status).toEqual([
      { keyId: "k2", rows: 300, inRing: true, current: true },
      { keyId: "k1", rows: 0, inRing: true, current: false },
    ]);
    // Every row was rewritten once by the rotation (generation bumped from 1 to 2).
    const generations = await db.pool.query<{ generation: string; n: string }>("select generation, count(*) as n from connections group by generation");
    expect(generations.rows).toEqual([{ generation: "2", n: "300" }]);

    // The old key can now be dropped.
    const onlyNew = ringOf(k2);
    await verifyKeyRing(db.pool, onlyNew);
    const newVault = await vaultOn(db, onlyNew);
    await expectAllTokens(newVault, tokens);
    // And a ring of the old key alone can no longer open anything.
    const err = await oldVault.grpcClient.get({ userId: users[0]!, integration: "gmail" }).catch((e: unknown) => e as Error);
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toMatch(/integrity/);
  });

  it("resumes after an abort, and rows stored during rotation are sealed under the new key", async () => {
    const db = await freshDatabase();
    const oldVault = await vaultOn(db, ringOf(k1));
    const tokens = await storeMany(oldVault, 100, "resume");
    const ring = ringOf(k2, k1);
    await verifyKeyRing(db.pool, ring);
    const vault = await vaultOn(db, ring);

    const controller = new AbortController();
    const firstReports: RotationProgress[] = [];
    const aborted = await rejection(
      rotateKeys(db.pool, ring, {
        batchSize: 25,
        signal: controller.signal,
        onProgress: (p) => {
          firstReports.push(p);
          controller.abort();
        },
      }),
    );
    expect(aborted.name).toBe("AbortError");
    expect(firstReports).toEqual([{ resealed: 25, total: 100 }]);
    expect(await rowsByKey(db)).toEqual({ k1: 75, k2: 25 });

    // Half-rotated: every token still reads back, through both keys.
    await expectAllTokens(vault, tokens);

    // A Store now (new row, and a replaced row still under k1) seals under k2.
    const { rows: stillOld } = await db.pool.query<{ user_id: string }>("select user_id from connections where key_id = 'k1' order by id desc limit 1");
    const replaced = stillOld[0]!.user_id;
    for (const userId of [replaced, "resume-new"]) {
      const accessToken = secretToken("during");
      stored.push(accessToken);
      await vault.grpcClient.store({ userId, integration: "gmail", tokenSet: { accessToken } });
      tokens.set(userId, accessToken);
      expect(await keyIdOf(db, userId)).toBe("k2");
    }

    // Resume; Stores of new connections race the batches.
    const racing: Promise<void>[] = [];
    const raced: string[] = [];
    const secondReports: RotationProgress[] = [];
    const result = await rotateKeys(db.pool, ring, {
      batchSize: 25,
      onProgress: (p) => {
        secondReports.push(p);
        const userId = `resume-race-${secondReports.length}`;
        const accessToken = secretToken("race");
        stored.push(accessToken);
        raced.push(userId);
        racing.push(
          vault.connectClient.store({ userId, integration: "gmail", tokenSet: { accessToken } }).then(() => {
            tokens.set(userId, accessToken);
          }),
        );
      },
    });
    await Promise.all(racing);
    expect(result).toEqual({ resealed: 74, total: 74 });
    expect(secondReports.map((r) => r.resealed)).toEqual([25, 50, 74]);
    expect(raced.length).toBe(3);
    for (const userId of raced) expect(await keyIdOf(db, userId)).toBe("k2");
    expect(await rowsByKey(db)).toEqual({ k2: 101 + raced.length });

    // Nothing left to do: a third run re-seals nothing.
    expect(await rotateKeys(db.pool, ring, { batchSize: 25 })).toEqual({ resealed: 0, total: 0 });
    const newVault = await vaultOn(db, ringOf(k2));
    await expectAllTokens(newVault, tokens);
  });

  it("stops at a tampered row with IntegrityError and never re-seals it", async () => {
    const db = await freshDatabase();
    const oldRing = ringOf(k1);
    const users = Array.from({ length: 60 }, (_, i) => `tamper-${String(i).padStart(2, "0")}`);
    for (const userId of users) await seed(db, oldRing, userId);
    const victim = users[40]!;
    await db.pool.query(
      "update connections set access_token_sealed = set_byte(access_token_sealed, 20, get_byte(access_token_sealed, 20) # 1) where user_id = $1",
      [victim],
    );
    const { rows: [before] } = await db.pool.query<{ access_token_sealed: Buffer; generation: string }>(
      "select access_token_sealed, generation from connections where user_id = $1",
      [victim],
    );

    const ring = ringOf(k2, k1);
    const reports: RotationProgress[] = [];
    const err = await rejection(rotateKeys(db.pool, ring, { batchSize: 25, onProgress: (p) => reports.push(p) }));
    expect(err).toBeInstanceOf(IntegrityError);
    expect(err.message).not.toContain(secretMarker);
    // The first batch (rows 0..24) committed; the batch holding the victim rolled back as a whole.
    expect(reports).toEqual([{ resealed: 25, total: 60 }]);
    expect(await rowsByKey(db)).toEqual({ k1: 35, k2: 25 });

    const check = async () => {
      expect(await keyIdOf(db, victim)).toBe("k1");
      const { rows: [after] } = await db.pool.query<{ access_token_sealed: Buffer; generation: string }>(
        "select access_token_sealed, generation from connections where user_id = $1",
        [victim],
      );
      expect(after!.access_token_sealed.equals(before!.access_token_sealed)).toBe(true);
      expect(after!.generation).toBe(before!.generation);
    };
    await check();
    // Running it again stops at the same row again: it is never skipped or laundered.
    expect(await rejection(rotateKeys(db.pool, ring, { batchSize: 25 }))).toBeInstanceOf(IntegrityError);
    await check();
    expect((await rowsByKey(db)).k1).toBeGreaterThanOrEqual(1);
  });
});

describe("keyStatus", () => {
  it("marks the sealing key, the keys in the ring and the ids missing from it", async () => {
    const db = await freshDatabase();
    for (const u of ["a", "b", "c"]) await seed(db, ringOf(k1), `status-${u}`);
    for (const u of ["d", "e"]) await seed(db, ringOf(k3), `status-${u}`);

    expect(await keyStatus(db.pool, ringOf(k2, k1))).toEqual([
      { keyId: "k2", rows: 0, inRing: true, current: true },
      { keyId: "k1", rows: 3, inRing: true, current: false },
      { keyId: "k3", rows: 2, inRing: false, current: false },
    ]);
    expect(await keyStatus(db.pool, ringOf(k1, k3))).toEqual([
      { keyId: "k1", rows: 3, inRing: true, current: true },
      { keyId: "k3", rows: 2, inRing: true, current: false },
    ]);
    expect(await keyStatus(db.pool, ringOf(k2))).toEqual([
      { keyId: "k2", rows: 0, inRing: true, current: true },
      { keyId: "k1", rows: 3, inRing: false, current: false },
      { keyId: "k3", rows: 2, inRing: false, current: false },
    ]);
  });

  it("lists the ring alone on an empty database", async () => {
    const db = await freshDatabase();
    expect(await keyStatus(db.pool, ringOf(k1, k2))).toEqual([
      { keyId: "k1", rows: 0, inRing: true, current: true },
      { keyId: "k2", rows: 0, inRing: true, current: false },
    ]);
  });
});
