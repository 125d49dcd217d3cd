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
import { allowsIntegration, type Caller } from "../auth/policy.js";
import type { VaultDeps } from "./deps.js";
import { validateUserId } from "./validate.js";

/** Handles TokenVaultService.ListConnections. */
export async function listConnections(
  deps: VaultDeps,
  req: ListConnectionsRequest,
  caller: Caller,
): Promise<ListConnectionsResponse> {
  const userId = validateUserId(req.userId);
  const rows = await selectUserConnections(deps.pool, userId);
  // A caller limited to some integrations does not learn that others are connected.
  const visible = rows.filter((row) => allowsIntegration(caller.policy, row.integration));
  return create(ListConnectionsResponseSchema, { connections: visible.map((row) => connectionFromRow(row, deps.now())) });
}
