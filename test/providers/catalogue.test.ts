/**
 * The provider catalogue as operators configure it:
 *
 * 1. The built-in catalogue loads and describes Google, Microsoft, GitHub,
 *    Slack, HubSpot and Salesforce as documented (Google: client_secret_post,
 *    access_type=offline, a revocation endpoint; Microsoft: offline_access,
 *    {tenant} defaulting to "common", no revocation endpoint ...).
 * 2. An override file replaces fields entry by entry and adds providers and
 *    integrations without code; settings fill the URL placeholders and attach
 *    the client credentials.
 * 3. Invalid entries throw a CatalogueError naming the entry (and field).
 * 4. providerSettingsFromEnv (and loadConfig) read TOKENVAULT_PROVIDER_<NAME>_*.
 * 5. `tokenvault serve` refuses to start on a broken TOKENVAULT_PROVIDERS_FILE
 *    with one clear line.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  builtInCataloguePath,
  CatalogueError,
  loadCatalogue,
  providerSettingsFromEnv,
  type CatalogueFile,
  type ProviderSettings,
} from "../../src/providers/catalogue.js";
import { loadConfig } from "../../src/config.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { cleanupCli, cliEnv, newKey, runCli, tempDir } from "../cli/helpers.js";

let dir: string;

beforeAll(() => {
  dir = mkdtempSync(path.join(tmpdir(), "tokenvault-catalogue-"));
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

let fileCount = 0;
/** Writes `content` (JSON unless a string) to a fresh file and returns its path. */
function file(content: unknown): string {
  const f = path.join(dir, `override-${++fileCount}.json`);
  writeFileSync(f, typeof content === "string" ? content : JSON.stringify(content));
  return f;
}

const noSettings = (): ProviderSettings => ({});

/** A complete provider entry, for adding providers. */
const fullEntry = {
  authorizationUrl: "https://idp.example.com/authorize",
  tokenUrl: "https://idp.example.com/token",
  revocationUrl: "https://idp.example.com/revoke",
  tokenEndpointAuthMethod: "client_secret_basic",
  scopeSeparator: " ",
  pkce: true,
  authorizationParams: {},
  requiredScopes: [],
  refreshSendsScope: false,
  refreshTokenRotates: true,
};

