/**
 * The real OAuth sidecar on listen(0), talking to a real vault over gRPC with
 * a caller allowed only Store, with logs captured for leak scans.
 */
import type { Catalogue } from "../../src/providers/catalogue.js";
import { returnUrlPolicy } from "../../src/sidecar/return-urls.js";
import { createSidecar, type Sidecar } from "../../src/sidecar/server.js";
import { generateTicketKey, mintConnectTicket, parseTicketKeys, type MintTicketOptions, type TicketKeys } from "../../src/sidecar/tickets.js";
import { createVaultClient, type VaultClient } from "../../src/sidecar/vault-client.js";
import { captureLogs, type CapturedLogs } from "./logs.js";

/** A running sidecar. */
export interface TestSidecar {
  readonly sidecar: Sidecar;
  /** http://localhost:<port>: the public URL (redirect URIs are <url>/callback/<integration>). */
  readonly url: string;
  readonly port: number;
  readonly keys: TicketKeys;
  readonly logs: CapturedLogs;
  /** A ticket minted with the sidecar's keys (returnUrl defaults to the first allowed one). */
  mint(options: Omit<MintTicketOptions, "returnUrl"> & { returnUrl?: string }): Promise<string>;
  /** The /connect link for a ticket. */
  connectUrl(integration: string, ticket: string): string;
  close(): Promise<void>;
}

/** Options of {@link startSidecar}. */
export interface StartSidecarOptions {
  /** The vault's base URL (http://127.0.0.1:port). */
  vaultUrl: string;
  /** The sidecar's caller secret (a caller allowed only Store). */
  callerSecret: string;
  catalogue: Catalogue;
  /** Allowed return URLs; default ["http://app.localhost.test/settings"]. */
  returnUrls?: string[];
  /** Ticket keys as TOKENVAULT_TICKET_KEYS would give them; default one fresh key. */
  ticketKeys?: string;
  trustedProxies?: number;
  providerTimeoutMs?: number;
  vaultTimeoutMs?: number;
  /** Replace the vault client (e.g. one pointing at a closed port). */
  vault?: VaultClient;
  now?: () => Date;
}

/** Starts a sidecar on 127.0.0.1 and a free port; its public URL is http://localhost:<port>. */
export async function startSidecar(options: StartSidecarOptions): Promise<TestSidecar> {
  const logs = captureLogs();
  const keys = parseTicketKeys(options.ticketKeys ?? generateTicketKey("test"), "test ticket keys");
  const returnUrls = options.returnUrls ?? ["http://app.localhost.test/settings"];
  const sidecar = createSidecar({
    publicUrl: undefined,
    secureCookies: false,
    returnUrls: returnUrlPolicy(returnUrls),
    trustedProxies: options.trustedProxies ?? 0,
    providerTimeoutMs: options.providerTimeoutMs ?? 5_000,
    vaultTimeoutMs: options.vaultTimeoutMs ?? 5_000,
    keys,
    catalogue: options.catalogue,
    vault: options.vault ?? createVaultClient({ url: options.vaultUrl, callerSecret: options.callerSecret }),
    logger: logs.logger,
    now: options.now,
  });
  const port = await sidecar.listen(0, "127.0.0.1");
  const url = `http://localhost:${port}`;
  return {
    sidecar,
    url,
    port,
    keys,
    logs,
    mint: (mint) => mintConnectTicket(keys, { returnUrl: returnUrls[0]!, ...mint }),
    connectUrl: (integration, ticket) => `${url}/connect/${encodeURIComponent(integration)}?ticket=${encodeURIComponent(ticket)}`,
    close: () => sidecar.close(1_000),
  };
}
