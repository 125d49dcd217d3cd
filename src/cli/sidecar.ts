/**
 * `tokenvault sidecar`: the OAuth sidecar (see src/sidecar/server.ts). It
 * needs the vault's address, its own caller secret, the ticket keys, the
 * return-URL allow-list and the provider settings; no database and no
 * encryption key.
 */
import { readFileSync } from "node:fs";
import { ConfigError, type SidecarConfig } from "../config.js";
import type { Logger } from "../log.js";
import { loadCatalogue } from "../providers/catalogue.js";
import { returnUrlPolicy } from "../sidecar/return-urls.js";
import { createSidecar } from "../sidecar/server.js";
import { loadTicketKeys } from "../sidecar/tickets.js";
import { createVaultClient } from "../sidecar/vault-client.js";

/** Runs the sidecar until SIGTERM or SIGINT. */
export async function sidecarCommand(config: SidecarConfig, logger: Logger): Promise<void> {
  if (config.returnUrls.length === 0) {
    throw new ConfigError("TOKENVAULT_SIDECAR_RETURN_URLS is required: the app URLs (comma-separated) the sidecar may send browsers back to");
  }
  let returnUrls;
  try {
    returnUrls = returnUrlPolicy(config.returnUrls);
  } catch (err) {
    throw new ConfigError(`TOKENVAULT_SIDECAR_RETURN_URLS: ${(err as Error).message}`);
  }
  const catalogue = loadCatalogue({ overrideFile: config.providersFile, settings: config.providerSettings });
  const keys = loadTicketKeys(config.ticketKeys);
  const sidecar = createSidecar({
    publicUrl: config.publicUrl,
    secureCookies: config.secureCookies,
    returnUrls,
    trustedProxies: config.trustedProxies,
    providerTimeoutMs: config.providerTimeoutMs,
    vaultTimeoutMs: config.vaultTimeoutMs,
    keys,
    catalogue,
    vault: createVaultClient({ url: config.vaultUrl, callerSecret: callerSecret(config), caFile: config.vaultCaFile }),
    logger,
    tls: config.tls === undefined ? undefined : { cert: readFileSync(config.tls.certFile), key: readFileSync(config.tls.keyFile) },
  });
  const stopped = new Promise<NodeJS.Signals>((resolve) => {
    process.once("SIGTERM", resolve);
    process.once("SIGINT", resolve);
  });
  const port = await sidecar.listen(config.port, config.host);
  const unconfigured = catalogue.integrationNames().filter((name) => catalogue.integration(name)?.provider.clientId === undefined);
  logger.info(
    {
      address: `${config.tls ? "https" : "http"}://${config.host}:${port}`,
      publicUrl: sidecar.publicUrl?.origin,
      vault: config.vaultUrl,
      returnUrls: config.returnUrls,
      integrationsWithoutClientId: unconfigured,
    },
    "tokenvault sidecar listening",
  );
  const signal = await stopped;
  logger.info({ signal }, "sidecar shutting down");
  await sidecar.close(config.shutdownGraceMs);
  logger.info("sidecar stopped");
}

function callerSecret(config: SidecarConfig): string {
  const source = config.callerSecret;
  if (source.kind === "env") return source.value;
  try {
    return readFileSync(source.path, "utf8").trim();
  } catch {
    throw new ConfigError(
      source.kind === "file"
        ? `cannot read TOKENVAULT_CALLER_SECRET_FILE (${source.path})`
        : `no caller secret: set TOKENVAULT_CALLER_SECRET (a caller allowed only Store), or run \`tokenvault serve\` on the embedded database first, which writes ${source.path}`,
    );
  }
}
