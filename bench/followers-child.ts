/**
 * StreamAudit followers for the "Get with 100 followers" variant, in their own
 * process: `follow: true` streams (with max_batch, as a busy auditor's client
 * asks) over plain node:http2 (gRPC framing), each reading everything the
 * server sends and counting the events in each message by their field tags.
 * The server does all of a follower's work (encode and write
 * every event to every stream); the reader skips protobuf decoding so that on
 * this 2-core machine the followers' client takes as little CPU as it can
 * from the server it measures.
 */
import http2 from "node:http2";
import { create, toBinary } from "@bufbuild/protobuf";
import { StreamAuditRequestSchema } from "../src/gen/tokenvault/v1/tokenvault_pb.js";
import { announceReady, serveIpc } from "./lib/ipc.js";

interface Follower {
  stream: http2.ClientHttp2Stream;
  /** Events received. */
  messages: number;
  bytes: number;
  status?: string;
  ended: boolean;
}

let sessions: http2.ClientHttp2Session[] = [];
let followers: Follower[] = [];

function grpcFrame(payload: Uint8Array): Buffer {
  const frame = Buffer.alloc(5 + payload.length);
  frame.writeUInt32BE(payload.length, 1);
  frame.set(payload, 5);
  return frame;
}

/**
 * Counts the events in a gRPC byte stream: each whole message's top-level
 * fields 1 (event) and 2 (events) are counted by their tags, without decoding
 * the events themselves.
 */
function counter(f: Follower): (chunk: Buffer) => void {
  let pending: Buffer = Buffer.alloc(0);
  return (chunk) => {
    f.bytes += chunk.length;
    pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
    while (pending.length >= 5) {
      const length = pending.readUInt32BE(1);
      if (pending.length < 5 + length) break;
      f.messages += eventsIn(pending.subarray(5, 5 + length));
      pending = pending.subarray(5 + length);
    }
  };
}

/** How many event fields (1 or 2, length-delimited) a StreamAuditResponse body holds. */
function eventsIn(body: Buffer): number {
  let events = 0;
  let pos = 0;
  const varint = () => {
    let value = 0;
    let shift = 0;
    for (;;) {
      const byte = body[pos++]!;
      value += (byte & 0x7f) * 2 ** shift;
      if ((byte & 0x80) === 0) return value;
      shift += 7;
    }
  };
  while (pos < body.length) {
    const tag = varint();
    if ((tag & 7) !== 2) return events; // only length-delimited fields are sent
    const length = varint();
    pos += length;
    if (tag >>> 3 === 1 || tag >>> 3 === 2) events++;
  }
  return events;
}

serveIpc({
  attach: async (m) => {
    const { baseUrl, secret, count, afterCursor, sessionsCount, maxBatch } = m as { baseUrl: string; secret: string; count: number; afterCursor: string; sessionsCount: number; maxBatch: number };
    sessions = Array.from({ length: sessionsCount }, () => http2.connect(baseUrl));
    const body = grpcFrame(toBinary(StreamAuditRequestSchema, create(StreamAuditRequestSchema, { follow: true, afterCursor: BigInt(afterCursor), maxBatch })));
    followers = [];
    for (let i = 0; i < count; i++) {
      const session = sessions[i % sessions.length]!;
      const stream = session.request({
        ":method": "POST",
        ":path": "/tokenvault.v1.TokenVaultService/StreamAudit",
        "content-type": "application/grpc",
        te: "trailers",
        authorization: `Bearer ${secret}`,
      });
      const f: Follower = { stream, messages: 0, bytes: 0, ended: false };
      stream.on("data", counter(f));
      stream.on("trailers", (t) => {
        f.status = String(t["grpc-status"] ?? "");
      });
      stream.on("response", (h) => {
        if (h["grpc-status"] !== undefined) f.status = String(h["grpc-status"]);
      });
      stream.on("close", () => {
        f.ended = true;
      });
      stream.on("error", () => {
        f.ended = true;
      });
      stream.end(body);
      followers.push(f);
    }
    return { attached: followers.length };
  },
  counts: () => ({
    messages: followers.map((f) => f.messages),
    ended: followers.filter((f) => f.ended).length,
    statuses: followers.map((f) => f.status).filter((s) => s !== undefined),
  }),
  detach: async () => {
    const result = {
      messages: followers.map((f) => f.messages),
      bytes: followers.reduce((a, f) => a + f.bytes, 0),
      endedEarly: followers.filter((f) => f.ended).length,
      statuses: followers.map((f) => f.status).filter((s) => s !== undefined),
    };
    for (const f of followers) f.stream.close(http2.constants.NGHTTP2_CANCEL);
    for (const s of sessions) s.close();
    followers = [];
    sessions = [];
    return result;
  },
  stop: () => {
    for (const s of sessions) s.destroy();
    setTimeout(() => process.exit(0), 20);
    return {};
  },
});
announceReady({ pid: process.pid });
