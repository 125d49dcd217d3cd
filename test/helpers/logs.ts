/**
 * A logger whose every line is kept in memory, so a test can prove what was
 * (and was not) logged.
 */
import { Writable } from "node:stream";
import { createLogger, type Logger } from "../../src/log.js";
import { secretMarker } from "./secrets.js";

/** A logger and the lines it wrote. */
export interface CapturedLogs {
  readonly logger: Logger;
  readonly lines: string[];
  /** Lines that contain the test secret marker or any of `extra`: must be empty. */
  leaks(extra?: readonly string[]): string[];
}

/** Creates a capturing logger at debug level (the most talkative one we ship). */
export function captureLogs(): CapturedLogs {
  const lines: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, done) {
      lines.push(...chunk.toString("utf8").split("\n").filter((l) => l !== ""));
      done();
    },
  });
  return {
    logger: createLogger("debug", stream),
    lines,
    leaks: (extra = []) => lines.filter((l) => l.includes(secretMarker) || extra.some((s) => s !== "" && l.includes(s))),
  };
}
