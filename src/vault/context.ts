/**
 * Per-call values that handlers and interceptors share through Connect's
 * context values: the request id and a logger bound to it, and the peer.
 */
import { createContextKey } from "@connectrpc/connect";
import type { Logger } from "../log.js";

/** What every call knows about itself. */
export interface CallContext {
  /** From the caller's x-request-id header when valid, else generated. */
  requestId: string;
  /** The service logger with this call's request id and method bound. */
  logger: Logger;
}

/** Set by the request interceptor before any handler runs. */
export const callContextKey = createContextKey<CallContext | undefined>(undefined, { description: "tokenvault call context" });

/** The remote address of the HTTP connection, set from the Node request. */
export const peerAddressKey = createContextKey<string>("", { description: "peer address" });
