/**
 * Tokens at rest, through the real server and the real database: a row holds
 * no token in any encoding, and a row altered in place (a flipped byte, a
 * ciphertext moved from another row or field, a relabelled key id) is a
 * DATA_LOSS error, never a garbled or foreign token.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorDetailSchema, ErrorReason } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { KeyRing, type KeyMaterial } from "../../src/crypto/key-ring.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { encodings, secretMarker, secretToken, testKeys } from "../helpers/secrets.js";
import { startVault, type TestVault } from "../helpers/server.js";

const transports = ["grpcClient", "connectClient", "grpcWebClient"] as const;
const sealedColumns = ["access_token_sealed", "refresh_token_sealed", "id_token_sealed", "extras_sealed"] as const;

let db: TestDatabase;
let vault: TestVault;
let material: KeyMaterial[];
/** Every secret this file stored, for the log and message scans. */
const stored: string[] = [];

interface TokenSet {
  accessToken: string;
  refreshToken: string;
  idToken: string;
  extra: string;
}

beforeAll(async () => {
  db = await createTestDatabase();
  material = testKeys("k1", "k2");
  vault = await startVault({ pool: db.pool, keyRing: new KeyRing(material) });
});

afterAll(async () => {
  await vault?.close();
  expect(vault.logs.leaks(stored)).toEqual([]);
  await db?.drop();
});

/** Stores a full token set for (userId, integration) and returns it. */
async function storeFull(userId: string, integration = "gmail"): Promise<TokenSet> {
  const tokens = {
    accessToken: secretToken("access"),
    refreshToken: secretToken("refresh"),
    idToken: secretToken("id"),
    extra: secretToken("extra"),
  };
  stored.push(tokens.accessToken, tokens.refreshToken, tokens.idToken, tokens.extra);
  const res = await vault.grpcClient.store({
    userId,
    integration,
    tokenSet: {
      accessToken: tokens.accessToken,
      refreshToken: tokens.refreshToken,
      idToken: tokens.idToken,
      scopes: ["openid"],
      extras: { tenant: "contoso", apiKey: tokens.extra },
    },
  });
  expect(res.created).toBe(true);
  return tokens;
}

/** Asserts the Get is a DATA_LOSS with reason INTEGRITY_FAILURE and carries no token. */
async function expectDataLoss(userId: string, integration = "gmail"): Promise<void> {
  for (const transport of transports) {
    const outcome = await vault[transport].get({ userId, integration }).then(
      (res) => ({ ok: true as const, res }),
      (err: unknown) => ({ ok: false as const, err }),
    );
    // A value here would be a garbled or foreign token: say so without printing it.
    if (outcome.ok) expect.fail(`${transport}: Get returned a value (${outcome.res.accessToken.length} chars) instead of DATA_LOSS`);
    const err = outcome.err;
    expect(err, transport).toBeInstanceOf(ConnectError);
    const ce = err as ConnectError;
    expect(ce.code, transport).toBe(Code.DataLoss);
    expect(ce.findDetails(ErrorDetailSchema).map((d) => d.reason), transport).toEqual([ErrorReason.INTEGRITY_FAILURE]);
    const text = `${ce.message} ${ce.rawMessage} ${JSON.stringify(ce.findDetails(ErrorDetailSchema))} ${JSON.stringify([...ce.metadata])}`;
    expect(text).toContain("integrity");
    expect(text).not.toContain(secretMarker);
    for (const s of stored) expect(text).not.toContain(s);
  }
}

async function expectTokens(userId: string, tokens: TokenSet, integration = "gmail"): Promise<void> {
  const got = await vault.connectClient.get({ userId, integration });
  expect(got.accessToken).toBe(tokens.accessToken);
  expect(got.idToken).toBe(tokens.idToken);
  expect(got.extras).toEqual({ tenant: "contoso", apiKey: tokens.extra });
}

async function rowOf(userId: string, integration = "gmail") {
  const { rows } = await db.pool.query("select * from connections where user_id = $1 and integration = $2", [userId, integration]);
  expect(rows).toHaveLength(1);
  return rows[0] as Record<(typeof sealedColumns)[number], Buffer> & { id: string; key_id: string };
}

describe("a stored row", () => {
  it("holds no token, refresh token, id token or extras value in any encoding", async () => {
    const tokens = await storeFull("at-rest-user");
    const secrets = [tokens.accessToken, tokens.refreshToken, tokens.idToken, tokens.extra];

    const dumps: string[] = [];
    // Every column as the driver returns it, bytea decoded every way a dump might show it.
    const { rows } = await db.pool.query("select * from connections");
    for (const row of rows as Record<string, unknown>[]) {
      for (const value of Object.values(row)) {
        if (Buffer.isBuffer(value)) {
          dumps.push(value.toString("utf8"), value.toString("latin1"), value.toString("hex"), value.toString("base64"));
        } else {
          dumps.push(JSON.stringify(value) ?? "");
        }
      }
    }
    // The row as PostgreSQL prints it (bytea in hex), and bytea in pg_dump's escape format.
    const asText = await db.pool.query<{ t: string }>("select t::text as t from connections t");
    dumps.push(...asText.rows.map((r) => r.t));
    const escaped = await db.pool.query(
      `select ${sealedColumns.map((c) => `encode(${c}, 'escape') as ${c}`).join(", ")} from connections`,
    );
    for (const row of escaped.rows as Record<string, string | null>[]) dumps.push(...Object.values(row).map((v) => v ?? ""));
    const all = dumps.join("\n");

    // The dumps do hold the row: metadata in clear, and every sealed column present.
    expect(all).toContain("at-rest-user");
    expect(all).toContain('"gmail"');
    const row = await rowOf("at-rest-user");
    for (const c of sealedColumns) {
      expect(Buffer.isBuffer(row[c]), c).toBe(true);
      expect(all).toContain(`\\x${row[c].toString("hex")}`);
    }
    // And not one secret, in any encoding, nor even the marker every test secret carries.
    expect(all).not.toContain(secretMarker);
    for (const secret of secrets) {
      for (const encoded of encodings(secret)) expect(all).not.toContain(encoded);
      for (const c of sealedColumns) expect(row[c].includes(Buffer.from(secret))).toBe(false);
    }
    // Extras are sealed as a whole: not even the non-secret "tenant" value is in clear.
    expect(all).not.toContain("contoso");
    await expectTokens("at-rest-user", tokens);
  });

  it("the database holds no key material, only check values", async () => {
    const { rows } = await db.pool.query<{ t: string }>("select t::text as t from encryption_keys t");
    const all = rows.map((r) => r.t).join("\n") + (await db.pool.query<{ t: string }>("select t::text as t from connections t")).rows.map((r) => r.t).join("\n");
    for (const k of material) {
      for (const encoded of [k.bytes.toString("hex"), k.bytes.toString("base64"), k.bytes.toString("base64url")]) {
        expect(all).not.toContain(encoded);
      }
    }
  });
});

