/**
 * A small OAuth token and revocation endpoint of our own on listen(0), for
 * the faults a real authorization server cannot be made to produce on cue:
 * 5xx, 429 with Retry-After, malformed JSON, a 200 without access_token, a
 * hang longer than the vault's timeout, a connection reset.
 *
 * Every request is recorded (method, path, headers, parsed form body, when it
 * came and when its connection closed) and answered by the first scripted
 * reply of its queue that fits its path: requests whose path ends in "/revoke"
 * take the revoke queue, all others the token queue; a reply scripted with a
 * path answers only a request for that exact path (so parallel requests to
 * two providers get the answers meant for them). With nothing scripted, the
 * token side answers 500 with error "unscripted" (and counts it, so a test can
 * prove nothing unexpected called) and the revoke side answers 200.
 *
 * For the sidecar's code exchange (authorization_code grant) the same queue
 * answers: script a reply, then read the recorded form (code, code_verifier,
 * redirect_uri) with codeRequests() and the client's authentication with
 * {@link clientAuth}.
 */
import http from "node:http";
import type { AddressInfo, Socket } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";

/** How the endpoint answers one request. */
export type Reply =
  /** Any status, headers and JSON (or raw text) body. */
  | { kind: "json"; status: number; body: unknown; headers?: Record<string, string> }
  | { kind: "raw"; status: number; body: string; headers?: Record<string, string> }
  /** Never answers; the connection stays open until the client gives up (or the endpoint closes). */
  | { kind: "hang" }
  /** Reads the request, then destroys the socket without a response. */
  | { kind: "reset" }
  /** Waits `ms`, then answers with `then` (a slow provider). */
  | { kind: "delayed"; ms: number; then: Reply };

/** A queued reply, for any path or for one. */
interface Scripted {
  reply: Reply;
  path?: string;
}

/** A recorded request. */
export interface RecordedRequest {
  readonly method: string;
  /** The path and query, e.g. /contoso/oauth2/v2.0/token. */
  readonly path: string;
  readonly headers: http.IncomingHttpHeaders;
  /** The body as text. */
  readonly rawBody: string;
  /** The body parsed as application/x-www-form-urlencoded (last value wins). */
  readonly form: Record<string, string>;
  /** Every key of the form, in order, repeated keys included. */
  readonly formKeys: string[];
  /** Which queue answered it. */
  readonly queue: "token" | "revoke";
  /** What it was answered with (undefined: unscripted). */
  readonly reply: Reply | undefined;
  readonly receivedAt: number;
  /** When the client's side of the exchange closed (Date.now()); undefined while open. */
  closedAt: number | undefined;
}

/** What a successful token response carries; every field optional. */
export interface SuccessFields {
  access_token?: string;
  refresh_token?: string;
  expires_in?: number | string;
  refresh_token_expires_in?: number | string;
  token_type?: string;
  scope?: string;
  id_token?: string;
  [extra: string]: unknown;
}

