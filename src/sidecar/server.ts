/**
 * The OAuth sidecar's HTTP server: the browser half of connecting an account.
 *
 *   GET /connect/:integration?ticket=T   verify the app's ticket, start a flow
 *                                        (state cookie + PKCE), 302 to the provider
 *   GET /callback/:integration?code&state
 *                                        finish the flow: check state against the
 *                                        cookie, exchange the code, Store through the
 *                                        vault, 303 back to the app's return URL
 *   GET /healthz                         the process is up
 *   GET /readyz                          the vault answers
 *
 * Refusals that cannot safely go back to the app (a bad ticket, a bad or
 * replayed state, a return URL off the allow-list) get a 400 page; once a flow
 * is proven, outcomes go back to the return URL as status=connected, denied or
 * error with a reason. No token, code, ticket or state is ever logged, put in
 * a URL the sidecar makes (besides the provider's own authorization request) or
 * shown in a page.
 */
import http from "node:http";
import https from "node:https";
import { isIP } from "node:net";
import type { Logger } from "../log.js";
import type { Catalogue, ResolvedIntegration } from "../providers/catalogue.js";
import { exchangeCode, type ProviderTokens } from "../providers/token-client.js";
import { ConnectError, Code } from "@connectrpc/connect";
import { flowCookieName, flowLifetimeSeconds, isWellFormedState, newFlowSecrets, openFlow, ReplayGuard, sealFlow, type FlowState } from "./flow.js";
import type { ReturnUrlPolicy } from "./return-urls.js";
import { TicketError, verifyConnectTicket, type TicketKeys } from "./tickets.js";
import type { VaultClient } from "./vault-client.js";

/** What the sidecar needs. */
export interface SidecarOptions {
  /**
   * The sidecar's public origin, as browsers and providers reach it (redirect
   * URIs are built on it); undefined: http://localhost:<bound port>.
   */
  publicUrl: URL | undefined;
  /** Mark cookies Secure (always, unless the public URL is http on localhost). */
  secureCookies: boolean;
  returnUrls: ReturnUrlPolicy;
  /** How many reverse proxies in front add X-Forwarded-For (0: use the socket's address). */
  trustedProxies: number;
  providerTimeoutMs: number;
  vaultTimeoutMs: number;
  keys: TicketKeys;
  catalogue: Catalogue;
  vault: VaultClient;
  logger: Logger;
  /** TLS certificate and key (PEM contents); plain HTTP/1.1 without. */
  tls?: { cert: Buffer; key: Buffer } | undefined;
  /** The clock (tests). */
  now?: () => Date;
}

/** A running sidecar. */
export interface Sidecar {
  /** Listens; resolves with the bound port. */
  listen(port: number, host: string): Promise<number>;
  /** The public origin (known once listening when not configured). */
  readonly publicUrl: URL | undefined;
  /** Stops accepting, waits up to `graceMs` for requests in flight, then cuts them. */
  close(graceMs?: number): Promise<void>;
}

/** An answer that stops the handling of a request. */
class Refusal extends Error {
  constructor(
    readonly status: number,
    readonly title: string,
    readonly detail: string,
    /** For the log: a stable word for why. */
    readonly reason: string,
  ) {
    super(detail);
  }
}

/** What the log line of a request says about it, besides method, route and status. */
interface Outcome {
  reason?: string;
  integration?: string;
  userId?: string;
  outcome?: string;
}

