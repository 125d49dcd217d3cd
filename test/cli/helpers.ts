/**
 * Runs the real `tokenvault` CLI (src/main.ts through tsx) as a child process
 * with a minimal environment, capturing everything it prints. Every process is
 * remembered, so a test file can scan all of their output for secrets and kill
 * whatever is left in afterAll.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { TokenVaultService } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { bearer } from "../helpers/server.js";

/** The repository root (the CLI's working directory). */
export const repoRoot = path.resolve(import.meta.dirname, "../..");

/** The log line `serve` writes once it accepts calls. */
export const listeningMessage = "tokenvault listening (gRPC, gRPC-Web and Connect)";

/** A parsed JSON log line. */
export type LogLine = Record<string, unknown> & { msg?: string; level?: string };

/** How a process ended: its exit code, or the signal that killed it (code null). */
export interface Exit {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
}

/** A running (or finished) CLI process. */
export interface CliProcess {
  readonly args: readonly string[];
  readonly pid: number;
  /** Everything written to stdout so far. */
  stdout(): string;
  /** Everything written to stderr so far. */
  stderr(): string;
  /** The complete stdout lines that parse as JSON objects (pino's log lines). */
  logs(): LogLine[];
  /** Resolves with the first log line matching `predicate`; rejects on exit or timeout. */
  waitForLog(predicate: (line: LogLine) => boolean, timeoutMs?: number): Promise<LogLine>;
  /** Sends `signal` to this process only (not to its children, e.g. an embedded PostgreSQL). */
  kill(signal?: NodeJS.Signals): void;
  /** Settles when the process has exited. */
  readonly exit: Promise<Exit>;
  /** The exit code (null when a signal killed it). */
  readonly exitCode: Promise<number | null>;
  /** True once the process has exited. */
  exited(): boolean;
}

/** A `serve` process that is listening. */
export interface ServeProcess extends CliProcess {
  readonly port: number;
  /** e.g. http://127.0.0.1:41234 (from the listening line's "address"). */
  readonly baseUrl: string;
  /** The listening log line. */
  readonly listening: LogLine;
}

/** The finished result of {@link runCli}. */
export interface CliResult extends Exit {
  readonly stdout: string;
  readonly stderr: string;
}

interface Tracked {
  readonly child: ChildProcess;
  readonly process: CliProcess;
}

/** Every process this module spawned (one module instance per test file). */
const spawned: Tracked[] = [];
const tempDirs: string[] = [];

// Last resort when the test process ends without cleanupCli() (a crash, a killed
// worker): no CLI, nor an embedded PostgreSQL it started, may outlive it.
process.once("exit", () => {
  for (const { child, process: p } of spawned) {
    if (p.exited()) continue;
    try {
      process.kill(-p.pid, "SIGKILL");
    } catch {
      child.kill("SIGKILL");
    }
  }
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
});

/**
 * The environment of a CLI process: PATH and HOME of the test runner and
 * `settings`; nothing else leaks in (no NODE_ENV, no DATABASE_URL of the shell).
 * Undefined values are left out.
 */
export function cliEnv(settings: Record<string, string | undefined> = {}): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [name, value] of Object.entries({ PATH: process.env.PATH, HOME: process.env.HOME, ...settings })) {
    if (value !== undefined) env[name] = value;
  }
  return env;
}

/** A fresh temporary folder, removed by {@link cleanupCli}. Usable as an embedded data folder (root runs PostgreSQL as `postgres`, which gets 0711 on it). */
export function tempDir(prefix = "tokenvault-cli-"): string {
  const dir = mkdtempSync(path.join(tmpdir(), prefix));
  tempDirs.push(dir);
  return dir;
}

/** A fresh key: its id, base64 material, and the `id:base64` entry for TOKENVAULT_KEYS. */
export interface TestKey {
  readonly id: string;
  readonly base64: string;
  readonly entry: string;
}

/** A random 32-byte key under `id`. */
export function newKey(id: string): TestKey {
  const base64 = randomBytes(32).toString("base64");
  return { id, base64, entry: `${id}:${base64}` };
}

/** Spawns `tokenvault ...args` with exactly `env`. */
export function spawnCli(args: readonly string[], env: Record<string, string>): CliProcess {
  const child = spawn(process.execPath, ["--import", "tsx", "src/main.ts", ...args], {
    cwd: repoRoot,
    env,
    stdio: ["ignore", "pipe", "pipe"],
    // Its own process group, so cleanup can also reach what it started (an embedded PostgreSQL).
    detached: true,
  });
  let out = "";
  let err = "";
  const listeners = new Set<() => void>();
  const changed = () => {
    for (const l of [...listeners]) l();
  };
  child.stdout!.setEncoding("utf8").on("data", (chunk: string) => {
    out += chunk;
    changed();
  });
  child.stderr!.setEncoding("utf8").on("data", (chunk: string) => {
    err += chunk;
    changed();
  });
  let hasExited = false;
  const exit = new Promise<Exit>((resolve, reject) => {
    child.once("error", reject);
    // 'close': the process exited and its output streams are drained.
    child.once("close", (code, signal) => {
      hasExited = true;
      changed();
      resolve({ code, signal });
    });
  });
  const logs = (): LogLine[] => {
    const lines: LogLine[] = [];
    for (const line of out.split("\n").slice(0, -1)) {
      if (!line.startsWith("{")) continue;
      try {
        const parsed: unknown = JSON.parse(line);
        if (parsed !== null && typeof parsed === "object") lines.push(parsed as LogLine);
      } catch {
        // not a log line
      }
    }
    return lines;
  };
  const describe = () => `tokenvault ${args.join(" ")}\n--- stdout ---\n${out}\n--- stderr ---\n${err}`;
  const proc: CliProcess = {
    args,
    pid: child.pid ?? -1,
    stdout: () => out,
    stderr: () => err,
    logs,
    waitForLog(predicate, timeoutMs = 30_000) {
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          listeners.delete(check);
          reject(new Error(`no matching log line within ${timeoutMs} ms from ${describe()}`));
        }, timeoutMs);
        const check = () => {
          const found = logs().find(predicate);
          if (found !== undefined || hasExited) {
            clearTimeout(timer);
            listeners.delete(check);
            if (found !== undefined) resolve(found);
            else reject(new Error(`process exited (${child.exitCode ?? child.signalCode}) before the log line: ${describe()}`));
          }
        };
        listeners.add(check);
        check();
      });
    },
    kill(signal = "SIGTERM") {
      if (!hasExited) child.kill(signal);
    },
    exit,
    exitCode: exit.then((e) => e.code),
    exited: () => hasExited,
  };
  spawned.push({ child, process: proc });
  return proc;
}

