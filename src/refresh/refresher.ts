/**
 * Refresh on read: makes sure Get hands out an access token that stays valid
 * for the caller's min_valid_for, calling the provider at most once per
 * connection at a time across every replica.
 *
 * - The fence is PostgreSQL: the refresher takes the connection's row lock
 *   (SELECT ... FOR UPDATE, with lock_timeout) and re-checks the generation it
 *   first read. A waiter that finds the row moved returns the new token without
 *   calling the provider. Calls in one process share one wait (single flight).
 * - The new access token and a rotated refresh token are written in the same
 *   transaction; a response without a refresh token keeps the old one.
 * - invalid_grant marks the connection needs-reauth (FAILED_PRECONDITION at
 *   once on later Gets, until a new Store). A transient failure backs off per
 *   connection (exponential, capped, or the provider's Retry-After), stored on
 *   the row so every replica honours it; the old token is returned while it is
 *   still valid. Nothing stored is overwritten by a failed refresh.
 * - The provider call is bounded by the configured timeout; a caller whose
 *   deadline comes first gets DEADLINE_EXCEEDED then, while the refresh goes
 *   on and commits (aborting it could lose a token the provider already
 *   rotated). The row lock is held during the call, so the lock and statement
 *   timeouts of waiters are longer than the provider timeout.
 *
 * What can be lost: if the process dies after the provider answered and before
 * the commit, the new tokens are lost and the old refresh token stays stored.
 * The next Get refreshes with it again; a provider that rotates refresh tokens
 * and detects reuse may then refuse it (invalid_grant -> needs-reauth).
 */
import type { Pool, PoolClient } from "pg";
import { Code, ConnectError } from "@connectrpc/connect";
import { create } from "@bufbuild/protobuf";
import type { KeyRing } from "../crypto/key-ring.js";
import { openSecrets, sealSecrets, type TokenSecrets } from "../crypto/token-seal.js";
import {
  lockConnection,
  markNeedsReauth,
  recordRefreshFailure,
  sealedSecretsOf,
  updateRefreshedTokens,
  type ConnectionRow,
} from "../db/queries/connections.js";
import { ErrorDetailSchema, ErrorReason } from "../gen/tokenvault/v1/tokenvault_pb.js";
import type { Catalogue, ResolvedProvider } from "../providers/catalogue.js";
import { refreshTokens } from "../providers/token-client.js";
import type { DetailValue } from "../audit/chain.js";
import { withTransaction } from "../db/transaction.js";

/** Settings of the refresher. */
export interface RefreshSettings {
  /** Longest a provider call may take. */
  providerTimeoutMs: number;
  /** First backoff after a transient failure; doubles with each further failure. */
  backoffBaseMs: number;
  /** Longest backoff. */
  backoffMaxMs: number;
}

/** What the refresher needs. */
export interface RefresherDeps {
  pool: Pool;
  keyRing: KeyRing;
  catalogue: Catalogue;
  now: () => Date;
  settings: RefreshSettings;
}

/** An event the refresh adds to its call's audit record. */
export interface RefreshEvent {
  action: "refresh" | "refresh_failed";
  outcome: string;
  details: Record<string, DetailValue>;
}

/** A token ready to hand out. */
export interface FreshToken {
  row: ConnectionRow;
  secrets: TokenSecrets;
  /** True when the token differs from the one stored when the call began (this call or a concurrent one refreshed it). */
  refreshed: boolean;
}

/** What a call asks of the refresher. */
export interface FreshnessRequest {
  /** The row as the call read it. */
  row: ConnectionRow;
  secrets: TokenSecrets;
  /** How long the token must stay valid. */
  minValidForMs: number;
  /** When the caller stops waiting (epoch ms), if it set a deadline. */
  deadlineAt: number | undefined;
  /** Receives the refresh or refresh_failed event when this call talked to the provider. */
  onEvent: (event: RefreshEvent) => void;
}

/** Hands out tokens that stay valid long enough. */
export interface Refresher {
  /** The token to return for `request.row`, refreshed first when needed. Throws ConnectErrors. */
  ensureFresh(request: FreshnessRequest): Promise<FreshToken>;
}

/** The longest Retry-After honoured. */
const maxRetryAfterMs = 24 * 3600 * 1000;

function detail(reason: ErrorReason) {
  return [{ desc: ErrorDetailSchema, value: create(ErrorDetailSchema, { reason }) }];
}

/** FAILED_PRECONDITION: the user must consent again. */
export function needsReauth(why: string): ConnectError {
  return new ConnectError(`the connection needs a new consent: ${why}`, Code.FailedPrecondition, undefined, detail(ErrorReason.NEEDS_REAUTH));
}

function notConfigured(why: string): ConnectError {
  return new ConnectError(`the token needs a refresh, but ${why}`, Code.FailedPrecondition, undefined, detail(ErrorReason.PROVIDER_NOT_CONFIGURED));
}

