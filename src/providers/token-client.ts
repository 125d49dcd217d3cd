/**
 * Calls a provider's token endpoint (authorization_code grant with PKCE,
 * RFC 6749 §4.1.3 and RFC 7636; refresh_token grant, RFC 6749 §6) and
 * revocation endpoint (RFC 7009), and sorts every answer into the few kinds
 * the vault and the sidecar act on. Tokens never appear in what it returns besides the token
 * set itself: reasons are the provider's error codes and HTTP statuses.
 */
import type { ResolvedProvider } from "./catalogue.js";

/** A token endpoint's successful answer, normalised. */
export interface ProviderTokens {
  accessToken: string;
  /** A new refresh token, when the provider sent one (rotation). */
  refreshToken: string | undefined;
  tokenType: string | undefined;
  /** Seconds, when given. */
  expiresIn: number | undefined;
  /** Seconds until the refresh token dies, when given (Microsoft, some others). */
  refreshTokenExpiresIn: number | undefined;
  /** Granted scopes, when given. */
  scopes: string[] | undefined;
  idToken: string | undefined;
  /** The answer's other fields (Slack's "team", Salesforce's "instance_url" ...). */
  extras: Record<string, unknown>;
}

/** The token response fields {@link ProviderTokens} names; the rest are extras. */
const knownFields = new Set(["access_token", "refresh_token", "token_type", "expires_in", "refresh_token_expires_in", "scope", "id_token"]);

/** What a token request (refresh or code exchange) came to. */
export type TokenResult =
  | { kind: "ok"; tokens: ProviderTokens }
  /** The refresh token is dead (revoked, expired, reused): the user must consent again. */
  | { kind: "invalid_grant"; error: string }
  /** Our side is wrong (client id/secret, grant not allowed): retrying will not help. */
  | { kind: "misconfigured"; error: string }
  /** Worth retrying later: timeout, network, 5xx, 429, malformed answer. */
  | { kind: "transient"; reason: string; retryAfterMs: number | undefined };

/** The longest token lifetime believed (Store accepts the same). */
const maxLifetimeSeconds = 10 * 365 * 24 * 3600;

/** Error codes that mean the grant itself is dead, as providers spell it. */
const deadGrant = new Set(["invalid_grant", "bad_refresh_token", "invalid_refresh_token", "token_revoked", "expired_token"]);
/** Error codes that mean the client's configuration is wrong. */
const clientFault = new Set(["invalid_client", "unauthorized_client", "unsupported_grant_type", "invalid_scope", "invalid_request"]);

/** Client authentication for a token or revocation request. */
function authenticate(provider: ResolvedProvider, body: URLSearchParams, headers: Record<string, string>): void {
  const id = provider.clientId ?? "";
  const secret = provider.clientSecret ?? "";
  if (provider.tokenEndpointAuthMethod === "client_secret_basic") {
    // RFC 6749 §2.3.1: form-encode each part before joining.
    const enc = (s: string) => encodeURIComponent(s).replace(/%20/g, "+");
    headers.authorization = `Basic ${Buffer.from(`${enc(id)}:${enc(secret)}`).toString("base64")}`;
  } else {
    body.set("client_id", id);
    body.set("client_secret", secret);
  }
}

/** Exchanges a refresh token for new tokens. `signal` bounds the call (deadline and timeout). */
export async function refreshTokens(provider: ResolvedProvider, refreshToken: string, scopes: readonly string[], signal: AbortSignal): Promise<TokenResult> {
  const body = new URLSearchParams({ grant_type: "refresh_token", refresh_token: refreshToken });
  // The required scopes too: a provider's answer may leave offline_access out of the stored scopes.
  const scope = [...new Set([...scopes, ...provider.requiredScopes])];
  if (provider.refreshSendsScope && scope.length > 0) body.set("scope", scope.join(provider.scopeSeparator));
  return requestTokens(provider, body, signal);
}

/** What the browser brought back to the callback, for {@link exchangeCode}. */
export interface AuthorizationCodeGrant {
  code: string;
  /** The redirect_uri sent in the authorization request (RFC 6749 §4.1.3: must be repeated). */
  redirectUri: string;
  /** The PKCE code_verifier, when the authorization request carried a challenge. */
  codeVerifier: string | undefined;
}

/**
 * Exchanges an authorization code for tokens. The answer is sorted as a
 * refresh's is: "invalid_grant" here means the code was refused (expired,
 * used, or the verifier does not match).
 */
export async function exchangeCode(provider: ResolvedProvider, grant: AuthorizationCodeGrant, signal: AbortSignal): Promise<TokenResult> {
  const body = new URLSearchParams({ grant_type: "authorization_code", code: grant.code, redirect_uri: grant.redirectUri });
  if (grant.codeVerifier !== undefined) body.set("code_verifier", grant.codeVerifier);
  return requestTokens(provider, body, signal);
}

