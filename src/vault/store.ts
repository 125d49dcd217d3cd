/**
 * Store: validate, seal every secret under the current key, upsert.
 */
import { create } from "@bufbuild/protobuf";
import { StoreResponseSchema, type StoreRequest, type StoreResponse } from "../gen/tokenvault/v1/tokenvault_pb.js";
import { sealSecrets } from "../crypto/token-seal.js";
import { upsertConnection } from "../db/queries/connections.js";
import { connectionFromRow } from "./convert.js";
import type { VaultDeps } from "./deps.js";
import { validateConsent, validateIntegration, validateTokenSet, validateUserId } from "./validate.js";

/** Handles TokenVaultService.Store. */
export async function store(deps: VaultDeps, req: StoreRequest): Promise<StoreResponse> {
  const userId = validateUserId(req.userId);
  const integration = validateIntegration(req.integration);
  const tokenSet = validateTokenSet(req.tokenSet, deps.now());
  const consent = validateConsent(req.metadata);

  const sealed = sealSecrets(deps.keyRing, { userId, integration }, tokenSet);
  const row = await upsertConnection(deps.pool, {
    userId,
    integration,
    keyId: sealed.keyId,
    accessTokenSealed: sealed.accessToken,
    refreshTokenSealed: sealed.refreshToken,
    idTokenSealed: sealed.idToken,
    extrasSealed: sealed.extras,
    tokenType: tokenSet.tokenType,
    scopes: tokenSet.scopes,
    expiresAt: tokenSet.expiresAt,
    refreshTokenExpiresAt: tokenSet.refreshTokenExpiresAt,
    ipAddress: consent.ipAddress,
    userAgent: consent.userAgent,
  });
  return create(StoreResponseSchema, { connection: connectionFromRow(row, deps.now()), created: row.created });
}
