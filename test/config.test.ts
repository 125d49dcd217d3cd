/**
 * loadConfig() as a pure function of an environment object: defaults, the
 * production requirements, one ConfigError naming the variable for every
 * invalid value, a frozen result, and no credential in any error message.
 */
import path from "node:path";
import { describe, expect, it } from "vitest";
import { ConfigError, loadConfig, loadSidecarConfig, type Config, type SidecarConfig } from "../src/config.js";

type Env = Record<string, string | undefined>;

/** The ConfigError loadConfig(env) throws; fails the test when it returns instead. */
function configError(env: Env): ConfigError {
  let config: Config | undefined;
  try {
    config = loadConfig(env);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return err as ConfigError;
  }
  throw new Error(`expected a ConfigError, loadConfig returned ${JSON.stringify(config)}`);
}

const productionBase: Env = {
  NODE_ENV: "production",
  DATABASE_URL: "postgres://vault:pw@db.internal:5432/tokenvault",
  TOKENVAULT_KEYS: "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
};

describe("defaults", () => {
  it("loadConfig({}) is a development configuration on 127.0.0.1:50051 with a development key ring in the data folder", () => {
    const config = loadConfig({});
    const dataDir = path.resolve(".tokenvault");
    expect(config).toEqual({
      production: false,
      databaseUrl: undefined,
      dataDir,
      embeddedPostgresPort: 0,
      host: "127.0.0.1",
      port: 50051,
      tls: undefined,
      keySource: { kind: "development", path: path.join(dataDir, "dev-keys.json") },
      openServices: new Set(["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"]),
      callersReloadMs: 5_000,
      migrateOnStart: true,
      logLevel: "info",
      maxMessageBytes: 262144,
      dbPoolMax: 10,
      shutdownGraceMs: 10_000,
      audit: { maxBatch: 256, maxWaitMs: 0, maxQueue: 10_000, lockTimeoutMs: 5_000, ringSize: 4_096, pollMs: 1_000, maxLag: 10_000 },
      providersFile: undefined,
      providerSettings: expect.any(Function),
      refresh: { providerTimeoutMs: 10_000, backoffBaseMs: 2_000, backoffMaxMs: 300_000 },
    });
    expect(config.providerSettings("google")).toEqual({ clientId: undefined, clientSecret: undefined, params: {} });
  });

  it("the development key file follows TOKENVAULT_DATA_DIR (resolved to an absolute path)", () => {
    const config = loadConfig({ TOKENVAULT_DATA_DIR: "some/relative/dir" });
    expect(config.dataDir).toBe(path.resolve("some/relative/dir"));
    expect(config.keySource).toEqual({ kind: "development", path: path.join(path.resolve("some/relative/dir"), "dev-keys.json") });
  });

  it("blank values count as unset", () => {
    const config = loadConfig({ TOKENVAULT_PORT: "  ", DATABASE_URL: "", TOKENVAULT_KEYS: " ", TOKENVAULT_LOG_LEVEL: "" });
    expect(config.port).toBe(50051);
    expect(config.databaseUrl).toBeUndefined();
    expect(config.keySource.kind).toBe("development");
    expect(config.logLevel).toBe("info");
  });
});

