/**
 * StreamAudit: replay the audit log after a cursor, then (with follow) stay
 * live. One loop serves both: each turn reads the next events after the cursor
 * from the feed's ring when it reaches back that far, else from the table, up
 * to the newest committed id, so replay and live join with no gap and no
 * duplicate. Writes wait for the client (connect-node awaits each write's
 * drain), so a slow reader costs no memory; one that falls more than
 * `maxLag` events behind after having caught up is ended with
 * RESOURCE_EXHAUSTED and the cursor to resume from.
 */
import { create, toBinary, type JsonObject } from "@bufbuild/protobuf";
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext } from "@connectrpc/connect";
import {
  AuditEventSchema,
  AuditResumeInfoSchema,
  StreamAuditResponseSchema,
  type StreamAuditRequest,
  type StreamAuditResponse,
} from "../gen/tokenvault/v1/tokenvault_pb.js";
import { auditActions, detailText, outcomeName, type AuditEvent, type DetailValue } from "../audit/chain.js";
import { selectAuditEvents, selectAuditHead, type AuditQuery } from "../db/queries/audit.js";
import { allowsIntegration, allowsUser, callerNamePattern, type Caller } from "../auth/policy.js";
import { callContextKey, peerAddressKey } from "./context.js";
import type { VaultDeps } from "./deps.js";
import { auditUnavailable } from "./audit-interceptor.js";
import { AuditUnavailableError } from "../audit/writer.js";
import { invalidField } from "./errors.js";
import { validateIntegration, validateUserId } from "./validate.js";

/** Events read per turn. */
const pageSize = 500;

/** How often an idle follower looks at its caller's credentials and policy again. */
const policyCheckMs = 1_000;

/** The trailer carrying the cursor to resume from. */
export const resumeAfterHeader = "tokenvault-resume-after";

/** Handles TokenVaultService.StreamAudit. */
export async function* streamAudit(
  deps: VaultDeps,
  req: StreamAuditRequest,
  ctx: HandlerContext,
  caller: Caller,
  currentCaller: (id: string) => Caller | undefined,
): AsyncGenerator<StreamAuditResponse> {
  const { feed, writer, maxLag } = deps.audit;
  const call = ctx.values.get(callContextKey);
  // Fail-closed like every access: the stream's own event (also for a refused
  // filter) commits before anything is sent.
  const record = async (outcome: string, query: AuditQuery, extra: Record<string, DetailValue>) => {
    try {
      await writer.record({
        occurredAt: new Date(),
        caller: caller.name,
        action: "stream_audit",
        userId: query.userId ?? null,
        integration: query.integration ?? null,
        outcome,
        requestId: call?.requestId ?? null,
        peer: ctx.values.get(peerAddressKey) || null,
        details: { rpc: "StreamAudit", follow: req.follow, after_cursor: req.afterCursor.toString(), ...extra },
      });
    } catch (err) {
      if (err instanceof AuditUnavailableError) throw auditUnavailable();
      throw err;
    }
  };
  let query: AuditQuery;
  let batchSize: number;
  try {
    query = validateFilter(req);
    if (req.maxBatch > maxBatchLimit) throw invalidField("max_batch", `must be at most ${maxBatchLimit}`);
    batchSize = Math.max(1, req.maxBatch);
  } catch (err) {
    const error = ConnectError.from(err);
    await record(outcomeName(Code[error.code]), {}, { error: detailText(error.rawMessage) });
    throw error;
  }
  await record("ok", query, {
    ...(query.caller === undefined ? {} : { caller: query.caller }),
    ...(query.actions === undefined ? {} : { actions: [...query.actions] }),
    ...(query.since === undefined ? {} : { since: query.since.toISOString() }),
    ...(query.until === undefined ? {} : { until: query.until.toISOString() }),
  });

  // The caller is looked up again each turn: a revoked caller or a narrowed
  // policy takes effect on open streams as on new calls.
  let now = caller;
  const visible = (e: AuditEvent) => matches(e, query) && maySee(now, e);
  const unregister = req.follow ? feed.register() : () => {};
  let cursor = req.afterCursor;
  // gRPC, gRPC-Web and Connect all name the codec in the content type; the response uses the request's.
  const binary = !(ctx.requestHeader.get("content-type") ?? "").includes("json");
  try {
    // Without follow the stream ends at the log's end as of now.
    const end = req.follow ? undefined : (await selectAuditHead(deps.pool)).lastId;
    let live = false;
    for (;;) {
      if (ctx.signal.aborted) return;
      if (feed.ending) throw resumable(Code.Unavailable, "the server is shutting down", cursor);
      const latest = currentCaller(caller.id);
      if (latest === undefined) throw resumable(Code.Unauthenticated, "the caller's credentials were revoked", cursor);
      if (!latest.policy.rpcs.has("StreamAudit")) throw resumable(Code.PermissionDenied, `caller "${latest.name}" may no longer call StreamAudit`, cursor);
      now = latest;
      const upTo = end ?? feed.head();
      if (cursor >= upTo) {
        if (end !== undefined) return;
        if (query.until !== undefined && Date.now() > query.until.getTime()) return;
        live = true;
        // Wake at least every policyCheckMs to look at the caller again.
        const untilMs = query.until === undefined ? Infinity : Math.max(0, query.until.getTime() - Date.now()) + 1;
        await feed.waitBeyond(cursor, ctx.signal, Math.min(untilMs, policyCheckMs));
        continue;
      }
      if (live && upTo - cursor > BigInt(maxLag)) {
        throw resumable(Code.ResourceExhausted, `this stream fell more than ${maxLag} events behind the log`, cursor);
      }
      // The ring only knows what the feed has seen: a replay's end read from the
      // table may be past it (another replica's events not yet notified).
      let events = upTo <= feed.head() ? feed.after(cursor, pageSize) : undefined;
      let scannedTo: bigint;
      if (events !== undefined) {
        // The ring is contiguous from cursor + 1; a replay without follow stops at its end.
        events = events.filter((e) => e.id <= upTo);
        scannedTo = events.length === 0 ? upTo : events[events.length - 1]!.id;
      } else {
        events = await selectAuditEvents(deps.pool, cursor, upTo, query, pageSize);
        scannedTo = events.length === pageSize ? events[events.length - 1]!.id : upTo;
      }
      const shown = events.filter(visible);
      for (let i = 0; i < shown.length; i += batchSize) {
        const batch = shown.slice(i, i + batchSize);
        yield response(batch, batchSize > 1, binary);
        cursor = batch[batch.length - 1]!.id;
        if (ctx.signal.aborted) return;
      }
      cursor = scannedTo;
    }
  } finally {
    unregister();
  }
}

