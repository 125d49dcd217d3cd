#!/usr/bin/env node
/**
 * The `tokenvault` command: parse the command line, load the configuration,
 * run the command. Invalid configuration or usage exits non-zero with one line.
 */
import { parseArgs } from "node:util";
import { ConfigError, loadConfig, loadSidecarConfig } from "./config.js";
import { KeyRingError } from "./crypto/key-ring.js";
import { KeyMismatchError } from "./keys/verify.js";
import { CallerAdminError } from "./auth/caller-admin.js";
import { createLogger } from "./log.js";
import { callersCommand } from "./cli/callers.js";
import { CatalogueError } from "./providers/catalogue.js";
import { auditCommand } from "./cli/audit.js";
import { generateKeyCommand, keysCommand } from "./cli/keys.js";
import { migrateCommand, UsageError } from "./cli/migrate.js";
import { serve } from "./cli/serve.js";
import { sidecarCommand } from "./cli/sidecar.js";
import { ticketsCommand, ticketsGenerateKey } from "./cli/tickets.js";
import { TicketKeyError } from "./sidecar/tickets.js";

const usage = `usage: tokenvault <command>

  serve                      run the vault (embedded PostgreSQL when DATABASE_URL is unset)
  migrate up|down|status     apply, revert (one step, or --count N) or list schema migrations
  keys generate [--id ID] [--prepend FILE]
                             make a new key (print it, or put it first in a key file)
  keys status                rows per key id
  keys rotate [--batch-size N]
                             re-seal every row under the sealing (first) key, online
  callers add NAME --allow RPC,... --integrations NAME,...|* [--users ID,PREFIX*,...] [--refresh-tokens]
                             add a caller; prints its secret once
  callers list | show NAME | revoke NAME | rotate-secret NAME
  callers bind-cert NAME --identity spiffe://...|DNS|CN
                             let a client certificate with this identity act as NAME (mutual TLS)
  callers apply FILE         make the callers match a JSON file (creates, updates, revokes the rest)
  audit verify [--from CURSOR]
                             recompute the audit hash chain; names the first bad event (exit 1)
  audit prune --before DATE  delete older events, keeping the rest verifiable (a checkpoint)
  audit tail [--follow] [--after CURSOR] [--user ID] [--integration NAME] [--caller NAME]
             [--action A,B] [--since DATE] [--until DATE] [--url URL] [--secret-file FILE]
                             print audit events as JSON lines through the StreamAudit API
  sidecar                    run the OAuth sidecar (connect and callback pages for browsers)
  tickets mint --user ID --integration NAME --return-url URL [--ttl SECONDS] [--link]
                             mint a connect ticket as an app backend does (--link: the whole /connect URL)
  tickets generate-key [--id ID]
                             make a ticket key for TOKENVAULT_TICKET_KEYS

Configuration comes from the environment: see README.md.`;

async function main(argv: string[]): Promise<number> {
  const { positionals, values } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      count: { type: "string" },
      id: { type: "string" },
      prepend: { type: "string" },
      "batch-size": { type: "string" },
      allow: { type: "string" },
      integrations: { type: "string" },
      users: { type: "string" },
      "refresh-tokens": { type: "boolean" },
      identity: { type: "string" },
      from: { type: "string" },
      before: { type: "string" },
      follow: { type: "boolean" },
      after: { type: "string" },
      user: { type: "string" },
      integration: { type: "string" },
      caller: { type: "string" },
      action: { type: "string" },
      since: { type: "string" },
      until: { type: "string" },
      url: { type: "string" },
      "secret-file": { type: "string" },
      "return-url": { type: "string" },
      ttl: { type: "string" },
      link: { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
  });
  const [command, action] = positionals;
  if (values.help === true || command === undefined || command === "help") {
    console.log(usage);
    return command === undefined && values.help !== true ? 2 : 0;
  }
  if (command === "keys" && action === "generate") {
    generateKeyCommand({ id: values.id, prepend: values.prepend });
    return 0;
  }
  if (command === "tickets" && action === "generate-key") {
    // Like `keys generate`: it makes the setting, so it must not need it.
    ticketsGenerateKey(values.id);
    return 0;
  }
  if (command === "sidecar" || command === "tickets") {
    // The sidecar's own settings: it has no database and no encryption key.
    const sidecarConfig = loadSidecarConfig();
    if (command === "sidecar") await sidecarCommand(sidecarConfig, createLogger(sidecarConfig.logLevel));
    else {
      await ticketsCommand(sidecarConfig, action ?? "", {
        user: values.user,
        integration: values.integration,
        returnUrl: values["return-url"],
        ttl: positiveInt(values.ttl, "--ttl"),
        link: values.link,
      });
    }
    return 0;
  }
  const config = loadConfig();
  const logger = createLogger(config.logLevel);
  switch (command) {
    case "serve":
      await serve(config, logger);
      return 0;
    case "migrate":
      await migrateCommand(config, logger, action ?? "", positiveInt(values.count, "--count"));
      return 0;
    case "keys":
      await keysCommand(config, logger, action ?? "", {
        id: values.id,
        prepend: values.prepend,
        batchSize: positiveInt(values["batch-size"], "--batch-size"),
      });
      return 0;
    case "callers":
      await callersCommand(config, logger, action ?? "", positionals.slice(2), {
        allow: values.allow,
        integrations: values.integrations,
        users: values.users,
        refreshTokens: values["refresh-tokens"],
        identity: values.identity,
      });
      return 0;
    case "audit":
      return auditCommand(config, logger, action ?? "", {
        from: values.from,
        before: values.before,
        follow: values.follow,
        after: values.after,
        user: values.user,
        integration: values.integration,
        caller: values.caller,
        action: values.action,
        since: values.since,
        until: values.until,
        url: values.url,
        secretFile: values["secret-file"],
      });
    default:
      throw new UsageError(`unknown command "${command}"`);
  }
}

function positiveInt(value: string | undefined, flag: string): number | undefined {
  if (value === undefined) return undefined;
  if (!/^[1-9]\d*$/.test(value)) throw new UsageError(`${flag} must be a positive whole number`);
  return Number(value);
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    if (err instanceof UsageError || (err as { code?: string }).code?.startsWith("ERR_PARSE_ARGS")) {
      console.error(`tokenvault: ${(err as Error).message}\n\n${usage}`);
      process.exit(2);
    }
    if (err instanceof ConfigError || err instanceof KeyRingError || err instanceof KeyMismatchError || err instanceof CallerAdminError || err instanceof CatalogueError || err instanceof TicketKeyError) {
      console.error(`tokenvault: ${err.message}`);
      process.exit(1);
    }
    const code = (err as { code?: string }).code;
    console.error(`tokenvault: ${err instanceof Error ? err.message : String(err)}${code ? ` (${code})` : ""}`);
    process.exit(1);
  },
);
