/**
 * The errors a caller sees. Handlers throw ConnectErrors built here; the
 * request interceptor turns anything else into one, so no pg message, stack,
 * key or token reaches a caller, and logs the cause once.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { create } from "@bufbuild/protobuf";
import { ErrorDetailSchema, ErrorReason } from "../gen/tokenvault/v1/tokenvault_pb.js";
import { IntegrityError } from "../crypto/key-ring.js";
import { connectCodeForDatabaseError } from "../db/errors.js";

function detail(reason: ErrorReason, field = "") {
  return { desc: ErrorDetailSchema, value: create(ErrorDetailSchema, { reason, field }) };
}

/** INVALID_ARGUMENT naming the field and what is wrong with it. */
export function invalidField(field: string, message: string): ConnectError {
  return new ConnectError(`${field} ${message}`, Code.InvalidArgument, undefined, [
    detail(ErrorReason.INVALID_FIELD, field),
  ]);
}

/** NOT_FOUND for a connection that does not exist. */
export function connectionNotFound(): ConnectError {
  return new ConnectError("no connection for this user_id and integration", Code.NotFound, undefined, [
    detail(ErrorReason.CONNECTION_NOT_FOUND),
  ]);
}

/** DATA_LOSS for a ciphertext that failed authentication. */
export function integrityFailure(): ConnectError {
  return new ConnectError(
    "a stored token failed its integrity check (altered, moved, or sealed under a different key); it was not returned",
    Code.DataLoss,
    undefined,
    [detail(ErrorReason.INTEGRITY_FAILURE)],
  );
}

/**
 * The ConnectError a caller gets for `err`, and whether the cause is
 * unexpected (and so worth an error log line).
 */
export function toConnectError(err: unknown, requestId: string): { error: ConnectError; unexpected: boolean } {
  if (err instanceof ConnectError) return { error: err, unexpected: err.code === Code.Internal || err.code === Code.Unknown };
  if (err instanceof IntegrityError) return { error: integrityFailure(), unexpected: false };
  const dbCode = connectCodeForDatabaseError(err);
  if (dbCode !== undefined) {
    const message = dbCode === Code.Unavailable
      ? "the token store is unavailable; retry later"
      : dbCode === Code.Aborted
        ? "the operation conflicted with another; retry it"
        : "the token store did not answer in time; retry later";
    return {
      error: new ConnectError(message, dbCode, undefined, [detail(ErrorReason.STORAGE_UNAVAILABLE)]),
      unexpected: true,
    };
  }
  return {
    error: new ConnectError(`internal error (request id ${requestId})`, Code.Internal),
    unexpected: true,
  };
}
