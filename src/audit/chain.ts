/**
 * The audit event and its hash chain. An event's hash is
 * SHA-256(prev_hash || canonical encoding), where the canonical encoding is a
 * JSON array of the event's fields in a fixed order, with `details` keys
 * sorted, so the same event always hashes the same after a round trip through
 * PostgreSQL (jsonb reorders keys; timestamps keep milliseconds).
 */
import { createHash } from "node:crypto";

/** The actions an event can record. */
export const auditActions = [
  "store",
  "get",
  "refresh",
  "refresh_failed",
  "remove",
  "clear_user",
  "list",
  "denied",
  "unauthenticated",
  "integrity_failure",
  "stream_audit",
  "verify_audit",
  "key_rotation",
  "audit_prune",
] as const;

/** One of {@link auditActions}. */
export type AuditAction = (typeof auditActions)[number];

/** A JSON value that can be stored in `details`. */
export type DetailValue = string | number | boolean | null | DetailValue[] | { [key: string]: DetailValue };

/** An event as a call describes it, before it has a place in the chain. */
export interface AuditEventInput {
  occurredAt: Date;
  /** The authenticated caller's name; null when unauthenticated. */
  caller: string | null;
  action: AuditAction;
  userId: string | null;
  integration: string | null;
  /** The Connect code in snake case ("ok", "not_found" ...). */
  outcome: string;
  requestId: string | null;
  peer: string | null;
  /** Facts without any secret. */
  details: Record<string, DetailValue>;
}

/** An event in the chain, as stored. */
export interface AuditEvent extends AuditEventInput {
  id: bigint;
  prevHash: Buffer;
  hash: Buffer;
}

/** The prev_hash of the first event ever written. */
export const genesisHash: Buffer = Buffer.alloc(32);

/** Version tag of the encoding, so it can change without ambiguity. */
const encodingVersion = "tokenvault.audit.v1";

/** Sorts object keys recursively so jsonb's reordering does not change the encoding. */
function canonicalValue(value: DetailValue): DetailValue {
  if (Array.isArray(value)) return value.map(canonicalValue);
  if (value !== null && typeof value === "object") {
    // No prototype: a key named "__proto__" must be an ordinary key, encoded and hashed.
    const sorted: Record<string, DetailValue> = Object.create(null) as Record<string, DetailValue>;
    for (const key of Object.keys(value).sort()) sorted[key] = canonicalValue(value[key]!);
    return sorted;
  }
  return value;
}

/** The canonical encoding of an event at position `id`. */
export function canonicalEncoding(id: bigint, event: AuditEventInput): string {
  return JSON.stringify([
    encodingVersion,
    id.toString(),
    event.occurredAt.toISOString(),
    event.caller,
    event.action,
    event.userId,
    event.integration,
    event.outcome,
    event.requestId,
    event.peer,
    canonicalValue(event.details),
  ]);
}

/** An event of an administrative command run from the CLI (no caller, request or peer). */
export function commandEvent(action: AuditAction, details: Record<string, DetailValue>): AuditEventInput {
  return {
    occurredAt: new Date(),
    caller: null,
    action,
    userId: null,
    integration: null,
    outcome: "ok",
    requestId: null,
    peer: null,
    details: { by: "cli", ...details },
  };
}

/** Places `events` after `head` in the chain: the next ids and the hashes linking them. */
export function chainEvents(head: { lastId: bigint; lastHash: Buffer }, events: readonly AuditEventInput[]): AuditEvent[] {
  let prevHash = head.lastHash;
  let id = head.lastId;
  return events.map((event) => {
    id += 1n;
    const hash = eventHash(prevHash, id, event);
    const chained: AuditEvent = { ...event, id, prevHash, hash };
    prevHash = hash;
    return chained;
  });
}

/** The hash of an event at position `id` following `prevHash`. */
export function eventHash(prevHash: Buffer, id: bigint, event: AuditEventInput): Buffer {
  return createHash("sha256").update(prevHash).update(canonicalEncoding(id, event)).digest();
}

/** Connect's code names (NotFound) as the outcome column writes them (not_found). */
export function outcomeName(codeName: string): string {
  return codeName.replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase();
}

/**
 * Makes a string safe for a jsonb details value: PostgreSQL rejects NUL, and
 * an overlong value (a caller's garbage) is cut.
 */
export function detailText(text: string, max = 512): string {
  const clean = text.replace(/\u0000/g, "\uFFFD");
  return clean.length > max ? `${clean.slice(0, max)}…` : clean;
}
