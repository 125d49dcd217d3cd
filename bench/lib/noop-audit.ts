/**
 * Variant G0 only: an AuditWriter that records nothing. It lives in bench/ and
 * is handed to buildServer as deps.audit.writer by the benchmark's server
 * child; no production code path can reach it (src/ never imports bench/).
 */
import type { AuditWriter } from "../../src/audit/writer.js";
import type { AuditEvent, AuditEventInput } from "../../src/audit/chain.js";

const zeroHash = Buffer.alloc(32);

/** A writer whose record() resolves at once, as if the event had committed. */
export function createNoopAuditWriter(): AuditWriter {
  let next = 1n;
  let events = 0;
  return {
    record(event: AuditEventInput): Promise<AuditEvent> {
      events += 1;
      return Promise.resolve({ ...event, id: next++, prevHash: zeroHash, hash: zeroHash });
    },
    stats: () => ({ batches: 0, events, largestBatch: 0 }),
    close: () => Promise.resolve(),
  };
}
