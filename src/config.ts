/**
 * Configuration: the only module that reads the environment. Every setting is
 * documented in README.md and .env.example; loadConfig() turns the environment
 * into one frozen, typed object or throws a ConfigError whose message is the one
 * line an operator needs to fix it.
 */
import { providerSettingsFromEnv, type ProviderSettings } from "./providers/catalogue.js";
import type { RefreshSettings } from "./refresh/refresher.js";
import path from "node:path";

/** A configuration problem; its message names the setting and what to do. */
export class ConfigError extends Error {
  override readonly name = "ConfigError";
}

/** Where the key ring comes from. */
export type KeySource =
  | { kind: "env"; value: string }
  | { kind: "file"; path: string }
  /** Not configured: a development key ring in the data folder (refused in production). */
  | { kind: "development"; path: string };

/** Log levels pino understands, quietest last. */
export const logLevels = ["trace", "debug", "info", "warn", "error", "fatal", "silent"] as const;
/** One of {@link logLevels}. */
export type LogLevel = (typeof logLevels)[number];

/** The service's settings, as loaded from the environment. */
export interface Config {
  readonly production: boolean;
  /** PostgreSQL URL; undefined means: run an embedded PostgreSQL in dataDir. */
  readonly databaseUrl: string | undefined;
  /** Folder for the embedded database and the development key ring. */
  readonly dataDir: string;
  /** Port of the embedded PostgreSQL; 0 picks a free one at each start. */
  readonly embeddedPostgresPort: number;
  readonly host: string;
  readonly port: number;
  /** TLS certificate and key (PEM files); both or neither. clientCaFile turns on mutual TLS. */
  readonly tls: { readonly certFile: string; readonly keyFile: string; readonly clientCaFile: string | undefined } | undefined;
  /** Services callable without a credential. */
  readonly openServices: ReadonlySet<string>;
  /** How often each replica re-reads the callers table even without a notification. */
  readonly callersReloadMs: number;
  readonly keySource: KeySource;
  /** Run pending migrations when `serve` starts. */
  readonly migrateOnStart: boolean;
  readonly logLevel: LogLevel;
  /** Largest request or response message, in bytes. */
  readonly maxMessageBytes: number;
  readonly dbPoolMax: number;
  /** How long graceful shutdown waits for in-flight calls before cutting them. */
  readonly shutdownGraceMs: number;
  /** The audit log's group commit and live feed. */
  readonly audit: AuditSettings;
  /** A provider catalogue file merged over the built-in one. */
  readonly providersFile: string | undefined;
  /** Client credentials and URL parameters per provider (TOKENVAULT_PROVIDER_<NAME>_...). */
  readonly providerSettings: (provider: string) => ProviderSettings;
  /** Refresh on Get: provider timeout and backoff. */
  readonly refresh: RefreshSettings;
}

/** The refresh settings when no variable sets them. */
export const defaultRefreshSettings: RefreshSettings = Object.freeze({
  providerTimeoutMs: 10_000,
  backoffBaseMs: 2_000,
  backoffMaxMs: 300_000,
});

/** The audit settings when no variable sets them. */
export const defaultAuditSettings: AuditSettings = Object.freeze({
  maxBatch: 256,
  maxWaitMs: 0,
  maxQueue: 10_000,
  lockTimeoutMs: 5_000,
  ringSize: 4_096,
  pollMs: 1_000,
  maxLag: 10_000,
});

/** Settings of the audit log (see src/audit/). */
export interface AuditSettings {
  /** Most events committed in one transaction. */
  readonly maxBatch: number;
  /** How long an idle writer waits for more events before committing (0: at once). */
  readonly maxWaitMs: number;
  /** Most events waiting for a commit; more are refused with UNAVAILABLE. */
  readonly maxQueue: number;
  /** A batch waiting longer than this for the chain's lock fails (and its calls with it). */
  readonly lockTimeoutMs: number;
  /** Recent events kept in memory for StreamAudit followers. */
  readonly ringSize: number;
  /** How often the head is re-read in case a notification was missed. */
  readonly pollMs: number;
  /** How far a caught-up follower may fall behind before its stream ends with RESOURCE_EXHAUSTED. */
  readonly maxLag: number;
}

