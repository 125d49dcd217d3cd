/**
 * Revocation on delete (RFC 7009): after Remove or ClearUser with revoke has
 * deleted the rows, tell each connection's provider to revoke its tokens. The
 * refresh token is revoked where there is one (revoking it ends the grant at
 * Google and Salesforce), else the access token. A row that fails its
 * integrity check or has no configured provider is reported, never fatal: the
 * rows are gone either way.
 */
import { create } from "@bufbuild/protobuf";
import { RevocationSchema, RevocationStatus, type Revocation } from "../gen/tokenvault/v1/tokenvault_pb.js";
import type { KeyRing } from "../crypto/key-ring.js";
import { openSecrets } from "../crypto/token-seal.js";
import { sealedSecretsOf, type ConnectionRow } from "../db/queries/connections.js";
import type { Catalogue } from "../providers/catalogue.js";
import { revokeToken } from "../providers/token-client.js";

/** Revokes the tokens of deleted rows, in parallel, each bounded by `timeoutMs`. */
export async function revokeDeleted(
  rows: readonly ConnectionRow[],
  deps: { keyRing: KeyRing; catalogue: Catalogue; timeoutMs: number },
): Promise<Revocation[]> {
  return Promise.all(
    rows.map(async (row) => {
      const status = await revokeOne(row, deps);
      return create(RevocationSchema, { integration: row.integration, status });
    }),
  );
}

async function revokeOne(row: ConnectionRow, deps: { keyRing: KeyRing; catalogue: Catalogue; timeoutMs: number }): Promise<RevocationStatus> {
  const provider = deps.catalogue.integration(row.integration)?.provider;
  if (provider === undefined || provider.revocationUrl === null) return RevocationStatus.NOT_SUPPORTED;
  if (provider.clientId === undefined) return RevocationStatus.FAILED;
  let secrets;
  try {
    secrets = openSecrets(deps.keyRing, { userId: row.user_id, integration: row.integration }, sealedSecretsOf(row));
  } catch {
    return RevocationStatus.FAILED;
  }
  const [token, hint] = secrets.refreshToken !== undefined ? [secrets.refreshToken, "refresh_token" as const] : [secrets.accessToken, "access_token" as const];
  const outcome = await revokeToken(provider, token, hint, AbortSignal.timeout(deps.timeoutMs));
  return outcome === "revoked" ? RevocationStatus.REVOKED : outcome === "not_supported" ? RevocationStatus.NOT_SUPPORTED : RevocationStatus.FAILED;
}
