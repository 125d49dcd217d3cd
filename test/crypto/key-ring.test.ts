/**
 * The key ring and the sealing of connection secrets, as pure units: what a
 * sealed buffer looks like, that any alteration, move or relabelling fails to
 * open (IntegrityError, never a garbled plaintext), and that configuration
 * errors are readable and never echo key material.
 */
import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import {
  IntegrityError,
  KeyRing,
  KeyRingError,
  formatKeyList,
  parseKeyList,
  type KeyMaterial,
} from "../../src/crypto/key-ring.js";
import { openSecrets, sealSecrets, type SealedSecrets, type TokenSecrets } from "../../src/crypto/token-seal.js";
import { secretToken, testKeys } from "../helpers/secrets.js";

const aad = Buffer.from("row-42/access_token");
const versionBytes = 1;
const ivBytes = 12;
const tagBytes = 16;

/** The error `fn` throws; fails the test when it returns instead. */
function thrown(fn: () => unknown): unknown {
  let value: unknown;
  try {
    value = fn();
  } catch (err) {
    return err;
  }
  throw new Error(`expected a throw, got a value of ${Buffer.isBuffer(value) ? value.length : typeof value} bytes/type`);
}

/** The KeyRingError building a ring from `text` throws. */
function keyRingError(text: string): KeyRingError {
  const err = thrown(() => new KeyRing(parseKeyList(text)));
  expect(err).toBeInstanceOf(KeyRingError);
  return err as KeyRingError;
}

/** Every form of a key worth looking for in a message, plus every 12-character window of its base64. */
function materialForms(bytes: Buffer): string[] {
  const b64 = bytes.toString("base64");
  const windows: string[] = [];
  for (let i = 0; i + 12 <= b64.length; i++) windows.push(b64.slice(i, i + 12));
  return [b64, bytes.toString("base64url"), bytes.toString("hex"), ...windows];
}

function expectNoMaterial(message: string, ...keys: Buffer[]): void {
  for (const key of keys) {
    for (const form of materialForms(key)) expect(message).not.toContain(form);
  }
}

