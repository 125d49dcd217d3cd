/**
 * `tokenvault migrate up|down|status`.
 */
import type { Config } from "../config.js";
import { migrate, migrationStatus } from "../db/migrate.js";
import type { Logger } from "../log.js";
import { openDatabase } from "./database.js";

/** Runs a migrate subcommand and prints what it did. */
export async function migrateCommand(config: Config, logger: Logger, action: string, count: number | undefined): Promise<void> {
  const database = await openDatabase(config, logger);
  try {
    if (action === "status") {
      for (const m of await migrationStatus(database.url)) {
        console.log(`${m.appliedAt ? "applied" : "pending"}  ${m.name}${m.appliedAt ? `  ${m.appliedAt.toISOString()}` : ""}`);
      }
    } else if (action === "up" || action === "down") {
      const names = await migrate(database.url, { direction: action, count, logger });
      console.log(names.length === 0 ? "nothing to do" : names.map((n) => `${action === "up" ? "applied" : "reverted"}  ${n}`).join("\n"));
    } else {
      throw new UsageError(`unknown migrate action "${action}": use up, down or status`);
    }
  } finally {
    await database.close();
  }
}

/** A command line that does not parse; main prints it with the usage. */
export class UsageError extends Error {
  override readonly name = "UsageError";
}
