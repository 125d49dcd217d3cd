/**
 * Callers and their policies.
 *
 * Glossary:
 * - caller: a named client of the vault (a service, the OAuth sidecar, an auditor).
 * - policy: what a caller may do: which RPCs, on which integrations, for which
 *   users, and whether Get may hand it the refresh token.
 */
import type { CallerRow } from "../db/queries/callers.js";

/** The RPCs a policy can allow, by method name. */
export const rpcNames = ["Store", "Get", "Remove", "ClearUser", "ListConnections", "StreamAudit", "VerifyAudit"] as const;
/** One of {@link rpcNames}. */
export type RpcName = (typeof rpcNames)[number];

/** Caller names: the same rules as integration names, so they are safe in logs and URLs. */
export const callerNamePattern = /^[a-z0-9][a-z0-9._-]{0,63}$/;

/** What a caller may do. */
export interface Policy {
  readonly rpcs: ReadonlySet<string>;
  /** "*" for every integration. */
  readonly integrations: "*" | ReadonlySet<string>;
  /** undefined for every user; else exact ids and prefixes (from entries ending in '*'). */
  readonly users: { readonly exact: ReadonlySet<string>; readonly prefixes: readonly string[] } | undefined;
  readonly mayReceiveRefreshToken: boolean;
}

/** An active (not revoked) caller as the registry holds it. */
export interface Caller {
  readonly id: string;
  readonly name: string;
  readonly secretHash: Buffer | null;
  readonly certIdentity: string | null;
  readonly policy: Policy;
}

/** Builds the in-memory caller from its row. */
export function callerFromRow(row: CallerRow): Caller {
  const users = row.allowed_users;
  return {
    id: row.id,
    name: row.name,
    secretHash: row.secret_hash,
    certIdentity: row.cert_identity,
    policy: {
      rpcs: new Set(row.allowed_rpcs),
      integrations: row.allowed_integrations.includes("*") ? "*" : new Set(row.allowed_integrations),
      users: users === null
        ? undefined
        : {
            exact: new Set(users.filter((u) => !u.endsWith("*"))),
            prefixes: users.filter((u) => u.endsWith("*")).map((u) => u.slice(0, -1)),
          },
      mayReceiveRefreshToken: row.may_receive_refresh_token,
    },
  };
}

/** Whether the policy covers this integration. */
export function allowsIntegration(policy: Policy, integration: string): boolean {
  return policy.integrations === "*" || policy.integrations.has(integration);
}

/** Whether the policy covers this user. */
export function allowsUser(policy: Policy, userId: string): boolean {
  if (policy.users === undefined) return true;
  return policy.users.exact.has(userId) || policy.users.prefixes.some((p) => userId.startsWith(p));
}

/** What a call asks for, as far as policy is concerned. */
export interface CallTarget {
  rpc: string;
  userId?: string;
  integration?: string;
  wantsRefreshToken?: boolean;
}

/**
 * Checks a call against a caller's policy. Returns undefined when allowed,
 * else the message for PERMISSION_DENIED, naming the missing permission.
 */
export function denial(caller: Caller, target: CallTarget): string | undefined {
  const { policy, name } = caller;
  if (!policy.rpcs.has(target.rpc)) return `caller "${name}" may not call ${target.rpc}`;
  // ClearUser deletes every integration of a user, so it needs all of them.
  if (target.rpc === "ClearUser" && policy.integrations !== "*") {
    return `caller "${name}" may not call ClearUser: it needs access to every integration ('*')`;
  }
  if (target.integration !== undefined && !allowsIntegration(policy, target.integration)) {
    return `caller "${name}" may not access integration "${target.integration}"`;
  }
  if (target.userId !== undefined && !allowsUser(policy, target.userId)) {
    return `caller "${name}" may not access this user`;
  }
  if (target.wantsRefreshToken === true && !policy.mayReceiveRefreshToken) {
    return `caller "${name}" may not receive refresh tokens`;
  }
  return undefined;
}
