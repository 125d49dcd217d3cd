/**
 * The provider catalogue: OAuth providers and the integrations that use them,
 * as data (catalogue.json beside this file, plus an optional override file
 * merged over it entry by entry). Client credentials come from the
 * environment, never from a file in the repository.
 */
import { readFileSync } from "node:fs";

/** How the client authenticates at the token endpoint (RFC 6749 §2.3.1). */
export type TokenEndpointAuthMethod = "client_secret_post" | "client_secret_basic";

/** One OAuth provider's endpoints and habits. */
export interface ProviderEntry {
  authorizationUrl: string;
  tokenUrl: string;
  /** RFC 7009 revocation endpoint, or null when the provider has none. */
  revocationUrl: string | null;
  tokenEndpointAuthMethod: TokenEndpointAuthMethod;
  /** How scopes are joined in requests (" " or ","). */
  scopeSeparator: string;
  /** Whether the authorization request takes a PKCE S256 challenge. */
  pkce: boolean;
  /** Extra authorization request parameters (Google: access_type=offline ...). */
  authorizationParams: Record<string, string>;
  /** Scopes always requested (Microsoft: offline_access, for a refresh token). */
  requiredScopes: string[];
  /** Whether a refresh request repeats the connection's scopes (Microsoft). */
  refreshSendsScope: boolean;
  /** Whether each refresh returns a new refresh token that replaces the old. */
  refreshTokenRotates: boolean;
  /** Values for {placeholders} in the URLs, overridable by settings (Microsoft: tenant=common). */
  defaults?: Record<string, string>;
}

/** An integration (what callers name, e.g. "gmail") and its provider. */
export interface IntegrationEntry {
  provider: string;
  /** Scopes asked for on connect. */
  scopes: string[];
}

/** The catalogue file's shape. */
export interface CatalogueFile {
  providers: Record<string, ProviderEntry>;
  integrations: Record<string, IntegrationEntry>;
}

/** A provider ready to call: URLs filled in, credentials attached. */
export interface ResolvedProvider extends Omit<ProviderEntry, "defaults"> {
  name: string;
  clientId: string | undefined;
  clientSecret: string | undefined;
}

/** An integration with its provider resolved. */
export interface ResolvedIntegration {
  name: string;
  scopes: string[];
  provider: ResolvedProvider;
}

/** A catalogue that cannot be used; the message names the entry and field. */
export class CatalogueError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CatalogueError";
  }
}

/** The catalogue shipped with the service, found from src/providers or dist/providers alike. */
export const builtInCataloguePath = new URL("../../src/providers/catalogue.json", import.meta.url);

/** Per-provider settings from the environment. */
export interface ProviderSettings {
  clientId?: string | undefined;
  clientSecret?: string | undefined;
  /** Values for URL placeholders, e.g. tenant. */
  params?: Record<string, string>;
}

/** The loaded catalogue. */
export interface Catalogue {
  /** The integration, or undefined when the catalogue has no such entry. */
  integration(name: string): ResolvedIntegration | undefined;
  /** Every integration name. */
  integrationNames(): string[];
}

/**
 * Reads the built-in catalogue, merges `overrideFile` over it (an entry given
 * there replaces fields of the built-in entry of the same name), checks it, and
 * attaches each provider's settings (read from `env` by {@link providerSettingsFromEnv}).
 */
export function loadCatalogue(options: { overrideFile?: string | undefined; settings: (provider: string) => ProviderSettings }): Catalogue {
  const base = readJson(builtInCataloguePath);
  // No prototype: an entry named "toString" or "constructor" is only what the files say.
  const merged: CatalogueFile = {
    providers: Object.assign(Object.create(null) as Record<string, ProviderEntry>, base.providers),
    integrations: Object.assign(Object.create(null) as Record<string, IntegrationEntry>, base.integrations),
  };
  if (options.overrideFile !== undefined) {
    const override = readJson(options.overrideFile);
    for (const [name, entry] of Object.entries(override.providers ?? {})) merged.providers[name] = { ...merged.providers[name], ...entry } as ProviderEntry;
    for (const [name, entry] of Object.entries(override.integrations ?? {})) merged.integrations[name] = { ...merged.integrations[name], ...entry } as IntegrationEntry;
  }
  for (const [name, entry] of Object.entries(merged.providers)) checkProvider(name, entry);
  for (const [name, entry] of Object.entries(merged.integrations)) {
    if (typeof entry.provider !== "string" || !Object.hasOwn(merged.providers, entry.provider)) throw new CatalogueError(`integration "${name}" names provider "${entry.provider}", which the catalogue does not have`);
    if (!Array.isArray(entry.scopes) || !entry.scopes.every((s) => typeof s === "string")) throw new CatalogueError(`integration "${name}": scopes must be a list of strings`);
  }

  const resolved = new Map<string, ResolvedIntegration>();
  for (const [name, entry] of Object.entries(merged.integrations)) {
    const p = merged.providers[entry.provider]!;
    const settings = options.settings(entry.provider);
    const params: Record<string, string> = { ...p.defaults, ...settings.params };
    if (settings.clientId !== undefined) params.client_id = settings.clientId;
    const fill = (url: string) => url.replace(/\{([a-z_]+)\}/g, (whole, key: string) => (params[key] !== undefined ? encodeURIComponent(params[key]) : whole));
    const { defaults: _defaults, ...rest } = p;
    resolved.set(name, {
      name,
      scopes: entry.scopes,
      provider: {
        ...rest,
        name: entry.provider,
        authorizationUrl: fill(p.authorizationUrl),
        tokenUrl: fill(p.tokenUrl),
        revocationUrl: p.revocationUrl === null ? null : fill(p.revocationUrl),
        clientId: settings.clientId,
        clientSecret: settings.clientSecret,
      },
    });
  }
  return {
    integration: (name) => resolved.get(name),
    integrationNames: () => [...resolved.keys()].sort(),
  };
}

