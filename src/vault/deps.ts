/**
 * What the service's handlers depend on, injected by buildServer so tests can
 * pass their own pool, key ring or clock.
 */
import type { Pool } from "pg";
import type { KeyRing } from "../crypto/key-ring.js";

/** The handlers' dependencies. */
export interface VaultDeps {
  readonly pool: Pool;
  readonly keyRing: KeyRing;
  /** The time, for expires_in; injectable for tests. */
  readonly now: () => Date;
}