describe("a row altered in the database", () => {
  it("one flipped byte in access_token_sealed is DATA_LOSS, for every byte region", async () => {
    // version byte, IV, body, tag
    for (const position of [0, 5, 20, -3]) {
      const user = `flip-${position}`;
      const tokens = await storeFull(user);
      await expectTokens(user, tokens);
      const before = await rowOf(user);
      const index = position >= 0 ? position : before.access_token_sealed.length + position;
      await db.pool.query(
        "update connections set access_token_sealed = set_byte(access_token_sealed, $2, get_byte(access_token_sealed, $2) # 1) where id = $1",
        [before.id, index],
      );
      const after = await rowOf(user);
      expect(after.access_token_sealed.equals(before.access_token_sealed)).toBe(false);
      await expectDataLoss(user);
    }
  });

  it("a flipped byte in any other sealed column is DATA_LOSS too", async () => {
    for (const column of sealedColumns.slice(1)) {
      const user = `flip-${column}`;
      await storeFull(user);
      await db.pool.query(
        `update connections set ${column} = set_byte(${column}, 14, get_byte(${column}, 14) # 128) where user_id = $1`,
        [user],
      );
      await expectDataLoss(user);
    }
  });

  it("a ciphertext copied from another user's row is DATA_LOSS", async () => {
    const alice = await storeFull("copy-alice");
    const bob = await storeFull("copy-bob");
    await db.pool.query(
      `update connections set access_token_sealed = (select access_token_sealed from connections where user_id = 'copy-bob' and integration = 'gmail')
       where user_id = 'copy-alice' and integration = 'gmail'`,
    );
    await expectDataLoss("copy-alice");
    // The source row is untouched and still opens: the failure is the move.
    await expectTokens("copy-bob", bob);
    expect(alice.accessToken).not.toBe(bob.accessToken);
  });

  it("a whole set of sealed columns copied from another user's row is DATA_LOSS", async () => {
    await storeFull("whole-alice");
    const bob = await storeFull("whole-bob");
    await db.pool.query(
      `update connections a set key_id = b.key_id, access_token_sealed = b.access_token_sealed,
         refresh_token_sealed = b.refresh_token_sealed, id_token_sealed = b.id_token_sealed, extras_sealed = b.extras_sealed
       from connections b
       where a.user_id = 'whole-alice' and b.user_id = 'whole-bob' and a.integration = b.integration`,
    );
    await expectDataLoss("whole-alice");
    await expectTokens("whole-bob", bob);
  });

  it("a ciphertext copied from another integration of the same user is DATA_LOSS", async () => {
    await storeFull("integ-user", "gmail");
    await storeFull("integ-user", "outlook");
    await db.pool.query(
      `update connections set access_token_sealed = (select access_token_sealed from connections where user_id = 'integ-user' and integration = 'outlook')
       where user_id = 'integ-user' and integration = 'gmail'`,
    );
    await expectDataLoss("integ-user", "gmail");
  });

  it("the refresh token's ciphertext copied into access_token_sealed of the same row is DATA_LOSS", async () => {
    await storeFull("field-user");
    await db.pool.query("update connections set access_token_sealed = refresh_token_sealed where user_id = 'field-user'");
    await expectDataLoss("field-user");
  });

  it("key_id changed to another id of the ring is DATA_LOSS", async () => {
    const tokens = await storeFull("relabel-user");
    expect((await rowOf("relabel-user")).key_id).toBe("k1");
    await expectTokens("relabel-user", tokens);
    await db.pool.query("update connections set key_id = 'k2' where user_id = 'relabel-user'");
    await expectDataLoss("relabel-user");
  });

  it("key_id changed to an id outside the ring is DATA_LOSS", async () => {
    await storeFull("unknown-key-user");
    await db.pool.query("update connections set key_id = 'k9' where user_id = 'unknown-key-user'");
    await expectDataLoss("unknown-key-user");
  });

  it("logs DATA_LOSS calls, and never a token", async () => {
    const dataLossLines = vault.logs.lines.filter((l) => l.includes('"code":"DataLoss"'));
    expect(dataLossLines.length).toBeGreaterThan(0);
    expect(vault.logs.leaks(stored)).toEqual([]);
  });
});