/** Builds the sidecar (not yet listening). */
export function createSidecar(options: SidecarOptions): Sidecar {
  const now = options.now ?? (() => new Date());
  const usedTickets = new ReplayGuard();
  const usedStates = new ReplayGuard();
  const log = options.logger;
  let publicUrl = options.publicUrl;

  async function handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? "/", "http://sidecar.invalid");
    const note: Outcome = {};
    // The route without its query: the query holds tickets, codes and states.
    const route = url.pathname.length > 200 ? `${url.pathname.slice(0, 200)}...` : url.pathname;
    try {
      // Not even HEAD: a link checker's HEAD must not use up a ticket.
      if (req.method !== "GET") {
        res.setHeader("allow", "GET");
        throw new Refusal(405, "Method not allowed", "Only GET is served here.", "method_not_allowed");
      }
      const [, section, name, ...rest] = url.pathname.split("/");
      if (url.pathname === "/healthz") return text(res, 200, "ok\n");
      if (url.pathname === "/readyz") {
        const ready = await options.vault.ready(2_000);
        note.outcome = ready ? "ready" : "vault unreachable";
        return text(res, ready ? 200 : 503, ready ? "ready\n" : "the vault is not reachable\n");
      }
      if ((section === "connect" || section === "callback") && name !== undefined && name !== "" && rest.length === 0) {
        const integration = lookUp(decodeSegment(name));
        note.integration = integration.name;
        if (section === "connect") await connect(res, url, integration, note);
        else await callback(req, res, url, integration, note);
        return;
      }
      throw new Refusal(404, "Not found", "There is nothing here.", "not_found");
    } catch (err) {
      if (err instanceof Refusal) {
        note.reason = err.reason;
        page(res, err.status, err.title, err.detail);
      } else {
        note.reason = "internal";
        log.error({ err: { name: (err as Error).name, message: (err as Error).message } }, "sidecar request failed");
        page(res, 500, "Something went wrong", "The connection could not be made. Please try again.");
      }
    } finally {
      log.info({ method: req.method, route, status: res.statusCode, ...note }, "sidecar request");
    }
  }

  function lookUp(name: string): ResolvedIntegration {
    const integration = options.catalogue.integration(name);
    if (integration === undefined) throw new Refusal(404, "Unknown integration", "This integration does not exist.", "unknown_integration");
    return integration;
  }

  /** GET /connect/:integration?ticket=... */
  async function connect(res: http.ServerResponse, url: URL, integration: ResolvedIntegration, note: Outcome): Promise<void> {
    const raw = url.searchParams.get("ticket");
    if (raw === null || raw === "") throw new Refusal(400, "Invalid connect link", "The link has no ticket. Start again from the application.", "missing_ticket");
    let ticket;
    try {
      ticket = await verifyConnectTicket(options.keys, raw, now());
    } catch (err) {
      if (err instanceof TicketError) throw new Refusal(400, "Invalid connect link", `This link cannot be used: ${err.message}. Start again from the application.`, "invalid_ticket");
      throw err;
    }
    note.userId = ticket.userId;
    if (ticket.integration !== integration.name) {
      throw new Refusal(400, "Invalid connect link", "The ticket is for another integration. Start again from the application.", "ticket_integration_mismatch");
    }
    if (options.returnUrls.check(ticket.returnUrl) === undefined) {
      throw new Refusal(400, "Invalid connect link", "The ticket's return address is not one this service may send you to.", "return_url_not_allowed");
    }
    const provider = integration.provider;
    if (provider.clientId === undefined) {
      throw new Refusal(503, "Not available", `Connecting ${integration.name} is not configured on this service.`, "provider_not_configured");
    }
    // Single use: a ticket that leaked (history, logs, a shoulder) cannot start a second flow for that user.
    const claim = usedTickets.claim(`ticket:${ticket.nonce}`, ticket.expiresAt * 1000 + 60_000, now().getTime());
    if (claim === "reused") throw new Refusal(400, "Link already used", "This connect link has already been used. Start again from the application.", "ticket_reused");
    if (claim === "full") throw new Refusal(503, "Busy", "Too many connections are in progress. Please try again shortly.", "replay_guard_full");

    const secrets = newFlowSecrets();
    const flow: FlowState = {
      state: secrets.state,
      codeVerifier: provider.pkce ? secrets.codeVerifier : undefined,
      userId: ticket.userId,
      integration: integration.name,
      returnUrl: ticket.returnUrl,
      expiresAt: Math.floor(now().getTime() / 1000) + flowLifetimeSeconds,
    };
    const cookie = await sealFlow(options.keys, flow);
    res.setHeader("set-cookie", cookieHeader(flowCookieName(flow.state), cookie, integration.name, flowLifetimeSeconds));

    const target = new URL(provider.authorizationUrl);
    const params = target.searchParams;
    for (const [key, value] of Object.entries(provider.authorizationParams)) params.set(key, value);
    params.set("response_type", "code");
    params.set("client_id", provider.clientId);
    params.set("redirect_uri", redirectUri(integration.name));
    const scopes = [...new Set([...integration.scopes, ...provider.requiredScopes])];
    if (scopes.length > 0) params.set("scope", scopes.join(provider.scopeSeparator));
    params.set("state", flow.state);
    if (provider.pkce) {
      params.set("code_challenge", secrets.codeChallenge);
      params.set("code_challenge_method", "S256");
    }
    note.outcome = "redirected to provider";
    redirect(res, 302, target);
  }

  /** GET /callback/:integration?code=...&state=... (or error=...) */
  async function callback(req: http.IncomingMessage, res: http.ServerResponse, url: URL, integration: ResolvedIntegration, note: Outcome): Promise<void> {
    const state = url.searchParams.get("state") ?? "";
    const startAgain = "Start again from the application.";
    if (!isWellFormedState(state)) throw new Refusal(400, "Invalid sign-in response", `The response has no valid state. Nothing was connected. ${startAgain}`, "invalid_state");
    const cookieName = flowCookieName(state);
    const sealed = readCookie(req, cookieName);
    if (sealed === undefined) {
      throw new Refusal(400, "Invalid sign-in response", `This browser has no connect in progress for this response: it expired, was finished already, or was started elsewhere. Nothing was connected. ${startAgain}`, "no_flow_cookie");
    }
    // From here on the flow is over, whatever happens: the cookie goes.
    res.setHeader("set-cookie", cookieHeader(cookieName, "", integration.name, 0));
    const flow = await openFlow(options.keys, sealed, now());
    if (flow === undefined || flow.state !== state) {
      throw new Refusal(400, "Invalid sign-in response", `The connect in progress is expired or not valid. Nothing was connected. ${startAgain}`, "invalid_flow_cookie");
    }
    note.userId = flow.userId;
    if (flow.integration !== integration.name) {
      throw new Refusal(400, "Invalid sign-in response", `The response does not belong to this integration. Nothing was connected. ${startAgain}`, "flow_integration_mismatch");
    }
    const claim = usedStates.claim(`state:${state}`, flow.expiresAt * 1000 + 60_000, now().getTime());
    if (claim === "reused") throw new Refusal(400, "Invalid sign-in response", `This response was used already. Nothing more was connected. ${startAgain}`, "state_reused");
    if (claim === "full") throw new Refusal(503, "Busy", "Too many connections are in progress. Please try again shortly.", "replay_guard_full");
    const returnUrl = options.returnUrls.check(flow.returnUrl);
    if (returnUrl === undefined) {
      throw new Refusal(400, "Cannot return", "The return address is no longer one this service may send you to. Nothing was connected.", "return_url_not_allowed");
    }
    const back = (status: "connected" | "denied" | "error", reason?: string) => {
      note.outcome = status;
      if (reason !== undefined) note.reason = reason;
      const target = new URL(returnUrl);
      target.searchParams.set("status", status);
      target.searchParams.set("integration", integration.name);
      if (reason !== undefined) target.searchParams.set("reason", reason);
      // 303: the browser follows with a GET whatever came before.
      redirect(res, 303, target);
    };

    const error = url.searchParams.get("error");
    if (error !== null) {
      // Only the provider's error code goes on: error_description is free text from outside.
      const code = /^[A-Za-z0-9_.-]{1,64}$/.test(error) ? error : "provider_error";
      return back(code === "access_denied" ? "denied" : "error", code);
    }
    const code = url.searchParams.get("code");
    if (code === null || code === "") return back("error", "missing_code");

    const exchanged = await exchangeCode(
      integration.provider,
      { code, redirectUri: redirectUri(integration.name), codeVerifier: flow.codeVerifier },
      AbortSignal.timeout(options.providerTimeoutMs),
    );
    if (exchanged.kind !== "ok") {
      const reason = exchanged.kind === "invalid_grant" ? "code_rejected" : exchanged.kind === "misconfigured" ? "provider_misconfigured" : "provider_unavailable";
      log.warn({ integration: integration.name, result: exchanged.kind, detail: exchanged.kind === "transient" ? exchanged.reason : exchanged.error }, "code exchange failed");
      return back("error", reason);
    }

    try {
      await options.vault.store(
        {
          userId: flow.userId,
          integration: integration.name,
          tokenSet: tokenSet(exchanged.tokens, integration),
          metadata: { ipAddress: clientAddress(req), userAgent: printableUserAgent(req.headers["user-agent"]) },
        },
        options.vaultTimeoutMs,
      );
    } catch (err) {
      const ce = ConnectError.from(err);
      const reason =
        ce.code === Code.InvalidArgument ? "token_rejected"
        : ce.code === Code.Unauthenticated || ce.code === Code.PermissionDenied ? "vault_refused"
        : "vault_unavailable";
      log.error({ integration: integration.name, code: Code[ce.code], message: ce.rawMessage }, "storing the token set in the vault failed");
      return back("error", reason);
    }
    back("connected");
  }

  function redirectUri(integration: string): string {
    return new URL(`/callback/${encodeURIComponent(integration)}`, publicUrl).href;
  }

  function cookieHeader(name: string, value: string, integration: string, maxAge: number): string {
    const parts = [`${name}=${value}`, `Path=/callback/${encodeURIComponent(integration)}`, `Max-Age=${maxAge}`, "HttpOnly", "SameSite=Lax"];
    if (options.secureCookies) parts.push("Secure");
    return parts.join("; ");
  }

  function clientAddress(req: http.IncomingMessage): string {
    const socketAddress = req.socket.remoteAddress ?? "";
    const chain = [
      ...String(req.headers["x-forwarded-for"] ?? "").split(",").map((s) => s.trim()).filter(Boolean),
      socketAddress,
    ];
    // Each trusted proxy appended the address it saw: step back that many from the socket.
    const candidate = options.trustedProxies === 0 ? socketAddress : chain[Math.max(0, chain.length - 1 - options.trustedProxies)] ?? "";
    const plain = candidate.startsWith("::ffff:") && isIP(candidate.slice(7)) === 4 ? candidate.slice(7) : candidate;
    return isIP(plain) === 0 ? "" : plain;
  }

  const listener: http.RequestListener = (req, res) => {
    void handle(req, res);
  };
  const server = options.tls === undefined ? http.createServer(listener) : https.createServer({ cert: options.tls.cert, key: options.tls.key }, listener);
  // Expired replay entries are forgotten once a minute.
  const pruneTimer = setInterval(() => {
    usedTickets.prune(now().getTime());
    usedStates.prune(now().getTime());
  }, 60_000);
  pruneTimer.unref();

  return {
    get publicUrl() {
      return publicUrl;
    },
    listen: (port, host) =>
      new Promise((resolve, reject) => {
        server.once("error", reject);
        server.listen(port, host, () => {
          server.off("error", reject);
          const bound = (server.address() as { port: number }).port;
          publicUrl ??= new URL(`http://localhost:${bound}`);
          resolve(bound);
        });
      }),
    close: async (graceMs = 5_000) => {
      clearInterval(pruneTimer);
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      server.closeIdleConnections();
      const timer = setTimeout(() => server.closeAllConnections(), graceMs);
      await closed;
      clearTimeout(timer);
    },
  };
}

