/**
 * Statements on the connections table, one function each. Sealed columns are
 * opaque bytes here: sealing and opening happen in src/crypto.
 */
import type { Pool, PoolClient } from "pg";
import type { SealedSecrets } from "../../crypto/token-seal.js";

type Queryable = Pool | PoolClient;

/** A connections row as selected (metadata and sealed secrets). */
export interface ConnectionRow {
  id: string;
  user_id: string;
  integration: string;
  key_id: string;
  access_token_sealed: Buffer;
  refresh_token_sealed: Buffer | null;
  id_token_sealed: Buffer | null;
  extras_sealed: Buffer | null;
  token_type: string;
  scopes: string[];
  expires_at: Date | null;
  status: "active" | "needs_reauth";
  generation: string;
  ip_address: string | null;
  user_agent: string | null;
  created_at: Date;
  updated_at: Date;
  last_used_at: Date | null;
  issued_at: Date;
  refresh_token_expires_at: Date | null;
  last_refreshed_at: Date | null;
  refresh_failures: number;
  refresh_retry_at: Date | null;
}

/** A connections row without its sealed columns, for listings. */
export type ConnectionMetadataRow = Omit<
  ConnectionRow,
  "access_token_sealed" | "refresh_token_sealed" | "id_token_sealed" | "extras_sealed"
> & { has_refresh_token: boolean };

const metadataColumns = `id, user_id, integration, key_id, token_type, scopes, expires_at, status, generation,
  host(ip_address) as ip_address, user_agent, created_at, updated_at, last_used_at, issued_at,
  refresh_token_expires_at, last_refreshed_at, refresh_failures, refresh_retry_at,
  refresh_token_sealed is not null as has_refresh_token`;

/** Every column of a row, sealed ones included. */
const rowColumns = `id, user_id, integration, key_id, access_token_sealed, refresh_token_sealed, id_token_sealed,
  extras_sealed, token_type, scopes, expires_at, status, generation, host(ip_address) as ip_address,
  user_agent, created_at, updated_at, last_used_at, issued_at, refresh_token_expires_at, last_refreshed_at,
  refresh_failures, refresh_retry_at`;

/** What Store writes: a token set as a refresh writes it, plus who and where from. */
export interface UpsertConnection extends RefreshedColumns {
  userId: string;
  integration: string;
  ipAddress: string | null;
  userAgent: string | null;
}

/**
 * Inserts or replaces the connection (user_id, integration). A replace keeps
 * created_at and last_used_at, makes the connection active again and bumps
 * its generation. `created` is true for an insert.
 */
export async function upsertConnection(
  db: Queryable,
  c: UpsertConnection,
): Promise<ConnectionMetadataRow & { created: boolean }> {
  const result = await db.query<ConnectionMetadataRow & { created: boolean }>(
    `insert into connections as c (user_id, integration, key_id, access_token_sealed, refresh_token_sealed,
       id_token_sealed, extras_sealed, token_type, scopes, expires_at, ip_address, user_agent, refresh_token_expires_at)
     values ($1::text, $2::text, $3::text, $4::bytea, $5::bytea, $6::bytea, $7::bytea, $8::text, $9::text[],
       $10::timestamptz, $11::inet, $12::text, $13::timestamptz)
     on conflict (user_id, integration) do update set
       key_id = excluded.key_id,
       access_token_sealed = excluded.access_token_sealed,
       refresh_token_sealed = excluded.refresh_token_sealed,
       id_token_sealed = excluded.id_token_sealed,
       extras_sealed = excluded.extras_sealed,
       token_type = excluded.token_type,
       scopes = excluded.scopes,
       expires_at = excluded.expires_at,
       ip_address = excluded.ip_address,
       user_agent = excluded.user_agent,
       status = 'active',
       generation = c.generation + 1,
       updated_at = now(),
       issued_at = now(),
       -- a new token set from a new consent: nothing about the old one holds
       refresh_token_expires_at = excluded.refresh_token_expires_at,
       last_refreshed_at = null,
       refresh_failures = 0,
       refresh_retry_at = null
     returning ${metadataColumns}, (xmax = 0) as created`,
    [
      c.userId, c.integration, c.keyId, c.accessTokenSealed, c.refreshTokenSealed, c.idTokenSealed,
      c.extrasSealed, c.tokenType, c.scopes, c.expiresAt, c.ipAddress, c.userAgent, c.refreshTokenExpiresAt,
    ],
  );
  return result.rows[0]!;
}

