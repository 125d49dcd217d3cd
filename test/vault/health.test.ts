// End-to-end tests of src/vault/health.ts against a real HTTP/2 server, with
// a Connect client and a plain @grpc/grpc-js client.

import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import type { Client, ConnectRouter, Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";

import {
  Health,
  HealthCheckResponse_ServingStatus as Status,
} from "../../src/gen/grpc/health/v1/health_pb.js";
import type { HealthCheckResponse } from "../../src/gen/grpc/health/v1/health_pb.js";
import { createHealthService } from "../../src/vault/health.js";
import type { HealthService } from "../../src/vault/health.js";
import { startRouterServer, type RouterServer } from "../helpers/router-server.js";

const repoRoot = path.resolve(import.meta.dirname, "../..");
const SVC = "tokenvault.v1.TokenVaultService";

interface TestServer extends RouterServer {
  /** Number of Watch handlers whose response stream has not finished. */
  openWatches(): number;
}

async function startServer(health: HealthService): Promise<TestServer> {
  let open = 0;
  // Observes the server side of Watch: the wrapper's finally runs only when
  // Connect finishes (or returns) the handler's response iterable, so it
  // shows whether a Watch handler really ended.
  const trackWatch: Interceptor = (next) => async (req) => {
    const res = await next(req);
    if (!res.stream || req.method.name !== "Watch") return res;
    open++;
    const inner = res.message;
    async function* tracked() {
      try {
        yield* inner;
      } finally {
        open--;
      }
    }
    return { ...res, message: tracked() };
  };
  const server = await startRouterServer((router: ConnectRouter) => health.register(router), [trackWatch]);
  return Object.assign(server, { openWatches: () => open });
}

function connectClient(srv: TestServer): Client<typeof Health> {
  // connect-node 2.x's gRPC transport always speaks HTTP/2 (its options type
  // no longer has httpVersion), which is what a cleartext h2 server needs.
  return createClient(Health, createGrpcTransport({ baseUrl: srv.baseUrl }));
}

/**
 * Reads a Watch stream one status at a time. A read that timed out stays
 * pending and is reused by the next read, so no message is lost.
 */
class WatchReader {
  private pending: Promise<IteratorResult<HealthCheckResponse>> | undefined;
  private readonly it: AsyncIterator<HealthCheckResponse>;

  constructor(stream: AsyncIterable<HealthCheckResponse>) {
    this.it = stream[Symbol.asyncIterator]();
  }

  /** The next status, or "end" when the stream finished. */
  async next(): Promise<Status | "end"> {
    const r = await this.take();
    this.pending = undefined;
    return r.done ? "end" : r.value.status;
  }

  /** Like next(), but "timeout" when nothing arrives within `ms`. */
  async nextWithin(ms: number): Promise<Status | "end" | "timeout"> {
    const r = await Promise.race([this.take(), sleep(ms).then(() => "timeout" as const)]);
    if (r === "timeout") return r;
    this.pending = undefined;
    return r.done ? "end" : r.value.status;
  }

  private take(): Promise<IteratorResult<HealthCheckResponse>> {
    if (this.pending === undefined) {
      this.pending = this.it.next();
      // Rejections (e.g. cancellation) are observed by the caller of next().
      this.pending.catch(() => {});
    }
    return this.pending;
  }
}

// grpc-js side, loaded from the vendored proto like any other gRPC client.
interface GrpcHealthClient extends grpc.Client {
  Check(
    req: { service: string },
    cb: (err: grpc.ServiceError | null, res?: { status: string }) => void,
  ): grpc.ClientUnaryCall;
  Watch(req: { service: string }): grpc.ClientReadableStream<{ status: string }>;
}

async function grpcJsClient(srv: TestServer): Promise<GrpcHealthClient> {
  const def = await protoLoader.load("grpc/health/v1/health.proto", {
    includeDirs: [path.join(repoRoot, "proto")],
    keepCase: true,
    enums: String,
    defaults: true,
  });
  const pkg = grpc.loadPackageDefinition(def) as unknown as {
    grpc: {
      health: {
        v1: {
          Health: new (address: string, creds: grpc.ChannelCredentials) => GrpcHealthClient;
        };
      };
    };
  };
  return new pkg.grpc.health.v1.Health(`127.0.0.1:${srv.port}`, grpc.credentials.createInsecure());
}

describe("createHealthService", () => {
  let health: HealthService;
  let srv: TestServer;
  let client: Client<typeof Health>;

  beforeAll(async () => {
    health = createHealthService();
    srv = await startServer(health);
    client = connectClient(srv);
  });

  afterAll(async () => {
    health?.shutdown();
    await srv?.close();
  });

  it("Check answers the overall status, set statuses, and NOT_FOUND otherwise", async () => {
    expect((await client.check({ service: "" })).status).toBe(Status.SERVING);

    const err = await client.check({ service: "no.such.Service" }).then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    expect(err?.code).toBe(Code.NotFound);

    health.setStatus("check.A", Status.NOT_SERVING);
    expect((await client.check({ service: "check.A" })).status).toBe(Status.NOT_SERVING);
    health.setStatus("check.A", Status.SERVING);
    expect((await client.check({ service: "check.A" })).status).toBe(Status.SERVING);
    health.setStatus("", Status.NOT_SERVING);
    expect((await client.check({ service: "" })).status).toBe(Status.NOT_SERVING);
    health.setStatus("", Status.SERVING);
  });

  it("Watch sends the current status at once, then each change", async () => {
    health.setStatus(SVC, Status.SERVING);
    const ac = new AbortController();
    const it = new WatchReader(client.watch({ service: SVC }, { signal: ac.signal }));
    try {
      expect(await it.next()).toBe(Status.SERVING);
      health.setStatus(SVC, Status.NOT_SERVING);
      expect(await it.next()).toBe(Status.NOT_SERVING);
      // Setting the same status again is not a change.
      health.setStatus(SVC, Status.NOT_SERVING);
      health.setStatus(SVC, Status.SERVING);
      expect(await it.next()).toBe(Status.SERVING);
      expect(await it.nextWithin(100)).toBe("timeout");
    } finally {
      ac.abort();
    }
  });

  it("Watch on an unknown service sends SERVICE_UNKNOWN and stays open", async () => {
    const ac = new AbortController();
    const it = new WatchReader(client.watch({ service: "later.Service" }, { signal: ac.signal }));
    try {
      expect(await it.next()).toBe(Status.SERVICE_UNKNOWN);
      // Still open: nothing, not even the end of the stream, arrives.
      expect(await it.nextWithin(150)).toBe("timeout");
      health.setStatus("later.Service", Status.SERVING);
      expect(await it.next()).toBe(Status.SERVING);
    } finally {
      ac.abort();
    }
  });

  it("a slow watcher gets the latest status, not a backlog", async () => {
    health.setStatus("burst.Service", Status.SERVING);
    const ac = new AbortController();
    const it = new WatchReader(client.watch({ service: "burst.Service" }, { signal: ac.signal }));
    try {
      expect(await it.next()).toBe(Status.SERVING);
      // 10,001 changes before the handler can run again: a queue would
      // deliver NOT_SERVING, SERVING, NOT_SERVING ...; coalescing delivers
      // only the last one (NOT_SERVING), then the UNKNOWN sentinel.
      for (let i = 0; i <= 10_000; i++) {
        health.setStatus("burst.Service", i % 2 === 0 ? Status.NOT_SERVING : Status.SERVING);
      }
      await sleep(20);
      health.setStatus("burst.Service", Status.UNKNOWN);
      expect(await it.next()).toBe(Status.NOT_SERVING);
      expect(await it.next()).toBe(Status.UNKNOWN);
      expect(await it.nextWithin(100)).toBe("timeout");
    } finally {
      ac.abort();
    }
  });

  it("Watch ends on the server when the client cancels", async () => {
    await vi.waitFor(() => expect(srv.openWatches()).toBe(0));
    const ac = new AbortController();
    const watchers = [SVC, "never.Known"].map((service) =>
      new WatchReader(client.watch({ service }, { signal: ac.signal })),
    );
    for (const it of watchers) await it.next();
    expect(srv.openWatches()).toBe(2);
    ac.abort();
    for (const it of watchers) {
      const err = await it.next().then(
        () => undefined,
        (e: unknown) => ConnectError.from(e),
      );
      expect(err?.code).toBe(Code.Canceled);
    }
    // The handler notices the cancellation and returns, freeing the watcher.
    await vi.waitFor(() => expect(srv.openWatches()).toBe(0));
  });

  it("works with a plain @grpc/grpc-js client", async () => {
    const gc = await grpcJsClient(srv);
    try {
      const check = (service: string) =>
        new Promise<{ err: grpc.ServiceError | null; status?: string }>((resolve) => {
          gc.Check({ service }, (err, res) => resolve({ err, status: res?.status }));
        });
      expect(await check("")).toEqual({ err: null, status: "SERVING" });
      const unknown = await check("no.such.Service");
      expect(unknown.err?.code).toBe(grpc.status.NOT_FOUND);

      health.setStatus("grpcjs.Service", Status.NOT_SERVING);
      const call = gc.Watch({ service: "grpcjs.Service" });
      const seen: string[] = [];
      const firstTwo = new Promise<void>((resolve) => {
        call.on("data", (res: { status: string }) => {
          seen.push(res.status);
          if (seen.length === 1) health.setStatus("grpcjs.Service", Status.SERVING);
          if (seen.length === 2) resolve();
        });
      });
      const ended = new Promise<grpc.ServiceError>((resolve) => call.on("error", resolve));
      await firstTwo;
      expect(seen).toEqual(["NOT_SERVING", "SERVING"]);
      call.cancel();
      expect((await ended).code).toBe(grpc.status.CANCELLED);
      await vi.waitFor(() => expect(srv.openWatches()).toBe(0));
    } finally {
      gc.close();
    }
  });
});

describe("HealthService.shutdown", () => {
  it("sets NOT_SERVING, ends every Watch cleanly and lets the server close gracefully", async () => {
    const health = createHealthService();
    const srv = await startServer(health);
    const client = connectClient(srv);
    const gc = await grpcJsClient(srv);
    try {
      health.setStatus(SVC, Status.SERVING);

      // Connect watchers on the overall status, a service and an unknown one.
      const known = new WatchReader(client.watch({ service: SVC }));
      const overall = new WatchReader(client.watch({ service: "" }));
      const unknown = new WatchReader(client.watch({ service: "never.Known" }));
      expect(await known.next()).toBe(Status.SERVING);
      expect(await overall.next()).toBe(Status.SERVING);
      expect(await unknown.next()).toBe(Status.SERVICE_UNKNOWN);

      // A grpc-js watcher, to check the stream ends with status OK.
      const call = gc.Watch({ service: SVC });
      const grpcSeen: string[] = [];
      const grpcFirst = new Promise<void>((resolve) =>
        call.on("data", (res: { status: string }) => {
          grpcSeen.push(res.status);
          resolve();
        }),
      );
      const grpcStatus = new Promise<grpc.StatusObject>((resolve) => call.on("status", resolve));
      const grpcEnd = new Promise<void>((resolve) => call.on("end", resolve));
      call.on("error", () => {}); // asserted through grpcStatus
      await grpcFirst;
      expect(srv.openWatches()).toBe(4);

      health.shutdown();

      // Known services get NOT_SERVING, then every stream ends without error.
      expect(await known.next()).toBe(Status.NOT_SERVING);
      expect(await known.next()).toBe("end");
      expect(await overall.next()).toBe(Status.NOT_SERVING);
      expect(await overall.next()).toBe("end");
      expect(await unknown.next()).toBe("end");
      expect((await grpcStatus).code).toBe(grpc.status.OK);
      await grpcEnd;
      expect(grpcSeen).toEqual(["SERVING", "NOT_SERVING"]);
      await vi.waitFor(() => expect(srv.openWatches()).toBe(0));

      // After shutdown: Check reports NOT_SERVING, setStatus is ignored, and
      // a new Watch gets the status and ends at once.
      expect((await client.check({ service: "" })).status).toBe(Status.NOT_SERVING);
      health.setStatus(SVC, Status.SERVING);
      expect((await client.check({ service: SVC })).status).toBe(Status.NOT_SERVING);
      const late = new WatchReader(client.watch({ service: SVC }));
      expect(await late.next()).toBe(Status.NOT_SERVING);
      expect(await late.next()).toBe("end");
      health.shutdown(); // idempotent
    } finally {
      gc.close();
      // No Watch is left to hold the HTTP/2 sessions open.
      expect(await srv.close()).toBe(false);
    }
  });
});