describe("valid settings", () => {
  it("reads every setting", () => {
    const config = loadConfig({
      ...productionBase,
      TOKENVAULT_DATA_DIR: "/srv/tv",
      TOKENVAULT_EMBEDDED_PG_PORT: "5433",
      TOKENVAULT_HOST: "0.0.0.0",
      TOKENVAULT_PORT: "8443",
      TOKENVAULT_TLS_CERT_FILE: "tls/cert.pem",
      TOKENVAULT_TLS_KEY_FILE: "/etc/tv/key.pem",
      TOKENVAULT_TLS_CLIENT_CA_FILE: "tls/clients-ca.pem",
      TOKENVAULT_OPEN_HEALTH: "yes",
      TOKENVAULT_OPEN_REFLECTION: "off",
      TOKENVAULT_CALLERS_RELOAD_MS: "250",
      TOKENVAULT_MIGRATE_ON_START: "off",
      TOKENVAULT_LOG_LEVEL: "warn",
      TOKENVAULT_MAX_MESSAGE_BYTES: "1048576",
      TOKENVAULT_DB_POOL_MAX: "25",
      TOKENVAULT_SHUTDOWN_GRACE_MS: "0",
      TOKENVAULT_AUDIT_MAX_BATCH: "64",
      TOKENVAULT_AUDIT_MAX_WAIT_MS: "2",
      TOKENVAULT_AUDIT_MAX_QUEUE: "500",
      TOKENVAULT_AUDIT_LOCK_TIMEOUT_MS: "250",
      TOKENVAULT_AUDIT_RING_SIZE: "128",
      TOKENVAULT_AUDIT_POLL_MS: "50",
      TOKENVAULT_AUDIT_MAX_LAG: "1000",
      TOKENVAULT_PROVIDERS_FILE: "conf/providers.json",
      TOKENVAULT_PROVIDER_GOOGLE_CLIENT_ID: "google-client",
      TOKENVAULT_PROVIDER_GOOGLE_CLIENT_SECRET: "google-secret",
      TOKENVAULT_PROVIDER_MICROSOFT_TENANT: "contoso",
      TOKENVAULT_REFRESH_TIMEOUT_MS: "3000",
      TOKENVAULT_REFRESH_BACKOFF_BASE_MS: "100",
      TOKENVAULT_REFRESH_BACKOFF_MAX_MS: "60000",
    });
    expect(config).toEqual({
      production: true,
      databaseUrl: productionBase.DATABASE_URL,
      dataDir: "/srv/tv",
      embeddedPostgresPort: 5433,
      host: "0.0.0.0",
      port: 8443,
      tls: { certFile: path.resolve("tls/cert.pem"), keyFile: "/etc/tv/key.pem", clientCaFile: path.resolve("tls/clients-ca.pem") },
      keySource: { kind: "env", value: productionBase.TOKENVAULT_KEYS },
      openServices: new Set(["grpc.health.v1.Health"]),
      callersReloadMs: 250,
      migrateOnStart: false,
      logLevel: "warn",
      maxMessageBytes: 1048576,
      dbPoolMax: 25,
      shutdownGraceMs: 0,
      audit: { maxBatch: 64, maxWaitMs: 2, maxQueue: 500, lockTimeoutMs: 250, ringSize: 128, pollMs: 50, maxLag: 1000 },
      providersFile: path.resolve("conf/providers.json"),
      providerSettings: expect.any(Function),
      refresh: { providerTimeoutMs: 3000, backoffBaseMs: 100, backoffMaxMs: 60_000 },
    });
    expect(config.providerSettings("google")).toEqual({ clientId: "google-client", clientSecret: "google-secret", params: {} });
    expect(config.providerSettings("microsoft")).toEqual({ clientId: undefined, clientSecret: undefined, params: { tenant: "contoso" } });
  });

  it("a key file path is resolved, and it satisfies production", () => {
    const config = loadConfig({ ...productionBase, TOKENVAULT_KEYS: undefined, TOKENVAULT_KEYS_FILE: "secrets/keys.json" });
    expect(config.keySource).toEqual({ kind: "file", path: path.resolve("secrets/keys.json") });
  });

  it.each([
    ["1", true], ["true", true], ["YES", true], ["On", true],
    ["0", false], ["false", false], ["no", false], ["OFF", false],
  ])("TOKENVAULT_MIGRATE_ON_START=%s is %s", (raw, expected) => {
    expect(loadConfig({ TOKENVAULT_MIGRATE_ON_START: raw }).migrateOnStart).toBe(expected);
  });

  it("accepts postgresql:// as well as postgres://, and the range ends of the port", () => {
    expect(loadConfig({ DATABASE_URL: "postgresql://u@h/db" }).databaseUrl).toBe("postgresql://u@h/db");
    expect(loadConfig({ TOKENVAULT_PORT: "0" }).port).toBe(0);
    expect(loadConfig({ TOKENVAULT_PORT: "65535" }).port).toBe(65535);
  });
});

describe("caller authentication settings", () => {
  const health = "grpc.health.v1.Health";
  const reflection = "grpc.reflection.v1.ServerReflection";

  it("TLS without a client CA has clientCaFile undefined; a blank client CA counts as unset", () => {
    const tls = { TOKENVAULT_TLS_CERT_FILE: "c.pem", TOKENVAULT_TLS_KEY_FILE: "k.pem" };
    expect(loadConfig(tls).tls).toEqual({ certFile: path.resolve("c.pem"), keyFile: path.resolve("k.pem"), clientCaFile: undefined });
    expect(loadConfig({ ...tls, TOKENVAULT_TLS_CLIENT_CA_FILE: "  " }).tls?.clientCaFile).toBeUndefined();
  });

  it("TOKENVAULT_TLS_CLIENT_CA_FILE with TLS is resolved to an absolute path", () => {
    const config = loadConfig({ TOKENVAULT_TLS_CERT_FILE: "c.pem", TOKENVAULT_TLS_KEY_FILE: "k.pem", TOKENVAULT_TLS_CLIENT_CA_FILE: "ca/clients.pem" });
    expect(config.tls?.clientCaFile).toBe(path.resolve("ca/clients.pem"));
  });

  it("TOKENVAULT_TLS_CLIENT_CA_FILE without a TLS certificate and key is a ConfigError naming it", () => {
    const err = configError({ TOKENVAULT_TLS_CLIENT_CA_FILE: "ca.pem" });
    expect(err.message).toContain("TOKENVAULT_TLS_CLIENT_CA_FILE");
    expect(err.message).toContain("TOKENVAULT_TLS_CERT_FILE");
    expect(err.message).not.toContain("\n");
    // In production too: mutual TLS is never silently off.
    expect(configError({ ...productionBase, TOKENVAULT_TLS_CLIENT_CA_FILE: "/etc/tv/ca.pem" }).message).toContain("TOKENVAULT_TLS_CLIENT_CA_FILE");
  });

  it.each([
    [{ TOKENVAULT_OPEN_HEALTH: "false" }, [reflection]],
    [{ TOKENVAULT_OPEN_REFLECTION: "0" }, [health]],
    [{ TOKENVAULT_OPEN_HEALTH: "no", TOKENVAULT_OPEN_REFLECTION: "OFF" }, []],
    [{ TOKENVAULT_OPEN_HEALTH: "true", TOKENVAULT_OPEN_REFLECTION: "1" }, [health, reflection]],
    [{ TOKENVAULT_OPEN_HEALTH: " ", TOKENVAULT_OPEN_REFLECTION: "" }, [health, reflection]],
  ] as [Env, string[]][])("%o opens exactly %o", (env, open) => {
    const config = loadConfig(env);
    expect([...config.openServices].sort()).toEqual([...open].sort());
    // The vault's own service is never open.
    expect(config.openServices.has("tokenvault.v1.TokenVaultService")).toBe(false);
  });

  it("the open-service switches in production are the same", () => {
    expect([...loadConfig({ ...productionBase, TOKENVAULT_OPEN_HEALTH: "false" }).openServices]).toEqual([reflection]);
  });

  it.each([
    ["100", 100],
    ["600000", 600_000],
    ["5000", 5_000],
  ])("TOKENVAULT_CALLERS_RELOAD_MS=%s is %i", (raw, expected) => {
    expect(loadConfig({ TOKENVAULT_CALLERS_RELOAD_MS: raw }).callersReloadMs).toBe(expected);
  });

  it.each(["99", "0", "600001", "-1", "5s", "1e3", "2.5"])("TOKENVAULT_CALLERS_RELOAD_MS=%s is a ConfigError naming it and its range", (raw) => {
    const err = configError({ TOKENVAULT_CALLERS_RELOAD_MS: raw });
    expect(err.message).toContain("TOKENVAULT_CALLERS_RELOAD_MS");
    expect(err.message).toContain("100 to 600000");
    expect(err.message).toContain(`"${raw}"`);
  });
});