/**
 * A provider's settings from the environment: TOKENVAULT_PROVIDER_<NAME>_CLIENT_ID,
 * _CLIENT_SECRET, and _<PARAM> for URL placeholders (e.g. _TENANT).
 */
export function providerSettingsFromEnv(env: Readonly<Record<string, string | undefined>>): (provider: string) => ProviderSettings {
  return (provider) => {
    const prefix = `TOKENVAULT_PROVIDER_${provider.toUpperCase().replace(/[^A-Z0-9]/g, "_")}_`;
    const params: Record<string, string> = {};
    let clientId: string | undefined;
    let clientSecret: string | undefined;
    for (const [key, value] of Object.entries(env)) {
      if (!key.startsWith(prefix) || value === undefined || value.trim() === "") continue;
      const name = key.slice(prefix.length);
      if (name === "CLIENT_ID") clientId = value.trim();
      else if (name === "CLIENT_SECRET") clientSecret = value.trim();
      else params[name.toLowerCase()] = value.trim();
    }
    return { clientId, clientSecret, params };
  };
}

function readJson(file: string | URL): Partial<CatalogueFile> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(file, "utf8"));
  } catch (err) {
    throw new CatalogueError(`cannot read the provider catalogue ${String(file)}: ${(err as Error).message}`);
  }
  const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);
  if (!isObject(parsed)) throw new CatalogueError(`the provider catalogue ${String(file)} must be a JSON object with "providers" and "integrations"`);
  for (const section of ["providers", "integrations"] as const) {
    const value = parsed[section];
    if (value === undefined) continue;
    if (!isObject(value)) throw new CatalogueError(`the provider catalogue ${String(file)}: "${section}" must be an object`);
    for (const [name, entry] of Object.entries(value)) {
      if (!isObject(entry)) throw new CatalogueError(`the provider catalogue ${String(file)}: ${section} entry "${name}" must be an object`);
    }
  }
  return parsed as Partial<CatalogueFile>;
}

/** Whether `url` is an http(s) URL once its {placeholders} are filled. */
function isHttpUrl(url: unknown): boolean {
  if (typeof url !== "string") return false;
  try {
    const parsed = new URL(url.replace(/\{[a-z_]+\}/g, "x"));
    return (parsed.protocol === "https:" || parsed.protocol === "http:") && parsed.hostname !== "" && !/\s/.test(url);
  } catch {
    return false;
  }
}

function checkProvider(name: string, p: ProviderEntry): void {
  const where = `provider "${name}"`;
  for (const field of ["authorizationUrl", "tokenUrl"] as const) {
    if (!isHttpUrl(p[field])) throw new CatalogueError(`${where}: ${field} must be an http(s) URL`);
  }
  if (p.revocationUrl !== null && !isHttpUrl(p.revocationUrl)) {
    throw new CatalogueError(`${where}: revocationUrl must be an http(s) URL or null`);
  }
  if (p.tokenEndpointAuthMethod !== "client_secret_post" && p.tokenEndpointAuthMethod !== "client_secret_basic") {
    throw new CatalogueError(`${where}: tokenEndpointAuthMethod must be client_secret_post or client_secret_basic`);
  }
  if (typeof p.scopeSeparator !== "string" || p.scopeSeparator.length !== 1) throw new CatalogueError(`${where}: scopeSeparator must be one character`);
  for (const flag of ["pkce", "refreshSendsScope", "refreshTokenRotates"] as const) {
    if (typeof p[flag] !== "boolean") throw new CatalogueError(`${where}: ${flag} must be true or false`);
  }
  if (!Array.isArray(p.requiredScopes)) throw new CatalogueError(`${where}: requiredScopes must be a list`);
  if (typeof p.authorizationParams !== "object" || p.authorizationParams === null) throw new CatalogueError(`${where}: authorizationParams must be an object`);
}
