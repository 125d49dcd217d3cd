/**
 * Managing callers: what the `tokenvault callers` commands and the
 * development default do. Secrets are returned once, to be shown once; only
 * their hashes are stored.
 */
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import type { Pool, PoolClient } from "pg";
import {
  insertCaller,
  revokeCaller,
  selectCallerByName,
  selectCallers,
  updateCallerCertIdentity,
  updateCallerPolicy,
  updateCallerSecret,
  type CallerPolicyColumns,
  type CallerRow,
} from "../db/queries/callers.js";
import { withTransaction } from "../db/transaction.js";
import { newSecret } from "./credentials.js";
import { callerNamePattern, rpcNames } from "./policy.js";

/** A request to manage callers that cannot be carried out; the message says why. */
export class CallerAdminError extends Error {
  override readonly name = "CallerAdminError";
}

/** A policy as written by people (CLI flags or a callers file). */
export interface PolicySpec {
  allow: readonly string[];
  integrations: readonly string[];
  users?: readonly string[] | undefined;
  refreshTokens?: boolean | undefined;
}

const integrationPattern = /^[a-z0-9][a-z0-9._-]{0,63}$/;

/** Checks a policy spec and turns it into columns. */
export function policyColumns(spec: PolicySpec): CallerPolicyColumns {
  const unknown = spec.allow.filter((rpc) => !(rpcNames as readonly string[]).includes(rpc));
  if (unknown.length > 0) throw new CallerAdminError(`unknown RPC ${unknown.join(", ")}: use ${rpcNames.join(", ")}`);
  if (spec.allow.length === 0) throw new CallerAdminError(`a caller must be allowed at least one RPC (${rpcNames.join(", ")})`);
  const badIntegration = spec.integrations.find((i) => i !== "*" && !integrationPattern.test(i));
  if (badIntegration !== undefined) throw new CallerAdminError(`integration "${badIntegration}" is not a valid name (or '*')`);
  if (spec.integrations.length === 0) throw new CallerAdminError("a caller must be allowed at least one integration (or '*')");
  const users = spec.users === undefined || spec.users.length === 0 ? null : [...spec.users];
  if (users?.some((u) => u === "" || u === "*")) throw new CallerAdminError("users must be user ids or prefixes like 'tenant-a/*'; omit it for every user");
  return {
    allowedRpcs: [...new Set(spec.allow)],
    allowedIntegrations: [...new Set(spec.integrations)],
    allowedUsers: users,
    mayReceiveRefreshToken: spec.refreshTokens === true,
  };
}

function checkName(name: string): void {
  if (!callerNamePattern.test(name)) {
    throw new CallerAdminError(`caller name "${name}" is invalid: 1..64 of a-z, 0-9, '.', '_' or '-', starting with a letter or digit`);
  }
}

/** Creates a caller with a fresh secret; returns the row and the secret (shown once). */
export async function addCaller(pool: Pool, name: string, spec: PolicySpec): Promise<{ caller: CallerRow; secret: string }> {
  checkName(name);
  const columns = policyColumns(spec);
  return withTransaction(pool, async (client) => {
    if ((await selectCallerByName(client, name)) !== undefined) throw new CallerAdminError(`caller "${name}" exists already`);
    const caller = await insertCaller(client, name, columns);
    const { secret, hash } = newSecret(caller.id);
    await updateCallerSecret(client, caller.id, hash);
    return { caller, secret };
  });
}

/** Gives a caller a new secret; the old one stops working at once. */
export async function rotateCallerSecret(pool: Pool, name: string): Promise<string> {
  const caller = await selectCallerByName(pool, name);
  if (caller === undefined || caller.revoked_at !== null) throw new CallerAdminError(`no active caller named "${name}"`);
  const { secret, hash } = newSecret(caller.id);
  await updateCallerSecret(pool, caller.id, hash);
  return secret;
}

