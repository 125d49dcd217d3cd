/**
 * `tokenvault callers add|list|show|revoke|rotate-secret|bind-cert|apply`.
 * Secrets are printed once, on stdout, and never logged.
 */
import type { Config } from "../config.js";
import {
  addCaller,
  applyCallers,
  bindCertificate,
  readCallersFile,
  revoke,
  rotateCallerSecret,
} from "../auth/caller-admin.js";
import { migrate } from "../db/migrate.js";
import { createPool } from "../db/pool.js";
import { selectCallerByName, selectCallers, type CallerRow } from "../db/queries/callers.js";
import type { Logger } from "../log.js";
import { openDatabase } from "./database.js";
import { UsageError } from "./migrate.js";

/** Flags of the callers subcommands. */
export interface CallersOptions {
  allow?: string;
  integrations?: string;
  users?: string;
  refreshTokens?: boolean;
  identity?: string;
}

const list = (value: string | undefined) => (value ?? "").split(",").map((s) => s.trim()).filter((s) => s !== "");

/** Runs a callers subcommand; `args` are the positionals after the action. */
export async function callersCommand(config: Config, logger: Logger, action: string, args: string[], options: CallersOptions): Promise<void> {
  const database = await openDatabase(config, logger);
  const pool = createPool({ connectionString: database.url, max: 2, logger, applicationName: "tokenvault-callers" });
  try {
    if (config.migrateOnStart) await migrate(database.url, { direction: "up", logger });
    const name = args[0];
    const needName = () => {
      if (name === undefined) throw new UsageError(`callers ${action} needs a caller NAME`);
      return name;
    };
    switch (action) {
      case "add": {
        if (options.allow === undefined || options.integrations === undefined) {
          throw new UsageError("callers add needs --allow RPC,... and --integrations NAME,...|*");
        }
        const { secret } = await addCaller(pool, needName(), {
          allow: list(options.allow),
          integrations: list(options.integrations),
          users: list(options.users),
          refreshTokens: options.refreshTokens,
        });
        console.log(secret);
        console.error(`caller "${name}" added. The secret above is shown once: store it in the caller's secret store.`);
        return;
      }
      case "list":
        for (const row of await selectCallers(pool)) console.log(describe(row, false));
        return;
      case "show": {
        const row = await selectCallerByName(pool, needName());
        if (row === undefined) throw new UsageError(`no caller named "${name}"`);
        console.log(describe(row, true));
        return;
      }
      case "revoke":
        await revoke(pool, needName());
        console.log(`caller "${name}" revoked`);
        return;
      case "rotate-secret":
        console.log(await rotateCallerSecret(pool, needName()));
        console.error(`caller "${name}" has a new secret (above, shown once); the old one no longer works.`);
        return;
      case "bind-cert":
        if (options.identity === undefined) throw new UsageError("callers bind-cert needs --identity (SAN URI, DNS name or CN)");
        await bindCertificate(pool, needName(), options.identity);
        console.log(`caller "${name}" is bound to certificate identity ${options.identity}`);
        return;
      case "apply": {
        const file = args[0];
        if (file === undefined) throw new UsageError("callers apply needs a FILE");
        const result = await applyCallers(pool, readCallersFile(file));
        for (const c of result.created) console.log(`created ${c.name}  secret ${c.secret}`);
        for (const n of result.updated) console.log(`updated ${n}`);
        for (const n of result.revoked) console.log(`revoked ${n}`);
        if (result.created.length > 0) console.error("The secrets above are shown once: store them in each caller's secret store.");
        return;
      }
      default:
        throw new UsageError(`unknown callers action "${action}": use add, list, show, revoke, rotate-secret, bind-cert or apply`);
    }
  } finally {
    await pool.end();
    await database.close();
  }
}

function describe(row: CallerRow, full: boolean): string {
  const state = row.revoked_at === null ? "active" : `revoked ${row.revoked_at.toISOString()}`;
  const lines = [
    `${row.name}  (${state})`,
    `  allow:          ${row.allowed_rpcs.join(",")}`,
    `  integrations:   ${row.allowed_integrations.join(",")}`,
    `  users:          ${row.allowed_users === null ? "*" : row.allowed_users.join(",")}`,
    `  refresh tokens: ${row.may_receive_refresh_token ? "yes" : "no"}`,
    `  credentials:    ${[row.secret_hash !== null ? "secret" : "", row.cert_identity !== null ? `certificate ${row.cert_identity}` : ""].filter(Boolean).join(", ") || "none"}`,
  ];
  if (full) lines.push(`  created:        ${row.created_at.toISOString()}`, `  updated:        ${row.updated_at.toISOString()}`);
  return lines.join("\n");
}
