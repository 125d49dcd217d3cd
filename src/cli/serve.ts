/**
 * `tokenvault serve`: open the database, migrate, check the key ring against
 * it, listen, and shut down gracefully on SIGTERM or SIGINT.
 */
import { setTimeout as sleep } from "node:timers/promises";
import type { Config } from "../config.js";
import { loadKeyRing } from "../crypto/key-source.js";
import { migrate } from "../db/migrate.js";
import { createPool } from "../db/pool.js";
import { verifyKeyRing } from "../keys/verify.js";
import type { Logger } from "../log.js";
import { ensureDevCaller } from "../auth/caller-admin.js";
import { createCallerRegistry } from "../auth/caller-registry.js";
import { buildServer } from "../vault/server.js";
import { openAuditLog } from "../audit/log.js";
import { loadCatalogue } from "../providers/catalogue.js";
import { createRefresher } from "../refresh/refresher.js";
import { openDatabase } from "./database.js";

/** Runs the vault until a signal stops it; resolves when it has shut down. */
export async function serve(config: Config, logger: Logger): Promise<void> {
  // Listen for signals first: a SIGTERM during start-up (e.g. while the
  // embedded database starts) must still stop everything that was started.
  const stopSignal = new Promise<NodeJS.Signals>((resolve) => {
    const stop = (signal: NodeJS.Signals) => {
      process.off("SIGTERM", stop);
      process.off("SIGINT", stop);
      resolve(signal);
    };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
  });

  const keys = loadKeyRing(config.keySource, config.production);
  if (keys.development) {
    logger.warn(
      { keyFile: config.keySource.kind === "development" ? config.keySource.path : undefined, created: keys.created },
      "DEVELOPMENT KEY RING: tokens are sealed with a key stored next to the data. Never use it in production (set TOKENVAULT_KEYS or TOKENVAULT_KEYS_FILE).",
    );
  }
  // A broken catalogue stops the start before anything is opened.
  const catalogue = loadCatalogue({ overrideFile: config.providersFile, settings: config.providerSettings });
  const database = await openDatabase(config, logger);
  const pool = createPool({ connectionString: database.url, max: config.dbPoolMax, logger, asynchronousCommit: true });
  try {
    if (config.migrateOnStart) {
      const applied = await migrate(database.url, { direction: "up", logger });
      if (applied.length > 0) logger.info({ applied }, "migrations applied");
    }
    await verifyKeyRing(pool, keys.ring);
  } catch (err) {
    await pool.end();
    await database.close();
    throw err;
  }

  const callers = await createCallerRegistry({
    pool,
    logger,
    listenUrl: database.url,
    reloadIntervalMs: config.callersReloadMs,
  });
  if (database.embedded) {
    // Development default: a caller with every permission, so the README's
    // walkthrough works on a first run. Never in production (no embedded database there).
    const dev = await ensureDevCaller(pool, config.dataDir);
    await callers.reload();
    if (dev.newSecret !== undefined && process.stderr.isTTY) {
      process.stderr.write(`\nDevelopment caller "dev" created. Its secret (shown once, also kept in ${dev.secretFile}):\n\n  ${dev.newSecret}\n\n`);
    }
    logger.warn({ secretFile: dev.secretFile, created: dev.newSecret !== undefined }, "development caller \"dev\" may call everything; its secret is in the data folder");
  } else if (callers.size === 0) {
    logger.warn("no callers are defined: nothing can call this vault until one is added (tokenvault callers add NAME --allow ... --integrations ...)");
  }

  const now = () => new Date();
  const refresher = createRefresher({ pool, keyRing: keys.ring, catalogue, now, settings: config.refresh });
  const audit = await openAuditLog({ pool, logger, listenUrl: database.url, settings: config.audit });
  const server = buildServer({
    deps: { pool, keyRing: keys.ring, now, audit, refresher, catalogue, refreshTimeoutMs: config.refresh.providerTimeoutMs },
    logger,
    callers,
    openServices: config.openServices,
    maxMessageBytes: config.maxMessageBytes,
    tls: config.tls,
  });
  const port = await server.listen(config.port, config.host);
  logger.info(
    { address: `${config.tls ? "https" : "http"}://${config.host}:${port}`, keyId: keys.ring.current.id, embeddedDatabase: database.embedded },
    "tokenvault listening (gRPC, gRPC-Web and Connect)",
  );

  const signal = await stopSignal;
  logger.info({ signal, graceMs: config.shutdownGraceMs }, "shutting down");
  const deadline = Date.now() + config.shutdownGraceMs;
  await server.close(config.shutdownGraceMs);
  await audit.close();
  await callers.close();
  // pool.end() waits for running queries; a call cut at the deadline may
  // still have one (up to statement_timeout), so bound the wait as well.
  const poolClosed = await Promise.race([
    pool.end().then(() => true),
    sleep(Math.max(1_000, deadline - Date.now())).then(() => false),
  ]);
  if (!poolClosed) logger.warn("database queries still running after the grace period: leaving them to the server");
  await database.close();
  logger.info("stopped");
}