describe("KeyRing seal/open", () => {
  const [k1] = testKeys("k1") as [KeyMaterial];
  const ring = new KeyRing([k1]);

  it("round-trips a plaintext and lays it out as version | IV | body | tag", () => {
    const plaintext = Buffer.from(secretToken("access"));
    const sealed = ring.seal(plaintext, aad);
    expect(sealed.length).toBe(versionBytes + ivBytes + plaintext.length + tagBytes);
    expect(sealed[0]).toBe(1);
    expect(sealed.includes(plaintext)).toBe(false);
    expect(ring.open("k1", sealed, aad).equals(plaintext)).toBe(true);
  });

  it("round-trips an empty plaintext and a large one", () => {
    for (const plaintext of [Buffer.alloc(0), randomBytes(70_000)]) {
      expect(ring.open("k1", ring.seal(plaintext, aad), aad).equals(plaintext)).toBe(true);
    }
  });

  it("draws a fresh IV for every seal: the same plaintext sealed twice differs", () => {
    const plaintext = Buffer.from(secretToken());
    const seals = Array.from({ length: 50 }, () => ring.seal(plaintext, aad));
    const ivs = new Set(seals.map((s) => s.subarray(versionBytes, versionBytes + ivBytes).toString("hex")));
    expect(ivs.size).toBe(seals.length);
    expect(new Set(seals.map((s) => s.toString("hex"))).size).toBe(seals.length);
    for (const s of seals) expect(ring.open("k1", s, aad).equals(plaintext)).toBe(true);
  });

  it("refuses any single flipped byte anywhere: version, IV, body and tag", () => {
    const plaintext = Buffer.from("tvsecret-x");
    const sealed = ring.seal(plaintext, aad);
    expect(sealed.length).toBe(versionBytes + ivBytes + plaintext.length + tagBytes);
    let checked = 0;
    for (let position = 0; position < sealed.length; position++) {
      for (const mask of [0x01, 0x80, 0xff]) {
        const altered = Buffer.from(sealed);
        altered[position]! ^= mask;
        expect(() => ring.open("k1", altered, aad), `byte ${position} ^ ${mask}`).toThrow(IntegrityError);
        checked++;
      }
    }
    expect(checked).toBe(sealed.length * 3);
    // The untouched original still opens: the failures above come from the flips.
    expect(ring.open("k1", sealed, aad).equals(plaintext)).toBe(true);
  });

  it("refuses a truncated, extended or too short ciphertext", () => {
    const sealed = ring.seal(Buffer.from("tvsecret-y"), aad);
    expect(() => ring.open("k1", sealed.subarray(0, sealed.length - 1), aad)).toThrow(IntegrityError);
    expect(() => ring.open("k1", Buffer.concat([sealed, Buffer.of(0)]), aad)).toThrow(IntegrityError);
    expect(() => ring.open("k1", sealed.subarray(0, versionBytes + ivBytes + tagBytes - 1), aad)).toThrow(IntegrityError);
    expect(() => ring.open("k1", Buffer.alloc(0), aad)).toThrow(IntegrityError);
  });

  it("refuses the wrong associated data", () => {
    const sealed = ring.seal(Buffer.from(secretToken()), aad);
    expect(() => ring.open("k1", sealed, Buffer.from("row-43/access_token"))).toThrow(IntegrityError);
    expect(() => ring.open("k1", sealed, Buffer.alloc(0))).toThrow(IntegrityError);
    expect(() => ring.open("k1", sealed, Buffer.concat([aad, Buffer.of(0)]))).toThrow(IntegrityError);
  });

  it("refuses an unknown key id", () => {
    const sealed = ring.seal(Buffer.from(secretToken()), aad);
    const err = thrown(() => ring.open("k9", sealed, aad));
    expect(err).toBeInstanceOf(IntegrityError);
    expect((err as Error).message).toContain('"k9"');
  });

  it("refuses a key under the right id but with different bytes", () => {
    const impostor = new KeyRing(testKeys("k1"));
    const sealed = ring.seal(Buffer.from(secretToken()), aad);
    expect(() => impostor.open("k1", sealed, aad)).toThrow(IntegrityError);
    expect(() => ring.open("k1", impostor.seal(Buffer.from(secretToken()), aad), aad)).toThrow(IntegrityError);
  });

  it("seals with the first key and opens with every key after a new key is prepended", () => {
    const [newKey] = testKeys("k2") as [KeyMaterial];
    const old = ring.seal(Buffer.from("sealed under k1"), aad);
    const rotated = new KeyRing([newKey, k1]);
    expect(rotated.current.id).toBe("k2");
    expect(rotated.ids).toEqual(["k2", "k1"]);
    expect(rotated.open("k1", old, aad).toString()).toBe("sealed under k1");

    const fresh = rotated.seal(Buffer.from("sealed under k2"), aad);
    expect(rotated.open("k2", fresh, aad).toString()).toBe("sealed under k2");
    expect(new KeyRing([newKey]).open("k2", fresh, aad).toString()).toBe("sealed under k2");
    // It really is k2 that sealed it: k1 cannot open it, and the old ring does not know k2.
    expect(() => rotated.open("k1", fresh, aad)).toThrow(IntegrityError);
    expect(() => ring.open("k2", fresh, aad)).toThrow(IntegrityError);
  });

  it("derives a check value per key that is neither the key nor shared between keys", () => {
    const [a, b] = testKeys("ka", "kb") as [KeyMaterial, KeyMaterial];
    const both = new KeyRing([a, b]);
    const ca = both.get("ka")!.checkValue;
    expect(ca.length).toBe(32);
    expect(ca.equals(a.bytes)).toBe(false);
    expect(ca.equals(both.get("kb")!.checkValue)).toBe(false);
    // Same bytes, same check value, whatever the ring: that is what start-up compares.
    expect(new KeyRing([{ id: "ka", bytes: Buffer.from(a.bytes) }]).get("ka")!.checkValue.equals(ca)).toBe(true);
  });
});

