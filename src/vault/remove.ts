/**
 * Remove and ClearUser: delete, say how much went, and with `revoke` also
 * revoke the deleted tokens at their providers (after the delete: the rows go
 * whatever the providers answer).
 */
import { create } from "@bufbuild/protobuf";
import {
  ClearUserResponseSchema,
  RemoveResponseSchema,
  RevocationSchema,
  RevocationStatus,
  type ClearUserRequest,
  type ClearUserResponse,
  type RemoveRequest,
  type RemoveResponse,
} from "../gen/tokenvault/v1/tokenvault_pb.js";
import { deleteConnection, deleteUserConnections } from "../db/queries/connections.js";
import { revokeDeleted } from "../refresh/revoke.js";
import type { VaultDeps } from "./deps.js";
import { validateIntegration, validateUserId } from "./validate.js";

/** Handles TokenVaultService.Remove. */
export async function remove(deps: VaultDeps, req: RemoveRequest): Promise<RemoveResponse> {
  const userId = validateUserId(req.userId);
  const integration = validateIntegration(req.integration);
  const rows = await deleteConnection(deps.pool, userId, integration);
  if (!req.revoke) return create(RemoveResponseSchema, { existed: rows.length === 1 });
  const [revocation] = await revokeDeleted(rows, revocationDeps(deps));
  return create(RemoveResponseSchema, {
    existed: rows.length === 1,
    revocation: revocation ?? create(RevocationSchema, { integration, status: RevocationStatus.NOT_REQUESTED }),
  });
}

/** Handles TokenVaultService.ClearUser. */
export async function clearUser(deps: VaultDeps, req: ClearUserRequest): Promise<ClearUserResponse> {
  const userId = validateUserId(req.userId);
  const rows = await deleteUserConnections(deps.pool, userId);
  return create(ClearUserResponseSchema, {
    removedCount: rows.length,
    revocations: req.revoke ? await revokeDeleted(rows, revocationDeps(deps)) : [],
  });
}

function revocationDeps(deps: VaultDeps) {
  return { keyRing: deps.keyRing, catalogue: deps.catalogue, timeoutMs: deps.refreshTimeoutMs };
}