/** Revokes a caller: its secret and certificate binding stop working. */
export async function revoke(pool: Pool, name: string): Promise<void> {
  if (!(await revokeCaller(pool, name))) throw new CallerAdminError(`no active caller named "${name}"`);
}

/** Binds a client-certificate identity (SAN URI, DNS name or CN) to a caller. */
export async function bindCertificate(pool: Pool, name: string, identity: string): Promise<void> {
  if (!(await bindIdentity(pool, name, identity))) throw new CallerAdminError(`no caller named "${name}"`);
}

/** A declarative callers file: `{"callers": {"billing": {"allow": [...], "integrations": [...]}}}`. */
export interface CallersFile {
  callers: Record<string, PolicySpec & { certIdentity?: string }>;
}

/** What `callers apply` did. */
export interface ApplyResult {
  created: { name: string; secret: string }[];
  updated: string[];
  revoked: string[];
}

/**
 * Makes the callers table match the file: creates missing callers (returning
 * their secrets, to show once), updates the policy of existing ones, and
 * revokes active callers the file does not name. One transaction: all or nothing.
 */
export async function applyCallers(pool: Pool, file: CallersFile): Promise<ApplyResult> {
  const entries = Object.entries(file.callers ?? {});
  for (const [name, spec] of entries) {
    checkName(name);
    policyColumns(spec);
  }
  return withTransaction(pool, async (client) => {
    const existing = new Map((await selectCallers(client)).map((c) => [c.name, c]));
    const result: ApplyResult = { created: [], updated: [], revoked: [] };
    for (const [name, spec] of entries) {
      const columns = policyColumns(spec);
      const row = existing.get(name);
      if (row !== undefined && row.revoked_at === null) {
        const changed = !samePolicy(row, columns) || (spec.certIdentity !== undefined && spec.certIdentity !== row.cert_identity);
        await updateCallerPolicy(client, name, columns);
        if (changed) result.updated.push(name);
      } else {
        // A new caller, or a revoked one brought back: either way it gets a
        // fresh secret, so a secret that was revoked never works again.
        const caller = row === undefined ? await insertCaller(client, name, columns) : (await updateCallerPolicy(client, name, columns))!;
        const { secret, hash } = newSecret(caller.id);
        await updateCallerSecret(client, caller.id, hash);
        result.created.push({ name, secret });
      }
      if (spec.certIdentity !== undefined) await bindIdentity(client, name, spec.certIdentity);
    }
    for (const [name, row] of existing) {
      if (row.revoked_at === null && !(name in file.callers)) {
        await revokeCaller(client, name);
        result.revoked.push(name);
      }
    }
    return result;
  });
}

/** Whether a stored caller already has exactly these policy columns. */
function samePolicy(row: CallerRow, columns: CallerPolicyColumns): boolean {
  const sameSet = (a: readonly string[] | null, b: readonly string[] | null) =>
    a === null || b === null ? a === b : a.length === b.length && a.every((x) => b.includes(x));
  return (
    sameSet(row.allowed_rpcs, columns.allowedRpcs) &&
    sameSet(row.allowed_integrations, columns.allowedIntegrations) &&
    sameSet(row.allowed_users, columns.allowedUsers) &&
    row.may_receive_refresh_token === columns.mayReceiveRefreshToken
  );
}

/** Binds an identity, saying which identity is taken rather than quoting the constraint. */
async function bindIdentity(db: Pool | PoolClient, name: string, identity: string): Promise<boolean> {
  if (identity.trim() === "" || identity.length > 1024) throw new CallerAdminError("the certificate identity must be 1..1024 characters");
  try {
    return await updateCallerCertIdentity(db, name, identity);
  } catch (err) {
    if ((err as { code?: string }).code === "23505") throw new CallerAdminError(`identity "${identity}" is bound to another caller already`);
    throw err;
  }
}