/**
 * Runs a command to completion. A process still running after `timeoutMs`
 * is stopped (SIGTERM, then SIGKILL) and reported with code null.
 */
export async function runCli(args: readonly string[], env: Record<string, string>, timeoutMs = 30_000): Promise<CliResult> {
  const proc = spawnCli(args, env);
  const timer = setTimeout(() => void stop(spawned.find((t) => t.process === proc)!), timeoutMs);
  try {
    const exit = await proc.exit;
    return { ...exit, stdout: proc.stdout(), stderr: proc.stderr() };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Starts `tokenvault serve` and waits for its listening line; the port comes
 * from that line's "address". Rejects (with the output) if it exits first.
 */
export async function startServe(env: Record<string, string>, timeoutMs = 30_000): Promise<ServeProcess> {
  const proc = spawnCli(["serve"], env);
  const listening = await proc.waitForLog((l) => l.msg === listeningMessage, timeoutMs);
  const address = new URL(String(listening.address));
  const port = Number(address.port);
  return { ...proc, port, baseUrl: `${address.protocol}//${address.hostname}:${port}`, listening };
}

/** Output of every process spawned so far by this test file. */
export function allOutput(): { args: readonly string[]; stdout: string; stderr: string }[] {
  return spawned.map(({ process: p }) => ({ args: p.args, stdout: p.stdout(), stderr: p.stderr() }));
}

/** Output lines (of any process so far) that contain one of `needles`, prefixed by the command. */
export function linesContaining(needles: readonly string[]): string[] {
  const found: string[] = [];
  for (const { args, stdout, stderr } of allOutput()) {
    for (const line of `${stdout}\n${stderr}`.split("\n")) {
      if (needles.some((n) => n !== "" && line.includes(n))) found.push(`[tokenvault ${args.join(" ")}] ${line}`);
    }
  }
  return found;
}

async function stop({ child, process: p }: Tracked): Promise<void> {
  if (p.exited()) return;
  child.kill("SIGTERM");
  const done = await Promise.race([p.exit.then(() => true, () => true), sleep(10_000).then(() => false)]);
  if (done) return;
  // Still there: kill the whole process group (the CLI and anything it started).
  try {
    process.kill(-p.pid, "SIGKILL");
  } catch {
    child.kill("SIGKILL");
  }
  await Promise.race([p.exit.catch(() => undefined), sleep(5_000)]);
}

/** Stops every process still running and removes the temporary folders. Call in afterAll. */
export async function cleanupCli(): Promise<void> {
  await Promise.all(spawned.map(stop));
  for (const dir of tempDirs.splice(0)) rmSync(dir, { recursive: true, force: true });
}

/** A bearer secret as the CLI prints it: `tvs_<caller id>_<43 base64url characters>`. */
export const callerSecretPattern = /^tvs_([1-9][0-9]*)_([A-Za-z0-9_-]{43})$/;

/** Every RPC a policy can allow, as `--allow` takes them. */
export const everyRpc = "Store,Get,Remove,ClearUser,ListConnections";

/** Stdout lines that are not JSON log lines (what a command printed for people). */
export function printed(stdout: string): string[] {
  return stdout.split("\n").filter((l) => l !== "" && !l.startsWith("{"));
}

/**
 * A Connect client (gRPC over h2c) of the vault at `baseUrl`, acting as the
 * caller whose bearer secret is `secret` (no credential when undefined).
 * Each client has a transport, i.e. connections, of its own.
 */
export function vaultClient(baseUrl: string, secret: string | undefined): Client<typeof TokenVaultService> {
  return createClient(TokenVaultService, createGrpcTransport({ baseUrl, interceptors: secret === undefined ? [] : [bearer(secret)] }));
}

/** "ok" when `call` succeeds, else the name of its Connect code (e.g. "Unauthenticated"). */
export async function outcome(call: Promise<unknown>): Promise<string> {
  try {
    await call;
    return "ok";
  } catch (err) {
    return Code[ConnectError.from(err).code];
  }
}

/**
 * `tokenvault callers add NAME --allow ALLOW --integrations INTEGRATIONS` in
 * `env`; returns the secret, the one line it printed. Throws with the output
 * when the command fails or prints anything else on stdout.
 */
export async function addCallerWithCli(name: string, env: Record<string, string>, allow = everyRpc, integrations = "*"): Promise<string> {
  const result = await runCli(["callers", "add", name, "--allow", allow, "--integrations", integrations], env);
  const lines = printed(result.stdout);
  if (result.code !== 0 || lines.length !== 1 || !callerSecretPattern.test(lines[0]!)) {
    throw new Error(`callers add ${name} failed (${result.code}):\n--- stdout ---\n${result.stdout}\n--- stderr ---\n${result.stderr}`);
  }
  return lines[0]!;
}
