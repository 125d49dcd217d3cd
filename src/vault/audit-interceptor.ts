/**
 * The audit interceptor: every TokenVaultService call that touches or tries to
 * touch a connection writes exactly one audit event, and its response leaves
 * only after that event has committed (fail-closed). It sits between the
 * request interceptor (request id, error shaping) and the auth interceptor, so
 * it sees denied and unauthenticated attempts too.
 *
 * StreamAudit records its own event when a stream starts (the handler knows
 * its filter); here only its refusals are recorded.
 */
import { Code, ConnectError, createContextKey, type Interceptor, type UnaryResponse } from "@connectrpc/connect";
import { create } from "@bufbuild/protobuf";
import { AuditUnavailableError, type AuditWriter } from "../audit/writer.js";
import { detailText, outcomeName, type AuditAction, type AuditEventInput, type DetailValue } from "../audit/chain.js";
import { callerKey, claimedCallerKey } from "../auth/interceptor.js";
import { ErrorDetailSchema, ErrorReason, RevocationStatus, TokenVaultService } from "../gen/tokenvault/v1/tokenvault_pb.js";
import { callContextKey, peerAddressKey } from "./context.js";
import { toConnectError } from "./errors.js";
import { validateIntegration, validateUserId } from "./validate.js";

/** What a handler adds to its call's audit event. */
export interface AuditNote {
  /** Facts for the event's details; never a secret. */
  details: Record<string, DetailValue>;
  /**
   * Further events of the same call, recorded before its own (a Get that
   * refreshed also writes the refresh or refresh_failed event).
   */
  events: { action: AuditAction; outcome: string; details: Record<string, DetailValue> }[];
}

/** The current call's audit note; handlers add details to it. */
export const auditNoteKey = createContextKey<AuditNote | undefined>(undefined, { description: "tokenvault audit note" });

/** Each RPC's action when it is allowed to run. */
const actions: Record<string, AuditAction> = {
  Store: "store",
  Get: "get",
  Remove: "remove",
  ClearUser: "clear_user",
  ListConnections: "list",
  StreamAudit: "stream_audit",
  VerifyAudit: "verify_audit",
};

/** Calls that change connections: failing them after the change must be loud. */
const mutating = new Set(["Store", "Remove", "ClearUser"]);

/** The UNAVAILABLE a call gets when its event cannot be committed. */
export function auditUnavailable(): ConnectError {
  return new ConnectError("the audit log is unavailable, so nothing was returned; retry later", Code.Unavailable, undefined, [
    { desc: ErrorDetailSchema, value: create(ErrorDetailSchema, { reason: ErrorReason.AUDIT_UNAVAILABLE }) },
  ]);
}

/** Creates the interceptor writing through `writer`. */
export function auditInterceptor(writer: AuditWriter): Interceptor {
  return (next) => async (req) => {
    if (req.service.typeName !== TokenVaultService.typeName) return next(req);
    const occurredAt = new Date();
    const note: AuditNote = { details: {}, events: [] };
    req.contextValues.set(auditNoteKey, note);
    let response: Awaited<ReturnType<typeof next>> | undefined;
    let failure: unknown;
    try {
      response = await next(req);
      // A stream that started records itself (see StreamAudit).
      if (req.stream) return response;
    } catch (err) {
      failure = err;
    }

    const call = req.contextValues.get(callContextKey);
    const code = failure === undefined ? undefined : toConnectError(failure, call?.requestId ?? "").error;
    const rpc = req.method.name;
    const message = req.stream ? undefined : (req.message as { userId?: unknown; integration?: unknown });
    const event: AuditEventInput = {
      occurredAt,
      caller: req.contextValues.get(callerKey)?.name ?? null,
      action: actionFor(rpc, code?.code),
      userId: validOrNull(message?.userId, validateUserId),
      integration: validOrNull(message?.integration, validateIntegration),
      outcome: code === undefined ? "ok" : outcomeName(Code[code.code]),
      requestId: call?.requestId ?? null,
      peer: req.contextValues.get(peerAddressKey) || null,
      details: { rpc, ...note.details, ...failureDetails(code, req.contextValues.get(claimedCallerKey)) },
    };
    if (code === undefined && response !== undefined) Object.assign(event.details, responseDetails(rpc, response as UnaryResponse));
    try {
      // Queued together, so they share a batch and keep their order.
      await Promise.all([
        ...note.events.map((extra) => writer.record({ ...event, ...extra, details: { rpc, ...extra.details } })),
        writer.record(event),
      ]);
    } catch (err) {
      if (!(err instanceof AuditUnavailableError)) throw err;
      if (failure === undefined && mutating.has(rpc)) {
        // The change is committed but its event is not: say so where operators look.
        call?.logger.error({ rpc, action: event.action }, "a change was committed but its audit event could not be; the caller was told UNAVAILABLE");
      }
      throw auditUnavailable();
    }
    if (failure !== undefined) throw failure;
    return response!;
  };
}

function actionFor(rpc: string, code: Code | undefined): AuditAction {
  if (code === Code.Unauthenticated) return "unauthenticated";
  if (code === Code.PermissionDenied) return "denied";
  if (code === Code.DataLoss) return "integrity_failure";
  return actions[rpc] ?? "denied";
}

/** A request field as recorded: only when valid, so no garbage (or misplaced secret) lands in a column. */
function validOrNull(value: unknown, validate: (v: string) => string): string | null {
  if (typeof value !== "string" || value === "") return null;
  try {
    return validate(value);
  } catch {
    return null;
  }
}

function failureDetails(error: ConnectError | undefined, claimed: string | undefined): Record<string, DetailValue> {
  if (error === undefined) return {};
  const details: Record<string, DetailValue> = { error: detailText(error.rawMessage) };
  if (claimed !== undefined) details.claimed_caller = detailText(claimed, 256);
  return details;
}

/** Facts from a successful response: counts and flags, never a token. */
function responseDetails(rpc: string, response: UnaryResponse): Record<string, DetailValue> {
  const m = response.message as Record<string, unknown>;
  switch (rpc) {
    case "Get":
      return { refreshed: m.refreshed === true, refresh_token_returned: typeof m.refreshToken === "string" };
    case "Remove": {
      const revocation = m.revocation as { status?: RevocationStatus } | undefined;
      const asked = revocation?.status !== undefined && revocation.status !== RevocationStatus.NOT_REQUESTED;
      return { existed: m.existed === true, ...(asked ? { revocation: RevocationStatus[revocation.status!]!.toLowerCase() } : {}) };
    }
    case "ClearUser": {
      const revocations = (m.revocations ?? []) as { integration: string; status: RevocationStatus }[];
      return {
        removed: Number(m.removedCount ?? 0),
        ...(revocations.length > 0 ? { revocations: Object.fromEntries(revocations.map((r) => [r.integration, RevocationStatus[r.status]!.toLowerCase()])) } : {}),
      };
    }
    case "ListConnections":
      return { connections: Array.isArray(m.connections) ? m.connections.length : 0 };
    case "VerifyAudit":
      return { ok: m.ok === true, checked: Number(m.checked ?? 0) };
    default:
      return {};
  }
}
