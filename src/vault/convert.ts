/**
 * Rows to messages. The only place that shapes a Connection for callers, so
 * no secret column can slip into a response.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  ConnectionSchema,
  ConnectionStatus,
  ConsentMetadataSchema,
  type Connection,
} from "../gen/tokenvault/v1/tokenvault_pb.js";
import type { ConnectionMetadataRow } from "../db/queries/connections.js";

/** The metadata columns a Connection message is made of. */
export type ConnectionFields = Pick<
  ConnectionMetadataRow,
  | "user_id" | "integration" | "scopes" | "token_type" | "expires_at" | "status" | "created_at" | "updated_at"
  | "last_used_at" | "issued_at" | "ip_address" | "user_agent" | "refresh_token_expires_at" | "last_refreshed_at"
> & { has_refresh_token: boolean };

/** A refresh token this close to its end makes ListConnections warn. */
const expiringSoonMs = 7 * 24 * 3600 * 1000;

/** Builds the Connection message for a row; `now` decides what "expiring soon" means. */
export function connectionFromRow(row: ConnectionFields, now: Date = new Date()): Connection {
  return create(ConnectionSchema, {
    userId: row.user_id,
    integration: row.integration,
    scopes: row.scopes,
    tokenType: row.token_type,
    expiresAt: row.expires_at === null ? undefined : timestampFromDate(row.expires_at),
    status: row.status === "needs_reauth" ? ConnectionStatus.NEEDS_REAUTH : ConnectionStatus.ACTIVE,
    hasRefreshToken: row.has_refresh_token,
    createdAt: timestampFromDate(row.created_at),
    updatedAt: timestampFromDate(row.updated_at),
    lastUsedAt: row.last_used_at === null ? undefined : timestampFromDate(row.last_used_at),
    issuedAt: timestampFromDate(row.issued_at),
    consent: create(ConsentMetadataSchema, { ipAddress: row.ip_address ?? "", userAgent: row.user_agent ?? "" }),
    refreshTokenExpiresAt: row.refresh_token_expires_at === null ? undefined : timestampFromDate(row.refresh_token_expires_at),
    refreshTokenExpiringSoon:
      row.has_refresh_token && row.refresh_token_expires_at !== null && row.refresh_token_expires_at.getTime() - now.getTime() < expiringSoonMs,
    lastRefreshedAt: row.last_refreshed_at === null ? undefined : timestampFromDate(row.last_refreshed_at),
  });
}
