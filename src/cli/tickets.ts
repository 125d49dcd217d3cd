/**
 * `tokenvault tickets`: mint a connect ticket as an app backend would (for
 * trying the sidecar out and for scripts), or make a new ticket key.
 */
import type { SidecarConfig } from "../config.js";
import { generateTicketKey, loadTicketKeys, maxTicketLifetimeSeconds, mintConnectTicket } from "../sidecar/tickets.js";
import { UsageError } from "./migrate.js";

/** Options of `tickets mint`. */
export interface TicketOptions {
  user?: string | undefined;
  integration?: string | undefined;
  returnUrl?: string | undefined;
  ttl?: number | undefined;
  /** Print the whole /connect link instead of the bare ticket. */
  link?: boolean | undefined;
}

/** `tickets generate-key`: prints a new `id:base64url` entry (no configuration needed). */
export function ticketsGenerateKey(id: string | undefined): void {
  console.log(generateTicketKey(id ?? new Date().toISOString().slice(0, 10)));
}

/** Runs `tickets mint`. */
export async function ticketsCommand(config: SidecarConfig, action: string, options: TicketOptions): Promise<void> {
  if (action !== "mint") throw new UsageError('tickets takes "mint" or "generate-key"');
  if (options.user === undefined || options.integration === undefined || options.returnUrl === undefined) {
    throw new UsageError("tickets mint needs --user ID --integration NAME --return-url URL");
  }
  if (options.ttl !== undefined && options.ttl > maxTicketLifetimeSeconds) {
    throw new UsageError(`a ticket lives 1 to ${maxTicketLifetimeSeconds} seconds`);
  }
  if (options.link === true && config.publicUrl === undefined && config.port === 0) {
    throw new UsageError("--link needs TOKENVAULT_SIDECAR_PUBLIC_URL (or a fixed TOKENVAULT_SIDECAR_PORT) to know the sidecar's address");
  }
  const ticket = await mintConnectTicket(loadTicketKeys(config.ticketKeys), {
    userId: options.user,
    integration: options.integration,
    returnUrl: options.returnUrl,
    ttlSeconds: options.ttl,
  }).catch((err: unknown) => {
    throw new UsageError((err as Error).message);
  });
  if (options.link !== true) {
    console.log(ticket);
    return;
  }
  const origin = config.publicUrl ?? new URL(`http://localhost:${config.port}`);
  const link = new URL(`/connect/${encodeURIComponent(options.integration)}`, origin);
  link.searchParams.set("ticket", ticket);
  console.log(link.href);
}
