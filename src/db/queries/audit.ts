/**
 * Statements on the audit tables (see migrations/0004_audit.sql). The chain is
 * extended only by {@link appendAuditEvents}, inside a transaction that holds
 * the audit_head row lock from {@link lockAuditHead} until commit.
 */
import type { Pool, PoolClient } from "pg";
import type { AuditAction, AuditEvent, DetailValue } from "../../audit/chain.js";

type Queryable = Pool | PoolClient;

/** The channel a committed batch notifies, with its last id as payload. */
export const auditChannel = "tokenvault_audit";

/** An audit_events row as pg returns it. */
export interface AuditEventRow {
  id: string;
  occurred_at: Date;
  caller: string | null;
  action: string;
  user_id: string | null;
  integration: string | null;
  outcome: string;
  request_id: string | null;
  peer: string | null;
  details: Record<string, DetailValue>;
  prev_hash: Buffer;
  hash: Buffer;
}

const eventColumns = "id, occurred_at, caller, action, user_id, integration, outcome, request_id, peer, details, prev_hash, hash";

function eventFromRow(row: AuditEventRow): AuditEvent {
  return {
    id: BigInt(row.id),
    occurredAt: row.occurred_at,
    caller: row.caller,
    action: row.action as AuditAction,
    userId: row.user_id,
    integration: row.integration,
    outcome: row.outcome,
    requestId: row.request_id,
    peer: row.peer,
    details: row.details,
    prevHash: row.prev_hash,
    hash: row.hash,
  };
}

/** The end of the chain. */
export interface AuditHead {
  lastId: bigint;
  lastHash: Buffer;
}

/**
 * Locks the chain's head until commit (beginning the transaction first when
 * asked, in the same round trip) and returns it. Durable whatever the database
 * default: synchronous_commit is on.
 */
export async function lockAuditHead(client: PoolClient, lockTimeoutMs: number, options: { begin: boolean }): Promise<AuditHead> {
  const results = (await client.query(
    `${options.begin ? "begin; " : ""}set local lock_timeout = ${Math.max(1, Math.trunc(lockTimeoutMs))}; set local synchronous_commit = on;
     select last_id, last_hash from audit_head for update`,
  )) as unknown as { rows: { last_id: string; last_hash: Buffer }[] }[];
  const row = results[results.length - 1]!.rows[0];
  if (row === undefined) throw new Error("audit_head is empty: run the migrations");
  return { lastId: BigInt(row.last_id), lastHash: row.last_hash };
}

/**
 * Inserts a batch of chained events, moves the head to the last of them and
 * notifies followers (delivered at commit), in one statement.
 */
export async function appendAuditEvents(client: PoolClient, events: readonly AuditEvent[]): Promise<void> {
  const last = events[events.length - 1]!;
  await client.query({
    name: "tokenvault-audit-append",
    text: `with inserted as (
             insert into audit_events (${eventColumns})
             select * from unnest($1::bigint[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[],
                                  $7::text[], $8::text[], $9::text[], $10::jsonb[], $11::bytea[], $12::bytea[])
           ), head as (
             update audit_head set last_id = $13::bigint, last_hash = $14::bytea
           )
           select pg_notify('${auditChannel}', $13::text)`,
    values: [
      events.map((e) => e.id.toString()),
      events.map((e) => e.occurredAt),
      events.map((e) => e.caller),
      events.map((e) => e.action),
      events.map((e) => e.userId),
      events.map((e) => e.integration),
      events.map((e) => e.outcome),
      events.map((e) => e.requestId),
      events.map((e) => e.peer),
      events.map((e) => JSON.stringify(e.details)),
      events.map((e) => e.prevHash),
      events.map((e) => e.hash),
      last.id.toString(),
      last.hash,
    ],
  });
}

/** The newest committed id (0 when nothing was ever written). */
export async function selectAuditHead(db: Queryable): Promise<AuditHead> {
  const result = await db.query<{ last_id: string; last_hash: Buffer }>("select last_id, last_hash from audit_head");
  const row = result.rows[0];
  if (row === undefined) throw new Error("audit_head is empty: run the migrations");
  return { lastId: BigInt(row.last_id), lastHash: row.last_hash };
}

/** What a reader of the log selects; unset fields match everything. */
export interface AuditQuery {
  userId?: string | undefined;
  integration?: string | undefined;
  caller?: string | undefined;
  actions?: readonly string[] | undefined;
  since?: Date | undefined;
  until?: Date | undefined;
}