function providerUnavailable(retryAt: Date, now: Date): ConnectError {
  const seconds = Math.max(1, Math.ceil((retryAt.getTime() - now.getTime()) / 1000));
  return new ConnectError(
    `the token expired and its provider could not refresh it; the vault tries again in ${seconds} s`,
    Code.Unavailable,
    { "retry-after": String(seconds) },
    detail(ErrorReason.PROVIDER_UNAVAILABLE),
  );
}

/** Whether the row's access token stays valid for `minValidForMs` from `now`. */
function validFor(row: ConnectionRow, minValidForMs: number, now: Date): boolean {
  return row.expires_at === null || row.expires_at.getTime() - now.getTime() >= minValidForMs;
}

/** Whether the row's access token still works at all. */
function stillValid(row: ConnectionRow, now: Date): boolean {
  return row.expires_at === null || row.expires_at.getTime() > now.getTime();
}

/** Creates the refresher. */
export function createRefresher(deps: RefresherDeps): Refresher {
  /** In-flight refreshes of this process, by connection: later calls share the first one's wait. */
  const inflight = new Map<string, Promise<FreshToken>>();

  /** The answer when the provider may not be called now: the old token while it works, else UNAVAILABLE. */
  const whileBackingOff = (row: ConnectionRow, secrets: TokenSecrets, now: Date): FreshToken | ConnectError =>
    stillValid(row, now) ? { row, secrets, refreshed: false } : providerUnavailable(row.refresh_retry_at ?? now, now);

  const provider = (integration: string): ResolvedProvider => {
    const entry = deps.catalogue.integration(integration);
    if (entry === undefined) throw notConfigured(`integration "${integration}" is not in the provider catalogue (add it, see TOKENVAULT_PROVIDERS_FILE)`);
    const p = entry.provider;
    const env = `TOKENVAULT_PROVIDER_${p.name.toUpperCase().replace(/[^A-Z0-9]/g, "_")}`;
    if (p.clientId === undefined || p.clientSecret === undefined) {
      throw notConfigured(`provider "${p.name}" has no client credentials: set ${env}_CLIENT_ID and ${env}_CLIENT_SECRET`);
    }
    return p;
  };

  /**
   * Decides under the row lock, inside the transaction. Errors are returned,
   * not thrown, so what the transaction wrote (needs-reauth, backoff) commits;
   * the audit event is handed out only after the commit.
   */
  const decide = async (client: PoolClient, request: FreshnessRequest, p: ResolvedProvider): Promise<{ outcome: FreshToken | ConnectError; event?: RefreshEvent }> => {
    const owner = { userId: request.row.user_id, integration: request.row.integration };
    const row = await lockConnection(client, owner.userId, owner.integration);
    if (row === undefined) return { outcome: new ConnectError("no connection for this user_id and integration", Code.NotFound) };
    const now = deps.now();
    if (row.status === "needs_reauth") return { outcome: needsReauth("the provider refused its refresh token") };
    const moved = row.generation !== request.row.generation;
    const secrets = moved ? openSecrets(deps.keyRing, owner, sealedSecretsOf(row)) : request.secrets;
    // Someone refreshed (or stored) while this call waited: no provider call.
    if (moved && validFor(row, request.minValidForMs, now)) return { outcome: { row, secrets, refreshed: true } };
    if (row.refresh_retry_at !== null && row.refresh_retry_at > now) return { outcome: whileBackingOff(row, secrets, now) };
    if (secrets.refreshToken === undefined) {
      return { outcome: stillValid(row, now) ? { row, secrets, refreshed: false } : needsReauth("the access token expired and no refresh token is stored") };
    }

    // Bounded by the configured timeout only: a caller that stops waiting is
    // answered at its deadline (ensureFresh), but the refresh carries on and
    // commits, so a token the provider already rotated is never thrown away.
    const result = await refreshTokens(p, secrets.refreshToken, row.scopes, AbortSignal.timeout(deps.settings.providerTimeoutMs));
    const after = deps.now();
    switch (result.kind) {
      case "ok": {
        const t = result.tokens;
        const next: TokenSecrets = {
          accessToken: t.accessToken,
          // Rotation-safe: no refresh token in the answer keeps the old one.
          refreshToken: t.refreshToken ?? secrets.refreshToken,
          idToken: t.idToken ?? secrets.idToken,
          extrasJson: secrets.extrasJson,
        };
        // Every sealed column is re-sealed under the current key, so the row keeps one key id.
        const sealed = sealSecrets(deps.keyRing, owner, next);
        const updated = await updateRefreshedTokens(client, row.id, {
          keyId: sealed.keyId,
          accessTokenSealed: sealed.accessToken,
          refreshTokenSealed: sealed.refreshToken,
          idTokenSealed: sealed.idToken,
          extrasSealed: sealed.extras,
          tokenType: t.tokenType !== undefined && /^[A-Za-z0-9_.-]{1,64}$/.test(t.tokenType) ? t.tokenType : row.token_type,
          scopes: t.scopes !== undefined && t.scopes.length > 0 ? [...new Set(t.scopes)] : row.scopes,
          expiresAt: t.expiresIn === undefined ? null : new Date(after.getTime() + t.expiresIn * 1000),
          refreshTokenExpiresAt:
            t.refreshTokenExpiresIn !== undefined
              ? new Date(after.getTime() + t.refreshTokenExpiresIn * 1000)
              : t.refreshToken !== undefined ? null : row.refresh_token_expires_at,
        });
        return {
          outcome: { row: updated, secrets: next, refreshed: true },
          event: {
            action: "refresh",
            outcome: "ok",
            details: { provider: p.name, refresh_token_rotated: t.refreshToken !== undefined, expires_in: t.expiresIn ?? null },
          },
        };
      }
      case "invalid_grant":
        await markNeedsReauth(client, row.id);
        return {
          outcome: needsReauth(`the provider answered ${result.error}`),
          event: { action: "refresh_failed", outcome: "failed_precondition", details: { provider: p.name, error: result.error, needs_reauth: true } },
        };
      case "misconfigured":
        return {
          outcome: notConfigured(`provider "${p.name}" refused the client (${result.error}): check its client id, secret and the catalogue entry`),
          event: { action: "refresh_failed", outcome: "failed_precondition", details: { provider: p.name, error: result.error } },
        };
      case "transient": {
        const backoff = Math.min(deps.settings.backoffMaxMs, deps.settings.backoffBaseMs * 2 ** Math.min(row.refresh_failures, 30));
        // A provider's Retry-After is honoured up to a day: a wild value must not park the connection for years.
        const retryAt = new Date(after.getTime() + Math.min(Math.max(backoff, result.retryAfterMs ?? 0), maxRetryAfterMs));
        await recordRefreshFailure(client, row.id, retryAt);
        return {
          outcome: whileBackingOff({ ...row, refresh_retry_at: retryAt }, secrets, after),
          event: {
            action: "refresh_failed",
            outcome: "unavailable",
            details: {
              provider: p.name,
              reason: result.reason,
              failures: row.refresh_failures + 1,
              retry_at: retryAt.toISOString(),
              served_old_token: stillValid(row, after),
            },
          },
        };
      }
    }
  };

  /** One refresh attempt in one transaction holding the row lock. */
  const refreshLocked = async (request: FreshnessRequest): Promise<FreshToken> => {
    const p = provider(request.row.integration);
    const { outcome, event } = await withTransaction(deps.pool, (client) => decide(client, request, p), {
      // Never retried: a retry would call the provider again.
      attempts: 1,
      // Waiters queue on the lock for as long as one provider call can take,
      // and no statement timeout of the pool cuts them off first.
      lockTimeoutMs: deps.settings.providerTimeoutMs + 5_000,
      statementTimeoutMs: deps.settings.providerTimeoutMs + 10_000,
    });
    if (event !== undefined) request.onEvent(event);
    if (outcome instanceof ConnectError) throw outcome;
    return outcome;
  };

  return {
    async ensureFresh(request) {
      const { row, secrets } = request;
      const now = deps.now();
      if (row.status === "needs_reauth") throw needsReauth("the provider refused its refresh token");
      if (validFor(row, request.minValidForMs, now)) return { row, secrets, refreshed: false };
      if (secrets.refreshToken === undefined) {
        if (stillValid(row, now)) return { row, secrets, refreshed: false };
        throw needsReauth("the access token expired and no refresh token is stored");
      }
      if (row.refresh_retry_at !== null && row.refresh_retry_at > now) {
        const answer = whileBackingOff(row, secrets, now);
        if (answer instanceof ConnectError) throw answer;
        return answer;
      }

      if (request.deadlineAt !== undefined && request.deadlineAt <= Date.now()) {
        throw new ConnectError("the deadline passed before the token could be refreshed", Code.DeadlineExceeded);
      }
      const key = `${row.user_id}\u0000${row.integration}`;
      const shared = inflight.get(key);
      if (shared !== undefined) {
        const result = await withinDeadline(shared, request.deadlineAt);
        // The shared refresh may have been for a shorter min_valid_for; it is the freshest there is.
        return { ...result, refreshed: result.row.generation !== row.generation };
      }
      const attempt = refreshLocked(request).finally(() => inflight.delete(key));
      inflight.set(key, attempt);
      return withinDeadline(attempt, request.deadlineAt);
    },
  };
}

/**
 * The caller's view of a refresh: DEADLINE_EXCEEDED when its deadline passes
 * first. The refresh itself goes on (and its failure, if any, is not the
 * caller's concern any more).
 */
async function withinDeadline(attempt: Promise<FreshToken>, deadlineAt: number | undefined): Promise<FreshToken> {
  if (deadlineAt === undefined) return attempt;
  attempt.catch(() => {}); // observed here even when the caller has gone
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new ConnectError("the deadline passed while the token was being refreshed; the refresh goes on, retry", Code.DeadlineExceeded)),
      Math.max(0, deadlineAt - Date.now()),
    );
  });
  try {
    return await Promise.race([attempt, expired]);
  } finally {
    clearTimeout(timer);
  }
}