/**
 * Selects the connection and marks it used, in one round trip. The mark never
 * waits: while a refresh holds the row lock (during its provider call) the
 * read goes on without it, so Gets queue in the refresher's single flight, not
 * on the lock with a pool connection each. Returns undefined when there is none.
 */
export async function selectConnectionForUse(
  db: Queryable,
  userId: string,
  integration: string,
): Promise<ConnectionRow | undefined> {
  const result = await db.query<ConnectionRow & { touched_at: Date }>({
    name: "tokenvault-select-connection-for-use",
    text: `with c as (
             select ${rowColumns} from connections where user_id = $1::text and integration = $2::text
           ), touched as (
             update connections u set last_used_at = now()
             from (select id from connections where user_id = $1::text and integration = $2::text
                   for no key update skip locked) l
             where u.id = l.id
             returning u.last_used_at
           )
           -- a Get that could not take the mark (another Get or a refresh holds the
           -- row) still used the connection now
           select c.*, coalesce((select last_used_at from touched), now()) as touched_at from c`,
    values: [userId, integration],
  });
  const row = result.rows[0];
  if (row === undefined) return undefined;
  const { touched_at, ...rest } = row;
  return { ...rest, last_used_at: touched_at };
}

/**
 * Locks the connection for the rest of the transaction (the refresh fence:
 * one refresher per connection across every replica) and returns it.
 */
export async function lockConnection(client: PoolClient, userId: string, integration: string): Promise<ConnectionRow | undefined> {
  const result = await client.query<ConnectionRow>(
    `select ${rowColumns} from connections where user_id = $1::text and integration = $2::text for update`,
    [userId, integration],
  );
  return result.rows[0];
}

/** What a successful refresh writes; every sealed column under `keyId`. */
export interface RefreshedColumns {
  keyId: string;
  accessTokenSealed: Buffer;
  refreshTokenSealed: Buffer | null;
  idTokenSealed: Buffer | null;
  extrasSealed: Buffer | null;
  tokenType: string;
  scopes: string[];
  expiresAt: Date | null;
  refreshTokenExpiresAt: Date | null;
}

/** Writes a refreshed token set (new generation, failures cleared) and returns the row. */
export async function updateRefreshedTokens(client: PoolClient, id: string, c: RefreshedColumns): Promise<ConnectionRow> {
  const result = await client.query<ConnectionRow>(
    `update connections set key_id = $2::text, access_token_sealed = $3::bytea, refresh_token_sealed = $4::bytea,
       id_token_sealed = $5::bytea, extras_sealed = $6::bytea, token_type = $7::text, scopes = $8::text[],
       expires_at = $9::timestamptz, refresh_token_expires_at = $10::timestamptz, status = 'active',
       generation = generation + 1, updated_at = now(), last_refreshed_at = now(), refresh_failures = 0,
       refresh_retry_at = null
     where id = $1::bigint
     returning ${rowColumns}`,
    [id, c.keyId, c.accessTokenSealed, c.refreshTokenSealed, c.idTokenSealed, c.extrasSealed, c.tokenType, c.scopes,
      c.expiresAt, c.refreshTokenExpiresAt],
  );
  return result.rows[0]!;
}

/** Marks the connection as needing a new consent (the provider refused its refresh token). */
export async function markNeedsReauth(client: PoolClient, id: string): Promise<void> {
  await client.query(
    "update connections set status = 'needs_reauth', generation = generation + 1, updated_at = now() where id = $1::bigint",
    [id],
  );
}

/** Counts a transient refresh failure and sets when the provider may be tried again. */
export async function recordRefreshFailure(client: PoolClient, id: string, retryAt: Date): Promise<void> {
  await client.query(
    "update connections set refresh_failures = refresh_failures + 1, refresh_retry_at = $2::timestamptz where id = $1::bigint",
    [id, retryAt],
  );
}

/** Deletes one connection and returns what it held (none, or one row), for revocation at the provider. */
export async function deleteConnection(db: Queryable, userId: string, integration: string): Promise<ConnectionRow[]> {
  const result = await db.query<ConnectionRow>(
    `delete from connections where user_id = $1::text and integration = $2::text returning ${rowColumns}`,
    [userId, integration],
  );
  return result.rows;
}

