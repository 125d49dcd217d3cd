/**
 * The real vault server on listen(0), reached by real clients: Connect's
 * clients over gRPC (HTTP/2), Connect (HTTP/1.1) and gRPC-Web, and a plain
 * @grpc/grpc-js client loaded from the .proto, as another language's
 * generated client would call it.
 */
import path from "node:path";
import { fileURLToPath } from "node:url";
import { randomBytes } from "node:crypto";
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import type pg from "pg";
import { TokenVaultService } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import type { KeyRing } from "../../src/crypto/key-ring.js";
import { buildServer, type VaultServer } from "../../src/vault/server.js";
import { addCaller, type PolicySpec } from "../../src/auth/caller-admin.js";
import { createCallerRegistry, type CallerRegistry } from "../../src/auth/caller-registry.js";
import { rpcNames } from "../../src/auth/policy.js";
import { captureLogs, type CapturedLogs } from "./logs.js";
import { openAuditLog, type AuditLog } from "../../src/audit/log.js";
import { defaultAuditSettings, defaultRefreshSettings, type AuditSettings } from "../../src/config.js";
import { loadCatalogue, type Catalogue } from "../../src/providers/catalogue.js";
import { createRefresher, type RefreshSettings } from "../../src/refresh/refresher.js";

/** The repository's proto/ folder. */
export const protoDir = fileURLToPath(new URL("../../proto", import.meta.url));

/** A running vault and clients for it. */
export interface TestVault {
  readonly server: VaultServer;
  readonly callers: CallerRegistry;
  /** The server's audit log (writer and live feed). */
  readonly audit: AuditLog;
  /** The bearer secret of "test-admin", the caller with every permission that the clients below use. */
  readonly secret: string;
  /** Adds a caller, reloads the registry, and returns its secret and Connect clients acting as it. */
  addCaller(name: string, spec: PolicySpec): Promise<{ secret: string; grpcClient: Client<typeof TokenVaultService>; connectClient: Client<typeof TokenVaultService> }>;
  /** Connect clients (gRPC and Connect protocol) that send `secret` (or nothing, when undefined). */
  clientsWith(secret: string | undefined): { grpcClient: Client<typeof TokenVaultService>; connectClient: Client<typeof TokenVaultService> };
  readonly port: number;
  readonly baseUrl: string;
  readonly logs: CapturedLogs;
  /** Connect client over gRPC (HTTP/2 h2c). */
  readonly grpcClient: Client<typeof TokenVaultService>;
  /** Connect client over the Connect protocol (HTTP/1.1, JSON). */
  readonly connectClient: Client<typeof TokenVaultService>;
  /** Connect client over gRPC-Web (HTTP/1.1, binary). */
  readonly grpcWebClient: Client<typeof TokenVaultService>;
  close(graceMs?: number): Promise<void>;
}

/** Options for {@link startVault}. */
export interface StartVaultOptions {
  pool: pg.Pool;
  /** Listen for caller changes on this database URL (a dedicated connection); default: reload on demand only. */
  listenUrl?: string;
  /** Which services need no credential; default health and reflection. */
  openServices?: ReadonlySet<string>;
  keyRing: KeyRing;
  now?: () => Date;
  maxMessageBytes?: number;
  tls?: { certFile: string; keyFile: string; clientCaFile?: string };
  /** Audit settings that differ from the defaults (a short lock timeout, a small max lag ...). */
  audit?: Partial<AuditSettings>;
  /** The provider catalogue; default: the built-in one without client credentials. */
  catalogue?: Catalogue;
  /** Refresh settings that differ from the defaults. */
  refresh?: Partial<RefreshSettings>;
}

/** Sends `authorization: Bearer <secret>` on every call. */
export function bearer(secret: string): Interceptor {
  return (next) => (req) => {
    req.header.set("authorization", `Bearer ${secret}`);
    return next(req);
  };
}

