/**
 * `tokenvault audit verify|prune|tail`: the auditors' commands. verify and
 * prune work on the database; tail is a client of the StreamAudit API, as an
 * auditor's own tool would be.
 */
import { readFileSync, existsSync } from "node:fs";
import path from "node:path";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import type { Config } from "../config.js";
import { createPool } from "../db/pool.js";
import { verifyAuditChain } from "../audit/verify.js";
import { pruneAudit } from "../audit/prune.js";
import { auditActions } from "../audit/chain.js";
import { TokenVaultService, type AuditEvent } from "../gen/tokenvault/v1/tokenvault_pb.js";
import type { Logger } from "../log.js";
import { openDatabase } from "./database.js";
import { UsageError } from "./migrate.js";

/** Flags of the audit subcommands. */
export interface AuditOptions {
  from?: string | undefined;
  before?: string | undefined;
  follow?: boolean | undefined;
  after?: string | undefined;
  user?: string | undefined;
  integration?: string | undefined;
  caller?: string | undefined;
  action?: string | undefined;
  since?: string | undefined;
  until?: string | undefined;
  url?: string | undefined;
  secretFile?: string | undefined;
}

/** Runs an audit subcommand; resolves with the exit code. */
export async function auditCommand(config: Config, logger: Logger, action: string, options: AuditOptions): Promise<number> {
  switch (action) {
    case "verify":
      return verify(config, logger, options.from === undefined ? undefined : cursor(options.from, "--from"));
    case "prune":
      if (options.before === undefined) throw new UsageError("audit prune needs --before DATE (e.g. 2026-01-01)");
      return prune(config, logger, date(options.before, "--before"));
    case "tail":
      return tail(config, options);
    default:
      throw new UsageError(`unknown audit action "${action}": use verify, prune or tail`);
  }
}

async function withDatabase<T>(config: Config, logger: Logger, fn: (pool: ReturnType<typeof createPool>) => Promise<T>): Promise<T> {
  const database = await openDatabase(config, logger);
  const pool = createPool({ connectionString: database.url, max: 2, logger, applicationName: "tokenvault-audit" });
  try {
    return await fn(pool);
  } finally {
    await pool.end();
    await database.close();
  }
}

async function verify(config: Config, logger: Logger, from: bigint | undefined): Promise<number> {
  const result = await withDatabase(config, logger, (pool) => verifyAuditChain(pool, from));
  if (result.ok) {
    console.log(`OK: ${result.checked} events checked, chain intact up to ${result.headId}`);
    return 0;
  }
  console.log(`FAILED at event ${result.firstBadId}: ${result.problem} (${result.checked} events before it are intact)`);
  return 1;
}

async function prune(config: Config, logger: Logger, before: Date): Promise<number> {
  return withDatabase(config, logger, async (pool) => {
    const checkpoint = await pruneAudit(pool, before, { lockTimeoutMs: config.audit.lockTimeoutMs, by: "cli" });
    if (checkpoint === undefined) {
      console.log(`nothing to prune before ${before.toISOString()}`);
      return 0;
    }
    console.log(`pruned ${checkpoint.prunedCount} events up to ${checkpoint.lastId}; the rest verifies from that checkpoint`);
    return 0;
  });
}

async function tail(config: Config, options: AuditOptions): Promise<number> {
  const baseUrl = options.url ?? process.env.TOKENVAULT_URL ?? `${config.tls ? "https" : "http"}://${config.host === "0.0.0.0" ? "127.0.0.1" : config.host}:${config.port}`;
  const secret = callerSecret(config, options.secretFile);
  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${secret}`);
    return next(req);
  };
  const client = createClient(TokenVaultService, createGrpcTransport({ baseUrl, interceptors: [auth] }));
  const actions = options.action === undefined ? [] : options.action.split(",").map((a) => a.trim()).filter(Boolean);
  const unknown = actions.find((a) => !(auditActions as readonly string[]).includes(a));
  if (unknown !== undefined) throw new UsageError(`unknown action "${unknown}": use ${auditActions.join(", ")}`);
  const abort = new AbortController();
  const stop = () => abort.abort();
  process.once("SIGINT", stop);
  process.once("SIGTERM", stop);
  let last = options.after === undefined ? 0n : cursor(options.after, "--after");
  try {
    const stream = client.streamAudit(
      {
        afterCursor: last,
        follow: options.follow === true,
        // Events that are ready together come in one message.
        maxBatch: 256,
        filter: {
          userId: options.user ?? "",
          integration: options.integration ?? "",
          caller: options.caller ?? "",
          actions,
          since: options.since === undefined ? undefined : timestampFromDate(date(options.since, "--since")),
          until: options.until === undefined ? undefined : timestampFromDate(date(options.until, "--until")),
        },
      },
      { signal: abort.signal },
    );
    for await (const { events } of stream) {
      for (const event of events) {
        last = event.cursor;
        process.stdout.write(JSON.stringify(eventJson(event)) + "\n");
      }
    }
    return 0;
  } catch (err) {
    if (abort.signal.aborted) return 0;
    const e = ConnectError.from(err);
    const resume = e.metadata.get("tokenvault-resume-after") ?? last.toString();
    console.error(`tokenvault: the stream ended: ${Code[e.code]} ${e.rawMessage} (resume with --after ${resume})`);
    return 1;
  } finally {
    process.off("SIGINT", stop);
    process.off("SIGTERM", stop);
  }
}

/** An event as one JSON line: cursors as strings (they are 64-bit), hashes in hex. */
function eventJson(e: AuditEvent): Record<string, unknown> {
  return {
    cursor: e.cursor.toString(),
    occurred_at: e.occurredAt === undefined ? null : timestampDate(e.occurredAt).toISOString(),
    caller: e.caller || null,
    action: e.action,
    user_id: e.userId || null,
    integration: e.integration || null,
    outcome: e.outcome,
    request_id: e.requestId || null,
    peer: e.peer || null,
    details: e.details ?? {},
    prev_hash: Buffer.from(e.prevHash).toString("hex"),
    hash: Buffer.from(e.hash).toString("hex"),
  };
}

/** The caller secret: TOKENVAULT_CALLER_SECRET, --secret-file, or the development caller's file. */
function callerSecret(config: Config, secretFile: string | undefined): string {
  const fromEnv = process.env.TOKENVAULT_CALLER_SECRET?.trim();
  if (fromEnv) return fromEnv;
  const file = secretFile ?? path.join(config.dataDir, "dev-caller-secret");
  if (secretFile === undefined && !existsSync(file)) {
    throw new UsageError("audit tail needs a caller allowed StreamAudit: set TOKENVAULT_CALLER_SECRET or pass --secret-file FILE");
  }
  return readFileSync(file, "utf8").trim();
}

function cursor(value: string, flag: string): bigint {
  if (!/^\d{1,19}$/.test(value)) throw new UsageError(`${flag} must be an event cursor (a whole number)`);
  return BigInt(value);
}

function date(value: string, flag: string): Date {
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) throw new UsageError(`${flag} must be a date or time such as 2026-01-01 or 2026-01-01T12:00:00Z`);
  return d;
}
