/**
 * ListConnections: metadata only; the query selects no sealed column.
 */
import { create } from "@bufbuild/protobuf";
import {
  ListConnectionsResponseSchema,
  type ListConnectionsRequest,
  type ListConnectionsResponse,
} from "../gen/tokenvault/v1/tokenvault_pb.js";
import { selectUserConnections } from "../db/queries/connections.js";
import { connectionFromRow } from "./convert.js";
import type { VaultDeps } from "./deps.js";
import { validateUserId } from "./validate.js";

/** Handles TokenVaultService.ListConnections. */
export async function listConnections(deps: VaultDeps, req: ListConnectionsRequest): Promise<ListConnectionsResponse> {
  const userId = validateUserId(req.userId);
  const rows = await selectUserConnections(deps.pool, userId);
  return create(ListConnectionsResponseSchema, { connections: rows.map(connectionFromRow) });
}