/** Builds the server with the given dependencies and listens on a free port. */
export async function startVault(options: StartVaultOptions): Promise<TestVault> {
  const logs = captureLogs();
  const callers = await createCallerRegistry({
    pool: options.pool,
    logger: logs.logger,
    listenUrl: options.listenUrl,
    reloadIntervalMs: 60_000,
  });
  const { secret } = await addCaller(options.pool, `test-admin-${randomBytes(4).toString("hex")}`, {
    allow: rpcNames,
    integrations: ["*"],
    refreshTokens: true,
  });
  await callers.reload();
  const audit = await openAuditLog({
    pool: options.pool,
    logger: logs.logger,
    listenUrl: options.listenUrl,
    settings: { ...defaultAuditSettings, ...options.audit },
  });
  const now = options.now ?? (() => new Date());
  const catalogue = options.catalogue ?? loadCatalogue({ settings: () => ({}) });
  const refresher = createRefresher({
    pool: options.pool,
    keyRing: options.keyRing,
    catalogue,
    now,
    settings: { ...defaultRefreshSettings, ...options.refresh },
  });
  const server = buildServer({
    deps: {
      pool: options.pool,
      keyRing: options.keyRing,
      now,
      audit,
      refresher,
      catalogue,
      refreshTimeoutMs: options.refresh?.providerTimeoutMs ?? defaultRefreshSettings.providerTimeoutMs,
    },
    logger: logs.logger,
    callers,
    openServices: options.openServices ?? new Set(["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"]),
    maxMessageBytes: options.maxMessageBytes ?? 256 * 1024,
    tls: options.tls,
  });
  const port = await server.listen(0, "127.0.0.1");
  const baseUrl = `http://127.0.0.1:${port}`;
  const clientsWith = (callerSecret: string | undefined) => {
    const interceptors = callerSecret === undefined ? [] : [bearer(callerSecret)];
    return {
      grpcClient: createClient(TokenVaultService, createGrpcTransport({ baseUrl, interceptors })),
      connectClient: createClient(TokenVaultService, createConnectTransport({ baseUrl, httpVersion: "1.1", useBinaryFormat: false, interceptors })),
    };
  };
  const admin = clientsWith(secret);
  return {
    server,
    callers,
    audit,
    secret,
    port,
    baseUrl,
    logs,
    grpcClient: admin.grpcClient,
    connectClient: admin.connectClient,
    grpcWebClient: createClient(TokenVaultService, createGrpcWebTransport({ baseUrl, httpVersion: "1.1", interceptors: [bearer(secret)] })),
    clientsWith,
    async addCaller(name, spec) {
      const added = await addCaller(options.pool, name, spec);
      await callers.reload();
      return { secret: added.secret, ...clientsWith(added.secret) };
    },
    async close(graceMs = 2_000) {
      await server.close(graceMs);
      await audit.close();
      await callers.close();
    },
  };
}

/** A @grpc/grpc-js client of TokenVaultService, with promise helpers. */
export interface GrpcJsVault {
  readonly raw: grpc.Client & Record<string, (...args: unknown[]) => unknown>;
  /** Calls a unary method; resolves the response or rejects with the grpc-js ServiceError. */
  call<T = Record<string, unknown>>(method: string, request: Record<string, unknown>, metadata?: grpc.Metadata): Promise<T>;
  close(): void;
}

/**
 * A grpc-js client generated at run time from proto/tokenvault/v1/tokenvault.proto,
 * with snake_case field names as in the .proto.
 */
export function grpcJsClient(
  port: number,
  secret: string | undefined,
  credentials = grpc.credentials.createInsecure(),
  host = "127.0.0.1",
): GrpcJsVault {
  const Service = grpcJsService("tokenvault/v1/tokenvault.proto", "tokenvault.v1.TokenVaultService");
  const raw = new Service(`${host}:${port}`, credentials) as GrpcJsVault["raw"];
  return {
    raw,
    call: (method, request, metadata = new grpc.Metadata()) =>
      new Promise((resolve, reject) => {
        // As another language's client passes credentials: call metadata.
        if (secret !== undefined && metadata.get("authorization").length === 0) metadata.set("authorization", `Bearer ${secret}`);
        raw[method]!(request, metadata, (err: grpc.ServiceError | null, res: unknown) => (err ? reject(err) : resolve(res as never)));
      }),
    close: () => raw.close(),
  };
}

/**
 * A grpc-js client constructor for `service` (full name) loaded at run time
 * from a .proto under proto/, with snake_case field names as in the file.
 */
export function grpcJsService(protoFile: string, service: string): grpc.ServiceClientConstructor {
  const definition = protoLoader.loadSync(path.join(protoDir, protoFile), {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [protoDir],
  });
  let node: unknown = grpc.loadPackageDefinition(definition);
  for (const part of service.split(".")) node = (node as Record<string, unknown>)[part];
  return node as grpc.ServiceClientConstructor;
}
