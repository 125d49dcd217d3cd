/**
 * Where the CLI's database comes from: DATABASE_URL, or the embedded
 * PostgreSQL in the data folder when none is configured.
 */
import type { Config } from "../config.js";
import { startEmbeddedPostgres } from "../db/embedded.js";
import type { Logger } from "../log.js";

/** A database URL and how to let go of it. */
export interface OpenedDatabase {
  /** Carries credentials: never log it. */
  readonly url: string;
  readonly embedded: boolean;
  close(): Promise<void>;
}

/** Uses DATABASE_URL, or starts the embedded server (development only; config refuses it in production). */
export async function openDatabase(config: Config, logger: Logger): Promise<OpenedDatabase> {
  if (config.databaseUrl !== undefined) {
    return { url: config.databaseUrl, embedded: false, close: async () => {} };
  }
  const embedded = await startEmbeddedPostgres(config.dataDir, config.embeddedPostgresPort, logger);
  return { url: embedded.url, embedded: true, close: () => embedded.stop() };
}