type Env = Readonly<Record<string, string | undefined>>;

/**
 * Reads the configuration from `env` (process.env by default).
 * @throws ConfigError naming the first invalid setting.
 */
export function loadConfig(env: Env = process.env): Config {
  const production = env.NODE_ENV === "production";
  const dataDir = path.resolve(nonEmpty(env, "TOKENVAULT_DATA_DIR") ?? ".tokenvault");
  const databaseUrl = nonEmpty(env, "DATABASE_URL");
  if (databaseUrl !== undefined) {
    let protocol: string;
    try {
      protocol = new URL(databaseUrl).protocol;
    } catch {
      throw new ConfigError("DATABASE_URL is not a URL: expected postgres://user:password@host:5432/database");
    }
    if (protocol !== "postgres:" && protocol !== "postgresql:") {
      throw new ConfigError("DATABASE_URL must start with postgres:// or postgresql://");
    }
  } else if (production) {
    throw new ConfigError(
      "DATABASE_URL is required when NODE_ENV=production: the embedded PostgreSQL is for development only",
    );
  }

  const certFile = nonEmpty(env, "TOKENVAULT_TLS_CERT_FILE");
  const keyFile = nonEmpty(env, "TOKENVAULT_TLS_KEY_FILE");
  if ((certFile === undefined) !== (keyFile === undefined)) {
    throw new ConfigError("set both TOKENVAULT_TLS_CERT_FILE and TOKENVAULT_TLS_KEY_FILE, or neither");
  }

  const clientCaFile = nonEmpty(env, "TOKENVAULT_TLS_CLIENT_CA_FILE");
  if (clientCaFile !== undefined && certFile === undefined) {
    throw new ConfigError("TOKENVAULT_TLS_CLIENT_CA_FILE needs TLS: set TOKENVAULT_TLS_CERT_FILE and TOKENVAULT_TLS_KEY_FILE too");
  }
  const openServices = new Set<string>();
  if (boolean(env, "TOKENVAULT_OPEN_HEALTH", true)) openServices.add("grpc.health.v1.Health");
  if (boolean(env, "TOKENVAULT_OPEN_REFLECTION", true)) openServices.add("grpc.reflection.v1.ServerReflection");

  const keysValue = nonEmpty(env, "TOKENVAULT_KEYS");
  const keysFile = nonEmpty(env, "TOKENVAULT_KEYS_FILE");
  if (keysValue !== undefined && keysFile !== undefined) {
    throw new ConfigError("set TOKENVAULT_KEYS or TOKENVAULT_KEYS_FILE, not both");
  }
  let keySource: KeySource;
  if (keysValue !== undefined) keySource = { kind: "env", value: keysValue };
  else if (keysFile !== undefined) keySource = { kind: "file", path: path.resolve(keysFile) };
  else if (production) {
    throw new ConfigError(
      "TOKENVAULT_KEYS or TOKENVAULT_KEYS_FILE is required when NODE_ENV=production (generate a key with `tokenvault keys generate`)",
    );
  } else keySource = { kind: "development", path: path.join(dataDir, "dev-keys.json") };

  const logLevel = (nonEmpty(env, "TOKENVAULT_LOG_LEVEL") ?? "info") as LogLevel;
  if (!logLevels.includes(logLevel)) {
    throw new ConfigError(`TOKENVAULT_LOG_LEVEL must be one of ${logLevels.join(", ")}`);
  }

  const audit: AuditSettings = Object.freeze({
    maxBatch: integer(env, "TOKENVAULT_AUDIT_MAX_BATCH", defaultAuditSettings.maxBatch, 1, 10_000),
    maxWaitMs: integer(env, "TOKENVAULT_AUDIT_MAX_WAIT_MS", defaultAuditSettings.maxWaitMs, 0, 1_000),
    maxQueue: integer(env, "TOKENVAULT_AUDIT_MAX_QUEUE", defaultAuditSettings.maxQueue, 1, 1_000_000),
    lockTimeoutMs: integer(env, "TOKENVAULT_AUDIT_LOCK_TIMEOUT_MS", defaultAuditSettings.lockTimeoutMs, 1, 600_000),
    ringSize: integer(env, "TOKENVAULT_AUDIT_RING_SIZE", defaultAuditSettings.ringSize, 16, 1_000_000),
    pollMs: integer(env, "TOKENVAULT_AUDIT_POLL_MS", defaultAuditSettings.pollMs, 10, 60_000),
    maxLag: integer(env, "TOKENVAULT_AUDIT_MAX_LAG", defaultAuditSettings.maxLag, 1, 10_000_000),
  });
  // One batch can land at once: a follower bound below it would end streams that keep up.
  if (audit.maxLag < audit.maxBatch) {
    throw new ConfigError(`TOKENVAULT_AUDIT_MAX_LAG (${audit.maxLag}) must be at least TOKENVAULT_AUDIT_MAX_BATCH (${audit.maxBatch})`);
  }

  return Object.freeze({
    production,
    databaseUrl,
    dataDir,
    embeddedPostgresPort: integer(env, "TOKENVAULT_EMBEDDED_PG_PORT", 0, 0, 65535),
    host: nonEmpty(env, "TOKENVAULT_HOST") ?? "127.0.0.1",
    port: integer(env, "TOKENVAULT_PORT", 50051, 0, 65535),
    tls: certFile !== undefined && keyFile !== undefined
      ? Object.freeze({
          certFile: path.resolve(certFile),
          keyFile: path.resolve(keyFile),
          clientCaFile: clientCaFile === undefined ? undefined : path.resolve(clientCaFile),
        })
      : undefined,
    keySource: Object.freeze(keySource),
    openServices,
    callersReloadMs: integer(env, "TOKENVAULT_CALLERS_RELOAD_MS", 5_000, 100, 600_000),
    migrateOnStart: boolean(env, "TOKENVAULT_MIGRATE_ON_START", true),
    logLevel,
    maxMessageBytes: integer(env, "TOKENVAULT_MAX_MESSAGE_BYTES", 256 * 1024, 64 * 1024, 16 * 1024 * 1024),
    dbPoolMax: integer(env, "TOKENVAULT_DB_POOL_MAX", 10, 1, 1000),
    shutdownGraceMs: integer(env, "TOKENVAULT_SHUTDOWN_GRACE_MS", 10_000, 0, 600_000),
    providersFile: nonEmpty(env, "TOKENVAULT_PROVIDERS_FILE") === undefined ? undefined : path.resolve(nonEmpty(env, "TOKENVAULT_PROVIDERS_FILE")!),
    providerSettings: providerSettingsFromEnv({ ...env }),
    refresh: Object.freeze({
      providerTimeoutMs: integer(env, "TOKENVAULT_REFRESH_TIMEOUT_MS", defaultRefreshSettings.providerTimeoutMs, 100, 120_000),
      backoffBaseMs: integer(env, "TOKENVAULT_REFRESH_BACKOFF_BASE_MS", defaultRefreshSettings.backoffBaseMs, 10, 3_600_000),
      backoffMaxMs: integer(env, "TOKENVAULT_REFRESH_BACKOFF_MAX_MS", defaultRefreshSettings.backoffMaxMs, 10, 86_400_000),
    }),
    audit,
  });
}