/** Deletes every connection of a user and returns what they held, ordered by integration. */
export async function deleteUserConnections(db: Queryable, userId: string): Promise<ConnectionRow[]> {
  const result = await db.query<ConnectionRow>(`delete from connections where user_id = $1::text returning ${rowColumns}`, [userId]);
  return result.rows.sort((a, b) => a.integration.localeCompare(b.integration));
}

/** A user's connections, metadata only, ordered by integration. */
export async function selectUserConnections(db: Queryable, userId: string): Promise<ConnectionMetadataRow[]> {
  const result = await db.query<ConnectionMetadataRow>(
    `select ${metadataColumns} from connections where user_id = $1::text order by integration`,
    [userId],
  );
  return result.rows;
}

/** Rows per key id, for `keys status`. */
export async function countConnectionsByKey(db: Queryable): Promise<{ key_id: string; rows: string }[]> {
  const result = await db.query<{ key_id: string; rows: string }>(
    "select key_id, count(*) as rows from connections group by key_id order by key_id",
  );
  return result.rows;
}

/**
 * The distinct key ids that seal at least one row. A loose index scan over
 * connections_key_id_idx, so start-up stays fast with millions of rows.
 */
export async function selectKeyIdsInUse(db: Queryable): Promise<string[]> {
  const result = await db.query<{ key_id: string }>(
    `with recursive ids as (
       (select key_id from connections order by key_id limit 1)
       union all
       select (select c.key_id from connections c where c.key_id > ids.key_id order by c.key_id limit 1)
       from ids where ids.key_id is not null
     )
     select key_id from ids where key_id is not null`,
  );
  return result.rows.map((r) => r.key_id);
}

/** Any one row sealed under `keyId`, to prove a key opens it; undefined when none. */
export async function selectOneRowSealedBy(db: Queryable, keyId: string): Promise<SealedRow | undefined> {
  const result = await db.query<SealedRow>(
    `select id, user_id, integration, key_id, access_token_sealed, refresh_token_sealed, id_token_sealed, extras_sealed
     from connections where key_id = $1::text limit 1`,
    [keyId],
  );
  return result.rows[0];
}

/** The sealed part of a row, as rotation reads and rewrites it. */
export type SealedRow = Pick<
  ConnectionRow,
  "id" | "user_id" | "integration" | "key_id" | "access_token_sealed" | "refresh_token_sealed" | "id_token_sealed" | "extras_sealed"
>;

/** A row's sealed columns as the crypto layer takes them. */
export function sealedSecretsOf(row: SealedRow): SealedSecrets {
  return {
    keyId: row.key_id,
    accessToken: row.access_token_sealed,
    refreshToken: row.refresh_token_sealed,
    idToken: row.id_token_sealed,
    extras: row.extras_sealed,
  };
}

/**
 * Locks up to `limit` rows not sealed under `currentKeyId`, skipping rows
 * another transaction holds (a Store or a concurrent rotation), so rotation
 * never waits on or overwrites live writes.
 */
export async function lockRowsToReseal(client: PoolClient, currentKeyId: string, limit: number): Promise<SealedRow[]> {
  const result = await client.query<SealedRow>(
    `select id, user_id, integration, key_id, access_token_sealed, refresh_token_sealed, id_token_sealed, extras_sealed
     from connections where key_id <> $1::text
     order by key_id, id limit $2::int
     for update skip locked`,
    [currentKeyId, limit],
  );
  return result.rows;
}

/** Rewrites a row's sealed columns after re-sealing; bumps its generation. */
export async function updateSealedColumns(
  client: PoolClient,
  row: Pick<SealedRow, "id" | "key_id" | "access_token_sealed" | "refresh_token_sealed" | "id_token_sealed" | "extras_sealed">,
): Promise<void> {
  await client.query(
    `update connections set key_id = $2::text, access_token_sealed = $3::bytea, refresh_token_sealed = $4::bytea,
       id_token_sealed = $5::bytea, extras_sealed = $6::bytea, generation = generation + 1
     where id = $1::bigint`,
    [row.id, row.key_id, row.access_token_sealed, row.refresh_token_sealed, row.id_token_sealed, row.extras_sealed],
  );
}

/** How many rows are not sealed under `currentKeyId`. */
export async function countRowsToReseal(db: Queryable, currentKeyId: string): Promise<number> {
  const result = await db.query<{ n: string }>("select count(*) as n from connections where key_id <> $1::text", [
    currentKeyId,
  ]);
  return Number(result.rows[0]?.n ?? 0);
}