/** An error that ends the stream early, with the cursor to resume after. */
function resumable(code: Code, why: string, cursor: bigint): ConnectError {
  return new ConnectError(
    `${why}; resume with after_cursor ${cursor}`,
    code,
    { [resumeAfterHeader]: cursor.toString() },
    [{ desc: AuditResumeInfoSchema, value: create(AuditResumeInfoSchema, { resumeAfterCursor: cursor }) }],
  );
}

function validateFilter(req: StreamAuditRequest): AuditQuery {
  const f = req.filter;
  const unknown = f?.actions.find((a) => !(auditActions as readonly string[]).includes(a));
  if (unknown !== undefined) throw invalidField("filter.actions", `must be among ${auditActions.join(", ")}`);
  const since = f?.since === undefined ? undefined : timestampDate(f.since);
  const until = f?.until === undefined ? undefined : timestampDate(f.until);
  if (since !== undefined && until !== undefined && since >= until) throw invalidField("filter.until", "must be after filter.since");
  if (f?.caller && !callerNamePattern.test(f.caller)) throw invalidField("filter.caller", "must be a caller name (1..64 of a-z 0-9 . _ -)");
  return {
    userId: f?.userId ? validateUserId(f.userId, "filter.user_id") : undefined,
    integration: f?.integration ? validateIntegration(f.integration, "filter.integration") : undefined,
    caller: f?.caller || undefined,
    actions: f?.actions.length ? f.actions : undefined,
    since,
    until,
  };
}

/** The filter, applied in memory to events from the ring (the table applies it in SQL). */
function matches(e: AuditEvent, q: AuditQuery): boolean {
  return (
    (q.userId === undefined || e.userId === q.userId) &&
    (q.integration === undefined || e.integration === q.integration) &&
    (q.caller === undefined || e.caller === q.caller) &&
    (q.actions === undefined || q.actions.includes(e.action)) &&
    (q.since === undefined || e.occurredAt >= q.since) &&
    (q.until === undefined || e.occurredAt < q.until)
  );
}

/**
 * A caller limited to some integrations or users sees only their events;
 * events about no integration (ClearUser, key rotation, failed logins) need '*'.
 */
function maySee(caller: Caller, e: AuditEvent): boolean {
  const { policy } = caller;
  if (policy.integrations !== "*" && (e.integration === null || !allowsIntegration(policy, e.integration))) return false;
  if (policy.users !== undefined && (e.userId === null || !allowsUser(policy, e.userId))) return false;
  return true;
}

/**
 * Each event's AuditEvent encoding, made once and shared by every follower the
 * event goes to (events from the feed's ring are the same objects for all):
 * with 100 followers, encoding each event per stream cost more than the Gets.
 */
const encodedEvents = new WeakMap<AuditEvent, Uint8Array>();

/** The most events a client may ask for in one response. */
const maxBatchLimit = 1000;

/**
 * The response carrying `events`: in `event` (one) or `events` (a batch).
 * For binary codecs the events go as their shared encodings, raw
 * length-delimited fields that serialisation copies as they are (field 1 or
 * 2); JSON serialisation drops raw fields, so JSON streams get messages.
 */
function response(events: AuditEvent[], batched: boolean, binary: boolean): StreamAuditResponse {
  if (!binary) {
    return batched
      ? create(StreamAuditResponseSchema, { events: events.map(toMessage) })
      : create(StreamAuditResponseSchema, { event: toMessage(events[0]!) });
  }
  const message = create(StreamAuditResponseSchema);
  message.$unknown = events.map((e) => ({ no: batched ? 2 : 1, wireType: WireType.LengthDelimited, data: encoded(e) }));
  return message;
}

/** The event's AuditEvent encoding with its length prefix, made once per event object. */
function encoded(e: AuditEvent): Uint8Array {
  let field = encodedEvents.get(e);
  if (field === undefined) {
    field = new BinaryWriter().bytes(toBinary(AuditEventSchema, toMessage(e))).finish();
    encodedEvents.set(e, field);
  }
  return field;
}

function toMessage(e: AuditEvent) {
  return create(AuditEventSchema, {
    cursor: e.id,
    occurredAt: timestampFromDate(e.occurredAt),
    caller: e.caller ?? "",
    action: e.action,
    userId: e.userId ?? "",
    integration: e.integration ?? "",
    outcome: e.outcome,
    requestId: e.requestId ?? "",
    peer: e.peer ?? "",
    details: e.details as JsonObject,
    prevHash: e.prevHash,
    hash: e.hash,
  });
}