/** Where a secret setting comes from (the sidecar's caller secret, the ticket keys). */
export type SecretSource =
  | { kind: "env"; value: string }
  | { kind: "file"; path: string }
  /** Not configured: a file in the data folder (for the caller secret, `serve` on the embedded database writes it). */
  | { kind: "development"; path: string };

/** The OAuth sidecar's settings (`tokenvault sidecar`, `tokenvault tickets`). */
export interface SidecarConfig {
  readonly production: boolean;
  readonly dataDir: string;
  readonly logLevel: LogLevel;
  readonly host: string;
  readonly port: number;
  /** The origin browsers and providers reach the sidecar at; undefined: http://localhost:<bound port>. */
  readonly publicUrl: URL | undefined;
  /** Whether cookies are marked Secure: always, unless the public URL is plain http on a loopback name. */
  readonly secureCookies: boolean;
  readonly tls: { readonly certFile: string; readonly keyFile: string } | undefined;
  /** The vault's gRPC address. */
  readonly vaultUrl: string;
  readonly vaultCaFile: string | undefined;
  readonly callerSecret: SecretSource;
  readonly ticketKeys: SecretSource;
  /** Where browsers may be sent back to (see src/sidecar/return-urls.ts); empty means not configured. */
  readonly returnUrls: readonly string[];
  readonly trustedProxies: number;
  readonly providerTimeoutMs: number;
  readonly vaultTimeoutMs: number;
  readonly providersFile: string | undefined;
  readonly providerSettings: (provider: string) => ProviderSettings;
  readonly shutdownGraceMs: number;
}