describe("production", () => {
  it("without DATABASE_URL is a ConfigError naming DATABASE_URL", () => {
    const err = configError({ ...productionBase, DATABASE_URL: undefined });
    expect(err.message).toContain("DATABASE_URL");
    expect(err.message).toContain("NODE_ENV=production");
  });

  it("without TOKENVAULT_KEYS or TOKENVAULT_KEYS_FILE is a ConfigError naming both", () => {
    const err = configError({ ...productionBase, TOKENVAULT_KEYS: undefined });
    expect(err.message).toContain("TOKENVAULT_KEYS");
    expect(err.message).toContain("TOKENVAULT_KEYS_FILE");
  });

  it("with both is a valid production configuration", () => {
    const config = loadConfig(productionBase);
    expect(config.production).toBe(true);
    expect(config.keySource.kind).toBe("env");
  });

  it("only NODE_ENV=production is production", () => {
    expect(loadConfig({ NODE_ENV: "prod" }).production).toBe(false);
    expect(loadConfig({ NODE_ENV: "development" }).production).toBe(false);
  });
});

describe("invalid values are a ConfigError naming the variable", () => {
  const cases: [string, Env, string[]][] = [
    ["port abc", { TOKENVAULT_PORT: "abc" }, ["TOKENVAULT_PORT"]],
    ["port 70000", { TOKENVAULT_PORT: "70000" }, ["TOKENVAULT_PORT"]],
    ["negative port", { TOKENVAULT_PORT: "-1" }, ["TOKENVAULT_PORT"]],
    ["fractional port", { TOKENVAULT_PORT: "80.5" }, ["TOKENVAULT_PORT"]],
    ["exponent port", { TOKENVAULT_PORT: "1e3" }, ["TOKENVAULT_PORT"]],
    ["embedded port 65536", { TOKENVAULT_EMBEDDED_PG_PORT: "65536" }, ["TOKENVAULT_EMBEDDED_PG_PORT"]],
    ["message limit below 64 KiB", { TOKENVAULT_MAX_MESSAGE_BYTES: "1000" }, ["TOKENVAULT_MAX_MESSAGE_BYTES"]],
    ["message limit above 16 MiB", { TOKENVAULT_MAX_MESSAGE_BYTES: String(16 * 1024 * 1024 + 1) }, ["TOKENVAULT_MAX_MESSAGE_BYTES"]],
    ["pool of 0", { TOKENVAULT_DB_POOL_MAX: "0" }, ["TOKENVAULT_DB_POOL_MAX"]],
    ["grace in words", { TOKENVAULT_SHUTDOWN_GRACE_MS: "ten seconds" }, ["TOKENVAULT_SHUTDOWN_GRACE_MS"]],
    ["migrate maybe", { TOKENVAULT_MIGRATE_ON_START: "maybe" }, ["TOKENVAULT_MIGRATE_ON_START"]],
    ["only the TLS cert", { TOKENVAULT_TLS_CERT_FILE: "cert.pem" }, ["TOKENVAULT_TLS_CERT_FILE", "TOKENVAULT_TLS_KEY_FILE"]],
    ["only the TLS key", { TOKENVAULT_TLS_KEY_FILE: "key.pem" }, ["TOKENVAULT_TLS_CERT_FILE", "TOKENVAULT_TLS_KEY_FILE"]],
    ["both key settings", { TOKENVAULT_KEYS: "k1:AAAA", TOKENVAULT_KEYS_FILE: "keys.json" }, ["TOKENVAULT_KEYS", "TOKENVAULT_KEYS_FILE"]],
    ["mysql URL", { DATABASE_URL: "mysql://x" }, ["DATABASE_URL"]],
    ["not a URL", { DATABASE_URL: "just some words" }, ["DATABASE_URL"]],
    ["bad log level", { TOKENVAULT_LOG_LEVEL: "verbose" }, ["TOKENVAULT_LOG_LEVEL"]],
    ["upper-case log level", { TOKENVAULT_LOG_LEVEL: "INFO" }, ["TOKENVAULT_LOG_LEVEL"]],
    ["client CA without TLS", { TOKENVAULT_TLS_CLIENT_CA_FILE: "ca.pem" }, ["TOKENVAULT_TLS_CLIENT_CA_FILE"]],
    ["client CA with only the TLS key", { TOKENVAULT_TLS_KEY_FILE: "k.pem", TOKENVAULT_TLS_CLIENT_CA_FILE: "ca.pem" }, ["TOKENVAULT_TLS_CERT_FILE", "TOKENVAULT_TLS_KEY_FILE"]],
    ["open health maybe", { TOKENVAULT_OPEN_HEALTH: "maybe" }, ["TOKENVAULT_OPEN_HEALTH"]],
    ["open reflection 2", { TOKENVAULT_OPEN_REFLECTION: "2" }, ["TOKENVAULT_OPEN_REFLECTION"]],
    ["callers reload below 100 ms", { TOKENVAULT_CALLERS_RELOAD_MS: "50" }, ["TOKENVAULT_CALLERS_RELOAD_MS"]],
  ];

  it.each(cases)("%s", (_name, env, names) => {
    const err = configError(env);
    for (const name of names) expect(err.message).toContain(name);
    // One line an operator can read, not a stack or a dump.
    expect(err.message).not.toContain("\n");
  });

  it("the message of a bad number shows the value that was given", () => {
    expect(configError({ TOKENVAULT_PORT: "abc" }).message).toContain('"abc"');
    expect(configError({ TOKENVAULT_PORT: "70000" }).message).toMatch(/0 to 65535/);
  });
});

