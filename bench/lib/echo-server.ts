/**
 * Variant E: the bare Connect-node server. The same server setup as
 * src/vault/server.ts in cleartext (one port, HTTP/2 prior knowledge told
 * apart from HTTP/1.1 by the preface, http2.createServer with the same
 * options, connectNodeAdapter with the same read/write limits and context
 * values) but no interceptors, and a Get that answers at once with a
 * Get-sized response (a real Get's response, with the request's user id
 * echoed into it). What it measures is the RPC framework alone.
 */
import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import { create, fromBinary } from "@bufbuild/protobuf";
import { createContextValues } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { GetResponseSchema, TokenVaultService, type GetResponse } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { peerAddressKey } from "../../src/vault/context.js";

const h2Preface = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

/** A listening echo server. */
export interface EchoServer {
  port: number;
  close(): Promise<void>;
}

/** Builds and starts the echo server; `template` is the binary of a real GetResponse. */
export async function startEchoServer(template: Uint8Array, maxMessageBytes: number): Promise<EchoServer> {
  const base: GetResponse = fromBinary(GetResponseSchema, template);
  const handler = connectNodeAdapter({
    routes: (router) => {
      router.service(TokenVaultService, {
        get: (req) =>
          create(GetResponseSchema, {
            ...base,
            connection: base.connection === undefined ? undefined : { ...base.connection, userId: req.userId, integration: req.integration },
          }),
      });
    },
    readMaxBytes: maxMessageBytes,
    writeMaxBytes: Math.max(maxMessageBytes, 16 * 1024 * 1024),
    contextValues: (req) => createContextValues().set(peerAddressKey, req.socket.remoteAddress ?? ""),
  });
  const h2 = http2.createServer({ maxSessionMemory: 64 }, handler as never);
  const h1 = http.createServer(handler as never);
  const sockets = new Set<net.Socket>();
  const listener = net.createServer((socket) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
    socket.on("error", () => {});
    let seen = Buffer.alloc(0);
    socket.setTimeout(10_000, () => socket.destroy());
    const onData = (chunk: Buffer) => {
      seen = Buffer.concat([seen, chunk]);
      const n = Math.min(seen.length, h2Preface.length);
      const isH2 = seen.subarray(0, n).equals(h2Preface.subarray(0, n));
      if (isH2 && seen.length < h2Preface.length) return;
      socket.off("data", onData);
      socket.setTimeout(0);
      socket.pause();
      socket.unshift(seen);
      (isH2 ? h2 : h1).emit("connection", socket);
      if (!isH2) socket.resume();
    };
    socket.on("data", onData);
  });
  const port = await new Promise<number>((resolve, reject) => {
    listener.once("error", reject);
    listener.listen(0, "127.0.0.1", () => resolve((listener.address() as net.AddressInfo).port));
  });
  return {
    port,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        listener.close(() => resolve());
      }),
  };
}
