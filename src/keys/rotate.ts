/**
 * Key rotation: re-seal every row under the ring's current (first) key, online.
 * Small transactions lock a batch of rows with SKIP LOCKED, open each with its
 * old key and seal it with the new one; Gets keep working throughout because
 * every replica's ring holds both keys. Nothing is kept between batches, so a
 * crashed rotation resumes by running it again.
 */
import { setTimeout as sleep } from "node:timers/promises";
import type { Pool, PoolClient } from "pg";
import { openSecrets, sealSecrets } from "../crypto/token-seal.js";
import type { KeyRing } from "../crypto/key-ring.js";
import { countConnectionsByKey, countRowsToReseal, lockRowsToReseal, sealedSecretsOf, updateSealedColumns } from "../db/queries/connections.js";
import { withTransaction } from "../db/transaction.js";

/** Progress of a rotation, reported after every batch. */
export interface RotationProgress {
  resealed: number;
  /** Rows not under the current key when the rotation started. */
  total: number;
}

/** Options of {@link rotateKeys}. */
export interface RotateOptions {
  batchSize?: number;
  onProgress?: (progress: RotationProgress) => void;
  /** Stops between batches when aborted; the rotation can be resumed later. */
  signal?: AbortSignal;
}

/**
 * Re-seals every row not under `ring.current`. Returns how many rows it re-sealed.
 * A row that fails to open (IntegrityError) stops the rotation: it is never
 * re-sealed, as that would launder a tampered ciphertext.
 */
export async function rotateKeys(pool: Pool, ring: KeyRing, options: RotateOptions = {}): Promise<RotationProgress> {
  const batchSize = options.batchSize ?? 500;
  const progress: RotationProgress = { resealed: 0, total: await countRowsToReseal(pool, ring.current.id) };
  let idleRounds = 0;
  for (;;) {
    options.signal?.throwIfAborted();
    const done = await withTransaction(pool, (client) => resealBatch(client, ring, batchSize));
    if (done > 0) {
      idleRounds = 0;
      progress.resealed += done;
      progress.total = Math.max(progress.total, progress.resealed);
      options.onProgress?.({ ...progress });
      continue;
    }
    // Nothing lockable: finished, or the rest is held by live writes (SKIP LOCKED).
    const left = await countRowsToReseal(pool, ring.current.id);
    if (left === 0) return progress;
    if (++idleRounds > 50) {
      throw new Error(`${left} rows stayed locked by other transactions for 10 s; run the rotation again`);
    }
    await sleep(200);
  }
}

async function resealBatch(client: PoolClient, ring: KeyRing, batchSize: number): Promise<number> {
  const rows = await lockRowsToReseal(client, ring.current.id, batchSize);
  for (const row of rows) {
    const owner = { userId: row.user_id, integration: row.integration };
    const secrets = openSecrets(ring, owner, sealedSecretsOf(row));
    const sealed = sealSecrets(ring, owner, secrets);
    await updateSealedColumns(client, {
      id: row.id,
      key_id: sealed.keyId,
      access_token_sealed: sealed.accessToken,
      refresh_token_sealed: sealed.refreshToken,
      id_token_sealed: sealed.idToken,
      extras_sealed: sealed.extras,
    });
  }
  return rows.length;
}

/** Rows per key id, marking which ids the ring holds and which one seals. */
export interface KeyStatusRow {
  keyId: string;
  rows: number;
  inRing: boolean;
  current: boolean;
}

/** What `keys status` prints: every key id in the ring or in the table. */
export async function keyStatus(pool: Pool, ring: KeyRing): Promise<KeyStatusRow[]> {
  const counts = new Map((await countConnectionsByKey(pool)).map((r) => [r.key_id, Number(r.rows)]));
  const ids = [...new Set([...ring.ids, ...counts.keys()])];
  return ids.map((keyId) => ({
    keyId,
    rows: counts.get(keyId) ?? 0,
    inRing: ring.get(keyId) !== undefined,
    current: keyId === ring.current.id,
  }));
}