describe("the result", () => {
  it("is frozen, and so is its TLS setting", () => {
    const config = loadConfig({ TOKENVAULT_TLS_CERT_FILE: "c.pem", TOKENVAULT_TLS_KEY_FILE: "k.pem", TOKENVAULT_TLS_CLIENT_CA_FILE: "ca.pem" });
    expect(Object.isFrozen(config)).toBe(true);
    expect(Object.isFrozen(config.tls)).toBe(true);
    // ESM is strict mode: writing a frozen property throws.
    expect(() => {
      (config as { port: number }).port = 1;
    }).toThrow(TypeError);
    expect(() => {
      (config.tls as { certFile: string }).certFile = "/tmp/other.pem";
    }).toThrow(TypeError);
    expect(() => {
      (config.tls as { clientCaFile: string }).clientCaFile = "/tmp/other-ca.pem";
    }).toThrow(TypeError);
    expect(() => {
      (config as { callersReloadMs: number }).callersReloadMs = 1;
    }).toThrow(TypeError);
    expect(config.port).toBe(50051);
  });

  it("is a new object per call that does not follow later changes of the environment", () => {
    const env: Env = { TOKENVAULT_PORT: "6000" };
    const config = loadConfig(env);
    env.TOKENVAULT_PORT = "7000";
    expect(config.port).toBe(6000);
    expect(loadConfig(env).port).toBe(7000);
  });
});

describe("a DATABASE_URL password never appears in a ConfigError", () => {
  const password = "Pw-9f3c2e7a1b";
  const user = "vault_admin";
  const withPassword = [
    `postgres://${user}:${password}@db.internal:5432/tokenvault`,
    `postgresql://${user}:${encodeURIComponent(password)}@db.internal/tokenvault?sslmode=require`,
  ];
  const badUrls = [
    `mysql://${user}:${password}@db.internal/tokenvault`,
    `http://${user}:${password}@db.internal/tokenvault`,
    `${user}:${password}@db.internal:5432/tokenvault`,
    `postgres://${user}:${password}@db internal:5432/tokenvault`,
    `//${user}:${password}@db.internal/tokenvault`,
  ];
  const otherErrors: Env[] = [
    { NODE_ENV: "production" },
    { TOKENVAULT_PORT: "abc" },
    { TOKENVAULT_EMBEDDED_PG_PORT: "99999" },
    { TOKENVAULT_MIGRATE_ON_START: "maybe" },
    { TOKENVAULT_TLS_CERT_FILE: "cert.pem" },
    { TOKENVAULT_KEYS: "k1:AAAA", TOKENVAULT_KEYS_FILE: "keys.json" },
    { TOKENVAULT_LOG_LEVEL: "loud" },
    { TOKENVAULT_DB_POOL_MAX: "0" },
    { TOKENVAULT_MAX_MESSAGE_BYTES: "1" },
    { TOKENVAULT_SHUTDOWN_GRACE_MS: "-5" },
    { TOKENVAULT_TLS_CLIENT_CA_FILE: "ca.pem" },
    { TOKENVAULT_OPEN_HEALTH: "maybe" },
    { TOKENVAULT_CALLERS_RELOAD_MS: "1" },
  ];

  const assertClean = (err: ConfigError, url: string) => {
    expect(err.message).not.toContain(password);
    expect(err.message).not.toContain(encodeURIComponent(password));
    expect(err.message).not.toContain(url);
    expect(err.message).not.toContain(user);
  };

  it.each(badUrls)("invalid DATABASE_URL %#", (url) => {
    const err = configError({ DATABASE_URL: url });
    expect(err.message).toContain("DATABASE_URL");
    assertClean(err, url);
  });

  it("an error in any other setting, next to a valid DATABASE_URL with a password", () => {
    let checked = 0;
    for (const url of withPassword) {
      for (const env of otherErrors) {
        const err = configError({ ...env, DATABASE_URL: url });
        assertClean(err, url);
        checked++;
      }
    }
    expect(checked).toBe(withPassword.length * otherErrors.length);
  });
});

