/**
 * buildServer: the vault's network face. One port answers gRPC, gRPC-Web and
 * Connect: over TLS (when configured) HTTP/2 and HTTP/1.1 are told apart by
 * ALPN; in cleartext by the first bytes of the connection, because HTTP/2
 * "prior knowledge" (h2c) starts with a fixed preface. So gRPC clients (h2c)
 * and browsers or curl (HTTP/1.1, Connect and gRPC-Web) share the port.
 */
import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import { readFileSync } from "node:fs";
import type { Duplex } from "node:stream";
import type { TLSSocket } from "node:tls";
import { createContextValues } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import { TokenVaultService } from "../gen/tokenvault/v1/tokenvault_pb.js";
import type { Logger } from "../log.js";
import { authInterceptor, clientCertIdentityKey } from "../auth/interceptor.js";
import type { CallerRegistry } from "../auth/caller-registry.js";
import { certificateIdentity } from "../auth/identity.js";
import { peerAddressKey } from "./context.js";
import type { VaultDeps } from "./deps.js";
import { createHealthService, type HealthService } from "./health.js";
import { requestInterceptor } from "./interceptor.js";
import { auditInterceptor } from "./audit-interceptor.js";
import { createRoutes } from "./routes.js";

/** What buildServer needs beyond the handlers' dependencies. */
export interface ServerOptions {
  readonly deps: VaultDeps;
  readonly logger: Logger;
  readonly callers: CallerRegistry;
  /** Services callable without a credential (health, reflection), by full name. */
  readonly openServices: ReadonlySet<string>;
  readonly maxMessageBytes: number;
  /** TLS; with clientCaFile, clients may also prove a caller identity by certificate (mutual TLS). */
  readonly tls?: { readonly certFile: string; readonly keyFile: string; readonly clientCaFile?: string | undefined } | undefined;
}

/** A built, not yet listening, vault server. */
export interface VaultServer {
  readonly health: HealthService;
  /** Starts listening; resolves with the bound port (use port 0 in tests). */
  listen(port: number, host: string): Promise<number>;
  /**
   * Graceful shutdown: stop accepting, mark health NOT_SERVING, let in-flight
   * calls finish (HTTP/2 GOAWAY; HTTP/1.1 connections close when idle), and cut
   * whatever is left after `graceMs`.
   */
  close(graceMs: number): Promise<void>;
}

const h2Preface = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

/** Builds the server for `options`; nothing listens until listen(). */
export function buildServer(options: ServerOptions): VaultServer {
  const { logger } = options;
  const health = createHealthService();
  health.setStatus(TokenVaultService.typeName, HealthCheckResponse_ServingStatus.SERVING);
  const handler = connectNodeAdapter({
    routes: createRoutes(options.deps, health, options.callers),
    // Outermost first: the request interceptor logs and shapes errors of the
    // auditing the auth interceptor's denials too; the audit interceptor records
    // every TokenVaultService call, including those refused.
    interceptors: [
      requestInterceptor(logger),
      auditInterceptor(options.deps.audit.writer),
      authInterceptor({ registry: options.callers, openServices: options.openServices }),
    ],
    readMaxBytes: options.maxMessageBytes,
    // Responses are not capped by the request limit: a Get carries more than
    // the Store that wrote it, and a user may have many connections.
    writeMaxBytes: Math.max(options.maxMessageBytes, 16 * 1024 * 1024),
    contextValues: (req) => {
      const socket = req.socket as TLSSocket;
      // Only a certificate that chained to the client CA proves anything.
      const certIdentity = socket.encrypted === true && socket.authorized ? certificateIdentity(socket.getPeerCertificate()) : undefined;
      return createContextValues()
        .set(peerAddressKey, req.socket.remoteAddress ?? "")
        .set(clientCertIdentityKey, certIdentity);
    },
  });

  const served = serveHandler(handler, {
    logger,
    tls: options.tls,
    beforeClose: () => {
      health.shutdown();
      // Audit followers end with a status that carries their resume cursor.
      options.deps.audit.feed.endStreams();
    },
  });
  return { health, listen: served.listen, close: served.close };
}

/** What {@link serveHandler} needs besides the handler. */
export interface ServeOptions {
  readonly logger: Logger;
  readonly tls?: ServerOptions["tls"];
  /** Runs first when close() is called (mark health, end streams). */
  readonly beforeClose?: () => void;
}

/** A request handler on the vault's one port, with graceful close. */
export type ServedHandler = Pick<VaultServer, "listen" | "close">;

/**
 * Serves a Connect request handler the way the vault is served: one port for
 * HTTP/2 and HTTP/1.1 (ALPN over TLS, the preface in cleartext), with
 * graceful shutdown. Exported for the benchmark's bare echo server, so its
 * baseline has exactly this setup.
 */
