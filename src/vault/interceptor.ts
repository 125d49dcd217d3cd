/**
 * The request interceptor, outermost on every call: assigns the request id
 * (the caller's x-request-id when valid), binds a logger to it, turns any
 * non-Connect failure into a safe ConnectError, and logs one line per call
 * with method, code and duration (never a message body).
 */
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { randomUUID } from "node:crypto";
import type { Logger } from "../log.js";
import { callerKey } from "../auth/interceptor.js";
import { callContextKey, peerAddressKey } from "./context.js";
import { toConnectError } from "./errors.js";

const requestIdHeader = "x-request-id";
const validRequestId = /^[A-Za-z0-9._:-]{1,128}$/;

/** Creates the interceptor; `logger` is the service logger. */
export function requestInterceptor(logger: Logger): Interceptor {
  // The per-call line has fixed, flat fields, none named like a secret, so
  // redaction could never change it; it was most of the line's cost.
  const callLines = logger.child({}, { redact: [] });
  return (next) => async (req) => {
    const started = performance.now();
    const claimed = req.header.get(requestIdHeader);
    const requestId = claimed !== null && validRequestId.test(claimed) ? claimed : randomUUID();
    const method = `${req.service.typeName}/${req.method.name}`;
    // Handlers seldom log: their request-bound logger is made on first use.
    let bound: Logger | undefined;
    req.contextValues.set(callContextKey, {
      requestId,
      get logger() {
        return (bound ??= logger.child({ requestId, method }));
      },
    });
    const peer = req.contextValues.get(peerAddressKey);
    // Health probes and reflection are frequent and uninteresting.
    const level = req.service.typeName.startsWith("grpc.") ? "debug" : "info";
    const caller = () => req.contextValues.get(callerKey)?.name;
    try {
      const res = await next(req);
      res.header.set(requestIdHeader, requestId);
      callLines[level]({ requestId, method, code: "ok", ms: elapsed(started), peer, caller: caller() }, "call");
      return res;
    } catch (err) {
      const { error, unexpected } = toConnectError(err, requestId);
      error.metadata.set(requestIdHeader, requestId);
      if (unexpected) {
        // A cause is not a fixed field: this line keeps redaction.
        logger.error({ requestId, method, code: Code[error.code], ms: elapsed(started), peer, caller: caller(), cause: describe(err) }, "call failed");
      } else {
        callLines[level]({ requestId, method, code: Code[error.code], ms: elapsed(started), peer, caller: caller(), reason: error.rawMessage }, "call");
      }
      throw error;
    }
  };
}

function elapsed(started: number): number {
  return Math.round((performance.now() - started) * 100) / 100;
}

/** What is logged of an unexpected failure: its kind and message, no request data. */
function describe(err: unknown): Record<string, unknown> {
  if (err instanceof ConnectError) return { name: "ConnectError", code: Code[err.code], message: err.rawMessage };
  if (err instanceof Error) {
    return { name: err.name, code: (err as { code?: unknown }).code, message: err.message, stack: err.stack };
  }
  return { name: typeof err };
}
