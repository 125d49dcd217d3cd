/**
 * The router: every service this server answers on its one port.
 */
import { Code, ConnectError, type ConnectRouter, type ContextValues } from "@connectrpc/connect";
import { callerKey } from "../auth/interceptor.js";
import type { Caller } from "../auth/policy.js";
import type { CallerRegistry } from "../auth/caller-registry.js";
import { TokenVaultService } from "../gen/tokenvault/v1/tokenvault_pb.js";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import type { VaultDeps } from "./deps.js";
import type { HealthService } from "./health.js";
import { registerReflection } from "./reflection.js";
import { store } from "./store.js";
import { get } from "./get.js";
import { clearUser, remove } from "./remove.js";
import { listConnections } from "./list.js";
import { streamAudit } from "./stream-audit.js";
import { verifyAudit } from "./verify-audit.js";

/** The caller the auth interceptor admitted; its absence is a wiring bug, not a client error. */
function authenticatedCaller(values: ContextValues): Caller {
  const caller = values.get(callerKey);
  if (caller === undefined) throw new ConnectError("no authenticated caller", Code.Internal);
  return caller;
}

/** Registers TokenVaultService, grpc.health.v1.Health and server reflection. */
export function createRoutes(deps: VaultDeps, health: HealthService, callers: CallerRegistry): (router: ConnectRouter) => void {
  return (router) => {
    router.service(TokenVaultService, {
      store: (req) => store(deps, req),
      get: (req, ctx) => get(deps, req, ctx),
      remove: (req) => remove(deps, req),
      clearUser: (req) => clearUser(deps, req),
      listConnections: (req, ctx) => listConnections(deps, req, authenticatedCaller(ctx.values)),
      streamAudit: (req, ctx) => streamAudit(deps, req, ctx, authenticatedCaller(ctx.values), (id) => callers.byId(id)),
      verifyAudit: (req) => verifyAudit(deps, req),
    });
    health.register(router);
    registerReflection(router, [TokenVaultService, Health]);
  };
}
