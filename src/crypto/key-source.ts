/**
 * Loads the key ring from where the configuration says: TOKENVAULT_KEYS, a key
 * file, or (development only) a key file the service writes into its data
 * folder on first run.
 *
 * Key file format (JSON): {"development"?: boolean, "keys": [{"id": "k1", "key": "<base64 of 32 bytes>"}]}
 * with the sealing key first.
 */
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import type { KeySource } from "../config.js";
import { KeyRing, KeyRingError, generateKey, newKeyId, parseKeyList, type KeyMaterial } from "./key-ring.js";

/** A loaded ring and whether it is a development ring (refused in production). */
export interface LoadedKeyRing {
  readonly ring: KeyRing;
  readonly development: boolean;
  /** True when this call created the development key file. */
  readonly created: boolean;
}

interface KeyFile {
  development?: boolean;
  keys: { id: string; key: string }[];
}

/**
 * Builds the key ring from `source`.
 * @throws KeyRingError with a one-line reason (never the key material).
 */
export function loadKeyRing(source: KeySource, production: boolean): LoadedKeyRing {
  let loaded: LoadedKeyRing;
  switch (source.kind) {
    case "env":
      loaded = { ring: new KeyRing(parseKeyList(source.value)), development: false, created: false };
      break;
    case "file": {
      const file = readKeyFile(source.path);
      loaded = { ring: new KeyRing(keyFileMaterial(file, source.path)), development: file.development === true, created: false };
      break;
    }
    case "development": {
      let created = false;
      let file: KeyFile;
      try {
        file = readKeyFile(source.path);
      } catch (e) {
        if ((e as { cause?: NodeJS.ErrnoException }).cause?.code !== "ENOENT") throw e;
        file = { development: true, keys: [] };
        writeKeyFile(source.path, file, [generateKey(newKeyId(new Date(), "dev"))]);
        file = readKeyFile(source.path);
        created = true;
      }
      loaded = { ring: new KeyRing(keyFileMaterial(file, source.path)), development: true, created };
      break;
    }
  }
  if (production && loaded.development) {
    throw new KeyRingError("NODE_ENV=production refuses a development key ring: configure TOKENVAULT_KEYS or TOKENVAULT_KEYS_FILE with keys of your own");
  }
  return loaded;
}

/**
 * Writes a key file with `keys` (sealing key first) in mode 0600, keeping the
 * file's development flag. Used for the development ring and by `keys generate --write`.
 */
export function writeKeyFile(filePath: string, base: Pick<KeyFile, "development">, keys: readonly KeyMaterial[]): void {
  mkdirSync(path.dirname(filePath), { recursive: true, mode: 0o700 });
  const body: KeyFile = {
    ...(base.development === true ? { development: true } : {}),
    keys: keys.map((k) => ({ id: k.id, key: k.bytes.toString("base64") })),
  };
  writeFileSync(filePath, JSON.stringify(body, null, 2) + "\n", { mode: 0o600 });
  chmodSync(filePath, 0o600);
}

/** Reads a key file's keys as material, e.g. to prepend a new key. */
export function readKeyFileMaterial(filePath: string): { development: boolean; keys: KeyMaterial[] } {
  const file = readKeyFile(filePath);
  return { development: file.development === true, keys: keyFileMaterial(file, filePath) };
}

function readKeyFile(filePath: string): KeyFile {
  let text: string;
  try {
    text = readFileSync(filePath, "utf8");
  } catch (cause) {
    throw new KeyRingError(`cannot read key file ${filePath}: ${(cause as NodeJS.ErrnoException).code ?? "error"}`, { cause });
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new KeyRingError(`key file ${filePath} is not valid JSON`);
  }
  const keys = (parsed as KeyFile | null)?.keys;
  if (!Array.isArray(keys) || !keys.every((k) => typeof k?.id === "string" && typeof k?.key === "string")) {
    throw new KeyRingError(`key file ${filePath} must hold {"keys": [{"id": "...", "key": "<base64>"}]}`);
  }
  return parsed as KeyFile;
}

function keyFileMaterial(file: KeyFile, filePath: string): KeyMaterial[] {
  if (file.keys.length === 0) throw new KeyRingError(`key file ${filePath} holds no key`);
  return parseKeyList(file.keys.map((k) => `${k.id}:${k.key}`).join(","));
}
