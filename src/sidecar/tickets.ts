/**
 * Connect tickets: the short-lived signed JWT an application's backend (which
 * knows who the user is) hands the browser to start a connect flow at the
 * sidecar. The format is plain JWT (RFC 7519) so any backend can mint one:
 *
 *   header  {"alg":"HS256","typ":"JWT","kid":"<key id>"}
 *   claims  {"aud":"tokenvault-sidecar","sub":"<user id>","integration":"gmail",
 *            "return_url":"https://app.example.com/settings","iat":<now>,
 *            "exp":<now + at most 600>,"jti":"<random nonce, at least 16 bytes>"}
 *
 * signed with HMAC-SHA256 under one of the keys in TOKENVAULT_TICKET_KEYS
 * (`id:base64url` entries; the first signs, every one verifies, so keys rotate
 * without a gap). The same keys, through HKDF, seal the sidecar's state cookie.
 */
import { hkdfSync, randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { SignJWT, errors as joseErrors, jwtVerify, type JWTPayload } from "jose";
import type { SecretSource } from "../config.js";

/** The audience every ticket must name. */
export const ticketAudience = "tokenvault-sidecar";
/** The longest a ticket may live (exp − iat), in seconds. */
export const maxTicketLifetimeSeconds = 600;
/** Allowed clock difference between the minting backend and the sidecar, in seconds. */
const clockToleranceSeconds = 30;

/** One ticket key: an id (the JWT's kid) and at least 256 bits of secret. */
export interface TicketKey {
  readonly id: string;
  readonly secret: Uint8Array;
}

/** The ticket keys: the first signs, all verify. */
export interface TicketKeys {
  readonly signing: TicketKey;
  byId(id: string): TicketKey | undefined;
  readonly all: readonly TicketKey[];
}

/** A ticket key setting that cannot be used. */
export class TicketKeyError extends Error {
  override readonly name = "TicketKeyError";
}

/** Parses `id:base64url` entries separated by commas or newlines. */
export function parseTicketKeys(text: string, origin: string): TicketKeys {
  const keys: TicketKey[] = [];
  for (const entry of text.split(/[,\n]/).map((e) => e.trim()).filter((e) => e !== "" && !e.startsWith("#"))) {
    const match = /^([A-Za-z0-9_.-]{1,64}):([A-Za-z0-9_-]+=*)$/.exec(entry);
    if (match === null) throw new TicketKeyError(`${origin}: each ticket key must be ID:BASE64URL (ID of letters, digits, _ . -)`);
    const secret = Buffer.from(match[2]!, "base64url");
    if (secret.length < 32) throw new TicketKeyError(`${origin}: ticket key "${match[1]}" must be at least 32 bytes`);
    if (keys.some((k) => k.id === match[1])) throw new TicketKeyError(`${origin}: ticket key id "${match[1]}" appears twice`);
    keys.push({ id: match[1]!, secret: new Uint8Array(secret) });
  }
  if (keys.length === 0) throw new TicketKeyError(`${origin}: no ticket key given`);
  const map = new Map(keys.map((k) => [k.id, k]));
  return { signing: keys[0]!, byId: (id) => map.get(id), all: keys };
}

/** Loads the ticket keys, creating the development key file (on first use) when that is the source and it is missing. */
export function loadTicketKeys(source: SecretSource): TicketKeys {
  switch (source.kind) {
    case "env":
      return parseTicketKeys(source.value, "TOKENVAULT_TICKET_KEYS");
    case "file":
      return parseTicketKeys(readKeyFile(source.path), source.path);
    case "development":
      if (!existsSync(source.path)) {
        mkdirSync(path.dirname(source.path), { recursive: true, mode: 0o700 });
        try {
          writeFileSync(source.path, `dev:${randomBytes(32).toString("base64url")}\n`, { mode: 0o600, flag: "wx" });
        } catch (err) {
          // Another process made it first: use theirs.
          if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
        }
      }
      return parseTicketKeys(readKeyFile(source.path), source.path);
  }
}

function readKeyFile(file: string): string {
  try {
    return readFileSync(file, "utf8");
  } catch (err) {
    throw new TicketKeyError(`cannot read ticket keys from ${file}: ${(err as Error).message}`);
  }
}

/** Makes a new ticket key entry (`id:base64url`) for TOKENVAULT_TICKET_KEYS. */
export function generateTicketKey(id: string): string {
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(id)) throw new TicketKeyError("a ticket key id is 1 to 64 letters, digits, _ . or -");
  return `${id}:${randomBytes(32).toString("base64url")}`;
}

