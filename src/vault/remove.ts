/**
 * Remove and ClearUser: delete and say how much went.
 */
import { create } from "@bufbuild/protobuf";
import {
  ClearUserResponseSchema,
  RemoveResponseSchema,
  type ClearUserRequest,
  type ClearUserResponse,
  type RemoveRequest,
  type RemoveResponse,
} from "../gen/tokenvault/v1/tokenvault_pb.js";
import { deleteConnection, deleteUserConnections } from "../db/queries/connections.js";
import type { VaultDeps } from "./deps.js";
import { validateIntegration, validateUserId } from "./validate.js";

/** Handles TokenVaultService.Remove. */
export async function remove(deps: VaultDeps, req: RemoveRequest): Promise<RemoveResponse> {
  const userId = validateUserId(req.userId);
  const integration = validateIntegration(req.integration);
  return create(RemoveResponseSchema, { existed: await deleteConnection(deps.pool, userId, integration) });
}

/** Handles TokenVaultService.ClearUser. */
export async function clearUser(deps: VaultDeps, req: ClearUserRequest): Promise<ClearUserResponse> {
  const userId = validateUserId(req.userId);
  return create(ClearUserResponseSchema, { removedCount: await deleteUserConnections(deps.pool, userId) });
}