/**
 * Reads the sidecar's configuration from `env`. It shares the provider
 * settings with the vault but nothing about the database or encryption keys:
 * the sidecar has neither.
 * @throws ConfigError naming the first invalid setting.
 */
export function loadSidecarConfig(env: Env = process.env): SidecarConfig {
  const production = env.NODE_ENV === "production";
  const dataDir = path.resolve(nonEmpty(env, "TOKENVAULT_DATA_DIR") ?? ".tokenvault");
  const logLevel = (nonEmpty(env, "TOKENVAULT_LOG_LEVEL") ?? "info") as LogLevel;
  if (!logLevels.includes(logLevel)) throw new ConfigError(`TOKENVAULT_LOG_LEVEL must be one of ${logLevels.join(", ")}`);

  const port = integer(env, "TOKENVAULT_SIDECAR_PORT", 8080, 0, 65535);
  const publicRaw = nonEmpty(env, "TOKENVAULT_SIDECAR_PUBLIC_URL");
  let publicUrl: URL | undefined;
  if (publicRaw !== undefined) {
    try {
      publicUrl = new URL(publicRaw);
    } catch {
      throw new ConfigError(`TOKENVAULT_SIDECAR_PUBLIC_URL is not a URL: expected https://connect.example.com`);
    }
    if (publicUrl.pathname !== "/" || publicUrl.search !== "" || publicUrl.hash !== "" || publicUrl.username !== "" || publicUrl.password !== "") {
      throw new ConfigError("TOKENVAULT_SIDECAR_PUBLIC_URL must be an origin only (scheme, host, port), e.g. https://connect.example.com");
    }
  } else if (production) {
    throw new ConfigError("TOKENVAULT_SIDECAR_PUBLIC_URL is required when NODE_ENV=production (the https origin providers redirect back to)");
  }
  const loopback = publicUrl === undefined || ["localhost", "127.0.0.1", "[::1]"].includes(publicUrl.hostname);
  if (publicUrl !== undefined && publicUrl.protocol !== "https:" && !(publicUrl.protocol === "http:" && loopback)) {
    throw new ConfigError("TOKENVAULT_SIDECAR_PUBLIC_URL must be https (plain http only on localhost, for development)");
  }

  const certFile = nonEmpty(env, "TOKENVAULT_SIDECAR_TLS_CERT_FILE");
  const keyFile = nonEmpty(env, "TOKENVAULT_SIDECAR_TLS_KEY_FILE");
  if ((certFile === undefined) !== (keyFile === undefined)) {
    throw new ConfigError("set both TOKENVAULT_SIDECAR_TLS_CERT_FILE and TOKENVAULT_SIDECAR_TLS_KEY_FILE, or neither");
  }

  const vaultUrl = nonEmpty(env, "TOKENVAULT_URL") ?? "http://127.0.0.1:50051";
  if (!isOriginUrl(vaultUrl)) throw new ConfigError("TOKENVAULT_URL must be http://host:port or https://host:port");

  const callerSecret = valueOrFile(env, "TOKENVAULT_CALLER_SECRET", production ? undefined : path.join(dataDir, "dev-sidecar-secret"), "a caller allowed only Store");
  const ticketKeys = valueOrFile(env, "TOKENVAULT_TICKET_KEYS", production ? undefined : path.join(dataDir, "dev-ticket-keys"), "make one with `tokenvault tickets generate-key`");

  const providersFile = nonEmpty(env, "TOKENVAULT_PROVIDERS_FILE");
  const vaultCaFile = nonEmpty(env, "TOKENVAULT_VAULT_CA_FILE");
  return Object.freeze({
    production,
    dataDir,
    logLevel,
    host: nonEmpty(env, "TOKENVAULT_SIDECAR_HOST") ?? "127.0.0.1",
    port,
    publicUrl,
    secureCookies: publicUrl !== undefined && !(publicUrl.protocol === "http:" && loopback),
    tls: certFile !== undefined && keyFile !== undefined ? Object.freeze({ certFile: path.resolve(certFile), keyFile: path.resolve(keyFile) }) : undefined,
    vaultUrl: vaultUrl.replace(/\/$/, ""),
    vaultCaFile: vaultCaFile === undefined ? undefined : path.resolve(vaultCaFile),
    callerSecret: Object.freeze(callerSecret),
    ticketKeys: Object.freeze(ticketKeys),
    returnUrls: Object.freeze((nonEmpty(env, "TOKENVAULT_SIDECAR_RETURN_URLS") ?? "").split(",").map((u) => u.trim()).filter(Boolean)),
    trustedProxies: integer(env, "TOKENVAULT_SIDECAR_TRUSTED_PROXIES", 0, 0, 10),
    providerTimeoutMs: integer(env, "TOKENVAULT_SIDECAR_PROVIDER_TIMEOUT_MS", 10_000, 100, 120_000),
    vaultTimeoutMs: integer(env, "TOKENVAULT_SIDECAR_VAULT_TIMEOUT_MS", 10_000, 100, 120_000),
    providersFile: providersFile === undefined ? undefined : path.resolve(providersFile),
    providerSettings: providerSettingsFromEnv({ ...env }),
    shutdownGraceMs: integer(env, "TOKENVAULT_SHUTDOWN_GRACE_MS", 10_000, 0, 600_000),
  });
}

