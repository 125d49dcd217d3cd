/**
 * What the service's handlers depend on, injected by buildServer so tests can
 * pass their own pool, key ring or clock.
 */
import type { Pool } from "pg";
import type { KeyRing } from "../crypto/key-ring.js";
import type { AuditFeed } from "../audit/feed.js";
import type { AuditWriter } from "../audit/writer.js";
import type { Refresher } from "../refresh/refresher.js";
import type { Catalogue } from "../providers/catalogue.js";

/** The audit log's parts the handlers use. */
export interface AuditDeps {
  /** Group-committing writer of audit events. */
  readonly writer: AuditWriter;
  /** This process's live view of the log, for StreamAudit followers. */
  readonly feed: AuditFeed;
  /** How many events a follower that has caught up may fall behind before its stream ends (RESOURCE_EXHAUSTED). */
  readonly maxLag: number;
}

/** The handlers' dependencies. */
export interface VaultDeps {
  readonly pool: Pool;
  readonly keyRing: KeyRing;
  /** The time, for expires_in; injectable for tests. */
  readonly now: () => Date;
  readonly audit: AuditDeps;
  /** Refreshes expiring tokens on Get. */
  readonly refresher: Refresher;
  /** The provider catalogue (refresh and revocation endpoints). */
  readonly catalogue: Catalogue;
  /** Longest a provider call (revocation) may take. */
  readonly refreshTimeoutMs: number;
}
