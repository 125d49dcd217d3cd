/**
 * A bare Connect router on an HTTP/2 cleartext server on listen(0), for
 * testing one service (health, reflection) without the vault around it.
 */
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import type { ConnectRouter, Interceptor } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";

/** A listening router server. */
export interface RouterServer {
  readonly port: number;
  readonly baseUrl: string;
  /**
   * Closes gracefully (session.close() waits for open streams); after 2 s the
   * rest is destroyed so a failing test cannot hang the suite. Resolves to true
   * when sessions had to be destroyed.
   */
  close(): Promise<boolean>;
}

/** Serves `routes` on 127.0.0.1 with an ephemeral port. */
export async function startRouterServer(routes: (router: ConnectRouter) => void, interceptors: Interceptor[] = []): Promise<RouterServer> {
  const server = http2.createServer(connectNodeAdapter({ routes, interceptors }));
  const sessions = new Set<http2.ServerHttp2Session>();
  server.on("session", (session) => {
    sessions.add(session);
    session.once("close", () => sessions.delete(session));
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  return {
    port,
    baseUrl: `http://127.0.0.1:${port}`,
    async close() {
      let forced = false;
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const session of sessions) session.close();
      const timer = setTimeout(() => {
        forced = true;
        for (const session of sessions) session.destroy();
      }, 2_000);
      await closed;
      clearTimeout(timer);
      return forced;
    },
  };
}