/** Loads with `override` and expects a CatalogueError; returns its message. */
function refusal(override: unknown): string {
  const overrideFile = file(override);
  let caught: unknown;
  try {
    loadCatalogue({ overrideFile, settings: noSettings });
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(CatalogueError);
  return (caught as CatalogueError).message;
}

// ---------------------------------------------------------------------------
// 1. The built-in catalogue
// ---------------------------------------------------------------------------

describe("the built-in catalogue", () => {
  const catalogue = loadCatalogue({ settings: noSettings });
  const provider = (integration: string) => {
    const entry = catalogue.integration(integration);
    if (entry === undefined) throw new Error(`no integration ${integration}`);
    return entry.provider;
  };

  it("has the documented integrations on Google, Microsoft, GitHub, Slack, HubSpot and Salesforce", () => {
    expect(catalogue.integrationNames()).toEqual(["github", "gmail", "google-calendar", "hubspot", "outlook", "salesforce", "slack"]);
    const providers = Object.fromEntries(catalogue.integrationNames().map((name) => [name, provider(name).name]));
    expect(providers).toEqual({
      gmail: "google",
      "google-calendar": "google",
      outlook: "microsoft",
      github: "github",
      slack: "slack",
      hubspot: "hubspot",
      salesforce: "salesforce",
    });
    const raw = JSON.parse(readFileSync(builtInCataloguePath, "utf8")) as CatalogueFile;
    expect(Object.keys(raw.providers).sort()).toEqual(["github", "google", "hubspot", "microsoft", "salesforce", "slack"]);
    expect(catalogue.integration("acme")).toBeUndefined();
  });

  it("Google: client_secret_post, access_type=offline, a revocation endpoint, refresh without scope", () => {
    const google = provider("gmail");
    expect(google).toMatchObject({
      name: "google",
      authorizationUrl: "https://accounts.google.com/o/oauth2/v2/auth",
      tokenUrl: "https://oauth2.googleapis.com/token",
      revocationUrl: "https://oauth2.googleapis.com/revoke",
      tokenEndpointAuthMethod: "client_secret_post",
      scopeSeparator: " ",
      pkce: true,
      refreshSendsScope: false,
      refreshTokenRotates: false,
    });
    expect(google.authorizationParams.access_type).toBe("offline");
    expect(catalogue.integration("gmail")!.scopes).toEqual(["https://www.googleapis.com/auth/gmail.readonly"]);
    expect(provider("google-calendar").tokenUrl).toBe(google.tokenUrl);
  });

  it("Microsoft: offline_access, {tenant} defaulting to common, scope on refresh, rotating refresh tokens, no revocation", () => {
    const ms = provider("outlook");
    expect(ms).toMatchObject({
      name: "microsoft",
      authorizationUrl: "https://login.microsoftonline.com/common/oauth2/v2.0/authorize",
      tokenUrl: "https://login.microsoftonline.com/common/oauth2/v2.0/token",
      revocationUrl: null,
      tokenEndpointAuthMethod: "client_secret_post",
      refreshSendsScope: true,
      refreshTokenRotates: true,
    });
    expect(ms.requiredScopes).toContain("offline_access");
    expect(catalogue.integration("outlook")!.scopes).toContain("offline_access");
    // The default is not a field of the resolved provider.
    expect("defaults" in ms).toBe(false);
  });

  it("GitHub, Slack, HubSpot and Salesforce as documented", () => {
    expect(provider("github")).toMatchObject({ tokenUrl: "https://github.com/login/oauth/access_token", revocationUrl: null, refreshTokenRotates: true });
    expect(provider("slack")).toMatchObject({ tokenUrl: "https://slack.com/api/oauth.v2.access", scopeSeparator: ",", revocationUrl: null });
    expect(provider("hubspot")).toMatchObject({ tokenUrl: "https://api.hubapi.com/oauth/v1/token", revocationUrl: null });
    expect(provider("hubspot").requiredScopes).toContain("oauth");
    expect(provider("salesforce")).toMatchObject({
      tokenUrl: "https://login.salesforce.com/services/oauth2/token",
      revocationUrl: "https://login.salesforce.com/services/oauth2/revoke",
    });
    expect(provider("salesforce").requiredScopes).toContain("refresh_token");
  });

  it("every built-in URL is https, and every entry has every field", () => {
    for (const name of catalogue.integrationNames()) {
      const p = provider(name);
      for (const url of [p.authorizationUrl, p.tokenUrl, p.revocationUrl]) {
        if (url !== null) expect(new URL(url).protocol, `${name}: ${url}`).toBe("https:");
      }
      expect(["client_secret_post", "client_secret_basic"]).toContain(p.tokenEndpointAuthMethod);
      expect(typeof p.pkce).toBe("boolean");
      expect(Array.isArray(p.requiredScopes)).toBe(true);
    }
  });

  it("without settings a provider has no client credentials; settings attach them per provider, not per integration", () => {
    expect(provider("gmail")).toMatchObject({ clientId: undefined, clientSecret: undefined });
    const asked: string[] = [];
    const withCredentials = loadCatalogue({
      settings: (p) => {
        asked.push(p);
        return p === "google" ? { clientId: "gid", clientSecret: "gsecret" } : {};
      },
    });
    expect(withCredentials.integration("gmail")!.provider).toMatchObject({ clientId: "gid", clientSecret: "gsecret" });
    expect(withCredentials.integration("google-calendar")!.provider).toMatchObject({ clientId: "gid", clientSecret: "gsecret" });
    expect(withCredentials.integration("outlook")!.provider).toMatchObject({ clientId: undefined, clientSecret: undefined });
    expect(new Set(asked)).toEqual(new Set(["google", "microsoft", "github", "slack", "hubspot", "salesforce"]));
  });

  it("a tenant from the settings fills {tenant}, URL-encoded", () => {
    const contoso = loadCatalogue({ settings: (p) => (p === "microsoft" ? { params: { tenant: "contoso.onmicrosoft.com" } } : {}) });
    expect(contoso.integration("outlook")!.provider.tokenUrl).toBe("https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token");
    expect(contoso.integration("outlook")!.provider.authorizationUrl).toBe(
      "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize",
    );
    const odd = loadCatalogue({ settings: (p) => (p === "microsoft" ? { params: { tenant: "a/b?c" } } : {}) });
    expect(odd.integration("outlook")!.provider.tokenUrl).toBe("https://login.microsoftonline.com/a%2Fb%3Fc/oauth2/v2.0/token");
  });
});

// ---------------------------------------------------------------------------
// 2. Override files
// ---------------------------------------------------------------------------

describe("an override file", () => {
  it("replaces only the fields it names, per entry", () => {
    const catalogue = loadCatalogue({
      overrideFile: file({ providers: { google: { tokenUrl: "http://127.0.0.1:9/token", revocationUrl: null } } }),
      settings: noSettings,
    });
    const google = catalogue.integration("gmail")!.provider;
    expect(google.tokenUrl).toBe("http://127.0.0.1:9/token");
    expect(google.revocationUrl).toBeNull();
    // Everything else of the entry is the built-in one.
    expect(google).toMatchObject({
      authorizationUrl: "https://accounts.google.com/o/oauth2/v2/auth",
      tokenEndpointAuthMethod: "client_secret_post",
      authorizationParams: { access_type: "offline", prompt: "consent" },
    });
    // Other entries are untouched.
    expect(catalogue.integration("outlook")!.provider.tokenUrl).toBe("https://login.microsoftonline.com/common/oauth2/v2.0/token");
    expect(catalogue.integrationNames()).toContain("salesforce");
  });

  it("keeps the {tenant} placeholder working in a replaced URL, with the default or the settings' tenant", () => {
    const overrideFile = file({ providers: { microsoft: { tokenUrl: "http://127.0.0.1:9/{tenant}/oauth2/v2.0/token" } } });
    expect(loadCatalogue({ overrideFile, settings: noSettings }).integration("outlook")!.provider.tokenUrl).toBe(
      "http://127.0.0.1:9/common/oauth2/v2.0/token",
    );
    const contoso = loadCatalogue({ overrideFile, settings: (p) => (p === "microsoft" ? { params: { tenant: "contoso" } } : {}) });
    expect(contoso.integration("outlook")!.provider.tokenUrl).toBe("http://127.0.0.1:9/contoso/oauth2/v2.0/token");
  });

  it("adds a provider and an integration without code, with {client_id} and custom placeholders", () => {
    const catalogue = loadCatalogue({
      overrideFile: file({
        providers: {
          acme: {
            ...fullEntry,
            tokenUrl: "https://{region}.acme.example/oauth/token?client={client_id}",
            defaults: { region: "eu" },
          },
        },
        integrations: {
          "acme-crm": { provider: "acme", scopes: ["contacts.read"] },
          // an existing integration moved to another scope set keeps its provider
          gmail: { scopes: ["https://www.googleapis.com/auth/gmail.modify"] },
        },
      }),
      settings: (p) => (p === "acme" ? { clientId: "acme id", clientSecret: "s" } : {}),
    });
    const acme = catalogue.integration("acme-crm")!;
    expect(acme.scopes).toEqual(["contacts.read"]);
    expect(acme.provider).toMatchObject({
      name: "acme",
      tokenEndpointAuthMethod: "client_secret_basic",
      tokenUrl: "https://eu.acme.example/oauth/token?client=acme%20id",
      clientId: "acme id",
      clientSecret: "s",
    });
    expect(catalogue.integration("gmail")!.scopes).toEqual(["https://www.googleapis.com/auth/gmail.modify"]);
    expect(catalogue.integration("gmail")!.provider.name).toBe("google");
    expect(catalogue.integrationNames()).toContain("acme-crm");
  });

  it("may be an empty object", () => {
    const catalogue = loadCatalogue({ overrideFile: file({}), settings: noSettings });
    expect(catalogue.integrationNames()).toHaveLength(7);
  });
});

// ---------------------------------------------------------------------------
// 3. Invalid entries
// ---------------------------------------------------------------------------

describe("invalid entries throw a CatalogueError naming the entry", () => {
  it.each([
    ["a tokenUrl that is not a URL", { providers: { google: { tokenUrl: "not a url" } } }, [/provider "google"/, /tokenUrl/]],
    ["an ftp tokenUrl", { providers: { google: { tokenUrl: "ftp://example.com/token" } } }, [/provider "google"/, /tokenUrl/]],
    ["a non-http authorizationUrl", { providers: { slack: { authorizationUrl: "javascript:alert(1)" } } }, [/provider "slack"/, /authorizationUrl/]],
    ["a revocationUrl that is not a URL", { providers: { google: { revocationUrl: "revoke" } } }, [/provider "google"/, /revocationUrl/]],
    ["a tokenUrl that is a number", { providers: { github: { tokenUrl: 42 } } }, [/provider "github"/, /tokenUrl/]],
    ["an unknown auth method", { providers: { hubspot: { tokenEndpointAuthMethod: "private_key_jwt" } } }, [/provider "hubspot"/, /tokenEndpointAuthMethod/]],
    ["a scope separator of two characters", { providers: { slack: { scopeSeparator: ", " } } }, [/provider "slack"/, /scopeSeparator/]],
    ["pkce as a string", { providers: { google: { pkce: "yes" } } }, [/provider "google"/, /pkce/]],
    ["requiredScopes as a string", { providers: { microsoft: { requiredScopes: "offline_access" } } }, [/provider "microsoft"/, /requiredScopes/]],
    ["authorizationParams as null", { providers: { google: { authorizationParams: null } } }, [/provider "google"/, /authorizationParams/]],
    ["a new provider missing fields", { providers: { acme: { tokenUrl: "https://acme.example/token" } } }, [/provider "acme"/]],
    [
      "an integration naming a missing provider",
      { integrations: { "acme-crm": { provider: "acme", scopes: [] } } },
      [/integration "acme-crm"/, /provider "acme"/],
    ],
    ["an integration whose scopes are not strings", { integrations: { gmail: { scopes: [1] } } }, [/integration "gmail"/, /scopes/]],
  ] as const)("%s", (_name, override, patterns) => {
    const message = refusal(override);
    for (const pattern of patterns) expect(message).toMatch(pattern);
  });

  it("an unreadable or missing file names the file", () => {
    const missing = path.join(dir, "does-not-exist.json");
    let caught: unknown;
    try {
      loadCatalogue({ overrideFile: missing, settings: noSettings });
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(CatalogueError);
    expect((caught as Error).message).toContain(missing);

    // A folder cannot be read as a file either.
    expect(() => loadCatalogue({ overrideFile: dir, settings: noSettings })).toThrow(CatalogueError);
  });

  it("a file that is not JSON names the file", () => {
    const broken = file('{"providers": {"google": ');
    let caught: unknown;
    try {
      loadCatalogue({ overrideFile: broken, settings: noSettings });
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(CatalogueError);
    expect((caught as Error).message).toContain(broken);
  });

  // Regression (was a product bug, fixed in src/providers and src/refresh):
  it("a tokenUrl that starts with https:// but does not parse is refused", () => {
    expect(refusal({ providers: { google: { tokenUrl: "https://" } } })).toMatch(/provider "google".*tokenUrl/);
    expect(refusal({ providers: { google: { tokenUrl: "https://exa mple.com/token" } } })).toMatch(/provider "google".*tokenUrl/);
  });

  // Regression (was a product bug, fixed in src/providers and src/refresh):
  it("an integration naming an inherited property as its provider is refused as a missing provider", () => {
    expect(refusal({ integrations: { x: { provider: "toString", scopes: [] } } })).toMatch(/integration "x"/);
  });

  // Regression (was a product bug, fixed in src/providers and src/refresh):
  it("a file whose JSON is not an object is refused, naming the file", () => {
    for (const content of ["null", "[]"]) {
      const f = file(content);
      let caught: unknown;
      try {
        loadCatalogue({ overrideFile: f, settings: noSettings });
      } catch (err) {
        caught = err;
      }
      expect(caught, content).toBeInstanceOf(CatalogueError);
      expect((caught as Error).message).toContain(f);
    }
  });
});

// ---------------------------------------------------------------------------
// 4. Settings from the environment
// ---------------------------------------------------------------------------

describe("providerSettingsFromEnv", () => {
  const env = {
    TOKENVAULT_PROVIDER_GOOGLE_CLIENT_ID: " 1234.apps.googleusercontent.com ",
    TOKENVAULT_PROVIDER_GOOGLE_CLIENT_SECRET: "google-secret",
    TOKENVAULT_PROVIDER_MICROSOFT_CLIENT_ID: "ms-id",
    TOKENVAULT_PROVIDER_MICROSOFT_CLIENT_SECRET: "",
    TOKENVAULT_PROVIDER_MICROSOFT_TENANT: "contoso",
    TOKENVAULT_PROVIDER_MY_IDP_CLIENT_ID: "idp-id",
    TOKENVAULT_PROVIDERS_FILE: "/etc/tokenvault/providers.json",
    OTHER: "x",
  };
  const settings = providerSettingsFromEnv(env);

  it("reads _CLIENT_ID and _CLIENT_SECRET (trimmed) per provider", () => {
    expect(settings("google")).toEqual({ clientId: "1234.apps.googleusercontent.com", clientSecret: "google-secret", params: {} });
  });

  it("takes an empty value as unset and other suffixes as URL parameters (_TENANT -> tenant)", () => {
    expect(settings("microsoft")).toEqual({ clientId: "ms-id", clientSecret: undefined, params: { tenant: "contoso" } });
  });

  it("maps a provider name's other characters to _ and gives unknown providers nothing", () => {
    expect(settings("my-idp")).toMatchObject({ clientId: "idp-id" });
    expect(settings("slack")).toEqual({ clientId: undefined, clientSecret: undefined, params: {} });
  });

  it("feeds loadCatalogue: the tenant from the environment fills the Microsoft URLs", () => {
    const catalogue = loadCatalogue({ settings });
    expect(catalogue.integration("outlook")!.provider.tokenUrl).toBe("https://login.microsoftonline.com/contoso/oauth2/v2.0/token");
    expect(catalogue.integration("gmail")!.provider).toMatchObject({ clientId: "1234.apps.googleusercontent.com", clientSecret: "google-secret" });
  });

  it("is what loadConfig uses, with TOKENVAULT_PROVIDERS_FILE resolved to an absolute path", () => {
    const config = loadConfig(env);
    expect(config.providerSettings("google")).toMatchObject({ clientId: "1234.apps.googleusercontent.com", clientSecret: "google-secret" });
    expect(config.providerSettings("microsoft").params).toEqual({ tenant: "contoso" });
    expect(config.providersFile).toBe("/etc/tokenvault/providers.json");
    expect(loadConfig({ TOKENVAULT_PROVIDERS_FILE: "providers.json" }).providersFile).toBe(path.resolve("providers.json"));
    expect(loadConfig({}).providersFile).toBeUndefined();
  });
});

// ---------------------------------------------------------------------------
// 5. serve refuses a broken catalogue
// ---------------------------------------------------------------------------

describe("tokenvault serve with a broken TOKENVAULT_PROVIDERS_FILE", () => {
  let db: TestDatabase;
  /** One key for every run: the first serve records its check value in the database. */
  const key = newKey("k1");

  beforeAll(async () => {
    db = await createTestDatabase();
  });

  afterAll(async () => {
    await cleanupCli();
    await db?.drop();
  });

  function serveEnv(providersFile: string) {
    return cliEnv({
      DATABASE_URL: db.url,
      TOKENVAULT_KEYS: key.entry,
      TOKENVAULT_PORT: "0",
      TOKENVAULT_LOG_LEVEL: "info",
      TOKENVAULT_DATA_DIR: tempDir(),
      TOKENVAULT_PROVIDERS_FILE: providersFile,
      TOKENVAULT_PROVIDER_GOOGLE_CLIENT_SECRET: "tvsecret-google-client-secret-not-to-print",
    });
  }

  /** Exit 1, exactly one stderr line naming what is wrong, never listening. */
  function expectRefusal(result: { code: number | null; stdout: string; stderr: string }, ...expected: RegExp[]): void {
    expect(result.code, `stdout: ${result.stdout}\nstderr: ${result.stderr}`).toBe(1);
    const lines = result.stderr.trimEnd().split("\n");
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^tokenvault: \S/);
    for (const pattern of expected) expect(lines[0]).toMatch(pattern);
    expect(result.stdout).not.toContain("tokenvault listening");
    expect(result.stdout + result.stderr).not.toContain("tvsecret");
    expect(result.stdout + result.stderr).not.toContain(key.base64);
  }

  it("an invalid entry: exit 1 with one line naming the entry and field", async () => {
    const providersFile = file({ providers: { google: { tokenEndpointAuthMethod: "private_key_jwt" } } });
    expectRefusal(await runCli(["serve"], serveEnv(providersFile)), /provider "google"/, /tokenEndpointAuthMethod/);
  });

  it("a missing file: exit 1 with one line naming the file", async () => {
    const missing = path.join(dir, "missing-providers.json");
    expectRefusal(await runCli(["serve"], serveEnv(missing)), new RegExp(missing.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")));
  });
});