describe("key ring configuration errors", () => {
  const good = testKeys("k1", "k2") as [KeyMaterial, KeyMaterial];
  const b64 = (k: KeyMaterial) => k.bytes.toString("base64");

  it("parses id:base64 entries in order, trimming spaces and empty entries", () => {
    const text = ` k1:${b64(good[0])} , ,k2:${good[1].bytes.toString("base64url")} `;
    const parsed = parseKeyList(text);
    expect(parsed.map((k) => k.id)).toEqual(["k1", "k2"]);
    expect(parsed[0]!.bytes.equals(good[0].bytes)).toBe(true);
    expect(parsed[1]!.bytes.equals(good[1].bytes)).toBe(true);
    expect(parseKeyList(formatKeyList(good)).map((k) => k.bytes.toString("hex"))).toEqual(good.map((k) => k.bytes.toString("hex")));
  });

  it("an empty ring", () => {
    for (const text of ["", " ", " , ,"]) {
      const err = keyRingError(text);
      expect(err.message).toMatch(/empty/);
    }
    expect(() => new KeyRing([])).toThrow(KeyRingError);
  });

  it("an invalid key id", () => {
    for (const id of ["bad id", "-k1", "k1!", "x".repeat(33), "ключ"]) {
      const err = keyRingError(`${id}:${b64(good[0])}`);
      expect(err.message).toMatch(/id of key entry \d+ is invalid/);
      expectNoMaterial(err.message, good[0].bytes);
    }
  });

  it("an entry without an id", () => {
    for (const text of [b64(good[0]), `:${b64(good[0])}`]) {
      const err = keyRingError(text);
      expect(err.message).toMatch(/id:base64key/);
      expectNoMaterial(err.message, good[0].bytes);
    }
  });

  it("a key of the wrong length", () => {
    const short = randomBytes(16);
    const long = randomBytes(48);
    for (const bytes of [short, long]) {
      const err = keyRingError(`k1:${bytes.toString("base64")}`);
      expect(err.message).toBe(`key "k1" must be 32 bytes (base64 of 32 random bytes), got ${bytes.length}`);
      expectNoMaterial(err.message, bytes);
    }
  });

  it("a duplicate key id", () => {
    const err = keyRingError(`k1:${b64(good[0])},k1:${b64(good[1])}`);
    expect(err.message).toMatch(/"k1" appears twice/);
    expectNoMaterial(err.message, good[0].bytes, good[1].bytes);
  });

  it("bad base64", () => {
    const text = b64(good[0]);
    for (const broken of [`${text.slice(0, 20)}*${text.slice(21)}`, `${text.slice(0, 20)} ${text.slice(20)}`, `=${text}`, `${text}===`]) {
      const err = keyRingError(`k1:${broken}`);
      expect(err.message).toBe('key "k1" is not valid base64');
      expectNoMaterial(err.message, good[0].bytes);
    }
  });

  it("every message is one readable line", () => {
    const texts = ["", `bad id:${b64(good[0])}`, b64(good[0]), `k1:${randomBytes(8).toString("base64")}`, `k1:${b64(good[0])},k1:${b64(good[1])}`, "k1:*"];
    for (const text of texts) {
      const { message } = keyRingError(text);
      expect(message.length).toBeGreaterThan(10);
      expect(message).not.toMatch(/[\r\n]/);
    }
  });

  // An operator who writes the entry the wrong way round ("base64key:id") puts
  // the key where the id belongs: the invalid-id message must not echo it.
  it("a key written where the id belongs is not echoed", () => {
    const err = keyRingError(`${b64(good[0])}:k1`);
    expect(err.message).toMatch(/id of key entry \d+ is invalid/);
    expectNoMaterial(err.message, good[0].bytes);
  });
});

