/**
 * `tokenvault keys generate|status|rotate`.
 */
import { existsSync } from "node:fs";
import type { Config } from "../config.js";
import { formatKeyList, generateKey, newKeyId } from "../crypto/key-ring.js";
import { loadKeyRing, readKeyFileMaterial, writeKeyFile } from "../crypto/key-source.js";
import { createPool } from "../db/pool.js";
import { keyStatus, rotateKeys } from "../keys/rotate.js";
import { verifyKeyRing } from "../keys/verify.js";
import type { Logger } from "../log.js";
import { recordCommandEvent } from "../audit/log.js";
import { openDatabase } from "./database.js";
import { UsageError } from "./migrate.js";

/** Options of the keys subcommands. */
export interface KeysOptions {
  id?: string;
  /** generate: put the new key first in this key file (it becomes the sealing key). */
  prepend?: string;
  batchSize?: number;
}

/**
 * `keys generate`: needs no configuration, so it also works where no key ring
 * exists yet (a first production setup).
 */
export function generateKeyCommand(options: KeysOptions): void {
  const key = generateKey(options.id ?? newKeyId());
  if (options.prepend === undefined) {
    console.log(formatKeyList([key]));
    console.error("Put this first in TOKENVAULT_KEYS (comma-separated, sealing key first) on every replica, then run `tokenvault keys rotate`.");
    return;
  }
  const file = existsSync(options.prepend) ? readKeyFileMaterial(options.prepend) : { development: false, keys: [] };
  if (file.keys.some((k) => k.id === key.id)) throw new UsageError(`key id "${key.id}" is already in ${options.prepend}`);
  writeKeyFile(options.prepend, { development: file.development }, [key, ...file.keys]);
  console.log(`added key "${key.id}" as the sealing key of ${options.prepend}; restart every replica, then run \`tokenvault keys rotate\``);
}

/** Runs `keys status` or `keys rotate`. */
export async function keysCommand(config: Config, logger: Logger, action: string, options: KeysOptions): Promise<void> {
  if (action !== "status" && action !== "rotate") throw new UsageError(`unknown keys action "${action}": use generate, status or rotate`);

  const { ring } = loadKeyRing(config.keySource, config.production);
  const database = await openDatabase(config, logger);
  const pool = createPool({ connectionString: database.url, max: 2, logger, applicationName: "tokenvault-keys" });
  try {
    // status only reads: it must be able to show ids missing from the ring,
    // which verifyKeyRing refuses. rotate writes, so it checks first.
    if (action === "status") {
      for (const row of await keyStatus(pool, ring)) {
        const marks = [row.current ? "sealing" : "", row.inRing ? "in ring" : "MISSING FROM RING"].filter(Boolean).join(", ");
        console.log(`${row.keyId.padEnd(34)} ${String(row.rows).padStart(10)} rows  (${marks})`);
      }
      return;
    }
    await verifyKeyRing(pool, ring);
    const started = Date.now();
    const result = await rotateKeys(pool, ring, {
      batchSize: options.batchSize,
      onProgress: (p) => console.error(`resealed ${p.resealed}/${p.total}`),
    });
    // A rotation touches every connection: it is an audited act.
    await recordCommandEvent(pool, logger, "key_rotation", { to_key: ring.current.id, resealed: result.resealed, ms: Date.now() - started });
    console.log(`rotation done: ${result.resealed} rows resealed under "${ring.current.id}" in ${Date.now() - started} ms`);
  } finally {
    await pool.end();
    await database.close();
  }
}
