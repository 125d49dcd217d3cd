/** What machine the figures come from, and CPU accounting per process. */
import os from "node:os";
import { readdirSync, readFileSync } from "node:fs";

/** The machine description written with the results. */
export function describeMachine(pgVersion: string, database: string, h2load: string | undefined) {
  const cpus = os.cpus();
  return {
    cpu_model: cpus[0]?.model ?? "unknown",
    cores: cpus.length,
    memory_gb: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    os: `${os.type()} ${os.release()} ${os.arch()}`,
    node_version: process.version,
    postgresql_version: pgVersion,
    database,
    h2load: h2load ?? "not installed",
    date: new Date().toISOString(),
  };
}

const ticksPerSecond = 100; // USER_HZ on Linux

function processTicks(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields after the command (which may hold spaces) start after the last ')'.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return Number(fields[11]) + Number(fields[12]); // utime + stime
  } catch {
    return 0;
  }
}

/** CPU ticks of every process named `postgres` (the server and its backends), by pid. */
function postgresTicks(): Map<number, number> {
  const ticks = new Map<number, number>();
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (readFileSync(`/proc/${entry}/comm`, "utf8").trim() !== "postgres") continue;
    } catch {
      continue;
    }
    ticks.set(Number(entry), processTicks(Number(entry)));
  }
  return ticks;
}

function machineTicks(): { busy: number; total: number } {
  const line = readFileSync("/proc/stat", "utf8").split("\n")[0]!;
  const v = line.trim().split(/\s+/).slice(1).map(Number);
  const idle = (v[3] ?? 0) + (v[4] ?? 0);
  const total = v.reduce((a, b) => a + b, 0);
  return { busy: total - idle, total };
}

/** A CPU snapshot of named processes, of PostgreSQL and of the whole machine. */
export interface CpuSnapshot {
  at: number;
  processes: Record<string, number>;
  postgres: Map<number, number>;
  machine: { busy: number; total: number };
}

export function cpuSnapshot(pids: Record<string, number>): CpuSnapshot {
  return {
    at: performance.now(),
    processes: Object.fromEntries(Object.entries(pids).map(([name, pid]) => [name, processTicks(pid)])),
    postgres: postgresTicks(),
    machine: machineTicks(),
  };
}

/**
 * CPU used between two snapshots: ms per process, PostgreSQL's ms, the
 * machine's busy share (0..1), and the share of the machine used by anything
 * else (other work on the machine, h2load when it runs): a measure of noise.
 */
export function cpuDelta(a: CpuSnapshot, b: CpuSnapshot) {
  const ms = (ticks: number) => (ticks * 1000) / ticksPerSecond;
  const processesMs = Object.fromEntries(Object.keys(b.processes).map((k) => [k, ms((b.processes[k] ?? 0) - (a.processes[k] ?? 0))]));
  const postgresMs = ms([...b.postgres.entries()].reduce((sum, [pid, t]) => sum + Math.max(0, t - (a.postgres.get(pid) ?? 0)), 0));
  const capacityMs = ((b.at - a.at) * os.cpus().length);
  const busyMs = ms(b.machine.busy - a.machine.busy);
  const oursMs = Object.values(processesMs).reduce((x, y) => x + y, 0) + postgresMs;
  return {
    processesMs,
    // Per backend: one that started in between counts whole; one that ended is lost (its last ticks).
    postgresMs,
    machineBusy: (b.machine.busy - a.machine.busy) / Math.max(1, b.machine.total - a.machine.total),
    othersShare: Math.max(0, busyMs - oursMs) / Math.max(1, capacityMs),
  };
}

/** Peak resident set (VmHWM) and current (VmRSS) of a process, in MiB. */
export function memoryOf(pid: number): { hwmMb: number; rssMb: number } | undefined {
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const kb = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? NaN);
    return { hwmMb: kb("VmHWM") / 1024, rssMb: kb("VmRSS") / 1024 };
  } catch {
    return undefined;
  }
}
