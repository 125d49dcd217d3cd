/**
 * StreamAudit followers for the "Get with 100 followers" variant, in their own
 * process: `follow: true` streams over plain node:http2 (gRPC framing), each
 * reading everything the server sends and counting messages by their 5-byte
 * gRPC prefix. The server does all of a follower's work (encode and write
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

/** Counts whole gRPC messages in a byte stream. */
function counter(f: Follower): (chunk: Buffer) => void {
  let header = Buffer.alloc(0);
  let remaining = 0; // body bytes of the current message still to come
  return (chunk) => {
    f.bytes += chunk.length;
    let i = 0;
    while (i < chunk.length) {
      if (remaining > 0) {
        const take = Math.min(remaining, chunk.length - i);
        remaining -= take;
        i += take;
        if (remaining === 0) f.messages += 1;
        continue;
      }
      const need = 5 - header.length;
      const take = Math.min(need, chunk.length - i);
      header = Buffer.concat([header, chunk.subarray(i, i + take)]);
      i += take;
      if (header.length === 5) {
        remaining = header.readUInt32BE(1);
        header = Buffer.alloc(0);
        if (remaining === 0) f.messages += 1;
      }
    }
  };
}

serveIpc({
  attach: async (m) => {
    const { baseUrl, secret, count, afterCursor, sessionsCount } = m as { baseUrl: string; secret: string; count: number; afterCursor: string; sessionsCount: number };
    sessions = Array.from({ length: sessionsCount }, () => http2.connect(baseUrl));
    const body = grpcFrame(toBinary(StreamAuditRequestSchema, create(StreamAuditRequestSchema, { follow: true, afterCursor: BigInt(afterCursor) })));
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
