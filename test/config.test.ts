/**
 * loadConfig() as a pure function of an environment object: defaults, the
 * production requirements, one ConfigError naming the variable for every
 * invalid value, a frozen result, and no credential in any error message.
 */
import path from "node:path";
import { describe, expect, it } from "vitest";
import { ConfigError, loadConfig, type Config } from "../src/config.js";

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