/** What a ticket says. */
export interface ConnectTicket {
  userId: string;
  integration: string;
  returnUrl: string;
  /** Seconds since the epoch. */
  expiresAt: number;
  /** The ticket's nonce (jti): a ticket is good for one connect. */
  nonce: string;
}

/** What {@link mintConnectTicket} needs. */
export interface MintTicketOptions {
  userId: string;
  integration: string;
  returnUrl: string;
  /** Lifetime in seconds, 1 to 600; default 300. */
  ttlSeconds?: number;
  /** The clock (tests). */
  now?: Date;
}

/**
 * Mints a connect ticket for the sidecar: an HS256 JWT under the signing
 * key. This is the whole of what a TypeScript backend needs; backends in other
 * languages follow the format in this module's header.
 */
export async function mintConnectTicket(keys: TicketKeys, options: MintTicketOptions): Promise<string> {
  const ttl = options.ttlSeconds ?? 300;
  if (!Number.isInteger(ttl) || ttl < 1 || ttl > maxTicketLifetimeSeconds) {
    throw new RangeError(`a ticket lives 1 to ${maxTicketLifetimeSeconds} seconds`);
  }
  if (options.userId === "") throw new RangeError("a ticket needs a user id");
  if (options.integration === "") throw new RangeError("a ticket needs an integration");
  const iat = Math.floor((options.now ?? new Date()).getTime() / 1000);
  return new SignJWT({ integration: options.integration, return_url: options.returnUrl })
    .setProtectedHeader({ alg: "HS256", typ: "JWT", kid: keys.signing.id })
    .setAudience(ticketAudience)
    .setSubject(options.userId)
    .setIssuedAt(iat)
    .setExpirationTime(iat + ttl)
    .setJti(randomBytes(16).toString("base64url"))
    .sign(keys.signing.secret);
}

/** Why a ticket was refused; the message is safe to show (it never repeats the ticket). */
export class TicketError extends Error {
  override readonly name = "TicketError";
}

/** Checks a ticket's signature, audience, lifetime and claims. */
export async function verifyConnectTicket(keys: TicketKeys, ticket: string, now: Date = new Date()): Promise<ConnectTicket> {
  let payload: JWTPayload;
  try {
    ({ payload } = await jwtVerify(
      ticket,
      (header) => {
        const key = header.kid === undefined ? undefined : keys.byId(header.kid);
        if (key === undefined) throw new TicketError("the ticket is signed with an unknown key");
        return key.secret;
      },
      {
        algorithms: ["HS256"],
        audience: ticketAudience,
        requiredClaims: ["sub", "exp", "iat", "jti"],
        clockTolerance: clockToleranceSeconds,
        currentDate: now,
      },
    ));
  } catch (err) {
    if (err instanceof TicketError) throw err;
    if (err instanceof joseErrors.JWTExpired) throw new TicketError("the ticket has expired");
    if (err instanceof joseErrors.JWSSignatureVerificationFailed) throw new TicketError("the ticket's signature does not verify");
    if (err instanceof joseErrors.JWTClaimValidationFailed) throw new TicketError(`the ticket's "${err.claim}" claim is not valid`);
    throw new TicketError("the ticket is not a valid signed JWT");
  }
  const { sub, exp, iat, jti } = payload;
  // jose checks that these are present, not their types.
  if (typeof sub !== "string" || sub === "") throw new TicketError('the ticket\'s "sub" claim must be a non-empty string');
  if (typeof jti !== "string") throw new TicketError('the ticket\'s "jti" claim must be a string');
  if (typeof exp !== "number" || typeof iat !== "number") throw new TicketError('the ticket\'s "iat" and "exp" claims must be numbers');
  if (exp - iat > maxTicketLifetimeSeconds) throw new TicketError(`the ticket lives longer than ${maxTicketLifetimeSeconds} seconds`);
  if (iat > now.getTime() / 1000 + clockToleranceSeconds) throw new TicketError("the ticket is issued in the future");
  // 16 random bytes are 22 base64url characters.
  if (jti.length < 22) throw new TicketError("the ticket's nonce (jti) is shorter than 16 random bytes (22 base64url characters)");
  const integration = payload.integration;
  const returnUrl = payload.return_url;
  if (typeof integration !== "string" || integration === "") throw new TicketError('the ticket has no "integration" claim');
  if (typeof returnUrl !== "string" || returnUrl === "") throw new TicketError('the ticket has no "return_url" claim');
  return { userId: sub, integration, returnUrl, expiresAt: exp, nonce: jti };
}

/** A 256-bit key for sealing state cookies, derived from a ticket key (so replicas share it). */
export function cookieKeyFor(key: TicketKey): Uint8Array {
  return new Uint8Array(hkdfSync("sha256", key.secret, new Uint8Array(0), "tokenvault sidecar state cookie v1", 32));
}
