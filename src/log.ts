/**
 * Structured JSON logging (pino). Token values, keys and credentials must never
 * reach a log line: code avoids logging them in the first place, and the
 * redaction list below is the safety net for an object logged whole by mistake.
 */
import { pino, type Logger, type DestinationStream } from "pino";
import type { LogLevel } from "./config.js";

export type { Logger } from "pino";

/**
 * Field names whose values are censored wherever they appear up to three levels
 * deep. pino's paths do not recurse, so each depth is listed.
 */
const secretFields = [
  "access_token", "accessToken", "refresh_token", "refreshToken", "id_token", "idToken",
  "token", "tokenSet", "token_set", "extras", "key", "keys", "secret", "client_secret",
  "clientSecret", "password", "authorization", "cookie", "databaseUrl", "connectionString",
];
const redactPaths = secretFields.flatMap((f) => [f, `*.${f}`, `*.*.${f}`]);

/**
 * Creates the service logger. `destination` lets tests capture every line.
 */
export function createLogger(level: LogLevel, destination?: DestinationStream): Logger {
  return pino(
    {
      level,
      base: { service: "tokenvault" },
      redact: { paths: redactPaths, censor: "[redacted]" },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    destination,
  );
}