/** Ready-made replies. */
export const reply = {
  /** 200 with the given token response (token_type Bearer unless given). */
  success: (fields: SuccessFields): Reply => ({ kind: "json", status: 200, body: { token_type: "Bearer", ...fields } }),
  /** An RFC 6749 §5.2 error: 400 unless another status is given (GitHub answers 200). */
  error: (error: string, status = 400, description?: string): Reply => ({
    kind: "json",
    status,
    body: description === undefined ? { error } : { error, error_description: description },
  }),
  invalidGrant: (): Reply => reply.error("invalid_grant", 400, "Token has been expired or revoked."),
  invalidClient: (): Reply => reply.error("invalid_client", 401, "The OAuth client was not found."),
  /** An HTTP status with a small JSON error body (e.g. 500, 502, 503). */
  status: (status: number, headers?: Record<string, string>): Reply => ({
    kind: "json",
    status,
    body: { error: "server_error" },
    ...(headers === undefined ? {} : { headers }),
  }),
  /** 429 with Retry-After (delta-seconds or an HTTP-date, as given). */
  tooManyRequests: (retryAfter: string): Reply => ({ kind: "json", status: 429, body: { error: "rate_limited" }, headers: { "retry-after": retryAfter } }),
  /** 200 whose body is not JSON. */
  malformedJson: (): Reply => ({ kind: "raw", status: 200, body: '{"access_token": "tvsecret-trunc', headers: { "content-type": "application/json" } }),
  /** 200 with JSON that has no access_token. */
  withoutAccessToken: (): Reply => ({ kind: "json", status: 200, body: { token_type: "Bearer", expires_in: 3600 } }),
  hang: (): Reply => ({ kind: "hang" }),
  delayed: (ms: number, then: Reply): Reply => ({ kind: "delayed", ms, then }),
  reset: (): Reply => ({ kind: "reset" }),
  /** 200 with an empty body (RFC 7009 revocation success). */
  ok: (): Reply => ({ kind: "raw", status: 200, body: "" }),
} as const;

/** A running endpoint. */
export interface TokenEndpoint {
  readonly port: number;
  /** http://127.0.0.1:PORT */
  readonly baseUrl: string;
  /** Every request so far, oldest first. */
  readonly requests: RecordedRequest[];
  /** Requests answered by the token queue. */
  tokenRequests(): RecordedRequest[];
  /** Requests answered by the revoke queue. */
  revokeRequests(): RecordedRequest[];
  /** Requests that found their queue empty on the token side. */
  unscripted(): RecordedRequest[];
  /** Token requests of the authorization_code grant (the sidecar's code exchanges), oldest first. */
  codeRequests(): RecordedRequest[];
  /** Appends replies to the token queue. */
  script(...replies: Reply[]): void;
  /** Appends a reply to the token queue for requests to `path` only (the path without query). */
  scriptFor(path: string, ...replies: Reply[]): void;
  /** Appends replies to the revoke queue. */
  scriptRevoke(...replies: Reply[]): void;
  /** Appends a reply to the revoke queue for requests to `path` only. */
  scriptRevokeFor(path: string, ...replies: Reply[]): void;
  /** Replies still queued (token, revoke). */
  pending(): { token: number; revoke: number };
  /** Drops every queued reply and recorded request. */
  reset(): void;
  /** Resolves once `count` requests have been recorded (rejects after `timeoutMs`). */
  waitForRequests(count: number, timeoutMs?: number): Promise<void>;
  close(): Promise<void>;
}