/**
 * loadSidecarConfig(): the OAuth sidecar's settings (`tokenvault sidecar`,
 * `tokenvault tickets`), as a pure function of an environment object.
 */
describe("loadSidecarConfig", () => {
  /** The ConfigError loadSidecarConfig(env) throws; fails the test when it returns instead. */
  function sidecarConfigError(env: Env): ConfigError {
    let config: SidecarConfig | undefined;
    try {
      config = loadSidecarConfig(env);
    } catch (err) {
      expect(err).toBeInstanceOf(ConfigError);
      expect((err as Error).message).not.toContain("\n");
      return err as ConfigError;
    }
    throw new Error(`expected a ConfigError, loadSidecarConfig returned ${JSON.stringify(config)}`);
  }

  const callerSecret = "tvs_7_sidecarCallerSecretValue0123456789abcdefghijk";
  const ticketKeys = "t1:Q0FGRUJBQkVDQUZFQkFCRUNBRkVCQUJFQ0FGRUJBQkU";
  const sidecarProduction: Env = {
    NODE_ENV: "production",
    TOKENVAULT_SIDECAR_PUBLIC_URL: "https://connect.example.com",
    TOKENVAULT_CALLER_SECRET: callerSecret,
    TOKENVAULT_TICKET_KEYS: ticketKeys,
  };

  describe("defaults", () => {
    it("loadSidecarConfig({}) listens on 127.0.0.1:8080, talks to the local vault, and uses development secrets in the data folder", () => {
      const config = loadSidecarConfig({});
      const dataDir = path.resolve(".tokenvault");
      expect(config).toEqual({
        production: false,
        dataDir,
        logLevel: "info",
        host: "127.0.0.1",
        port: 8080,
        publicUrl: undefined,
        secureCookies: false,
        tls: undefined,
        vaultUrl: "http://127.0.0.1:50051",
        vaultCaFile: undefined,
        callerSecret: { kind: "development", path: path.join(dataDir, "dev-sidecar-secret") },
        ticketKeys: { kind: "development", path: path.join(dataDir, "dev-ticket-keys") },
        returnUrls: [],
        trustedProxies: 0,
        providerTimeoutMs: 10_000,
        vaultTimeoutMs: 10_000,
        providersFile: undefined,
        providerSettings: expect.any(Function),
        shutdownGraceMs: 10_000,
      });
      expect(config.providerSettings("google")).toEqual({ clientId: undefined, clientSecret: undefined, params: {} });
      expect(Object.isFrozen(config)).toBe(true);
      expect(Object.isFrozen(config.callerSecret)).toBe(true);
      expect(Object.isFrozen(config.ticketKeys)).toBe(true);
      expect(Object.isFrozen(config.returnUrls)).toBe(true);
    });

    it("the development secret files follow TOKENVAULT_DATA_DIR (resolved to an absolute path)", () => {
      const config = loadSidecarConfig({ TOKENVAULT_DATA_DIR: "some/relative/dir" });
      const dataDir = path.resolve("some/relative/dir");
      expect(config.dataDir).toBe(dataDir);
      expect(config.callerSecret).toEqual({ kind: "development", path: path.join(dataDir, "dev-sidecar-secret") });
      expect(config.ticketKeys).toEqual({ kind: "development", path: path.join(dataDir, "dev-ticket-keys") });
    });

    it("blank values count as unset", () => {
      const config = loadSidecarConfig({
        TOKENVAULT_SIDECAR_PORT: " ",
        TOKENVAULT_SIDECAR_PUBLIC_URL: "",
        TOKENVAULT_URL: "  ",
        TOKENVAULT_CALLER_SECRET: "",
        TOKENVAULT_CALLER_SECRET_FILE: " ",
        TOKENVAULT_TICKET_KEYS: " ",
        TOKENVAULT_SIDECAR_RETURN_URLS: " ",
      });
      expect(config.port).toBe(8080);
      expect(config.publicUrl).toBeUndefined();
      expect(config.vaultUrl).toBe("http://127.0.0.1:50051");
      expect(config.callerSecret.kind).toBe("development");
      expect(config.ticketKeys.kind).toBe("development");
      expect(config.returnUrls).toEqual([]);
    });

    it("needs nothing of the vault's own settings (no DATABASE_URL, no TOKENVAULT_KEYS) and ignores them", () => {
      const config = loadSidecarConfig({ ...sidecarProduction, DATABASE_URL: "not even a URL", TOKENVAULT_KEYS: "garbage", TOKENVAULT_PORT: "abc" });
      expect(config.production).toBe(true);
      expect(config).not.toHaveProperty("databaseUrl");
      expect(config).not.toHaveProperty("keySource");
    });
  });

  describe("valid settings", () => {
    it("reads every setting", () => {
      const config = loadSidecarConfig({
        ...sidecarProduction,
        TOKENVAULT_DATA_DIR: "/srv/tv",
        TOKENVAULT_LOG_LEVEL: "warn",
        TOKENVAULT_SIDECAR_HOST: "0.0.0.0",
        TOKENVAULT_SIDECAR_PORT: "8443",
        TOKENVAULT_SIDECAR_TLS_CERT_FILE: "tls/cert.pem",
        TOKENVAULT_SIDECAR_TLS_KEY_FILE: "/etc/tv/key.pem",
        TOKENVAULT_URL: "https://vault.internal:50051/",
        TOKENVAULT_VAULT_CA_FILE: "ca/vault.pem",
        TOKENVAULT_SIDECAR_RETURN_URLS: " https://app.example.com/settings , https://admin.example.com/,",
        TOKENVAULT_SIDECAR_TRUSTED_PROXIES: "2",
        TOKENVAULT_SIDECAR_PROVIDER_TIMEOUT_MS: "3000",
        TOKENVAULT_SIDECAR_VAULT_TIMEOUT_MS: "4000",
        TOKENVAULT_PROVIDERS_FILE: "conf/providers.json",
        TOKENVAULT_PROVIDER_GOOGLE_CLIENT_ID: "google-client",
        TOKENVAULT_SHUTDOWN_GRACE_MS: "500",
      });
      expect(config).toEqual({
        production: true,
        dataDir: "/srv/tv",
        logLevel: "warn",
        host: "0.0.0.0",
        port: 8443,
        publicUrl: new URL("https://connect.example.com"),
        secureCookies: true,
        tls: { certFile: path.resolve("tls/cert.pem"), keyFile: "/etc/tv/key.pem" },
        // The trailing slash goes: the vault client appends paths to it.
        vaultUrl: "https://vault.internal:50051",
        vaultCaFile: path.resolve("ca/vault.pem"),
        callerSecret: { kind: "env", value: callerSecret },
        ticketKeys: { kind: "env", value: ticketKeys },
        returnUrls: ["https://app.example.com/settings", "https://admin.example.com/"],
        trustedProxies: 2,
        providerTimeoutMs: 3000,
        vaultTimeoutMs: 4000,
        providersFile: path.resolve("conf/providers.json"),
        providerSettings: expect.any(Function),
        shutdownGraceMs: 500,
      });
      expect(config.providerSettings("google").clientId).toBe("google-client");
    });

    it("secrets given as files are resolved paths, and they satisfy production", () => {
      const config = loadSidecarConfig({
        ...sidecarProduction,
        TOKENVAULT_CALLER_SECRET: undefined,
        TOKENVAULT_CALLER_SECRET_FILE: "secrets/caller",
        TOKENVAULT_TICKET_KEYS: undefined,
        TOKENVAULT_TICKET_KEYS_FILE: "/run/secrets/ticket-keys",
      });
      expect(config.callerSecret).toEqual({ kind: "file", path: path.resolve("secrets/caller") });
      expect(config.ticketKeys).toEqual({ kind: "file", path: "/run/secrets/ticket-keys" });
    });

    it("TOKENVAULT_SIDECAR_PORT takes 0 (a free port) to 65535", () => {
      expect(loadSidecarConfig({ TOKENVAULT_SIDECAR_PORT: "0" }).port).toBe(0);
      expect(loadSidecarConfig({ TOKENVAULT_SIDECAR_PORT: "65535" }).port).toBe(65535);
    });
  });

  describe("the public URL", () => {
    it.each(["https://connect.example.com", "https://connect.example.com/", "https://connect.example.com:8443", "https://10.0.0.5"])(
      "%s: https anywhere, with Secure cookies",
      (url) => {
        const config = loadSidecarConfig({ TOKENVAULT_SIDECAR_PUBLIC_URL: url });
        expect(config.publicUrl?.origin).toBe(new URL(url).origin);
        expect(config.secureCookies).toBe(true);
      },
    );

    it.each(["http://localhost:8080", "http://127.0.0.1:8080", "http://localhost", "http://[::1]:8080", "http://LOCALHOST:3001"])(
      "%s: plain http on a loopback name is allowed for development, without Secure cookies",
      (url) => {
        const config = loadSidecarConfig({ TOKENVAULT_SIDECAR_PUBLIC_URL: url });
        expect(config.publicUrl?.href).toBe(new URL(url).href);
        expect(config.secureCookies).toBe(false);
      },
    );

    // The config's own doc comment and the README: cookies are Secure "always,
    // unless the public URL is plain http on a loopback name". https on
    // localhost is not plain http; a browser keeps Secure cookies there.
    it.each(["https://localhost:8443", "https://127.0.0.1:8443"])("%s: https on a loopback name still has Secure cookies", (url) => {
      expect(loadSidecarConfig({ TOKENVAULT_SIDECAR_PUBLIC_URL: url }).secureCookies).toBe(true);
    });

    it.each([
      "http://connect.example.com",
      "http://10.0.0.5:8080",
      "http://0.0.0.0:8080",
      "http://localhost.example.com",
      "http://127.0.0.1.nip.io",
      "ftp://localhost",
    ])("%s is refused: https except on localhost", (url) => {
      const err = sidecarConfigError({ TOKENVAULT_SIDECAR_PUBLIC_URL: url });
      expect(err.message).toContain("TOKENVAULT_SIDECAR_PUBLIC_URL");
      expect(err.message).toContain("https");
    });

    it("plain http elsewhere is refused in production too", () => {
      expect(sidecarConfigError({ ...sidecarProduction, TOKENVAULT_SIDECAR_PUBLIC_URL: "http://connect.example.com" }).message).toContain(
        "TOKENVAULT_SIDECAR_PUBLIC_URL",
      );
    });

    it.each([
      "https://connect.example.com/oauth",
      "https://connect.example.com/oauth/",
      "https://connect.example.com/?x=1",
      "https://connect.example.com/#top",
      "https://user@connect.example.com",
      "https://:password@connect.example.com",
      "http://localhost:8080/sidecar",
    ])("%s is refused: an origin only", (url) => {
      const err = sidecarConfigError({ TOKENVAULT_SIDECAR_PUBLIC_URL: url });
      expect(err.message).toContain("TOKENVAULT_SIDECAR_PUBLIC_URL");
      expect(err.message).toMatch(/origin only/);
    });

    it.each(["connect.example.com", "just words", "https://"])("%s is refused: not a URL", (url) => {
      const err = sidecarConfigError({ TOKENVAULT_SIDECAR_PUBLIC_URL: url });
      expect(err.message).toContain("TOKENVAULT_SIDECAR_PUBLIC_URL");
      expect(err.message).toMatch(/not a URL/);
    });
  });

  describe("production", () => {
    it("with a public URL, a caller secret and ticket keys is a valid production configuration", () => {
      const config = loadSidecarConfig(sidecarProduction);
      expect(config.production).toBe(true);
      expect(config.secureCookies).toBe(true);
      expect(config.callerSecret.kind).toBe("env");
      expect(config.ticketKeys.kind).toBe("env");
    });

    it("without anything set, the first refusal names TOKENVAULT_SIDECAR_PUBLIC_URL", () => {
      const err = sidecarConfigError({ NODE_ENV: "production" });
      expect(err.message).toContain("TOKENVAULT_SIDECAR_PUBLIC_URL");
      expect(err.message).toContain("NODE_ENV=production");
    });

    it("without TOKENVAULT_SIDECAR_PUBLIC_URL is a ConfigError naming it", () => {
      const err = sidecarConfigError({ ...sidecarProduction, TOKENVAULT_SIDECAR_PUBLIC_URL: undefined });
      expect(err.message).toContain("TOKENVAULT_SIDECAR_PUBLIC_URL");
      expect(err.message).toContain("NODE_ENV=production");
    });

    it("without a caller secret is a ConfigError naming TOKENVAULT_CALLER_SECRET and _FILE (no development file)", () => {
      const err = sidecarConfigError({ ...sidecarProduction, TOKENVAULT_CALLER_SECRET: undefined });
      expect(err.message).toContain("TOKENVAULT_CALLER_SECRET or TOKENVAULT_CALLER_SECRET_FILE");
      expect(err.message).toContain("NODE_ENV=production");
      expect(err.message).not.toContain("dev-sidecar-secret");
    });

    it("without ticket keys is a ConfigError naming TOKENVAULT_TICKET_KEYS and _FILE (no development file)", () => {
      const err = sidecarConfigError({ ...sidecarProduction, TOKENVAULT_TICKET_KEYS: undefined });
      expect(err.message).toContain("TOKENVAULT_TICKET_KEYS or TOKENVAULT_TICKET_KEYS_FILE");
      expect(err.message).toContain("NODE_ENV=production");
      expect(err.message).not.toContain("dev-ticket-keys");
      // The caller secret is not repeated in the message about another setting.
      expect(err.message).not.toContain(callerSecret);
    });

    it("only NODE_ENV=production is production", () => {
      expect(loadSidecarConfig({ NODE_ENV: "prod" }).production).toBe(false);
      expect(loadSidecarConfig({ NODE_ENV: "development" }).callerSecret.kind).toBe("development");
    });
  });

  describe("invalid values are a ConfigError naming the variable", () => {
    it("TOKENVAULT_CALLER_SECRET and TOKENVAULT_CALLER_SECRET_FILE together are refused, without echoing the secret", () => {
      const err = sidecarConfigError({ TOKENVAULT_CALLER_SECRET: callerSecret, TOKENVAULT_CALLER_SECRET_FILE: "/run/secrets/caller" });
      expect(err.message).toContain("TOKENVAULT_CALLER_SECRET");
      expect(err.message).toContain("TOKENVAULT_CALLER_SECRET_FILE");
      expect(err.message).toMatch(/not both/);
      expect(err.message).not.toContain(callerSecret);
      // In production as well.
      expect(sidecarConfigError({ ...sidecarProduction, TOKENVAULT_CALLER_SECRET_FILE: "/run/secrets/caller" }).message).toMatch(/not both/);
    });

    it("TOKENVAULT_TICKET_KEYS and TOKENVAULT_TICKET_KEYS_FILE together are refused, without echoing the keys", () => {
      const err = sidecarConfigError({ TOKENVAULT_TICKET_KEYS: ticketKeys, TOKENVAULT_TICKET_KEYS_FILE: "keys.txt" });
      expect(err.message).toContain("TOKENVAULT_TICKET_KEYS_FILE");
      expect(err.message).toMatch(/not both/);
      expect(err.message).not.toContain(ticketKeys.split(":")[1]!);
    });

    it.each([
      "127.0.0.1:50051",
      "vault.internal:50051",
      "grpc://vault.internal:50051",
      "dns:///vault.internal:50051",
      "http://vault.internal:50051/tokenvault",
      "http://vault.internal:50051/?tls=1",
      "http://vault.internal:50051?tls=1",
      "http://user:password@vault.internal:50051",
      "http://vault internal:50051",
      "http://vault.internal:99999",
      "https://",
      "just some words",
    ])("TOKENVAULT_URL=%s is refused", (url) => {
      const err = sidecarConfigError({ TOKENVAULT_URL: url });
      expect(err.message).toContain("TOKENVAULT_URL");
      expect(err.message).toMatch(/http:\/\/host:port/);
    });

    it.each(["http://vault.internal:50051", "https://vault.internal", "http://[::1]:50051"])("TOKENVAULT_URL=%s is accepted as is", (url) => {
      expect(loadSidecarConfig({ TOKENVAULT_URL: url }).vaultUrl).toBe(url);
    });

    it.each([
      ["0", 0],
      ["1", 1],
      ["10", 10],
    ])("TOKENVAULT_SIDECAR_TRUSTED_PROXIES=%s is %i", (raw, expected) => {
      expect(loadSidecarConfig({ TOKENVAULT_SIDECAR_TRUSTED_PROXIES: raw }).trustedProxies).toBe(expected);
    });

    it.each(["11", "-1", "one", "1.5", "1e1"])("TOKENVAULT_SIDECAR_TRUSTED_PROXIES=%s is refused with its range", (raw) => {
      const err = sidecarConfigError({ TOKENVAULT_SIDECAR_TRUSTED_PROXIES: raw });
      expect(err.message).toContain("TOKENVAULT_SIDECAR_TRUSTED_PROXIES");
      expect(err.message).toContain("0 to 10");
      expect(err.message).toContain(`"${raw}"`);
    });

    const cases: [string, Env, string[]][] = [
      ["port abc", { TOKENVAULT_SIDECAR_PORT: "abc" }, ["TOKENVAULT_SIDECAR_PORT"]],
      ["port 65536", { TOKENVAULT_SIDECAR_PORT: "65536" }, ["TOKENVAULT_SIDECAR_PORT", "0 to 65535"]],
      ["only the TLS cert", { TOKENVAULT_SIDECAR_TLS_CERT_FILE: "c.pem" }, ["TOKENVAULT_SIDECAR_TLS_CERT_FILE", "TOKENVAULT_SIDECAR_TLS_KEY_FILE"]],
      ["only the TLS key", { TOKENVAULT_SIDECAR_TLS_KEY_FILE: "k.pem" }, ["TOKENVAULT_SIDECAR_TLS_CERT_FILE", "TOKENVAULT_SIDECAR_TLS_KEY_FILE"]],
      ["bad log level", { TOKENVAULT_LOG_LEVEL: "verbose" }, ["TOKENVAULT_LOG_LEVEL"]],
      ["provider timeout below 100 ms", { TOKENVAULT_SIDECAR_PROVIDER_TIMEOUT_MS: "99" }, ["TOKENVAULT_SIDECAR_PROVIDER_TIMEOUT_MS"]],
      ["vault timeout above 2 minutes", { TOKENVAULT_SIDECAR_VAULT_TIMEOUT_MS: "120001" }, ["TOKENVAULT_SIDECAR_VAULT_TIMEOUT_MS"]],
      ["grace in words", { TOKENVAULT_SHUTDOWN_GRACE_MS: "soon" }, ["TOKENVAULT_SHUTDOWN_GRACE_MS"]],
    ];

    it.each(cases)("%s", (_name, env, names) => {
      const err = sidecarConfigError(env);
      for (const name of names) expect(err.message).toContain(name);
    });
  });
});
