/**
 * The key ring: versioned AES-256 keys. The first key seals; every key opens.
 *
 * Glossary:
 * - key id: a short name (`k2026a`) stored beside every sealed row, so the ring
 *   knows which key opens it and rotation knows which rows still need work.
 * - seal / open: AES-256-GCM encryption / authenticated decryption.
 * - associated data (AAD): bytes that are authenticated but not stored in the
 *   ciphertext; here they bind a ciphertext to its row and field, so a
 *   ciphertext copied elsewhere fails to open.
 * - check value: HMAC of a fixed label under the key, kept in the database so
 *   that a different key under a known id is caught at start-up, not at the
 *   first Get. It reveals nothing about the key.
 *
 * Sealed layout: version byte (1) | IV (12 bytes, random per seal) | ciphertext | tag (16 bytes).
 */
import { createCipheriv, createDecipheriv, createHmac, createSecretKey, randomBytes, type KeyObject } from "node:crypto";

const formatVersion = 1;
const ivBytes = 12;
const tagBytes = 16;
const keyBytes = 32;
const checkLabel = "tokenvault key check value v1";

/** Key ids: short, printable, safe in a log line, a CLI argument and an env var. */
export const keyIdPattern = /^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$/;

/** A ciphertext failed authentication: altered, moved, or sealed under a different key. */
export class IntegrityError extends Error {
  override readonly name = "IntegrityError";
}

/** A key ring could not be built from its configuration; the message says why. */
export class KeyRingError extends Error {
  override readonly name = "KeyRingError";
}

/** One key of the ring, imported once. */
export interface RingKey {
  readonly id: string;
  /** Imported once so no request pays for key parsing. */
  readonly secret: KeyObject;
  /** See the glossary: HMAC-SHA256 of a fixed label. */
  readonly checkValue: Buffer;
}

/** An id and the raw 32 key bytes, as parsed from configuration. */
export interface KeyMaterial {
  readonly id: string;
  readonly bytes: Buffer;
}

/** Versioned keys: seals with the first, opens with any. */
export class KeyRing {
  readonly #keys: ReadonlyMap<string, RingKey>;
  /** The key that seals; the first one configured. */
  readonly current: RingKey;

  constructor(material: readonly KeyMaterial[]) {
    if (material.length === 0) throw new KeyRingError("the key ring is empty: configure at least one key");
    const keys = new Map<string, RingKey>();
    for (const [index, { id, bytes }] of material.entries()) {
      if (!keyIdPattern.test(id)) {
        // Never echo an invalid id: an entry written key:id would print the key.
        throw new KeyRingError(
          `the id of key entry ${index + 1} is invalid (${id.length} characters): use 1..32 letters, digits, '_' or '-' (entries are written id:base64key)`,
        );
      }
      if (bytes.length !== keyBytes) {
        throw new KeyRingError(`key "${id}" must be ${keyBytes} bytes (base64 of 32 random bytes), got ${bytes.length}`);
      }
      if (keys.has(id)) throw new KeyRingError(`key id "${id}" appears twice in the key ring`);
      keys.set(id, {
        id,
        secret: createSecretKey(bytes),
        checkValue: createHmac("sha256", bytes).update(checkLabel).digest(),
      });
    }
    this.#keys = keys;
    this.current = keys.values().next().value as RingKey;
  }

  /** Every key id in ring order (the sealing key first). */
  get ids(): string[] {
    return [...this.#keys.keys()];
  }

  /** The key with this id, if the ring has it. */
  get(id: string): RingKey | undefined {
    return this.#keys.get(id);
  }

  /** Seals `plaintext` under the current key, bound to `aad`. */
  seal(plaintext: Buffer, aad: Buffer): Buffer {
    const iv = randomBytes(ivBytes);
    const cipher = createCipheriv("aes-256-gcm", this.current.secret, iv, { authTagLength: tagBytes });
    cipher.setAAD(aad);
    const body = Buffer.concat([cipher.update(plaintext), cipher.final()]);
    return Buffer.concat([Buffer.of(formatVersion), iv, body, cipher.getAuthTag()]);
  }

  /**
   * Opens a ciphertext sealed under key `keyId` with the same `aad`.
   * @throws IntegrityError when it fails authentication or the key is unknown:
   * a garbled plaintext is never returned.
   */
  open(keyId: string, sealed: Buffer, aad: Buffer): Buffer {
    const key = this.#keys.get(keyId);
    if (key === undefined) throw new IntegrityError(`key id "${keyId}" is not in the key ring`);
    if (sealed.length < 1 + ivBytes + tagBytes || sealed[0] !== formatVersion) {
      throw new IntegrityError("ciphertext is malformed");
    }
    const iv = sealed.subarray(1, 1 + ivBytes);
    const tag = sealed.subarray(sealed.length - tagBytes);
    const body = sealed.subarray(1 + ivBytes, sealed.length - tagBytes);
    const decipher = createDecipheriv("aes-256-gcm", key.secret, iv, { authTagLength: tagBytes });
    decipher.setAAD(aad);
    decipher.setAuthTag(tag);
    try {
      return Buffer.concat([decipher.update(body), decipher.final()]);
    } catch {
      throw new IntegrityError("ciphertext failed authentication");
    }
  }
}

/** A fresh random key, as `id:base64` text for TOKENVAULT_KEYS or a key file. */
export function generateKey(id: string): KeyMaterial {
  if (!keyIdPattern.test(id)) throw new KeyRingError(`key id "${id}" is invalid: use 1..32 letters, digits, '_' or '-'`);
  return { id, bytes: randomBytes(keyBytes) };
}

/** A key id that sorts by creation time, e.g. `k20261126t163012`. */
export function newKeyId(now = new Date(), prefix = "k"): string {
  return prefix + now.toISOString().replace(/[-:]/g, "").replace(/\..*$/, "").toLowerCase();
}

/**
 * Parses the TOKENVAULT_KEYS format: comma-separated `id:base64key` entries,
 * the sealing key first.
 */
export function parseKeyList(text: string): KeyMaterial[] {
  return text
    .split(",")
    .map((entry) => entry.trim())
    .filter((entry) => entry !== "")
    .map((entry) => {
      const colon = entry.indexOf(":");
      if (colon <= 0) throw new KeyRingError("each key must be written id:base64key (a key entry has no id)");
      return { id: entry.slice(0, colon), bytes: decodeBase64(entry.slice(colon + 1), entry.slice(0, colon)) };
    });
}

/** Formats keys in the TOKENVAULT_KEYS format. */
export function formatKeyList(keys: readonly KeyMaterial[]): string {
  return keys.map((k) => `${k.id}:${k.bytes.toString("base64")}`).join(",");
}

function decodeBase64(text: string, id: string): Buffer {
  if (!/^[A-Za-z0-9+/_-]+={0,2}$/.test(text)) throw new KeyRingError(`key "${id}" is not valid base64`);
  return Buffer.from(text, "base64");
}
