/**
 * The token sets the benchmark stores and reads: Google-like shapes (an access
 * token of ~200 characters, a refresh token, two scopes, no id token), far
 * expiry so no Get ever needs a refresh. A few hundred distinct sets are made
 * once and reused; every row is still sealed for its own user (the AAD binds
 * user id and integration).
 */
import { randomBytes } from "node:crypto";
import type { TokenSecrets } from "../../src/crypto/token-seal.js";

/** Every benchmark connection uses this integration. */
export const benchIntegration = "gmail";

/** Scopes of every benchmark connection. */
export const benchScopes = ["https://www.googleapis.com/auth/gmail.readonly", "openid"];

/** The user id of key `n` in a key space. */
export function userId(prefix: string, n: number): string {
  return `${prefix}${n}`;
}

/** Key prefix of the seeded connections read by Get. */
export const getPrefix = "bench-u";
/** Key prefix of the connections written by the Store variant (kept apart from Get's). */
export const storePrefix = "bench-store-";

function token(prefix: string, length: number): string {
  return (prefix + randomBytes(length).toString("base64url")).slice(0, prefix.length + length);
}

/** `count` distinct token sets. */
export function makeTokenSets(count: number): TokenSecrets[] {
  return Array.from({ length: count }, () => ({
    accessToken: token("ya29.a0", 200),
    refreshToken: token("1//0g", 100),
    idToken: undefined,
    extrasJson: undefined,
  }));
}

/** Far in the future (but inside the 10-year bound a Store accepts): no refresh is ever due. */
export function farExpiry(): Date {
  return new Date(Date.now() + 5 * 365 * 24 * 3600 * 1000);
}

/** A small, fast PRNG (xorshift32) so key choice costs nothing measurable. */
export function prng(seed: number): () => number {
  let x = seed >>> 0 || 0x9e3779b9;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
}
