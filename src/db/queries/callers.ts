/**
 * Statements on the callers table (see migrations/0003_callers.sql).
 */
import type { Pool, PoolClient } from "pg";

type Queryable = Pool | PoolClient;

/** A callers row. */
export interface CallerRow {
  id: string;
  name: string;
  secret_hash: Buffer | null;
  cert_identity: string | null;
  allowed_rpcs: string[];
  allowed_integrations: string[];
  allowed_users: string[] | null;
  may_receive_refresh_token: boolean;
  revoked_at: Date | null;
  created_at: Date;
  updated_at: Date;
}

/** A caller's policy columns, as written by the CLI. */
export interface CallerPolicyColumns {
  allowedRpcs: string[];
  allowedIntegrations: string[];
  allowedUsers: string[] | null;
  mayReceiveRefreshToken: boolean;
}

/** Every caller, revoked ones included (the CLI lists them; the registry skips them). */
export async function selectCallers(db: Queryable): Promise<CallerRow[]> {
  const result = await db.query<CallerRow>("select * from callers order by name");
  return result.rows;
}

/** One caller by name. */
export async function selectCallerByName(db: Queryable, name: string): Promise<CallerRow | undefined> {
  const result = await db.query<CallerRow>("select * from callers where name = $1::text", [name]);
  return result.rows[0];
}

/** Creates a caller; its secret hash is set by {@link updateCallerSecret} once the id is known. */
export async function insertCaller(db: Queryable, name: string, policy: CallerPolicyColumns): Promise<CallerRow> {
  const result = await db.query<CallerRow>(
    `insert into callers (name, allowed_rpcs, allowed_integrations, allowed_users, may_receive_refresh_token)
     values ($1::text, $2::text[], $3::text[], $4::text[], $5::boolean) returning *`,
    [name, policy.allowedRpcs, policy.allowedIntegrations, policy.allowedUsers, policy.mayReceiveRefreshToken],
  );
  return result.rows[0]!;
}

/** Replaces a caller's policy and un-revokes it (used by `callers apply`). */
export async function updateCallerPolicy(db: Queryable, name: string, policy: CallerPolicyColumns): Promise<CallerRow | undefined> {
  const result = await db.query<CallerRow>(
    `update callers set allowed_rpcs = $2::text[], allowed_integrations = $3::text[], allowed_users = $4::text[],
       may_receive_refresh_token = $5::boolean, revoked_at = null, updated_at = now()
     where name = $1::text returning *`,
    [name, policy.allowedRpcs, policy.allowedIntegrations, policy.allowedUsers, policy.mayReceiveRefreshToken],
  );
  return result.rows[0];
}

/** Sets the hash of a caller's new secret; the old secret stops working. */
export async function updateCallerSecret(db: Queryable, id: string, secretHash: Buffer): Promise<void> {
  await db.query("update callers set secret_hash = $2::bytea, updated_at = now() where id = $1::bigint", [id, secretHash]);
}

/** Binds a client-certificate identity to a caller (null unbinds). */
export async function updateCallerCertIdentity(db: Queryable, name: string, identity: string | null): Promise<boolean> {
  const result = await db.query("update callers set cert_identity = $2::text, updated_at = now() where name = $1::text", [name, identity]);
  return result.rowCount === 1;
}

/** Revokes a caller: every credential of it stops working. */
export async function revokeCaller(db: Queryable, name: string): Promise<boolean> {
  const result = await db.query(
    "update callers set revoked_at = now(), updated_at = now() where name = $1::text and revoked_at is null",
    [name],
  );
  return result.rowCount === 1;
}
