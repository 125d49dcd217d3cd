/**
 * Seals and opens the secret fields of a connection. Each field is sealed on
 * its own with associated data naming the key id, user, integration and field,
 * so a ciphertext moved to another row, another field, or relabelled with
 * another key id fails to open (IntegrityError) instead of yielding a token.
 */
import type { KeyRing } from "./key-ring.js";

/** The secret fields of a connection, in clear. */
export interface TokenSecrets {
  accessToken: string;
  refreshToken: string | undefined;
  idToken: string | undefined;
  /** Provider extras as JSON text; may itself hold secrets. */
  extrasJson: string | undefined;
}

/** The same fields sealed, plus the id of the key that sealed them. */
export interface SealedSecrets {
  keyId: string;
  accessToken: Buffer;
  refreshToken: Buffer | null;
  idToken: Buffer | null;
  extras: Buffer | null;
}

/** Which row a ciphertext belongs to. */
export interface ConnectionKey {
  userId: string;
  integration: string;
}

type Field = "access_token" | "refresh_token" | "id_token" | "extras";

/**
 * Associated data: a length-prefixed encoding, so no choice of user id or
 * integration can make two different rows produce the same bytes.
 */
function associatedData(keyId: string, owner: ConnectionKey, field: Field): Buffer {
  const parts = ["tokenvault/v1", keyId, owner.userId, owner.integration, field].map((s) => Buffer.from(s, "utf8"));
  const out: Buffer[] = [];
  for (const part of parts) {
    const length = Buffer.alloc(4);
    length.writeUInt32BE(part.length);
    out.push(length, part);
  }
  return Buffer.concat(out);
}

/** Seals every present secret under the ring's current key. */
export function sealSecrets(ring: KeyRing, owner: ConnectionKey, secrets: TokenSecrets): SealedSecrets {
  const keyId = ring.current.id;
  const seal = (field: Field, value: string) => ring.seal(Buffer.from(value, "utf8"), associatedData(keyId, owner, field));
  return {
    keyId,
    accessToken: seal("access_token", secrets.accessToken),
    refreshToken: secrets.refreshToken === undefined ? null : seal("refresh_token", secrets.refreshToken),
    idToken: secrets.idToken === undefined ? null : seal("id_token", secrets.idToken),
    extras: secrets.extrasJson === undefined ? null : seal("extras", secrets.extrasJson),
  };
}

/**
 * Opens every present secret.
 * @throws IntegrityError when any field fails authentication.
 */
export function openSecrets(ring: KeyRing, owner: ConnectionKey, sealed: SealedSecrets): TokenSecrets {
  const open = (field: Field, value: Buffer) =>
    ring.open(sealed.keyId, value, associatedData(sealed.keyId, owner, field)).toString("utf8");
  return {
    accessToken: open("access_token", sealed.accessToken),
    refreshToken: sealed.refreshToken === null ? undefined : open("refresh_token", sealed.refreshToken),
    idToken: sealed.idToken === null ? undefined : open("id_token", sealed.idToken),
    extrasJson: sealed.extras === null ? undefined : open("extras", sealed.extras),
  };
}
