/**
 * Enforcement, in one interceptor for every RPC: who is calling (bearer secret,
 * else verified client certificate), and may they make this call? It runs
 * before any handler, so a denied call reads and writes nothing.
 *
 * - No or invalid credential: UNAUTHENTICATED, one message whatever the cause
 *   (unknown caller, wrong or rotated secret, revoked caller, unbound certificate),
 *   so the answer reveals nothing about which callers exist.
 * - A valid caller outside its policy: PERMISSION_DENIED naming what is missing.
 */
import { Code, ConnectError, createContextKey, type Interceptor } from "@connectrpc/connect";
import type { CallerRegistry } from "./caller-registry.js";
import { TokenVaultService } from "../gen/tokenvault/v1/tokenvault_pb.js";
import { bearerToken, claimedCallerId } from "./credentials.js";
import { denial, type Caller } from "./policy.js";

/** The authenticated caller of the current call; set by the interceptor. */
export const callerKey = createContextKey<Caller | undefined>(undefined, { description: "tokenvault caller" });

/** The identity of the verified client certificate, when the connection has one; set per request by the server. */
export const clientCertIdentityKey = createContextKey<string | undefined>(undefined, { description: "client certificate identity" });

/**
 * Who a call that failed authentication claimed to be, for the audit log: the
 * caller named by a bearer secret's id part, or a certificate's identity.
 */
export const claimedCallerKey = createContextKey<string | undefined>(undefined, { description: "claimed caller" });

/** Options of {@link authInterceptor}. */
export interface AuthOptions {
  registry: CallerRegistry;
  /** Services that need no credential (health checks, reflection), by full name. */
  openServices: ReadonlySet<string>;
}

const unauthenticated = () =>
  new ConnectError(
    "missing or invalid credentials: send 'authorization: Bearer <secret>' or a client certificate bound to a caller",
    Code.Unauthenticated,
  );

/** Creates the enforcing interceptor. */
export function authInterceptor(options: AuthOptions): Interceptor {
  return (next) => async (req) => {
    if (options.openServices.has(req.service.typeName)) return next(req);
    const authorization = req.header.get("authorization");
    const certIdentity = req.contextValues.get(clientCertIdentityKey);
    // A presented authorization header is the credential: a bad or malformed
    // one is not rescued by a certificate.
    let caller: Caller | undefined;
    if (authorization !== null) {
      const secret = bearerToken(authorization);
      caller = secret === undefined ? undefined : options.registry.bySecret(secret);
    } else if (certIdentity !== undefined) {
      caller = options.registry.byCertIdentity(certIdentity);
    }
    if (caller === undefined) {
      req.contextValues.set(claimedCallerKey, claimedCaller(options.registry, authorization, certIdentity));
      throw unauthenticated();
    }
    req.contextValues.set(callerKey, caller);

    // Health and reflection, when not open, need only a valid caller.
    if (req.service.typeName !== TokenVaultService.typeName) return next(req);

    // The request fields policy looks at have the same names in every request message.
    const message = req.stream ? undefined : (req.message as { userId?: unknown; integration?: unknown; includeRefreshToken?: unknown });
    const reason = denial(caller, {
      rpc: req.method.name,
      userId: typeof message?.userId === "string" ? message.userId : undefined,
      integration: typeof message?.integration === "string" ? message.integration : undefined,
      wantsRefreshToken: message?.includeRefreshToken === true,
    });
    if (reason !== undefined) throw new ConnectError(reason, Code.PermissionDenied);
    return next(req);
  };
}

/** Names whom a failed credential claimed to be; never the secret itself. */
function claimedCaller(registry: CallerRegistry, authorization: string | null, certIdentity: string | undefined): string | undefined {
  if (authorization !== null) {
    const secret = bearerToken(authorization);
    const id = secret === undefined ? undefined : claimedCallerId(secret);
    if (id === undefined) return undefined;
    return registry.byId(id)?.name ?? `unknown caller id ${id}`;
  }
  return certIdentity === undefined ? undefined : `certificate ${certIdentity}`;
}
