/**
 * Start-up check of the key ring against the database: refuse to serve when a
 * key id that seals rows is missing from the ring, or when a ring key differs
 * from the key that was used under the same id before. Catching this at start
 * beats a DATA_LOSS on the first Get.
 */
import { timingSafeEqual } from "node:crypto";
import type { Pool } from "pg";
import type { KeyRing } from "../crypto/key-ring.js";
import { insertEncryptionKey, selectEncryptionKeys } from "../db/queries/encryption-keys.js";
import { selectKeyIdsInUse, selectOneRowSealedBy } from "../db/queries/connections.js";
import { openSecrets } from "../crypto/token-seal.js";

/** The key ring does not fit the database; the message names the key id. */
export class KeyMismatchError extends Error {
  override readonly name = "KeyMismatchError";
}

/**
 * Checks the ring against the database and records check values of new keys.
 * @throws KeyMismatchError naming the offending key id.
 */
export async function verifyKeyRing(pool: Pool, ring: KeyRing): Promise<void> {
  // A ring key never recorded may still seal rows (written before check values
  // existed, or by a process that skipped this check): prove it opens one
  // before recording it, or a wrong key would become the recorded truth.
  const known = new Set((await selectEncryptionKeys(pool)).map((row) => row.key_id));
  for (const id of ring.ids) {
    if (known.has(id)) continue;
    const sample = await selectOneRowSealedBy(pool, id);
    if (sample !== undefined) {
      try {
        openSecrets(ring, { userId: sample.user_id, integration: sample.integration }, {
          keyId: id,
          accessToken: sample.access_token_sealed,
          refreshToken: null,
          idToken: null,
          extras: null,
        });
      } catch {
        throw new KeyMismatchError(`key "${id}" in the key ring does not open the rows sealed under that id: restore the original key`);
      }
    }
    // Record, then compare below: if two replicas race with different keys
    // under one id, the loser sees the winner's check value and refuses.
    await insertEncryptionKey(pool, id, ring.get(id)!.checkValue);
  }
  const recorded = await selectEncryptionKeys(pool);
  for (const row of recorded) {
    const key = ring.get(row.key_id);
    if (key === undefined) continue;
    const same = row.check_value.length === key.checkValue.length && timingSafeEqual(row.check_value, key.checkValue);
    if (!same) {
      throw new KeyMismatchError(
        `key "${row.key_id}" in the key ring is not the key that sealed data under that id before (check value differs): restore the original key`,
      );
    }
  }
  const missing = (await selectKeyIdsInUse(pool)).filter((id) => ring.get(id) === undefined);
  if (missing.length > 0) {
    throw new KeyMismatchError(
      `key ${missing.map((id) => `"${id}"`).join(", ")} seals stored tokens but is not in the key ring: add it back (rotate before retiring a key)`,
    );
  }
}
