/**
 * Test secrets carry one marker, so a scan of any captured output for the
 * marker proves no token leaked, whatever the encoding of the rest.
 */
import { randomBytes } from "node:crypto";
import { KeyRing, type KeyMaterial } from "../../src/crypto/key-ring.js";

/** Appears in every token the tests store, and in nothing else. */
export const secretMarker = "tvsecret";

/** A unique token-like secret, e.g. `tvsecret-ya29-3f2a...`. */
export function secretToken(kind = "tok"): string {
  return `${secretMarker}-${kind}-${randomBytes(12).toString("hex")}`;
}

/** Fresh key material with the given ids (first seals). */
export function testKeys(...ids: string[]): KeyMaterial[] {
  return ids.map((id) => ({ id, bytes: randomBytes(32) }));
}

/** A ring over fresh keys. */
export function testKeyRing(...ids: string[]): KeyRing {
  return new KeyRing(testKeys(...(ids.length > 0 ? ids : ["k1"])));
}

/** Every encoding of `secret` worth looking for in a dump. */
export function encodings(secret: string): string[] {
  const bytes = Buffer.from(secret, "utf8");
  return [secret, bytes.toString("base64"), bytes.toString("base64url"), bytes.toString("hex"), bytes.toString("hex").toUpperCase()];
}