/** Whether `value` is an http(s) origin: scheme, host and port only (no credentials, path or query). */
function isOriginUrl(value: string): boolean {
  if (/\s/.test(value)) return false;
  try {
    const url = new URL(value);
    return (url.protocol === "http:" || url.protocol === "https:") && url.username === "" && url.password === "" && url.pathname === "/" && url.search === "" && url.hash === "" && !value.includes("?") && !value.includes("#");
  } catch {
    return false;
  }
}

/**
 * A secret given as `NAME` (the value) or `NAME_FILE` (a path), not both;
 * else the development file, or a ConfigError when there is none (production).
 */
function valueOrFile(env: Env, name: string, developmentPath: string | undefined, hint: string): SecretSource {
  const value = nonEmpty(env, name);
  const file = nonEmpty(env, `${name}_FILE`);
  if (value !== undefined && file !== undefined) throw new ConfigError(`set ${name} or ${name}_FILE, not both`);
  if (value !== undefined) return { kind: "env", value };
  if (file !== undefined) return { kind: "file", path: path.resolve(file) };
  if (developmentPath === undefined) throw new ConfigError(`${name} or ${name}_FILE is required when NODE_ENV=production (${hint})`);
  return { kind: "development", path: developmentPath };
}

function nonEmpty(env: Env, name: string): string | undefined {
  const value = env[name]?.trim();
  return value === undefined || value === "" ? undefined : value;
}

function integer(env: Env, name: string, fallback: number, min: number, max: number): number {
  const raw = nonEmpty(env, name);
  if (raw === undefined) return fallback;
  const value = /^\d+$/.test(raw) ? Number(raw) : NaN;
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    throw new ConfigError(`${name} must be a whole number from ${min} to ${max}, got "${raw}"`);
  }
  return value;
}

function boolean(env: Env, name: string, fallback: boolean): boolean {
  const raw = nonEmpty(env, name)?.toLowerCase();
  if (raw === undefined) return fallback;
  if (["1", "true", "yes", "on"].includes(raw)) return true;
  if (["0", "false", "no", "off"].includes(raw)) return false;
  throw new ConfigError(`${name} must be true or false, got "${raw}"`);
}