describe("sealSecrets / openSecrets", () => {
  const ring = new KeyRing(testKeys("k1", "k0"));
  const alice = { userId: "alice", integration: "gmail" };
  const secrets: TokenSecrets = {
    accessToken: secretToken("access"),
    refreshToken: secretToken("refresh"),
    idToken: secretToken("id"),
    extrasJson: JSON.stringify({ apiKey: secretToken("extra") }),
  };
  const sealed = sealSecrets(ring, alice, secrets);

  it("round-trips every field under the current key and keeps absent fields absent", () => {
    expect(sealed.keyId).toBe("k1");
    expect(openSecrets(ring, alice, sealed)).toEqual(secrets);
    const minimal = sealSecrets(ring, alice, { accessToken: "tvsecret-only", refreshToken: undefined, idToken: undefined, extrasJson: undefined });
    expect(minimal).toMatchObject({ refreshToken: null, idToken: null, extras: null });
    expect(openSecrets(ring, alice, minimal)).toEqual({ accessToken: "tvsecret-only", refreshToken: undefined, idToken: undefined, extrasJson: undefined });
  });

  it("seals each field on its own with a fresh IV", () => {
    const again = sealSecrets(ring, alice, secrets);
    for (const field of ["accessToken", "refreshToken", "idToken", "extras"] as const) {
      expect(again[field]!.equals(sealed[field]!)).toBe(false);
    }
  });

  it("fails for a ciphertext moved to another user", () => {
    expect(() => openSecrets(ring, { ...alice, userId: "bob" }, sealed)).toThrow(IntegrityError);
    // Only the access token moved: it alone is enough to fail.
    const bob = sealSecrets(ring, { ...alice, userId: "bob" }, secrets);
    expect(() => openSecrets(ring, { ...alice, userId: "bob" }, { ...bob, accessToken: sealed.accessToken })).toThrow(IntegrityError);
    expect(() => openSecrets(ring, { ...alice, userId: "bob" }, { ...bob, extras: sealed.extras })).toThrow(IntegrityError);
  });

  it("fails for a ciphertext moved to another integration", () => {
    expect(() => openSecrets(ring, { ...alice, integration: "outlook" }, sealed)).toThrow(IntegrityError);
  });

  it("binds user and integration unambiguously (no concatenation collisions)", () => {
    const pairs = [
      [{ userId: "ab", integration: "c" }, { userId: "a", integration: "bc" }],
      [{ userId: "a/b", integration: "c" }, { userId: "a", integration: "b/c" }],
      [{ userId: "a\u0000b", integration: "c" }, { userId: "a", integration: "b\u0000c" }],
    ] as const;
    for (const [owner, other] of pairs) {
      const s = sealSecrets(ring, owner, secrets);
      expect(openSecrets(ring, owner, s)).toEqual(secrets);
      expect(() => openSecrets(ring, other, s)).toThrow(IntegrityError);
    }
  });

  it("fails for a ciphertext moved to another field of the same row", () => {
    const moves: Partial<SealedSecrets>[] = [
      { accessToken: sealed.refreshToken! },
      { accessToken: sealed.idToken! },
      { refreshToken: sealed.accessToken },
      { idToken: sealed.refreshToken },
      { extras: sealed.idToken },
      { accessToken: sealed.refreshToken!, refreshToken: sealed.accessToken },
    ];
    for (const move of moves) {
      expect(() => openSecrets(ring, alice, { ...sealed, ...move }), JSON.stringify(Object.keys(move))).toThrow(IntegrityError);
    }
  });

  it("fails when relabelled with another key id of the ring", () => {
    expect(() => openSecrets(ring, alice, { ...sealed, keyId: "k0" })).toThrow(IntegrityError);
    expect(() => openSecrets(ring, alice, { ...sealed, keyId: "k9" })).toThrow(IntegrityError);
  });

  it("fails when relabelled with another id even if that id holds the very same key bytes", () => {
    // Only the associated data can tell these two ids apart.
    const bytes = randomBytes(32);
    const twins = new KeyRing([{ id: "k1", bytes }, { id: "k1-copy", bytes: Buffer.from(bytes) }]);
    const s = sealSecrets(twins, alice, secrets);
    expect(openSecrets(twins, alice, s)).toEqual(secrets);
    expect(() => openSecrets(twins, alice, { ...s, keyId: "k1-copy" })).toThrow(IntegrityError);
  });

  it("fails for a single flipped byte in any field", () => {
    for (const field of ["accessToken", "refreshToken", "idToken", "extras"] as const) {
      const altered = Buffer.from(sealed[field]!);
      altered[altered.length >> 1]! ^= 0x01;
      expect(() => openSecrets(ring, alice, { ...sealed, [field]: altered }), field).toThrow(IntegrityError);
    }
  });
});
