/**
 * Get: read the connection (marking it used), open its secrets, refresh them
 * first when the access token would not stay valid for min_valid_for (unless
 * refresh is off), answer. The refresh's own audit event joins the call's.
 */
import { create, type JsonObject } from "@bufbuild/protobuf";
import type { HandlerContext } from "@connectrpc/connect";
import { GetResponseSchema, RefreshMode, type GetRequest, type GetResponse } from "../gen/tokenvault/v1/tokenvault_pb.js";
import { openSecrets } from "../crypto/token-seal.js";
import { sealedSecretsOf, selectConnectionForUse } from "../db/queries/connections.js";
import { needsReauth } from "../refresh/refresher.js";
import { auditNoteKey } from "./audit-interceptor.js";
import { connectionFromRow } from "./convert.js";
import type { VaultDeps } from "./deps.js";
import { connectionNotFound } from "./errors.js";
import { validateIntegration, validateMinValidFor, validateRefreshMode, validateUserId } from "./validate.js";

/** Handles TokenVaultService.Get. */
export async function get(deps: VaultDeps, req: GetRequest, ctx: HandlerContext): Promise<GetResponse> {
  const started = Date.now();
  const userId = validateUserId(req.userId);
  const integration = validateIntegration(req.integration);
  const minValidForSeconds = validateMinValidFor(req.minValidFor);
  const mode = validateRefreshMode(req.refresh);

  const read = await selectConnectionForUse(deps.pool, userId, integration);
  if (read === undefined) throw connectionNotFound();
  // A connection whose refresh token the provider refused answers at once, without the provider.
  if (read.status === "needs_reauth") throw needsReauth("the provider refused its refresh token");
  // Throws IntegrityError (-> DATA_LOSS) before anything is returned.
  const opened = openSecrets(deps.keyRing, { userId, integration }, sealedSecretsOf(read));
  const note = ctx.values.get(auditNoteKey);
  const { row, secrets, refreshed } = mode === RefreshMode.NEVER
    ? { row: read, secrets: opened, refreshed: false }
    : await deps.refresher.ensureFresh({
        row: read,
        secrets: opened,
        minValidForMs: minValidForSeconds * 1000,
        deadlineAt: ctx.timeoutMs() === undefined ? undefined : started + ctx.timeoutMs()!,
        onEvent: (event) => note?.events.push(event),
      });
  const connection = connectionFromRow({ ...row, has_refresh_token: row.refresh_token_sealed !== null }, deps.now());
  return create(GetResponseSchema, {
    accessToken: secrets.accessToken,
    tokenType: row.token_type,
    expiresAt: connection.expiresAt,
    scopes: row.scopes,
    idToken: secrets.idToken,
    // The auth interceptor already refused include_refresh_token to callers not allowed it.
    refreshToken: req.includeRefreshToken ? secrets.refreshToken : undefined,
    extras: secrets.extrasJson === undefined ? undefined : (JSON.parse(secrets.extrasJson) as JsonObject),
    refreshed,
    connection,
  });
}
