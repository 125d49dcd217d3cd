/**
 * Request validation at the edge. Every rule is documented in the .proto and
 * the README; a violation is INVALID_ARGUMENT naming the field, raised before
 * anything is read or written.
 */
import { isIP } from "node:net";
import type { Duration, Timestamp } from "@bufbuild/protobuf/wkt";
import type { TokenSet, ConsentMetadata } from "../gen/tokenvault/v1/tokenvault_pb.js";
import { RefreshMode } from "../gen/tokenvault/v1/tokenvault_pb.js";
import { invalidField } from "./errors.js";

/** Limits of the contract, in one place. */
export const limits = {
  userIdChars: 256,
  integrationPattern: /^[a-z0-9][a-z0-9._-]{0,63}$/,
  /** Bytes of UTF-8, for each of access, refresh and id token. */
  tokenBytes: 16 * 1024,
  extrasJsonBytes: 16 * 1024,
  tokenTypeChars: 64,
  scopes: 256,
  scopeChars: 512,
  /** All scopes together, so a Get response stays far below the message limit. */
  scopesTotalChars: 8 * 1024,
  userAgentChars: 512,
  maxExpiresInSeconds: 10 * 365 * 24 * 3600,
  maxMinValidForSeconds: 24 * 3600,
  defaultMinValidForSeconds: 5 * 60,
} as const;

// C0 and C1 control characters: never meaningful in an id, risky in logs.
const controlChars = /[\u0000-\u001f\u007f-\u009f]/;

/** Checks a user id: 1..256 characters, no control characters, well-formed Unicode. */
export function validateUserId(value: string, field = "user_id"): string {
  const chars = [...value].length;
  if (chars === 0 || chars > limits.userIdChars) throw invalidField(field, `must be 1..${limits.userIdChars} characters`);
  if (controlChars.test(value) || !value.isWellFormed()) throw invalidField(field, "must not contain control characters or unpaired surrogates");
  return value;
}

/** Checks an integration name: lowercase ASCII letters, digits, '.', '_', '-', 1..64 chars. */
export function validateIntegration(value: string, field = "integration"): string {
  if (!limits.integrationPattern.test(value)) {
    throw invalidField(field, "must be 1..64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit");
  }
  return value;
}

function validateTokenText(value: string, field: string): string {
  const bytes = Buffer.byteLength(value, "utf8");
  if (bytes === 0 || bytes > limits.tokenBytes) throw invalidField(field, `must be 1..${limits.tokenBytes} bytes`);
  if (controlChars.test(value) || !value.isWellFormed()) throw invalidField(field, "must not contain control characters");
  return value;
}

/** A validated TokenSet, normalised for storage. */
export interface ValidTokenSet {
  accessToken: string;
  refreshToken: string | undefined;
  idToken: string | undefined;
  tokenType: string;
  scopes: string[];
  expiresAt: Date | null;
  /** When the refresh token dies, when the provider said. */
  refreshTokenExpiresAt: Date | null;
  /** Provider extras as JSON text, or undefined when there are none. */
  extrasJson: string | undefined;
}

/** Validates and normalises a Store's token set. `now` anchors expires_in. */
export function validateTokenSet(tokenSet: TokenSet | undefined, now: Date): ValidTokenSet {
  if (tokenSet === undefined) throw invalidField("token_set", "is required");
  const accessToken = validateTokenText(tokenSet.accessToken, "token_set.access_token");
  const refreshToken = tokenSet.refreshToken === undefined ? undefined : validateTokenText(tokenSet.refreshToken, "token_set.refresh_token");
  const idToken = tokenSet.idToken === undefined ? undefined : validateTokenText(tokenSet.idToken, "token_set.id_token");

  const tokenType = tokenSet.tokenType === "" ? "Bearer" : tokenSet.tokenType;
  if (tokenType.length > limits.tokenTypeChars || !/^[A-Za-z0-9_.-]+$/.test(tokenType)) {
    throw invalidField("token_set.token_type", `must be 1..${limits.tokenTypeChars} characters of letters, digits, '_', '.' or '-'`);
  }

  if (tokenSet.scopes.length > limits.scopes) throw invalidField("token_set.scopes", `must have at most ${limits.scopes} entries`);
  for (const scope of tokenSet.scopes) {
    if (scope.length === 0 || scope.length > limits.scopeChars || /\s/.test(scope) || controlChars.test(scope)) {
      throw invalidField("token_set.scopes", `entries must be 1..${limits.scopeChars} characters without whitespace`);
    }
  }
  const scopes = [...new Set(tokenSet.scopes)];
  if (scopes.reduce((n, s) => n + s.length, 0) > limits.scopesTotalChars) {
    throw invalidField("token_set.scopes", `must be at most ${limits.scopesTotalChars} characters in all`);
  }

  let expiresAt: Date | null = null;
  if (tokenSet.expiry.case === "expiresAt") {
    expiresAt = timestampToDate(tokenSet.expiry.value, "token_set.expires_at");
  } else if (tokenSet.expiry.case === "expiresIn") {
    expiresAt = new Date(now.getTime() + Math.round(lifetimeSeconds(tokenSet.expiry.value, "token_set.expires_in") * 1000));
  }

  let refreshTokenExpiresAt: Date | null = null;
  if (tokenSet.refreshTokenExpiresIn !== undefined) {
    if (refreshToken === undefined) throw invalidField("token_set.refresh_token_expires_in", "needs token_set.refresh_token");
    refreshTokenExpiresAt = new Date(now.getTime() + Math.round(lifetimeSeconds(tokenSet.refreshTokenExpiresIn, "token_set.refresh_token_expires_in") * 1000));
  }

  let extrasJson: string | undefined;
  // protobuf-es hands google.protobuf.Struct over as a plain JSON object.
  if (tokenSet.extras !== undefined && Object.keys(tokenSet.extras).length > 0) {
    extrasJson = JSON.stringify(tokenSet.extras);
    if (Buffer.byteLength(extrasJson, "utf8") > limits.extrasJsonBytes) {
      throw invalidField("token_set.extras", `must be at most ${limits.extrasJsonBytes} bytes as JSON`);
    }
  }
  return { accessToken, refreshToken, idToken, tokenType, scopes, expiresAt, refreshTokenExpiresAt, extrasJson };
}