/** The Store token set from a token response (RFC 6749 §5.1: no scope means the requested scopes). */
function tokenSet(tokens: ProviderTokens, integration: ResolvedIntegration) {
  const requested = [...new Set([...integration.scopes, ...integration.provider.requiredScopes])];
  return {
    accessToken: tokens.accessToken,
    refreshToken: tokens.refreshToken,
    tokenType: (tokens.tokenType ?? "").slice(0, 64),
    scopes: tokens.scopes ?? requested,
    expiry: tokens.expiresIn === undefined ? { case: undefined } : { case: "expiresIn" as const, value: { seconds: BigInt(tokens.expiresIn) } },
    idToken: tokens.idToken,
    refreshTokenExpiresIn: tokens.refreshToken === undefined || tokens.refreshTokenExpiresIn === undefined ? undefined : { seconds: BigInt(tokens.refreshTokenExpiresIn) },
    extras: tokens.extras as never,
  };
}

/**
 * The User-Agent as the vault accepts it (at most 512 characters, no control
 * characters): it is informational, so a tab or a stray byte must not fail the connect.
 */
function printableUserAgent(value: string | undefined): string {
  return (value ?? "").replace(/[\u0000-\u001f\u007f-\u009f]/g, " ").slice(0, 512);
}

function decodeSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    return segment;
  }
}

