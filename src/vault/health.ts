// The standard gRPC health checking service (grpc.health.v1.Health), so that
// load balancers, Kubernetes gRPC probes and grpc-health-probe can ask
// whether the server (service "") or one named service is serving.
//
// Spec: https://github.com/grpc/grpc/blob/master/doc/health-checking.md and
// the comments in proto/grpc/health/v1/health.proto. Where the spec is
// silent this follows grpc-go's health server.

import { Code, ConnectError } from "@connectrpc/connect";
import type { ConnectRouter } from "@connectrpc/connect";
import {
  Health,
  HealthCheckResponse_ServingStatus as ServingStatus,
} from "../gen/grpc/health/v1/health_pb.js";
import type { HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";

/**
 * The health service and the switches that drive it.
 */
export interface HealthService {
  /** Registers grpc.health.v1.Health (Check and Watch) on a Connect router. */
  register(router: ConnectRouter): void;
  /**
   * Sets the serving status of `service` (a full service name such as
   * "tokenvault.v1.TokenVaultService", or "" for the server as a whole) and
   * notifies its watchers. Ignored after shutdown(), so that a component
   * still reporting SERVING while the process drains cannot undo it.
   */
  setStatus(service: string, status: HealthCheckResponse_ServingStatus): void;
  /**
   * Marks every known service NOT_SERVING, sends that to every watcher and
   * then ends every Watch stream with OK, so that a graceful HTTP/2 shutdown
   * is not held open by long-lived Watch calls. Watch calls arriving later
   * get the current status and end at once. Idempotent.
   */
  shutdown(): void;
}

/**
 * One open Watch call. It keeps only the newest status not yet sent, never a
 * queue: a watcher that reads slowly only needs the latest status, and a
 * queue would grow without bound while a client stalls.
 */
interface Watcher {
  /** The newest status not yet sent, if any. */
  pending: HealthCheckResponse_ServingStatus | undefined;
  /** Set once the stream must end after sending what is pending. */
  closed: boolean;
  /** Wakes the Watch loop when it is waiting; undefined while it is busy. */
  wake: (() => void) | undefined;
}

/**
 * Creates a health service. The overall server status ("") starts as
 * SERVING, as in grpc-go: the process answering at all is the signal, and a
 * caller that needs a warm-up phase sets it to NOT_SERVING before listening.
 * Every other service is unknown until setStatus() names it.
 */
export function createHealthService(): HealthService {
  const statuses = new Map<string, HealthCheckResponse_ServingStatus>([
    ["", ServingStatus.SERVING],
  ]);
  const watchers = new Map<string, Set<Watcher>>();
  let isShutdown = false;

  const notify = (watcher: Watcher): void => {
    const wake = watcher.wake;
    watcher.wake = undefined;
    wake?.();
  };

  const update = (service: string, status: HealthCheckResponse_ServingStatus): void => {
    // No message for a non-change: watchers only care about transitions.
    if (statuses.get(service) === status) return;
    statuses.set(service, status);
    for (const watcher of watchers.get(service) ?? []) {
      watcher.pending = status;
      notify(watcher);
    }
  };

  const current = (service: string): HealthCheckResponse_ServingStatus =>
    statuses.get(service) ?? ServingStatus.SERVICE_UNKNOWN;

  return {
    register(router: ConnectRouter): void {
      router.service(Health, {
        check(request) {
          const status = statuses.get(request.service);
          if (status === undefined) {
            // The spec requires NOT_FOUND for an unknown service in Check
            // (unlike Watch); probes treat it as "not healthy".
            throw new ConnectError(
              `unknown service: ${JSON.stringify(request.service)}`,
              Code.NotFound,
            );
          }
          return { status };
        },

        async *watch(request, context) {
          const service = request.service;
          const watcher: Watcher = {
            // The spec requires the current status at once, SERVICE_UNKNOWN
            // included, without ending the call for an unknown service.
            pending: current(service),
            closed: isShutdown,
            wake: undefined,
          };
          let set = watchers.get(service);
          if (set === undefined) {
            set = new Set();
            watchers.set(service, set);
          }
          set.add(watcher);
          // The client cancelling (or the deadline passing) aborts the
          // signal; wake the loop so the handler returns and frees the watcher.
          const onAbort = (): void => {
            watcher.closed = true;
            notify(watcher);
          };
          context.signal.addEventListener("abort", onAbort);
          try {
            let lastSent: HealthCheckResponse_ServingStatus | undefined;
            for (;;) {
              if (context.signal.aborted) return;
              const next = watcher.pending;
              watcher.pending = undefined;
              // A status that flipped and flipped back while the client was
              // slow is not a change from what it last saw.
              if (next !== undefined && next !== lastSent) {
                lastSent = next;
                // The generator resumes only when Connect pulls the next
                // message, i.e. after this one was handed to the stream; so
                // at most one status is in flight and one is pending.
                yield { status: next };
                continue;
              }
              if (watcher.closed) return;
              await new Promise<void>((resolve) => {
                watcher.wake = resolve;
              });
            }
          } finally {
            context.signal.removeEventListener("abort", onAbort);
            set.delete(watcher);
            if (set.size === 0 && watchers.get(service) === set) {
              watchers.delete(service);
            }
          }
        },
      });
    },

    setStatus(service: string, status: HealthCheckResponse_ServingStatus): void {
      if (isShutdown) return;
      update(service, status);
    },

    shutdown(): void {
      if (isShutdown) return;
      isShutdown = true;
      for (const service of statuses.keys()) {
        update(service, ServingStatus.NOT_SERVING);
      }
      // Ending the calls with OK (rather than an error) makes well-behaved
      // clients reconnect with backoff, per the spec, which during a rolling
      // restart lands them on another instance. Watchers of unknown services
      // are ended too, or they would hold the HTTP/2 session open.
      for (const set of watchers.values()) {
        for (const watcher of set) {
          watcher.closed = true;
          notify(watcher);
        }
      }
    },
  };
}