/** POSTs a token request with the client's authentication and sorts the answer. */
async function requestTokens(provider: ResolvedProvider, body: URLSearchParams, signal: AbortSignal): Promise<TokenResult> {
  const headers: Record<string, string> = { "content-type": "application/x-www-form-urlencoded", accept: "application/json" };
  authenticate(provider, body, headers);

  let response: Response;
  try {
    response = await fetch(provider.tokenUrl, { method: "POST", body, headers, signal, redirect: "error" });
  } catch (err) {
    const name = (err as Error).name;
    return { kind: "transient", reason: name === "TimeoutError" || name === "AbortError" ? "timeout" : "connection failed", retryAfterMs: undefined };
  }
  let json: Record<string, unknown> | undefined;
  try {
    const text = await response.text();
    const parsed: unknown = JSON.parse(text);
    json = typeof parsed === "object" && parsed !== null && !Array.isArray(parsed) ? (parsed as Record<string, unknown>) : undefined;
  } catch (err) {
    const name = (err as Error).name;
    if (name === "TimeoutError" || name === "AbortError") return { kind: "transient", reason: "timeout", retryAfterMs: undefined };
    json = undefined;
  }

  const error = typeof json?.error === "string" ? json.error : undefined;
  if (response.status === 429) return { kind: "transient", reason: "HTTP 429", retryAfterMs: retryAfter(response.headers.get("retry-after")) };
  if (response.status >= 500) return { kind: "transient", reason: `HTTP ${response.status}`, retryAfterMs: retryAfter(response.headers.get("retry-after")) };
  if (error !== undefined) {
    const code = error.slice(0, 64);
    if (deadGrant.has(error)) return { kind: "invalid_grant", error: code };
    if (clientFault.has(error)) return { kind: "misconfigured", error: code };
    return { kind: "transient", reason: `provider error ${JSON.stringify(code)} (HTTP ${response.status})`, retryAfterMs: undefined };
  }
  if (response.status !== 200) return { kind: "transient", reason: `HTTP ${response.status}`, retryAfterMs: undefined };
  const accessToken = json?.access_token;
  if (json === undefined || typeof accessToken !== "string" || accessToken === "") {
    return { kind: "transient", reason: "malformed response (no access_token)", retryAfterMs: undefined };
  }
  const seconds = (v: unknown) => {
    const n = typeof v === "string" && /^\d+$/.test(v) ? Number(v) : v;
    // Longer than ten years is nonsense (and past what a Date can hold): treat it as not given.
    return typeof n === "number" && Number.isFinite(n) && n > 0 && n <= maxLifetimeSeconds ? Math.floor(n) : undefined;
  };
  const refresh = json.refresh_token;
  const extras: Record<string, unknown> = {};
  for (const [field, value] of Object.entries(json)) if (!knownFields.has(field)) extras[field] = value;
  return {
    kind: "ok",
    tokens: {
      accessToken,
      refreshToken: typeof refresh === "string" && refresh !== "" ? refresh : undefined,
      tokenType: typeof json.token_type === "string" ? json.token_type : undefined,
      expiresIn: seconds(json.expires_in),
      refreshTokenExpiresIn: seconds(json.refresh_token_expires_in),
      scopes: typeof json.scope === "string" ? json.scope.split(/[ ,]+/).filter(Boolean) : undefined,
      idToken: typeof json.id_token === "string" ? json.id_token : undefined,
      extras,
    },
  };
}

/** What a revocation came to, per token. */
export type RevocationResult = "revoked" | "not_supported" | "failed";

/** Revokes a token at the provider (RFC 7009); never throws. */
export async function revokeToken(
  provider: ResolvedProvider,
  token: string,
  hint: "refresh_token" | "access_token",
  signal: AbortSignal,
): Promise<RevocationResult> {
  if (provider.revocationUrl === null) return "not_supported";
  const body = new URLSearchParams({ token, token_type_hint: hint });
  const headers: Record<string, string> = { "content-type": "application/x-www-form-urlencoded" };
  authenticate(provider, body, headers);
  try {
    const response = await fetch(provider.revocationUrl, { method: "POST", body, headers, signal, redirect: "error" });
    await response.arrayBuffer().catch(() => undefined);
    // RFC 7009 §2.2: 200 also for a token that was already invalid.
    return response.status === 200 ? "revoked" : "failed";
  } catch {
    return "failed";
  }
}

/** Retry-After in ms: delta-seconds or an HTTP date (RFC 9110 §10.2.3). */
function retryAfter(value: string | null): number | undefined {
  if (value === null) return undefined;
  const ms = /^\d+$/.test(value.trim()) ? Number(value.trim()) * 1000 : Date.parse(value) - Date.now();
  return Number.isFinite(ms) ? Math.max(0, ms) : undefined;
}
