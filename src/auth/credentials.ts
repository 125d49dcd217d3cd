/**
 * Bearer secrets. A secret is `tvs_<caller id>_<43 characters>`: 256 random
 * bits, base64url, behind the caller's id so that checking one costs a map
 * look-up and one constant-time comparison, never a scan. Only its SHA-256
 * hash is stored; it is shown once, when made.
 */
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";

const secretPattern = /^tvs_([1-9][0-9]{0,18})_([A-Za-z0-9_-]{43})$/;

/** A freshly made secret for caller `callerId`, and the hash to store. */
export function newSecret(callerId: string): { secret: string; hash: Buffer } {
  const secret = `tvs_${callerId}_${randomBytes(32).toString("base64url")}`;
  return { secret, hash: hashSecret(secret) };
}

/** SHA-256 of the whole secret. */
export function hashSecret(secret: string): Buffer {
  return createHash("sha256").update(secret, "utf8").digest();
}

/** The caller id a secret claims, or undefined when it is not a TokenVault secret at all. */
export function claimedCallerId(secret: string): string | undefined {
  return secretPattern.exec(secret)?.[1];
}

// Compared against when the claimed caller does not exist, so that the work
// done (and so the time taken) is the same whether it exists or not.
const decoyHash = hashSecret(`tvs_0_${"A".repeat(43)}`);

/** Whether `secret` hashes to `storedHash`, in constant time; a null hash never matches. */
export function secretMatches(secret: string, storedHash: Buffer | null): boolean {
  const candidate = hashSecret(secret);
  const against = storedHash !== null && storedHash.length === candidate.length ? storedHash : decoyHash;
  return timingSafeEqual(candidate, against) && against !== decoyHash;
}

/** The secret in an `authorization: Bearer ...` header value, if any. */
export function bearerToken(header: string | null): string | undefined {
  if (header === null) return undefined;
  const match = /^Bearer\s+(\S+)\s*$/i.exec(header);
  return match?.[1];
}