/** Events with afterId < id <= upToId matching `query`, in id order, at most `limit`. */
export async function selectAuditEvents(
  db: Queryable,
  afterId: bigint,
  upToId: bigint,
  query: AuditQuery,
  limit: number,
): Promise<AuditEvent[]> {
  const result = await db.query<AuditEventRow>({
    name: "tokenvault-audit-select",
    text: `select ${eventColumns} from audit_events
           where id > $1::bigint and id <= $2::bigint
             and ($3::text is null or user_id = $3::text)
             and ($4::text is null or integration = $4::text)
             and ($5::text is null or caller = $5::text)
             and ($6::text[] is null or action = any($6::text[]))
             and ($7::timestamptz is null or occurred_at >= $7::timestamptz)
             and ($8::timestamptz is null or occurred_at < $8::timestamptz)
           order by id limit $9::int`,
    values: [
      afterId.toString(),
      upToId.toString(),
      query.userId ?? null,
      query.integration ?? null,
      query.caller ?? null,
      query.actions === undefined || query.actions.length === 0 ? null : query.actions,
      query.since ?? null,
      query.until ?? null,
      limit,
    ],
  });
  return result.rows.map(eventFromRow);
}

/** Events from `fromId` on, unfiltered, in id order, at most `limit` (for verification). */
export async function selectAuditRange(db: Queryable, fromId: bigint, limit: number): Promise<AuditEvent[]> {
  const result = await db.query<AuditEventRow>(
    `select ${eventColumns} from audit_events where id >= $1::bigint order by id limit $2::int`,
    [fromId.toString(), limit],
  );
  return result.rows.map(eventFromRow);
}

/** The id of the event with this hash, if any (slow: only for explaining a broken chain). */
export async function selectAuditIdByHash(db: Queryable, hash: Buffer): Promise<bigint | undefined> {
  const result = await db.query<{ id: string }>("select id from audit_events where hash = $1::bytea limit 1", [hash]);
  return result.rows[0] === undefined ? undefined : BigInt(result.rows[0].id);
}

/** One event by id. */
export async function selectAuditEvent(db: Queryable, id: bigint): Promise<AuditEvent | undefined> {
  const result = await db.query<AuditEventRow>(`select ${eventColumns} from audit_events where id = $1::bigint`, [id.toString()]);
  return result.rows[0] === undefined ? undefined : eventFromRow(result.rows[0]);
}

/** A prune's record of where it cut the log. */
export interface AuditCheckpoint {
  lastId: bigint;
  lastHash: Buffer;
  prunedCount: bigint;
  prunedBefore: Date;
}

interface CheckpointRow {
  last_id: string;
  last_hash: Buffer;
  pruned_count: string;
  pruned_before: Date;
}

const checkpointColumns = "last_id, last_hash, pruned_count, pruned_before";

function checkpointFromRow(row: CheckpointRow | undefined): AuditCheckpoint | undefined {
  return row === undefined
    ? undefined
    : { lastId: BigInt(row.last_id), lastHash: row.last_hash, prunedCount: BigInt(row.pruned_count), prunedBefore: row.pruned_before };
}

/** The newest checkpoint, if the log was ever pruned. */
export async function selectLatestCheckpoint(db: Queryable): Promise<AuditCheckpoint | undefined> {
  const result = await db.query<CheckpointRow>(`select ${checkpointColumns} from audit_checkpoints order by last_id desc limit 1`);
  return checkpointFromRow(result.rows[0]);
}

/** The checkpoint that ends exactly at `lastId`, if any. */
export async function selectCheckpointAt(db: Queryable, lastId: bigint): Promise<AuditCheckpoint | undefined> {
  const result = await db.query<CheckpointRow>(`select ${checkpointColumns} from audit_checkpoints where last_id = $1::bigint`, [lastId.toString()]);
  return checkpointFromRow(result.rows[0]);
}

/**
 * Deletes every event before the first one at or after `before` and records a
 * checkpoint carrying the hash where the cut was made. Returns it, or undefined
 * when nothing was old enough.
 */
export async function pruneAuditEvents(client: PoolClient, before: Date): Promise<AuditCheckpoint | undefined> {
  // Ids follow commit order, times nearly so: cut below the first event at or
  // after `before`, so nothing newer than `before` goes.
  const cut = await client.query<{ cut: string | null }>(
    `select coalesce((select min(id) from audit_events where occurred_at >= $1::timestamptz) - 1,
                     (select last_id from audit_head)) as cut`,
    [before],
  );
  const lastId = BigInt(cut.rows[0]!.cut ?? "0");
  const last = await client.query<{ hash: Buffer }>("select hash from audit_events where id = $1::bigint", [lastId.toString()]);
  if (last.rows[0] === undefined) return undefined; // nothing older, or already pruned up to here
  const deleted = await client.query("delete from audit_events where id <= $1::bigint", [lastId.toString()]);
  const checkpoint: AuditCheckpoint = { lastId, lastHash: last.rows[0].hash, prunedCount: BigInt(deleted.rowCount ?? 0), prunedBefore: before };
  await client.query(
    "insert into audit_checkpoints (last_id, last_hash, pruned_count, pruned_before) values ($1::bigint, $2::bytea, $3::bigint, $4::timestamptz)",
    [lastId.toString(), checkpoint.lastHash, checkpoint.prunedCount.toString(), before],
  );
  return checkpoint;
}