/** A token lifetime in seconds: positive and at most 10 years. */
function lifetimeSeconds(value: Duration, field: string): number {
  const seconds = durationSeconds(value, field);
  // Compare whole seconds and nanos: floating point would let 10 years + 1 ns through.
  const whole = Number(value.seconds);
  const tooLong = whole > limits.maxExpiresInSeconds || (whole === limits.maxExpiresInSeconds && value.nanos > 0);
  if (seconds <= 0 || tooLong) throw invalidField(field, "must be positive and at most 10 years");
  return seconds;
}

/** A validated consent metadata. */
export interface ValidConsent {
  ipAddress: string | null;
  userAgent: string | null;
}

/** Validates the consenting browser's IP address and user agent (both optional). */
export function validateConsent(metadata: ConsentMetadata | undefined): ValidConsent {
  const ip = metadata?.ipAddress ?? "";
  const userAgent = metadata?.userAgent ?? "";
  if (ip !== "" && isIP(ip) === 0) throw invalidField("metadata.ip_address", "must be an IPv4 or IPv6 address");
  if (userAgent.length > limits.userAgentChars || controlChars.test(userAgent) || !userAgent.isWellFormed()) {
    throw invalidField("metadata.user_agent", `must be at most ${limits.userAgentChars} characters without control characters`);
  }
  return { ipAddress: ip === "" ? null : ip, userAgent: userAgent === "" ? null : userAgent };
}

/** Validates Get's min_valid_for (default 5 minutes), in seconds. */
export function validateMinValidFor(value: Duration | undefined): number {
  if (value === undefined) return limits.defaultMinValidForSeconds;
  const seconds = durationSeconds(value, "min_valid_for");
  if (seconds < 0 || seconds > limits.maxMinValidForSeconds) throw invalidField("min_valid_for", "must be between 0 and 24 hours");
  return seconds;
}

/** Validates Get's refresh mode: a value this server knows. */
export function validateRefreshMode(value: RefreshMode): RefreshMode {
  if (typeof RefreshMode[value] !== "string") {
    throw invalidField("refresh", "must be REFRESH_MODE_AUTO or REFRESH_MODE_NEVER");
  }
  return value === RefreshMode.UNSPECIFIED ? RefreshMode.AUTO : value;
}

function durationSeconds(value: Duration, field: string): number {
  const seconds = Number(value.seconds);
  if (!Number.isSafeInteger(seconds) || Math.abs(value.nanos) > 999_999_999 || (seconds > 0 && value.nanos < 0) || (seconds < 0 && value.nanos > 0)) {
    throw invalidField(field, "is not a valid duration");
  }
  return seconds + value.nanos / 1e9;
}

function timestampToDate(value: Timestamp, field: string): Date {
  const seconds = Number(value.seconds);
  // The protobuf Timestamp range: 0001-01-01 to 9999-12-31.
  if (!Number.isSafeInteger(seconds) || seconds < -62135596800 || seconds > 253402300799 || value.nanos < 0 || value.nanos > 999_999_999) {
    throw invalidField(field, "is not a valid timestamp");
  }
  return new Date(seconds * 1000 + Math.floor(value.nanos / 1e6));
}
