/**
 * Variant E: the bare Connect-node server. The same server setup as the
 * vault (src/vault/server.ts serveHandler: one port, HTTP/2 prior knowledge
 * told apart from HTTP/1.1 by the preface; connectNodeAdapter with the same
 * read/write limits and context values) but no interceptors, and a Get that answers at once with a
 * Get-sized response (a real Get's response, with the request's user id
 * echoed into it). What it measures is the RPC framework alone.
 */
import { pino } from "pino";
import { create, fromBinary } from "@bufbuild/protobuf";
import { createContextValues } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { GetResponseSchema, TokenVaultService, type GetResponse } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { peerAddressKey } from "../../src/vault/context.js";
import { serveHandler } from "../../src/vault/server.js";

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
  // The vault's own listener (src/vault/server.ts), so only the handler differs.
  const served = serveHandler(handler, { logger: pino({ level: "silent" }) });
  const port = await served.listen(0, "127.0.0.1");
  return {
    port,
    close: () => served.close(0),
  };
}
