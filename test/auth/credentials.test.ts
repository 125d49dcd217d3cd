/**
 * Pure units of src/auth/credentials.ts (the secret format, its hash, the
 * Authorization header, the constant-time check) and src/auth/policy.ts
 * (a caller row as a policy, and denial() for each dimension).
 */
import { createHash, randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { bearerToken, claimedCallerId, hashSecret, newSecret, secretMatches } from "../../src/auth/credentials.js";
import { allowsIntegration, allowsUser, callerFromRow, denial, rpcNames, type Caller } from "../../src/auth/policy.js";
import type { CallerRow } from "../../src/db/queries/callers.js";

const secretShape = /^tvs_([1-9][0-9]*)_([A-Za-z0-9_-]{43})$/;
/** 43 characters of the secret alphabet. */
const tail = (c = "A") => c.repeat(43);

describe("newSecret", () => {
  it("is tvs_<caller id>_<43 base64url characters>", () => {
    for (const id of ["1", "42", "9223372036854775807"]) {
      const { secret } = newSecret(id);
      const match = secretShape.exec(secret);
      expect(match, secret).not.toBeNull();
      expect(match![1]).toBe(id);
    }
  });

  it("carries 256 random bits: the tail decodes to 32 bytes and differs every time", () => {
    const tails = new Set<string>();
    for (let i = 0; i < 200; i++) {
      const t = newSecret("7").secret.slice("tvs_7_".length);
      expect(Buffer.from(t, "base64url")).toHaveLength(32);
      tails.add(t);
    }
    expect(tails.size).toBe(200);
  });

  it("returns the SHA-256 of the whole secret as the hash to store", () => {
    const { secret, hash } = newSecret("3");
    expect(hash).toEqual(createHash("sha256").update(secret).digest());
    expect(hash).toHaveLength(32);
  });

  it("makes secrets its own parser accepts, claiming the right id", () => {
    expect(claimedCallerId(newSecret("123").secret)).toBe("123");
  });
});

describe("hashSecret", () => {
  it("is SHA-256 over UTF-8 (known vector)", () => {
    expect(hashSecret("abc").toString("hex")).toBe("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    expect(hashSecret("é")).toEqual(createHash("sha256").update(Buffer.from([0xc3, 0xa9])).digest());
  });

  it("is deterministic and tells different secrets apart", () => {
    const s = `tvs_1_${tail()}`;
    expect(hashSecret(s)).toEqual(hashSecret(s));
    expect(hashSecret(s)).not.toEqual(hashSecret(`tvs_1_${tail("B")}`));
  });
});

describe("claimedCallerId", () => {
  it.each([
    { secret: `tvs_1_${tail()}`, id: "1" },
    { secret: `tvs_9876543210_${tail("-")}`, id: "9876543210" },
    { secret: `tvs_1234567890123456789_${tail("_")}`, id: "1234567890123456789" },
    { secret: `tvs_5_${"aZ09-_".repeat(7)}x`, id: "5" },
  ])("$secret claims $id", ({ secret, id }) => {
    expect(claimedCallerId(secret)).toBe(id);
  });

  it.each([
    { name: "empty", secret: "" },
    { name: "a tail of 42 characters", secret: `tvs_1_${"A".repeat(42)}` },
    { name: "a tail of 44 characters", secret: `tvs_1_${"A".repeat(44)}` },
    { name: "id 0", secret: `tvs_0_${tail()}` },
    { name: "an id with a leading zero", secret: `tvs_01_${tail()}` },
    { name: "an id of 20 digits", secret: `tvs_12345678901234567890_${tail()}` },
    { name: "a negative id", secret: `tvs_-1_${tail()}` },
    { name: "a non-numeric id", secret: `tvs_abc_${tail()}` },
    { name: "no id", secret: `tvs__${tail()}` },
    { name: "an uppercase prefix", secret: `TVS_1_${tail()}` },
    { name: "another prefix", secret: `tvx_1_${tail()}` },
    { name: "standard base64 '+' in the tail", secret: `tvs_1_${"A".repeat(42)}+` },
    { name: "standard base64 '/' in the tail", secret: `tvs_1_${"A".repeat(42)}/` },
    { name: "padding '=' in the tail", secret: `tvs_1_${"A".repeat(42)}=` },
    { name: "a trailing space", secret: `tvs_1_${tail()} ` },
    { name: "a leading space", secret: ` tvs_1_${tail()}` },
    { name: "a trailing newline", secret: `tvs_1_${tail()}\n` },
    { name: "a non-ASCII character", secret: `tvs_1_${"A".repeat(42)}é` },
  ])("$name: not a TokenVault secret", ({ secret }) => {
    expect(claimedCallerId(secret)).toBeUndefined();
  });
});

describe("secretMatches", () => {
  const { secret, hash } = newSecret("11");

  it("accepts the secret against its own hash", () => {
    expect(secretMatches(secret, hash)).toBe(true);
    // A copy of the stored bytes, as read back from the database.
    expect(secretMatches(secret, Buffer.from(hash))).toBe(true);
  });

  it("refuses another secret, even of the same caller", () => {
    expect(secretMatches(newSecret("11").secret, hash)).toBe(false);
    expect(secretMatches(`${secret.slice(0, -1)}${secret.endsWith("A") ? "B" : "A"}`, hash)).toBe(false);
  });

  it("refuses a hash that differs in one bit", () => {
    const flipped = Buffer.from(hash);
    flipped[31] = flipped[31]! ^ 1;
    expect(secretMatches(secret, flipped)).toBe(false);
  });

  it("never matches a null hash (a certificate-only caller, or an unknown one)", () => {
    expect(secretMatches(secret, null)).toBe(false);
    expect(secretMatches("", null)).toBe(false);
  });

  it("never matches the decoy compared against for unknown callers", () => {
    // credentials.ts compares unknown callers against the hash of tvs_0_AAAA...:
    // that very secret must not be let in for want of a stored hash.
    expect(secretMatches(`tvs_0_${tail()}`, null)).toBe(false);
    expect(secretMatches(`tvs_0_${tail()}`, Buffer.alloc(5))).toBe(false);
  });

  it.each([
    { name: "empty", stored: () => Buffer.alloc(0) },
    { name: "16 bytes", stored: () => hash.subarray(0, 16) },
    { name: "31 bytes", stored: () => hash.subarray(0, 31) },
    { name: "33 bytes starting with the right 32", stored: () => Buffer.concat([hash, Buffer.from([0])]) },
    { name: "64 bytes", stored: () => Buffer.concat([hash, hash]) },
  ])("refuses a stored hash of the wrong length ($name) without throwing", ({ stored }) => {
    expect(secretMatches(secret, stored())).toBe(false);
  });
});

describe("bearerToken", () => {
  const t = `tvs_1_${tail()}`;

  it.each([
    { name: "the canonical form", header: `Bearer ${t}` },
    { name: "lowercase scheme", header: `bearer ${t}` },
    { name: "uppercase scheme", header: `BEARER ${t}` },
    { name: "mixed-case scheme", header: `bEaReR ${t}` },
    { name: "several spaces after the scheme", header: `Bearer    ${t}` },
    { name: "a tab after the scheme", header: `Bearer\t${t}` },
    { name: "trailing spaces", header: `Bearer ${t}   ` },
  ])("$name: the token", ({ header }) => {
    expect(bearerToken(header)).toBe(t);
  });

  it("returns any single token, TokenVault secret or not (the registry judges it)", () => {
    expect(bearerToken("Bearer abc.def-ghi")).toBe("abc.def-ghi");
  });

  it.each([
    { name: "no header", header: null },
    { name: "empty", header: "" },
    { name: "the scheme alone", header: "Bearer" },
    { name: "the scheme and a space", header: "Bearer " },
    { name: "no space after the scheme", header: `Bearer${t}` },
    { name: "Basic", header: `Basic ${Buffer.from("user:pass").toString("base64")}` },
    { name: "Token", header: `Token ${t}` },
    { name: "Digest", header: `Digest username="a"` },
    { name: "a bare secret", header: t },
    { name: "two tokens", header: `Bearer ${t} ${t}` },
    { name: "two Authorization headers joined", header: `Bearer ${t}, Bearer ${t}` },
    { name: "a scheme that only starts with Bearer", header: `Bearerx ${t}` },
  ])("$name: no token", ({ header }) => {
    expect(bearerToken(header)).toBeUndefined();
  });
});

/** A caller row with every permission, overridden by `over`. */
function row(over: Partial<CallerRow> = {}): CallerRow {
  return {
    id: "9",
    name: "svc",
    secret_hash: randomBytes(32),
    cert_identity: null,
    allowed_rpcs: [...rpcNames],
    allowed_integrations: ["*"],
    allowed_users: null,
    may_receive_refresh_token: true,
    revoked_at: null,
    created_at: new Date(),
    updated_at: new Date(),
    ...over,
  };
}

const caller = (over: Partial<CallerRow> = {}): Caller => callerFromRow(row(over));

describe("callerFromRow", () => {
  it("keeps identity and credentials", () => {
    const r = row({ cert_identity: "spiffe://example.org/svc" });
    const c = callerFromRow(r);
    expect(c).toMatchObject({ id: "9", name: "svc", certIdentity: "spiffe://example.org/svc" });
    expect(c.secretHash).toBe(r.secret_hash);
  });

  it("'*' among the integrations means every integration", () => {
    expect(caller({ allowed_integrations: ["gmail", "*"] }).policy.integrations).toBe("*");
    const listed = caller({ allowed_integrations: ["gmail", "outlook"] }).policy.integrations;
    expect(listed).not.toBe("*");
    expect([...(listed as ReadonlySet<string>)].sort()).toEqual(["gmail", "outlook"]);
  });

  it("splits users into exact ids and prefixes; null means every user", () => {
    expect(caller().policy.users).toBeUndefined();
    const users = caller({ allowed_users: ["carol", "tenant-a/*", "t*"] }).policy.users!;
    expect([...users.exact]).toEqual(["carol"]);
    expect(users.prefixes).toEqual(["tenant-a/", "t"]);
  });
});

describe("allowsIntegration and allowsUser", () => {
  it("integrations: '*' or the listed ones", () => {
    expect(allowsIntegration(caller().policy, "anything")).toBe(true);
    const p = caller({ allowed_integrations: ["gmail"] }).policy;
    expect(allowsIntegration(p, "gmail")).toBe(true);
    expect(allowsIntegration(p, "gmail2")).toBe(false);
    expect(allowsIntegration(p, "gmai")).toBe(false);
    expect(allowsIntegration(p, "*")).toBe(false);
  });

  it("users: exact ids match exactly, prefixes match what starts with them", () => {
    const p = caller({ allowed_users: ["carol", "tenant-a/*"] }).policy;
    expect(allowsUser(p, "carol")).toBe(true);
    expect(allowsUser(p, "carol2")).toBe(false);
    expect(allowsUser(p, "caro")).toBe(false);
    expect(allowsUser(p, "Carol")).toBe(false);
    expect(allowsUser(p, "tenant-a/bob")).toBe(true);
    expect(allowsUser(p, "tenant-a/")).toBe(true);
    expect(allowsUser(p, "tenant-a")).toBe(false);
    expect(allowsUser(p, "tenant-b/bob")).toBe(false);
    expect(allowsUser(p, "x/tenant-a/bob")).toBe(false);
    expect(allowsUser(caller().policy, "anyone at all")).toBe(true);
  });
});

describe("denial", () => {
  it("allows a call inside the policy", () => {
    for (const rpc of rpcNames) {
      expect(denial(caller(), { rpc, userId: "u", integration: rpc === "ClearUser" || rpc === "ListConnections" ? undefined : "gmail" })).toBeUndefined();
    }
    expect(denial(caller(), { rpc: "Get", userId: "u", integration: "gmail", wantsRefreshToken: true })).toBeUndefined();
  });

  it("RPC: names the RPC", () => {
    const c = caller({ allowed_rpcs: ["Get"] });
    expect(denial(c, { rpc: "Get", userId: "u", integration: "gmail" })).toBeUndefined();
    for (const rpc of ["Store", "Remove", "ClearUser", "ListConnections"]) {
      expect(denial(c, { rpc, userId: "u", integration: "gmail" })).toBe(`caller "svc" may not call ${rpc}`);
    }
  });

  it("integration: names the integration", () => {
    const c = caller({ allowed_integrations: ["outlook"] });
    expect(denial(c, { rpc: "Get", userId: "u", integration: "outlook" })).toBeUndefined();
    expect(denial(c, { rpc: "Store", userId: "u", integration: "gmail" })).toBe(`caller "svc" may not access integration "gmail"`);
    // ListConnections carries no integration: allowed, the handler filters.
    expect(denial(c, { rpc: "ListConnections", userId: "u" })).toBeUndefined();
  });

  it("ClearUser: needs '*', even when every integration the user has is listed", () => {
    const message = `caller "svc" may not call ClearUser: it needs access to every integration ('*')`;
    expect(denial(caller({ allowed_integrations: ["gmail", "outlook", "slack"] }), { rpc: "ClearUser", userId: "u" })).toBe(message);
    expect(denial(caller({ allowed_integrations: ["*"] }), { rpc: "ClearUser", userId: "u" })).toBeUndefined();
  });

  it("users: the message names no user id", () => {
    const c = caller({ allowed_users: ["carol", "tenant-a/*"] });
    expect(denial(c, { rpc: "Get", userId: "carol", integration: "gmail" })).toBeUndefined();
    expect(denial(c, { rpc: "Get", userId: "tenant-a/bob", integration: "gmail" })).toBeUndefined();
    const message = denial(c, { rpc: "Get", userId: "tenant-b/secret-user", integration: "gmail" });
    expect(message).toBe(`caller "svc" may not access this user`);
    expect(denial(c, { rpc: "ClearUser", userId: "dave" })).toBe(`caller "svc" may not access this user`);
    expect(denial(c, { rpc: "ListConnections", userId: "dave" })).toBe(`caller "svc" may not access this user`);
  });

  it("refresh tokens: only when asked for", () => {
    const c = caller({ may_receive_refresh_token: false });
    expect(denial(c, { rpc: "Get", userId: "u", integration: "gmail" })).toBeUndefined();
    expect(denial(c, { rpc: "Get", userId: "u", integration: "gmail", wantsRefreshToken: false })).toBeUndefined();
    expect(denial(c, { rpc: "Get", userId: "u", integration: "gmail", wantsRefreshToken: true })).toBe(`caller "svc" may not receive refresh tokens`);
  });

  it("names the first missing permission: RPC, then ClearUser's '*', then integration, then user, then refresh tokens", () => {
    const none = caller({ allowed_rpcs: ["Get", "ClearUser"], allowed_integrations: ["outlook"], allowed_users: ["carol"], may_receive_refresh_token: false });
    expect(denial(none, { rpc: "Store", userId: "dave", integration: "gmail" })).toBe(`caller "svc" may not call Store`);
    expect(denial(none, { rpc: "ClearUser", userId: "dave" })).toMatch(/needs access to every integration/);
    expect(denial(none, { rpc: "Get", userId: "dave", integration: "gmail", wantsRefreshToken: true })).toBe(`caller "svc" may not access integration "gmail"`);
    expect(denial(none, { rpc: "Get", userId: "dave", integration: "outlook", wantsRefreshToken: true })).toBe(`caller "svc" may not access this user`);
    expect(denial(none, { rpc: "Get", userId: "carol", integration: "outlook", wantsRefreshToken: true })).toBe(`caller "svc" may not receive refresh tokens`);
  });
});
