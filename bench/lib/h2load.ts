/**
 * h2load (Debian's nghttp2-client) as a second, non-Node load generator:
 * gRPC over h2c with a fixed request body (a 5-byte gRPC prefix and a
 * GetRequest), content-type application/grpc, te: trailers and the bearer
 * secret. h2load sends one body for every request, so its Gets all read the
 * same connection (a hot key), unlike the Node client's random keys. It counts
 * HTTP statuses only, so the harness first checks one call's grpc-status.
 */
import { execFile, spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import http2 from "node:http2";
import os from "node:os";
import path from "node:path";

/** h2load's version line, or undefined when it is not installed. */
export function h2loadVersion(): Promise<string | undefined> {
  return new Promise((resolve) => {
    execFile("h2load", ["--version"], (err, stdout) => resolve(err ? undefined : stdout.trim().split("\n")[0]));
  });
}

/** A gRPC-framed message: flag byte 0, 4-byte big-endian length, body. */
export function grpcFrame(payload: Uint8Array): Buffer {
  const frame = Buffer.alloc(5 + payload.length);
  frame.writeUInt32BE(payload.length, 1);
  frame.set(payload, 5);
  return frame;
}

/** Writes the body file h2load posts. */
export function writeBodyFile(name: string, frame: Buffer): string {
  const file = path.join(os.tmpdir(), `tokenvault-bench-${name}.bin`);
  writeFileSync(file, frame);
  return file;
}

/** Sends the same request h2load will send, once, and returns its grpc-status (and message). */
export function grpcCheck(url: string, secret: string, frame: Buffer): Promise<{ status: string; message: string }> {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const session = http2.connect(u.origin);
    session.on("error", reject);
    const req = session.request({
      ":method": "POST",
      ":path": u.pathname,
      "content-type": "application/grpc",
      te: "trailers",
      authorization: `Bearer ${secret}`,
    });
    let status = "";
    let message = "";
    req.on("response", (h) => {
      if (h["grpc-status"] !== undefined) status = String(h["grpc-status"]);
    });
    req.on("trailers", (t) => {
      status = String(t["grpc-status"] ?? status);
      message = decodeURIComponent(String(t["grpc-message"] ?? ""));
    });
    req.on("data", () => {});
    req.on("close", () => {
      session.close();
      resolve({ status, message });
    });
    req.on("error", reject);
    req.end(frame);
  });
}

/** What one h2load run reported. */
export interface H2loadResult {
  rps: number;
  seconds: number;
  succeeded: number;
  failed: number;
  errored: number;
  meanMs: number;
  maxMs: number;
}

function toMs(value: string, unit: string): number {
  const v = Number(value);
  return unit === "us" ? v / 1000 : unit === "s" ? v * 1000 : v;
}

/** Runs h2load for `seconds` (after `warmupSeconds`) with `connections` x `streams` requests in flight. */
export function runH2load(options: { url: string; secret: string; bodyFile: string; seconds: number; warmupSeconds: number; connections: number; streams: number }): Promise<H2loadResult> {
  const args = [
    "-c", String(options.connections),
    "-m", String(options.streams),
    "-t", "1",
    "-D", `${options.seconds}s`,
    `--warm-up-time=${options.warmupSeconds}s`,
    "-H", "content-type: application/grpc",
    "-H", "te: trailers",
    "-H", `authorization: Bearer ${options.secret}`,
    "-d", options.bodyFile,
    options.url,
  ];
  return new Promise((resolve, reject) => {
    const child = spawn("h2load", args, { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (out += d.toString()));
    child.on("error", reject);
    child.on("exit", (code) => {
      const finished = /finished in ([\d.]+)(m?s), ([\d.]+) req\/s/.exec(out);
      const requests = /requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored/.exec(out);
      const time = /time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)/.exec(out);
      if (code !== 0 || finished === null || requests === null) {
        reject(new Error(`h2load failed (exit ${code}): ${out.slice(-500)}`));
        return;
      }
      resolve({
        rps: Number(finished[3]),
        seconds: finished[2] === "ms" ? Number(finished[1]) / 1000 : Number(finished[1]),
        succeeded: Number(requests[4]),
        failed: Number(requests[5]),
        errored: Number(requests[6]),
        meanMs: time === null ? NaN : toMs(time[5]!, time[6]!),
        maxMs: time === null ? NaN : toMs(time[3]!, time[4]!),
      });
    });
  });
}