function readCookie(req: http.IncomingMessage, name: string): string | undefined {
  for (const part of (req.headers.cookie ?? "").split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim();
  }
  return undefined;
}

/** Headers every answer carries: nothing cached, nothing framed, no Referer (the URLs hold tickets and codes). */
function secure(res: http.ServerResponse): void {
  res.setHeader("cache-control", "no-store");
  res.setHeader("pragma", "no-cache");
  res.setHeader("referrer-policy", "no-referrer");
  res.setHeader("x-content-type-options", "nosniff");
  res.setHeader("x-frame-options", "DENY");
  res.setHeader("content-security-policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'");
}

function redirect(res: http.ServerResponse, status: 302 | 303, target: URL): void {
  secure(res);
  res.writeHead(status, { location: target.href, "content-length": "0" });
  res.end();
}

function text(res: http.ServerResponse, status: number, body: string): void {
  secure(res);
  res.writeHead(status, { "content-type": "text/plain; charset=utf-8", "content-length": Buffer.byteLength(body) });
  res.end(body);
}

function page(res: http.ServerResponse, status: number, title: string, detail: string): void {
  const escape = (s: string) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  const body = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${escape(title)}</title>
<style>body{font-family:system-ui,sans-serif;max-width:36em;margin:4em auto;padding:0 1em;color:#222}</style></head>
<body><h1>${escape(title)}</h1><p>${escape(detail)}</p></body></html>
`;
  secure(res);
  res.writeHead(status, { "content-type": "text/html; charset=utf-8", "content-length": Buffer.byteLength(body) });
  res.end(body);
}