export function serveHandler(handler: ReturnType<typeof connectNodeAdapter>, options: ServeOptions): ServedHandler {
  const { logger } = options;
  const sessions = new Set<http2.ServerHttp2Session>();
  const sockets = new Set<Duplex>();
  /** HTTP/1.1 requests in flight per socket, so shutdown closes only idle ones. */
  const busy = new Map<Duplex, number>();
  /** Sockets that carry HTTP/2: they close with their session, after GOAWAY. */
  const http2Sockets = new WeakSet<Duplex>();
  const idleHttp1 = (socket: Duplex) => !http2Sockets.has(socket) && (busy.get(socket) ?? 0) === 0;
  let closing = false;

  const trackSession = (session: http2.ServerHttp2Session) => {
    sessions.add(session);
    session.once("close", () => sessions.delete(session));
    if (closing) session.close();
  };
  const trackSocket = (socket: Duplex) => {
    sockets.add(socket);
    socket.once("close", () => {
      sockets.delete(socket);
      busy.delete(socket);
    });
    socket.on("error", (err) => logger.debug({ err: err.message }, "connection error"));
  };
  // HTTP/1.1 requests (both transports): count in-flight requests per socket.
  const onHttp1Request = (req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse) => {
    if (req.httpVersionMajor === 1) {
      const socket = req.socket as Duplex;
      busy.set(socket, (busy.get(socket) ?? 0) + 1);
      res.once("close", () => {
        const left = (busy.get(socket) ?? 1) - 1;
        busy.set(socket, left);
        if (closing && left === 0) socket.destroy();
      });
      if (closing) res.setHeader("connection", "close");
    }
    handler(req as never, res as never);
  };

  let listener: net.Server;
  if (options.tls !== undefined) {
    const clientCa = options.tls.clientCaFile;
    const secure = http2.createSecureServer(
      {
        cert: readFileSync(options.tls.certFile),
        key: readFileSync(options.tls.keyFile),
        allowHTTP1: true,
        maxSessionMemory: 64,
        // Ask for a client certificate but let clients without one through:
        // they may still authenticate with a bearer secret.
        ...(clientCa !== undefined ? { ca: readFileSync(clientCa), requestCert: true, rejectUnauthorized: false } : {}),
      },
      onHttp1Request,
    );
    secure.on("session", trackSession);
    // Prepended so a refused certificate ends the socket before HTTP sees a request.
    secure.prependListener("secureConnection", (socket: TLSSocket) => {
      // A certificate that does not verify (another CA, expired) ends the
      // connection at once, as a strict handshake would.
      if (clientCa !== undefined && !socket.authorized && Object.keys(socket.getPeerCertificate()).length > 0) {
        logger.info({ peer: socket.remoteAddress, reason: String(socket.authorizationError) }, "client certificate refused");
        socket.destroy();
        return;
      }
      trackSocket(socket);
      if (socket.alpnProtocol === "h2") http2Sockets.add(socket);
    });
    secure.on("tlsClientError", (err) => logger.debug({ err: err.message }, "TLS handshake failed"));
    listener = secure;
  } else {
    const h2 = http2.createServer({ maxSessionMemory: 64 }, onHttp1Request);
    h2.on("session", trackSession);
    const h1 = http.createServer(onHttp1Request);
    // Route each cleartext connection by its first bytes: the HTTP/2 preface or not.
    listener = net.createServer((socket) => {
      trackSocket(socket);
      let seen = Buffer.alloc(0);
      // A client that never sends its first bytes must not hold a socket forever.
      socket.setTimeout(10_000, () => socket.destroy());
      const onData = (chunk: Buffer) => {
        seen = Buffer.concat([seen, chunk]);
        const n = Math.min(seen.length, h2Preface.length);
        const isH2 = seen.subarray(0, n).equals(h2Preface.subarray(0, n));
        if (isH2 && seen.length < h2Preface.length) return; // need more bytes to decide
        socket.off("data", onData);
        socket.setTimeout(0);
        socket.pause();
        socket.unshift(seen);
        if (isH2) http2Sockets.add(socket);
        (isH2 ? h2 : h1).emit("connection", socket);
        // The HTTP/2 session reads the unshifted bytes itself; the HTTP/1.1
        // parser listens for 'data', so its socket must flow again.
        if (!isH2) socket.resume();
      };
      socket.on("data", onData);
    });
  }

  return {
    listen(port, host) {
      return new Promise((resolve, reject) => {
        listener.once("error", reject);
        listener.listen(port, host, () => {
          listener.off("error", reject);
          resolve((listener.address() as net.AddressInfo).port);
        });
      });
    },
    async close(graceMs) {
      if (closing) return;
      closing = true;
      options.beforeClose?.();
      const stopped = new Promise<void>((resolve) => listener.close(() => resolve()));
      for (const session of sessions) session.close();
      const deadline = Date.now() + graceMs;
      while ((sessions.size > 0 || sockets.size > 0) && Date.now() < deadline) {
        // An HTTP/1.1 socket with nothing in flight can go now; HTTP/2 sockets go with their session.
        for (const socket of sockets) if (idleHttp1(socket)) socket.destroy();
        await new Promise((r) => setTimeout(r, 20));
      }
      if (sessions.size > 0 || sockets.size > 0) {
        logger.warn({ sessions: sessions.size, sockets: sockets.size }, "grace period over: cutting remaining connections");
        for (const session of sessions) session.destroy();
        for (const socket of sockets) socket.destroy();
      }
      await stopped;
    },
  };
}
