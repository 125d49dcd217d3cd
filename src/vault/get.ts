/**
 * Get: read the connection (marking it used), open its secrets, answer.
 *
 * min_valid_for and the refresh mode are validated here so the contract is
 * final; refreshing an expiring token is the refresh module's job (issue #5):
 * until then a token is returned as stored and `refreshed` is false.
 */
import { create, type JsonObject } from "@bufbuild/protobuf";
import { GetResponseSchema, type GetRequest, type GetResponse } from "../gen/tokenvault/v1/tokenvault_pb.js";
import { openSecrets } from "../crypto/token-seal.js";
import { selectConnectionForUse } from "../db/queries/connections.js";
import { connectionFromRow } from "./convert.js";
import type { VaultDeps } from "./deps.js";
import { connectionNotFound } from "./errors.js";
import { validateIntegration, validateMinValidFor, validateRefreshMode, validateUserId } from "./validate.js";

/** Handles TokenVaultService.Get. */
export async function get(deps: VaultDeps, req: GetRequest): Promise<GetResponse> {
  const userId = validateUserId(req.userId);
  const integration = validateIntegration(req.integration);
  validateMinValidFor(req.minValidFor);
  validateRefreshMode(req.refresh);

  const row = await selectConnectionForUse(deps.pool, userId, integration);
  if (row === undefined) throw connectionNotFound();
  // Throws IntegrityError (-> DATA_LOSS) before anything is returned.
  const secrets = openSecrets(deps.keyRing, { userId, integration }, {
    keyId: row.key_id,
    accessToken: row.access_token_sealed,
    refreshToken: row.refresh_token_sealed,
    idToken: row.id_token_sealed,
    extras: row.extras_sealed,
  });
  const connection = connectionFromRow({ ...row, has_refresh_token: row.refresh_token_sealed !== null });
  return create(GetResponseSchema, {
    accessToken: secrets.accessToken,
    tokenType: row.token_type,
    expiresAt: connection.expiresAt,
    scopes: row.scopes,
    idToken: secrets.idToken,
    // The auth interceptor already refused include_refresh_token to callers not allowed it.
    refreshToken: req.includeRefreshToken ? secrets.refreshToken : undefined,
    extras: secrets.extrasJson === undefined ? undefined : (JSON.parse(secrets.extrasJson) as JsonObject),
    refreshed: false,
    connection,
  });
}
