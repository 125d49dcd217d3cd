/**
 * Statements on the encryption_keys table: the check value of every key id the
 * service has used (see migrations/0002_encryption_keys.sql).
 */
import type { Pool, PoolClient } from "pg";

/** A recorded key id and its check value. */
export interface EncryptionKeyRow {
  key_id: string;
  check_value: Buffer;
}

/** Every recorded key. */
export async function selectEncryptionKeys(db: Pool | PoolClient): Promise<EncryptionKeyRow[]> {
  const result = await db.query<EncryptionKeyRow>("select key_id, check_value from encryption_keys order by key_id");
  return result.rows;
}

/** Records a key's check value unless the id is already recorded. */
export async function insertEncryptionKey(db: Pool | PoolClient, keyId: string, checkValue: Buffer): Promise<void> {
  await db.query(
    "insert into encryption_keys (key_id, check_value) values ($1::text, $2::bytea) on conflict (key_id) do nothing",
    [keyId, checkValue],
  );
}
