/**
 * Request/response over a forked child's IPC channel: the orchestrator sends
 * `{ id, type, ...payload }`, the child answers `{ id, ok, result | error }`.
 */
import { fork, type ChildProcess } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { buildDir } from "./build.js";

interface Reply {
  id: number;
  ok: boolean;
  result?: unknown;
  error?: string;
}

/** A forked benchmark child (server, load generator or followers). */
export class Child {
  readonly process: ChildProcess;
  readonly name: string;
  #next = 1;
  readonly #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  #exited = false;
  /** Resolves with what the child announces once it is ready (its id-0 message). */
  readonly ready: Promise<Record<string, unknown>>;
  #announce: (v: Record<string, unknown>) => void = () => {};
  #fail: (e: Error) => void = () => {};

  constructor(name: string, process: ChildProcess) {
    this.name = name;
    this.process = process;
    this.ready = new Promise((resolve, reject) => {
      this.#announce = resolve;
      this.#fail = reject;
    });
    process.on("message", (message: unknown) => {
      const reply = message as Reply;
      if (reply.id === 0) {
        this.#announce((reply.result ?? {}) as Record<string, unknown>);
        return;
      }
      const pending = this.#pending.get(reply.id);
      if (pending === undefined) return;
      this.#pending.delete(reply.id);
      if (reply.ok) pending.resolve(reply.result);
      else pending.reject(new Error(`${name}: ${reply.error}`));
    });
    process.once("exit", (code, signal) => {
      this.#exited = true;
      this.#fail(new Error(`${name} exited before it was ready (code ${code}, signal ${signal})`));
      for (const p of this.#pending.values()) p.reject(new Error(`${name} exited (code ${code}, signal ${signal})`));
      this.#pending.clear();
    });
  }

  get pid(): number {
    return this.process.pid!;
  }

  get exited(): boolean {
    return this.#exited;
  }

  /** Sends a request and waits for its answer. */
  call<T>(type: string, payload: Record<string, unknown> = {}): Promise<T> {
    if (this.#exited) return Promise.reject(new Error(`${this.name} has exited`));
    const id = this.#next++;
    return new Promise<T>((resolve, reject) => {
      this.#pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.process.send({ id, type, ...payload });
    });
  }

  /** Asks the child to stop; kills it (by its own pid) if it has not exited after `graceMs`. */
  async stop(graceMs = 15_000): Promise<void> {
    if (this.#exited) return;
    const exited = new Promise<void>((resolve) => this.process.once("exit", () => resolve()));
    this.call("stop").catch(() => {});
    const timer = setTimeout(() => {
      if (!this.#exited) this.process.kill("SIGKILL");
    }, graceMs);
    await exited;
    clearTimeout(timer);
  }
}

/**
 * Forks a child: `script` is a bench/ file name (e.g. "server-child.ts"); it
 * runs from the transpiled tree when `built` (see build.ts), else under tsx.
 * `nodeFlags` are extra node flags (e.g. --cpu-prof).
 */
export function forkChild(name: string, script: string, options: { built: boolean; nodeFlags?: string[]; env?: NodeJS.ProcessEnv; quiet?: boolean }): Child {
  const file = options.built
    ? path.join(buildDir, "bench", script.replace(/\.ts$/, ".js"))
    : fileURLToPath(new URL(`../${script}`, import.meta.url));
  const child = fork(file, [], {
    execArgv: [...(options.built ? [] : ["--import", "tsx"]), ...(options.nodeFlags ?? [])],
    env: options.env ?? process.env,
    // The vault's log lines (one per call at info) go nowhere, as to a log
    // shipper that keeps up; stderr stays visible for crashes.
    stdio: ["ignore", options.quiet === false ? "inherit" : "ignore", "inherit", "ipc"],
  });
  return new Child(name, child);
}

type Handler = (message: Record<string, unknown>) => Promise<unknown> | unknown;

/** Child side: serves requests with `handlers` (by type); "stop" is answered by the handler the child gives. */
export function serveIpc(handlers: Record<string, Handler>): void {
  process.on("message", (message: unknown) => {
    const m = message as Record<string, unknown> & { id: number; type: string };
    const handler = handlers[m.type];
    const reply = (r: Omit<Reply, "id">) => process.send?.({ id: m.id, ...r });
    if (handler === undefined) {
      reply({ ok: false, error: `unknown request ${m.type}` });
      return;
    }
    Promise.resolve()
      .then(() => handler(m))
      .then(
        (result) => reply({ ok: true, result }),
        (err: unknown) => reply({ ok: false, error: err instanceof Error ? `${err.message}\n${err.stack ?? ""}` : String(err) }),
      );
  });
  // The orchestrator dying must not leave children behind.
  process.on("disconnect", () => process.exit(0));
}

/** Child side: tells the parent it is ready. */
export function announceReady(result: Record<string, unknown>): void {
  process.send?.({ id: 0, ok: true, result });
}
