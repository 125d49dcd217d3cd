/**
 * The state of one connect flow, between /connect and /callback. It lives in
 * the browser as an encrypted cookie (JWE, dir + A256GCM, under a key derived
 * from the ticket keys), so any sidecar replica can finish a flow another
 * started and the sidecar keeps no session store. The cookie is named after
 * the flow's `state`, so flows in two tabs do not overwrite each other, and a
 * callback is accepted only with the cookie whose sealed state equals the
 * `state` parameter: that is what binds the authorization response to the
 * browser that started it (RFC 6749 §10.12).
 */
import { randomBytes, createHash } from "node:crypto";
import { EncryptJWT, jwtDecrypt } from "jose";
import { cookieKeyFor, type TicketKeys } from "./tickets.js";

/** A flow between /connect and /callback. */
export interface FlowState {
  /** The OAuth `state`: 256 random bits, base64url. */
  state: string;
  /** The PKCE code_verifier (RFC 7636), when the provider takes PKCE. */
  codeVerifier: string | undefined;
  userId: string;
  integration: string;
  returnUrl: string;
  /** Seconds since the epoch. */
  expiresAt: number;
}

/** How long a flow may take, from /connect to /callback (login and consent included). */
export const flowLifetimeSeconds = 600;

/** The cookie that carries `state`'s flow. */
export function flowCookieName(state: string): string {
  return `tv_flow_${state}`;
}

/** Whether `value` has the shape of a state this sidecar makes (so it can name a cookie). */
export function isWellFormedState(value: string): boolean {
  return /^[A-Za-z0-9_-]{43}$/.test(value);
}

/** A new flow's random state and PKCE verifier with its S256 challenge. */
export function newFlowSecrets(): { state: string; codeVerifier: string; codeChallenge: string } {
  const codeVerifier = randomBytes(32).toString("base64url");
  return {
    state: randomBytes(32).toString("base64url"),
    codeVerifier,
    codeChallenge: createHash("sha256").update(codeVerifier).digest("base64url"),
  };
}

/** Seals a flow into a cookie value. */
export async function sealFlow(keys: TicketKeys, flow: FlowState): Promise<string> {
  return new EncryptJWT({
    state: flow.state,
    cv: flow.codeVerifier,
    sub: flow.userId,
    integration: flow.integration,
    return_url: flow.returnUrl,
  })
    .setProtectedHeader({ alg: "dir", enc: "A256GCM", kid: keys.signing.id })
    .setExpirationTime(flow.expiresAt)
    .encrypt(cookieKeyFor(keys.signing));
}

/** Opens a cookie value; undefined when it is forged, damaged, sealed under an unknown key or expired. */
export async function openFlow(keys: TicketKeys, value: string, now: Date = new Date()): Promise<FlowState | undefined> {
  try {
    const { payload } = await jwtDecrypt(
      value,
      (header) => {
        const key = header.kid === undefined ? undefined : keys.byId(header.kid);
        if (key === undefined) throw new Error("unknown key");
        return cookieKeyFor(key);
      },
      { keyManagementAlgorithms: ["dir"], contentEncryptionAlgorithms: ["A256GCM"], requiredClaims: ["exp"], currentDate: now },
    );
    const { state, cv, sub, integration, return_url: returnUrl, exp } = payload;
    if (typeof state !== "string" || typeof sub !== "string" || typeof integration !== "string" || typeof returnUrl !== "string" || typeof exp !== "number") return undefined;
    if (cv !== undefined && typeof cv !== "string") return undefined;
    return { state, codeVerifier: cv, userId: sub, integration, returnUrl, expiresAt: exp };
  } catch {
    return undefined;
  }
}

/**
 * Remembers single-use values (ticket nonces, flow states) until they expire,
 * so a second use is refused. In memory: each sidecar process refuses reuse
 * of what it has seen (see README for replicas).
 */
export class ReplayGuard {
  readonly #seen = new Map<string, number>();
  readonly #capacity: number;

  constructor(capacity = 1_000_000) {
    this.#capacity = capacity;
  }

  /**
   * Records `id` as used until `expiresAtMs`. Returns "fresh" the first time,
   * "reused" after, and "full" when the guard cannot remember more (the flow
   * must then be refused: forgetting would let a replay through).
   */
  claim(id: string, expiresAtMs: number, nowMs: number = Date.now()): "fresh" | "reused" | "full" {
    if (this.#seen.has(id)) return "reused";
    if (this.#seen.size >= this.#capacity) this.prune(nowMs);
    if (this.#seen.size >= this.#capacity) return "full";
    this.#seen.set(id, expiresAtMs);
    return "fresh";
  }

  /** How many values are remembered. */
  get size(): number {
    return this.#seen.size;
  }

  /** Forgets expired values; called by the sidecar's timer and when full. */
  prune(nowMs: number = Date.now()): void {
    for (const [id, expiresAt] of this.#seen) if (expiresAt <= nowMs) this.#seen.delete(id);
  }
}
