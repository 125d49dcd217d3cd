/**
 * VerifyAudit: the `tokenvault audit verify` check, for auditors over the API.
 */
import { create } from "@bufbuild/protobuf";
import { VerifyAuditResponseSchema, type VerifyAuditRequest, type VerifyAuditResponse } from "../gen/tokenvault/v1/tokenvault_pb.js";
import { verifyAuditChain } from "../audit/verify.js";
import type { VaultDeps } from "./deps.js";

/** Handles TokenVaultService.VerifyAudit. */
export async function verifyAudit(deps: VaultDeps, req: VerifyAuditRequest): Promise<VerifyAuditResponse> {
  const result = await verifyAuditChain(deps.pool, req.fromCursor === 0n ? undefined : req.fromCursor);
  return create(VerifyAuditResponseSchema, {
    ok: result.ok,
    checked: BigInt(result.checked),
    firstBadCursor: result.firstBadId ?? 0n,
    problem: result.problem ?? "",
    headCursor: result.headId,
  });
}