/** Starts the endpoint on 127.0.0.1:0. */
export async function startTokenEndpoint(): Promise<TokenEndpoint> {
  const requests: RecordedRequest[] = [];
  const unscriptedRequests: RecordedRequest[] = [];
  let tokenQueue: Scripted[] = [];
  let revokeQueue: Scripted[] = [];
  const take = (queue: Scripted[], path: string): Reply | undefined => {
    const i = queue.findIndex((s) => s.path === undefined || s.path === path);
    return i === -1 ? undefined : queue.splice(i, 1)[0]!.reply;
  };
  const sockets = new Set<Socket>();
  const hanging = new Set<http.ServerResponse>();

  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const rawBody = Buffer.concat(chunks).toString("utf8");
      const params = new URLSearchParams(rawBody);
      const path = req.url ?? "/";
      const pathname = new URL(path, "http://x").pathname;
      const queue = pathname.endsWith("/revoke") ? "revoke" : "token";
      const next = take(queue === "token" ? tokenQueue : revokeQueue, pathname);
      const recorded: RecordedRequest = {
        method: req.method ?? "",
        path,
        headers: req.headers,
        rawBody,
        form: Object.fromEntries(params),
        formKeys: [...params.keys()],
        queue,
        reply: next,
        receivedAt: Date.now(),
        closedAt: undefined,
      };
      requests.push(recorded);
      res.on("close", () => {
        recorded.closedAt = Date.now();
        hanging.delete(res);
      });

      const answer: Reply =
        next ?? (queue === "revoke" ? reply.ok() : { kind: "json", status: 500, body: { error: "unscripted" } });
      if (next === undefined && queue === "token") unscriptedRequests.push(recorded);
      respond(req, res, answer);
    });
  });
  /** Answers one request as `answer` says. */
  const respond = (req: http.IncomingMessage, res: http.ServerResponse, answer: Reply): void => {
    switch (answer.kind) {
      case "json":
        res.writeHead(answer.status, { "content-type": "application/json", ...answer.headers });
        res.end(JSON.stringify(answer.body));
        return;
      case "raw":
        res.writeHead(answer.status, { "content-type": "text/plain", ...answer.headers });
        res.end(answer.body);
        return;
      case "hang":
        hanging.add(res);
        return;
      case "reset":
        req.socket.destroy();
        return;
      case "delayed": {
        hanging.add(res);
        const timer = setTimeout(() => {
          hanging.delete(res);
          if (!res.destroyed) respond(req, res, answer.then);
        }, answer.ms);
        res.on("close", () => clearTimeout(timer));
        return;
      }
    }
  };
  server.on("connection", (socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;

  return {
    port,
    baseUrl: `http://127.0.0.1:${port}`,
    requests,
    tokenRequests: () => requests.filter((r) => r.queue === "token"),
    revokeRequests: () => requests.filter((r) => r.queue === "revoke"),
    unscripted: () => [...unscriptedRequests],
    codeRequests: () => requests.filter((r) => r.queue === "token" && r.form.grant_type === "authorization_code"),
    script: (...replies) => {
      tokenQueue.push(...replies.map((r) => ({ reply: r })));
    },
    scriptFor: (path, ...replies) => {
      tokenQueue.push(...replies.map((r) => ({ reply: r, path })));
    },
    scriptRevoke: (...replies) => {
      revokeQueue.push(...replies.map((r) => ({ reply: r })));
    },
    scriptRevokeFor: (path, ...replies) => {
      revokeQueue.push(...replies.map((r) => ({ reply: r, path })));
    },
    pending: () => ({ token: tokenQueue.length, revoke: revokeQueue.length }),
    reset() {
      tokenQueue = [];
      revokeQueue = [];
      requests.splice(0);
      unscriptedRequests.splice(0);
    },
    async waitForRequests(count, timeoutMs = 10_000) {
      const deadline = Date.now() + timeoutMs;
      while (requests.length < count) {
        if (Date.now() > deadline) throw new Error(`the token endpoint got ${requests.length} requests, not ${count}, within ${timeoutMs} ms`);
        await sleep(10);
      }
    },
    async close() {
      for (const res of hanging) res.destroy();
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** How a recorded request authenticated the client (RFC 6749 §2.3.1). */
export type ClientAuth =
  | { method: "client_secret_basic"; clientId: string; clientSecret: string }
  | { method: "client_secret_post"; clientId: string; clientSecret: string | undefined }
  | { method: "none" };

/**
 * The client authentication a request carried: HTTP Basic (each part
 * form-decoded, as RFC 6749 §2.3.1 has it encoded), else client_id (and
 * client_secret) in the form body.
 */
export function clientAuth(request: RecordedRequest): ClientAuth {
  const header = request.headers.authorization;
  if (typeof header === "string" && /^basic /i.test(header)) {
    const decoded = Buffer.from(header.slice(6).trim(), "base64").toString("utf8");
    const colon = decoded.indexOf(":");
    const formDecode = (s: string) => decodeURIComponent(s.replace(/\+/g, " "));
    return { method: "client_secret_basic", clientId: formDecode(decoded.slice(0, colon)), clientSecret: formDecode(decoded.slice(colon + 1)) };
  }
  if (request.form.client_id !== undefined) return { method: "client_secret_post", clientId: request.form.client_id, clientSecret: request.form.client_secret };
  return { method: "none" };
}