/** Reads and checks the shape of a callers file (JSON). */
export function readCallersFile(filePath: string): CallersFile {
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(filePath, "utf8"));
  } catch (err) {
    throw new CallerAdminError(`cannot read ${filePath} as JSON: ${(err as Error).message}`);
  }
  const callers = (parsed as { callers?: unknown } | null)?.callers;
  if (typeof callers !== "object" || callers === null || Array.isArray(callers)) {
    throw new CallerAdminError(`${filePath} must hold {"callers": {"<name>": {"allow": [...], "integrations": [...]}}}`);
  }
  const known = new Set(["allow", "integrations", "users", "refreshTokens", "certIdentity"]);
  const isStringList = (v: unknown) => Array.isArray(v) && v.every((x) => typeof x === "string");
  for (const [name, spec] of Object.entries(callers)) {
    const where = `caller "${name}" in ${filePath}`;
    if (typeof spec !== "object" || spec === null || Array.isArray(spec)) throw new CallerAdminError(`${where} must be an object`);
    const s = spec as Record<string, unknown>;
    const stray = Object.keys(s).find((k) => !known.has(k));
    if (stray !== undefined) throw new CallerAdminError(`${where} has unknown field "${stray}" (use ${[...known].join(", ")})`);
    if (!isStringList(s.allow) || !isStringList(s.integrations)) {
      throw new CallerAdminError(`${where} needs "allow" and "integrations" lists of strings`);
    }
    if (s.users !== undefined && !isStringList(s.users)) throw new CallerAdminError(`${where}: "users" must be a list of strings`);
    if (s.refreshTokens !== undefined && typeof s.refreshTokens !== "boolean") throw new CallerAdminError(`${where}: "refreshTokens" must be true or false`);
    if (s.certIdentity !== undefined && typeof s.certIdentity !== "string") throw new CallerAdminError(`${where}: "certIdentity" must be a string`);
  }
  return parsed as CallersFile;
}

/** The development caller's name. */
export const devCallerName = "dev";
/** The development sidecar's caller: Store only, like a production sidecar's. */
export const devSidecarCallerName = "dev-sidecar";

/**
 * Development default (embedded database only): makes sure a `dev` caller with
 * every permission and a `dev-sidecar` caller allowed only Store exist, with
 * their secrets in `dataDir/dev-caller-secret` and `dataDir/dev-sidecar-secret`
 * (mode 0600). Returns the dev secret when it was just made (to show once).
 */
export async function ensureDevCaller(pool: Pool, dataDir: string): Promise<{ secretFile: string; newSecret: string | undefined }> {
  await ensureCallerWithSecretFile(pool, devSidecarCallerName, { allow: ["Store"], integrations: ["*"] }, path.join(dataDir, "dev-sidecar-secret"));
  // Keep "every permission" true as RPCs are added.
  const secretFile = path.join(dataDir, "dev-caller-secret");
  const newSecret = await ensureCallerWithSecretFile(pool, devCallerName, { allow: rpcNames, integrations: ["*"], refreshTokens: true }, secretFile);
  return { secretFile, newSecret };
}

/** Gives caller `name` the policy `spec` and a usable secret in `secretFile`; returns the secret when it is new. */
async function ensureCallerWithSecretFile(pool: Pool, name: string, spec: PolicySpec, secretFile: string): Promise<string | undefined> {
  const existing = await selectCallerByName(pool, name);
  if (existing !== undefined && existing.revoked_at === null && existsSync(secretFile)) {
    await updateCallerPolicy(pool, name, policyColumns(spec));
    return undefined;
  }
  let secret: string;
  if (existing === undefined) {
    secret = (await addCaller(pool, name, spec)).secret;
  } else {
    await updateCallerPolicy(pool, name, policyColumns(spec));
    secret = await rotateCallerSecret(pool, name);
  }
  writeFileSync(secretFile, secret + "\n", { mode: 0o600 });
  return secret;
}
