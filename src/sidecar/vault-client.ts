/**
 * The sidecar's only store: the vault, reached over gRPC with the sidecar's
 * own caller credential (a caller allowed only Store).
 */
import { readFileSync } from "node:fs";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import { StoreRequestSchema, TokenVaultService, type StoreRequest } from "../gen/tokenvault/v1/tokenvault_pb.js";

/** Where and how the sidecar reaches the vault. */
export interface VaultClientOptions {
  /** http://host:port (h2c) or https://host:port. */
  url: string;
  /** The sidecar's caller secret. */
  callerSecret: string;
  /** A CA bundle (PEM file) to trust for an https vault, beyond the system's. */
  caFile?: string | undefined;
}

/** What the sidecar asks of the vault. */
export interface VaultClient {
  /** Stores a token set; rejects with a ConnectError. */
  store(request: MessageInitShape<typeof StoreRequestSchema>, timeoutMs: number): Promise<void>;
  /** Whether the vault answers (its health service says SERVING, or it answered at all but asks for a credential). */
  ready(timeoutMs: number): Promise<boolean>;
}

/** Opens a client; nothing connects until the first call. */
export function createVaultClient(options: VaultClientOptions): VaultClient {
  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${options.callerSecret}`);
    return next(req);
  };
  const ca = options.caFile === undefined ? undefined : readFileSync(options.caFile);
  const transport = (interceptors: Interceptor[]) =>
    createGrpcTransport({ baseUrl: options.url, interceptors, nodeOptions: ca === undefined ? {} : { ca } });
  const vault = createClient(TokenVaultService, transport([auth]));
  // Health is asked without the credential: the vault's health service is open by default.
  const health = createClient(Health, transport([]));
  return {
    async store(request, timeoutMs) {
      const message: StoreRequest = create(StoreRequestSchema, request);
      await vault.store(message, { timeoutMs });
    },
    async ready(timeoutMs) {
      try {
        const answer = await health.check({ service: "" }, { timeoutMs });
        return answer.status === HealthCheckResponse_ServingStatus.SERVING;
      } catch (err) {
        // A vault that closed its health service still answered: it is reachable.
        const code = ConnectError.from(err).code;
        return code === Code.Unauthenticated || code === Code.PermissionDenied;
      }
    },
  };
}
