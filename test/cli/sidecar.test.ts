/**
 * `tokenvault sidecar` and `tokenvault tickets` as operators run them: real
 * child processes (src/main.ts through tsx) with nothing but their
 * environment. Ticket keys and tickets from the command line, start-up
 * refusals, the README's development walkthrough against a real `serve` on the
 * embedded database (its Store-only "dev-sidecar" caller, the development
 * ticket key, /healthz, /readyz, /connect to the provider, shutdown), the
 * sidecar with configured secrets against a vault on the test database, and
 * no ticket key, caller secret or ticket in what the sidecar or serve printed.
 */
import { existsSync, readFileSync, statSync, writeFileSync } from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { decodeJwt, decodeProtectedHeader } from "jose";
import { afterAll, describe, expect, it } from "vitest";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { secretMarker, secretToken } from "../helpers/secrets.js";
import { maxTicketLifetimeSeconds, parseTicketKeys, TicketError, ticketAudience, verifyConnectTicket } from "../../src/sidecar/tickets.js";
import {
  addCallerWithCli,
  allOutput,
  callerSecretPattern,
  cleanupCli,
  cliEnv,
  newKey,
  outcome,
  printed,
  runCli,
  spawnCli,
  startServe,
  tempDir,
  vaultClient,
  type CliProcess,
  type CliResult,
  type LogLine,
} from "./helpers.js";

/** The log line `sidecar` writes once it accepts requests. */
const sidecarListening = "tokenvault sidecar listening";
const returnUrl = "http://localhost:3000/settings";

/** Ticket key material handed to or made for processes (scanned for in every output but generate-key's own). */
const ticketKeyMaterial: string[] = [];
/** Caller secrets (and their secret parts): neither serve nor sidecar may print one. */
const callerSecrets: string[] = [];
/** Every ticket minted by a process of this file: only the `tickets mint` that made it may print it. */
const tickets: string[] = [];
/** Database passwords and encryption key material handed to serve. */
const otherSecrets: string[] = [];
const databases: TestDatabase[] = [];

/** A fresh ticket key entry `id:base64url`, remembered for the scans. */
function ticketKey(id: string): string {
  const entry = `${id}:${Buffer.from(newKey(id).base64, "base64").toString("base64url")}`;
  rememberTicketKeys(entry);
  return entry;
}

/** Remembers the secrets of `id:base64url` entries, in the encodings worth scanning for. */
function rememberTicketKeys(text: string): void {
  for (const key of parseTicketKeys(text, "test").all) {
    const bytes = Buffer.from(key.secret);
    ticketKeyMaterial.push(bytes.toString("base64url"), bytes.toString("base64"), bytes.toString("hex"));
  }
}

function rememberCallerSecret(secret: string): void {
  callerSecrets.push(secret, callerSecretPattern.exec(secret)![2]!);
}

/** Remembers a ticket: the whole JWT and its signature (unique to it). */
function rememberTicket(ticket: string): void {
  tickets.push(ticket, ticket.split(".")[2]!);
}

/** Exit 2 with the usage text, a message naming what is wrong, and nothing on stdout. */
function expectUsageError(result: CliResult, message: RegExp): void {
  expect(result.code, `stdout: ${result.stdout}\nstderr: ${result.stderr}`).toBe(2);
  expect(result.stderr.split("\n")[0]).toMatch(/^tokenvault: /);
  expect(result.stderr.split("\n")[0]).toMatch(message);
  expect(result.stderr).toContain("usage: tokenvault <command>");
  expect(result.stdout).toBe("");
}

/** Exit 1, exactly one stderr line naming what is wrong, nothing on stdout, never listening. */
function expectRefusal(result: CliResult, ...expected: RegExp[]): string {
  expect(result.code, `stdout: ${result.stdout}\nstderr: ${result.stderr}`).toBe(1);
  const lines = result.stderr.trimEnd().split("\n");
  expect(lines).toHaveLength(1);
  const line = lines[0]!;
  expect(line).toMatch(/^tokenvault: \S/);
  for (const pattern of expected) expect(line).toMatch(pattern);
  expect(result.stdout).not.toContain(sidecarListening);
  return line;
}

/** The one line a `tickets` command printed; fails with its output otherwise. */
function onlyLine(result: CliResult): string {
  expect(result.code, `stdout: ${result.stdout}\nstderr: ${result.stderr}`).toBe(0);
  const lines = printed(result.stdout);
  expect(lines).toHaveLength(1);
  expect(result.stdout).toBe(`${lines[0]}\n`);
  return lines[0]!;
}

/** `tickets mint` for user u1 on gmail back to `returnUrl`, plus `extra` flags. */
function mint(env: Record<string, string>, ...extra: string[]): Promise<CliResult> {
  return runCli(["tickets", "mint", "--user", "u1", "--integration", "gmail", "--return-url", returnUrl, ...extra], env);
}

/** A running sidecar process, its listening line and its addresses. */
interface SidecarProcess extends CliProcess {
  readonly listening: LogLine;
  readonly port: number;
  /** Where this test reaches it: http://127.0.0.1:<port>. */
  readonly baseUrl: string;
}

async function startSidecarCli(env: Record<string, string>): Promise<SidecarProcess> {
  const proc = spawnCli(["sidecar"], env);
  const listening = await proc.waitForLog((l) => l.msg === sidecarListening, 30_000);
  const address = new URL(String(listening.address));
  const port = Number(address.port);
  return Object.assign(proc, { listening, port, baseUrl: `http://${address.hostname}:${port}` });
}

async function until(condition: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(50);
  }
}

async function status(url: string): Promise<number> {
  const res = await fetch(url, { redirect: "manual" });
  await res.arrayBuffer();
  return res.status;
}

afterAll(async () => {
  await cleanupCli();
  for (const db of databases) await db.drop();
});

describe("tickets generate-key", () => {
  it("--id k1 prints k1:<base64url of 32 fresh bytes>, a key the sidecar accepts", async () => {
    const first = onlyLine(await runCli(["tickets", "generate-key", "--id", "k1"], cliEnv({ TOKENVAULT_DATA_DIR: tempDir() })));
    const match = /^k1:([A-Za-z0-9_-]{43})$/.exec(first);
    expect(match, first).not.toBeNull();
    const bytes = Buffer.from(match![1]!, "base64url");
    expect(bytes).toHaveLength(32);
    expect(bytes.toString("base64url")).toBe(match![1]);
    const keys = parseTicketKeys(first, "generated");
    expect(keys.signing.id).toBe("k1");

    const second = onlyLine(await runCli(["tickets", "generate-key", "--id", "k1"], cliEnv({ TOKENVAULT_DATA_DIR: tempDir() })));
    expect(second).toMatch(/^k1:[A-Za-z0-9_-]{43}$/);
    expect(second).not.toBe(first);
  });

  it("without --id the id is today's date; an id that is not letters, digits, _ . - is refused", async () => {
    const dated = onlyLine(await runCli(["tickets", "generate-key"], cliEnv({ TOKENVAULT_DATA_DIR: tempDir() })));
    expect(dated).toMatch(/^\d{4}-\d{2}-\d{2}:[A-Za-z0-9_-]{43}$/);

    const bad = await runCli(["tickets", "generate-key", "--id", "k 1"], cliEnv({ TOKENVAULT_DATA_DIR: tempDir() }));
    expectRefusal(bad, /ticket key id/);
  });

  // Fails today: see the report. src/main.ts loads the whole sidecar
  // configuration (loadSidecarConfig) before it looks at the tickets action,
  // so in production generate-key is refused for want of TOKENVAULT_TICKET_KEYS
  // with a message telling the operator to run `tokenvault tickets
  // generate-key`, the command that was just refused. `keys generate` skips the
  // configuration for exactly this reason (test/cli/admin.test.ts).
  it("works in a production environment that has no ticket keys yet", async () => {
    const env = cliEnv({
      NODE_ENV: "production",
      TOKENVAULT_SIDECAR_PUBLIC_URL: "https://connect.example.com",
      TOKENVAULT_CALLER_SECRET_FILE: "/run/secrets/tokenvault-sidecar",
      TOKENVAULT_DATA_DIR: tempDir(),
    });
    const result = await runCli(["tickets", "generate-key", "--id", "prod1"], env);
    expect(result.stderr).not.toMatch(/make one with `tokenvault tickets generate-key`/);
    expect(onlyLine(result)).toMatch(/^prod1:[A-Za-z0-9_-]{43}$/);
  });
});

describe("tickets mint", () => {
  it("with TOKENVAULT_TICKET_KEYS prints one JWT, signed by the first key, that the sidecar's verifier accepts with the right claims", async () => {
    const dataDir = tempDir();
    const signing = ticketKey("k2");
    const older = ticketKey("k1");
    const env = cliEnv({ TOKENVAULT_DATA_DIR: dataDir, TOKENVAULT_TICKET_KEYS: `${signing},${older}` });
    const before = Math.floor(Date.now() / 1000);
    const ticket = onlyLine(await mint(env));
    const after = Math.ceil(Date.now() / 1000);
    rememberTicket(ticket);
    expect(ticket).toMatch(/^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/);

    const verified = await verifyConnectTicket(parseTicketKeys(`${signing},${older}`, "test"), ticket);
    expect(verified).toMatchObject({ userId: "u1", integration: "gmail", returnUrl });
    expect(verified.nonce.length).toBeGreaterThanOrEqual(16);
    expect(decodeProtectedHeader(ticket)).toEqual({ alg: "HS256", typ: "JWT", kid: "k2" });
    const claims = decodeJwt(ticket);
    expect(claims).toEqual({
      aud: ticketAudience,
      sub: "u1",
      integration: "gmail",
      return_url: returnUrl,
      iat: expect.any(Number),
      exp: expect.any(Number),
      jti: verified.nonce,
    });
    expect(claims.iat).toBeGreaterThanOrEqual(before);
    expect(claims.iat).toBeLessThanOrEqual(after);
    // Five minutes by default.
    expect(claims.exp! - claims.iat!).toBe(300);

    // Signed by k2: a sidecar that knows only k1 refuses it.
    await expect(verifyConnectTicket(parseTicketKeys(older, "test"), ticket)).rejects.toThrow(TicketError);
    // Nothing was written to the data folder: the keys came from the environment.
    expect(existsSync(path.join(dataDir, "dev-ticket-keys"))).toBe(false);

    // --ttl sets the lifetime, up to the maximum; every ticket has a nonce of its own.
    const short = onlyLine(await mint(env, "--ttl", "60"));
    const longest = onlyLine(await mint(env, "--ttl", String(maxTicketLifetimeSeconds)));
    rememberTicket(short);
    rememberTicket(longest);
    const shortClaims = decodeJwt(short);
    expect(shortClaims.exp! - shortClaims.iat!).toBe(60);
    expect(decodeJwt(longest).exp! - decodeJwt(longest).iat!).toBe(600);
    await verifyConnectTicket(parseTicketKeys(signing, "test"), longest);
    expect(new Set([claims.jti, shortClaims.jti, decodeJwt(longest).jti]).size).toBe(3);
  });

  it("--link prints <public url>/connect/<integration>?ticket=<ticket>", async () => {
    const keys = ticketKey("link1");
    const withPublicUrl = cliEnv({ TOKENVAULT_DATA_DIR: tempDir(), TOKENVAULT_TICKET_KEYS: keys, TOKENVAULT_SIDECAR_PUBLIC_URL: "https://connect.example.com" });
    const link = onlyLine(await mint(withPublicUrl, "--link"));
    const url = new URL(link);
    expect(url.origin).toBe("https://connect.example.com");
    expect(url.pathname).toBe("/connect/gmail");
    expect([...url.searchParams.keys()]).toEqual(["ticket"]);
    const ticket = url.searchParams.get("ticket")!;
    rememberTicket(ticket);
    expect(link).toBe(`https://connect.example.com/connect/gmail?ticket=${ticket}`);
    expect(await verifyConnectTicket(parseTicketKeys(keys, "test"), ticket)).toMatchObject({ userId: "u1", integration: "gmail", returnUrl });

    // Without a public URL: http://localhost:<TOKENVAULT_SIDECAR_PORT>, 8080 by default.
    const onPort = onlyLine(await mint(cliEnv({ TOKENVAULT_DATA_DIR: tempDir(), TOKENVAULT_TICKET_KEYS: keys, TOKENVAULT_SIDECAR_PORT: "9123" }), "--link"));
    expect(onPort).toMatch(/^http:\/\/localhost:9123\/connect\/gmail\?ticket=[A-Za-z0-9_.-]+$/);
    rememberTicket(new URL(onPort).searchParams.get("ticket")!);
    const byDefault = onlyLine(await mint(cliEnv({ TOKENVAULT_DATA_DIR: tempDir(), TOKENVAULT_TICKET_KEYS: keys }), "--link"));
    expect(byDefault).toMatch(/^http:\/\/localhost:8080\/connect\/gmail\?ticket=[A-Za-z0-9_.-]+$/);
    rememberTicket(new URL(byDefault).searchParams.get("ticket")!);

    // A production backend with its configuration mints the same way.
    const production = cliEnv({
      NODE_ENV: "production",
      TOKENVAULT_SIDECAR_PUBLIC_URL: "https://connect.example.com",
      TOKENVAULT_CALLER_SECRET: "unused-by-mint",
      TOKENVAULT_TICKET_KEYS: keys,
      TOKENVAULT_DATA_DIR: tempDir(),
    });
    const prodLink = onlyLine(await mint(production, "--link"));
    expect(prodLink.startsWith("https://connect.example.com/connect/gmail?ticket=")).toBe(true);
    rememberTicket(new URL(prodLink).searchParams.get("ticket")!);
  });

  it("usage errors exit 2 with the usage text and print no ticket", async () => {
    const env = cliEnv({ TOKENVAULT_DATA_DIR: tempDir(), TOKENVAULT_TICKET_KEYS: ticketKey("usage1") });
    expectUsageError(await mint(env, "--ttl", "601"), /1 to 600 seconds/);
    expectUsageError(await mint(env, "--ttl", "0"), /--ttl/);
    expectUsageError(await mint(env, "--ttl", "5m"), /--ttl/);
    expectUsageError(
      await runCli(["tickets", "mint", "--integration", "gmail", "--return-url", returnUrl], env),
      /tickets mint needs --user ID --integration NAME --return-url URL/,
    );
    expectUsageError(await runCli(["tickets", "mint", "--user", "u1", "--return-url", returnUrl], env), /--integration/);
    expectUsageError(await runCli(["tickets", "mint", "--user", "u1", "--integration", "gmail"], env), /--return-url/);
    expectUsageError(await runCli(["tickets", "frobnicate"], env), /"mint" or "generate-key"/);
  });

  it("without configured keys (not production) creates the development key file in TOKENVAULT_DATA_DIR, 0600, and the next mint reuses it", async () => {
    const dataDir = tempDir();
    const keyFile = path.join(dataDir, "dev-ticket-keys");
    expect(existsSync(keyFile)).toBe(false);
    const env = cliEnv({ TOKENVAULT_DATA_DIR: dataDir });

    const first = onlyLine(await mint(env));
    rememberTicket(first);
    expect(statSync(keyFile).mode & 0o777).toBe(0o600);
    const keyText = readFileSync(keyFile, "utf8");
    expect(keyText).toMatch(/^dev:[A-Za-z0-9_-]{43}\n$/);
    rememberTicketKeys(keyText);
    const keys = parseTicketKeys(keyText, keyFile);
    expect(decodeProtectedHeader(first).kid).toBe("dev");
    expect(await verifyConnectTicket(keys, first)).toMatchObject({ userId: "u1", integration: "gmail", returnUrl });

    const second = onlyLine(await mint(env));
    rememberTicket(second);
    expect(readFileSync(keyFile, "utf8")).toBe(keyText);
    expect(statSync(keyFile).mode & 0o777).toBe(0o600);
    await verifyConnectTicket(keys, second);
    expect(second).not.toBe(first);
  });

  // Fails today: see the report. src/sidecar/tickets.ts writes the development
  // key file with writeFileSync(..., { flag: "wx" }) without creating the data
  // folder, so a first `tickets mint` (or `sidecar`) before anything made
  // .tokenvault/ dies with "ENOENT: no such file or directory". The vault's
  // development key ring creates the folder (src/crypto/key-source.ts).
  it("creates the data folder when it does not exist yet", async () => {
    const dataDir = path.join(tempDir(), "fresh", ".tokenvault");
    const result = await mint(cliEnv({ TOKENVAULT_DATA_DIR: dataDir }));
    expect(result.stderr).not.toMatch(/ENOENT/);
    const ticket = onlyLine(result);
    rememberTicket(ticket);
    const keyFile = path.join(dataDir, "dev-ticket-keys");
    expect(statSync(keyFile).mode & 0o777).toBe(0o600);
    const keyText = readFileSync(keyFile, "utf8");
    rememberTicketKeys(keyText);
    await verifyConnectTicket(parseTicketKeys(keyText, keyFile), ticket);
  });
});

describe("sidecar start-up refusals", () => {
  it("without TOKENVAULT_SIDECAR_RETURN_URLS exits 1 with one line naming it", async () => {
    const result = await runCli(["sidecar"], cliEnv({ TOKENVAULT_DATA_DIR: tempDir(), TOKENVAULT_SIDECAR_PORT: "0" }));
    expectRefusal(result, /TOKENVAULT_SIDECAR_RETURN_URLS/, /required/);
  });

  it("NODE_ENV=production with nothing set exits 1 with one line naming TOKENVAULT_SIDECAR_PUBLIC_URL, and writes nothing", async () => {
    const dataDir = tempDir();
    const result = await runCli(["sidecar"], cliEnv({ NODE_ENV: "production", TOKENVAULT_DATA_DIR: dataDir }));
    expectRefusal(result, /TOKENVAULT_SIDECAR_PUBLIC_URL/, /production/);
    expect(existsSync(path.join(dataDir, "dev-ticket-keys"))).toBe(false);
  });

  it("a return URL entry that is not an absolute http(s) URL is named", async () => {
    const result = await runCli(
      ["sidecar"],
      cliEnv({ TOKENVAULT_DATA_DIR: tempDir(), TOKENVAULT_SIDECAR_PORT: "0", TOKENVAULT_SIDECAR_RETURN_URLS: `${returnUrl},app.example.com/settings` }),
    );
    expectRefusal(result, /TOKENVAULT_SIDECAR_RETURN_URLS/, /app\.example\.com\/settings/);
  });

  it("without a caller secret (no serve on the embedded database ran in this data folder) says what to set or run", async () => {
    const dataDir = tempDir();
    const result = await runCli(
      ["sidecar"],
      cliEnv({ TOKENVAULT_DATA_DIR: dataDir, TOKENVAULT_SIDECAR_PORT: "0", TOKENVAULT_SIDECAR_RETURN_URLS: returnUrl, TOKENVAULT_TICKET_KEYS: ticketKey("r1") }),
    );
    expectRefusal(result, /TOKENVAULT_CALLER_SECRET/, /tokenvault serve/, /dev-sidecar-secret/);
  });

  it("a TOKENVAULT_CALLER_SECRET_FILE that cannot be read is named", async () => {
    const missing = path.join(tempDir(), "no-such-secret");
    const result = await runCli(
      ["sidecar"],
      cliEnv({
        TOKENVAULT_DATA_DIR: tempDir(),
        TOKENVAULT_SIDECAR_PORT: "0",
        TOKENVAULT_SIDECAR_RETURN_URLS: returnUrl,
        TOKENVAULT_TICKET_KEYS: ticketKey("r2"),
        TOKENVAULT_CALLER_SECRET_FILE: missing,
      }),
    );
    expectRefusal(result, /TOKENVAULT_CALLER_SECRET_FILE/, new RegExp(missing.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")));
  });
});

describe("development walkthrough (README): serve on the embedded database, then the sidecar in the same data folder", () => {
  it("the dev-sidecar caller may only Store; the sidecar uses it and a development ticket key, answers health checks, sends a minted link to Google, and shuts down", async () => {
    const dataDir = tempDir("tokenvault-sidecar-");
    const serve = await startServe(cliEnv({ TOKENVAULT_PORT: "0", TOKENVAULT_LOG_LEVEL: "info", TOKENVAULT_DATA_DIR: dataDir }), 60_000);
    otherSecrets.push(readFileSync(path.join(dataDir, "pg-password"), "utf8").trim());
    for (const k of (JSON.parse(readFileSync(path.join(dataDir, "dev-keys.json"), "utf8")) as { keys: { key: string }[] }).keys) otherSecrets.push(k.key);
    expect(serve.listening).toMatchObject({ embeddedDatabase: true });

    // serve wrote the sidecar's caller secret next to the dev caller's, 0600.
    const sidecarSecretFile = path.join(dataDir, "dev-sidecar-secret");
    expect(statSync(sidecarSecretFile).mode & 0o777).toBe(0o600);
    const sidecarSecretText = readFileSync(sidecarSecretFile, "utf8");
    expect(sidecarSecretText).toMatch(/^tvs_[1-9][0-9]*_[A-Za-z0-9_-]{43}\n$/);
    const sidecarSecret = sidecarSecretText.trim();
    rememberCallerSecret(sidecarSecret);
    const devSecret = readFileSync(path.join(dataDir, "dev-caller-secret"), "utf8").trim();
    rememberCallerSecret(devSecret);
    expect(sidecarSecret).not.toBe(devSecret);

    // That caller can Store and nothing else.
    const asSidecar = vaultClient(serve.baseUrl, sidecarSecret);
    const accessToken = secretToken("walkthrough");
    const stored = await asSidecar.store({ userId: "walk-user", integration: "gmail", tokenSet: { accessToken, scopes: ["openid"] } });
    expect(stored.created).toBe(true);
    expect(await outcome(asSidecar.get({ userId: "walk-user", integration: "gmail" }))).toBe("PermissionDenied");
    expect(await outcome(asSidecar.listConnections({ userId: "walk-user" }))).toBe("PermissionDenied");
    expect(await outcome(asSidecar.remove({ userId: "walk-user", integration: "gmail" }))).toBe("PermissionDenied");
    // What it stored is there (the dev caller may read it).
    expect((await vaultClient(serve.baseUrl, devSecret).get({ userId: "walk-user", integration: "gmail" })).accessToken).toBe(accessToken);

    // The sidecar, with nothing but the README's settings and a free port.
    const ticketKeyFile = path.join(dataDir, "dev-ticket-keys");
    expect(existsSync(ticketKeyFile)).toBe(false);
    const sidecar = await startSidecarCli(
      cliEnv({
        TOKENVAULT_DATA_DIR: dataDir,
        TOKENVAULT_URL: serve.baseUrl,
        TOKENVAULT_SIDECAR_PORT: "0",
        TOKENVAULT_SIDECAR_RETURN_URLS: returnUrl,
        TOKENVAULT_PROVIDER_GOOGLE_CLIENT_ID: "x",
        TOKENVAULT_LOG_LEVEL: "info",
      }),
    );
    expect(sidecar.port).toBeGreaterThan(0);
    const publicUrl = `http://localhost:${sidecar.port}`;
    expect(sidecar.listening).toMatchObject({
      level: "info",
      address: `http://127.0.0.1:${sidecar.port}`,
      publicUrl,
      vault: serve.baseUrl,
      returnUrls: [returnUrl],
    });
    const unconfigured = sidecar.listening.integrationsWithoutClientId as string[];
    expect(unconfigured).not.toContain("gmail");
    expect(unconfigured.length).toBeGreaterThan(0);
    // It made the development ticket key on first use, 0600.
    expect(statSync(ticketKeyFile).mode & 0o777).toBe(0o600);
    const ticketKeyText = readFileSync(ticketKeyFile, "utf8");
    expect(ticketKeyText).toMatch(/^dev:[A-Za-z0-9_-]{43}\n$/);
    rememberTicketKeys(ticketKeyText);

    const healthz = await fetch(`${sidecar.baseUrl}/healthz`);
    expect(healthz.status).toBe(200);
    expect(await healthz.text()).toBe("ok\n");
    expect(healthz.headers.get("cache-control")).toBe("no-store");
    const readyz = await fetch(`${sidecar.baseUrl}/readyz`);
    expect(readyz.status).toBe(200);
    expect(await readyz.text()).toBe("ready\n");

    // The README's `tickets mint --link`, in the same data folder: the same development key.
    const minted = onlyLine(
      await runCli(
        ["tickets", "mint", "--user", "walk-user", "--integration", "gmail", "--return-url", returnUrl, "--link"],
        cliEnv({ TOKENVAULT_DATA_DIR: dataDir, TOKENVAULT_SIDECAR_PORT: String(sidecar.port) }),
      ),
    );
    expect(minted.startsWith(`${publicUrl}/connect/gmail?ticket=`)).toBe(true);
    const ticket = new URL(minted).searchParams.get("ticket")!;
    rememberTicket(ticket);
    expect(readFileSync(ticketKeyFile, "utf8")).toBe(ticketKeyText);
    expect(await verifyConnectTicket(parseTicketKeys(ticketKeyText, "dev"), ticket)).toMatchObject({ userId: "walk-user", integration: "gmail", returnUrl });

    // The browser opens the link (localhost resolves to this machine: the link is used as printed).
    const connect = await fetch(minted, { redirect: "manual" });
    expect(connect.status).toBe(302);
    const location = new URL(connect.headers.get("location")!);
    expect(location.origin).toBe("https://accounts.google.com");
    const params = location.searchParams;
    expect(params.get("client_id")).toBe("x");
    expect(params.get("response_type")).toBe("code");
    expect(params.get("redirect_uri")).toBe(`${publicUrl}/callback/gmail`);
    expect(params.get("scope")).toContain("https://www.googleapis.com/auth/gmail.readonly");
    expect(params.get("state")).toMatch(/^[A-Za-z0-9_-]{16,}$/);
    expect(params.get("code_challenge_method")).toBe("S256");
    expect(connect.headers.get("referrer-policy")).toBe("no-referrer");
    const cookie = connect.headers.get("set-cookie")!;
    expect(cookie).toMatch(/Path=\/callback\/gmail/);
    expect(cookie).toMatch(/HttpOnly/);
    expect(cookie).toMatch(/SameSite=Lax/);
    // http on localhost: not Secure, or the browser would drop it.
    expect(cookie).not.toMatch(/Secure/);
    // A ticket is good for one connect.
    expect(await status(minted)).toBe(400);

    // The vault stops: the sidecar is alive but not ready.
    serve.kill("SIGTERM");
    expect(await serve.exitCode).toBe(0);
    await until(async () => (await status(`${sidecar.baseUrl}/readyz`)) === 503, 15_000, "/readyz to answer 503 with the vault stopped");
    const notReady = await fetch(`${sidecar.baseUrl}/readyz`);
    expect(notReady.status).toBe(503);
    expect(await notReady.text()).toBe("the vault is not reachable\n");
    expect(await status(`${sidecar.baseUrl}/healthz`)).toBe(200);

    // SIGTERM: a graceful stop, exit 0, and nothing listens any more.
    sidecar.kill("SIGTERM");
    expect(await sidecar.exitCode).toBe(0);
    expect((await sidecar.exit).signal).toBeNull();
    const shuttingDown = sidecar.logs().find((l) => l.msg === "sidecar shutting down");
    expect(shuttingDown).toMatchObject({ signal: "SIGTERM" });
    // Compared by time, not by line: see the report (main() calls process.exit()
    // while pino's asynchronous stdout may still be writing an earlier line, so
    // the last lines can come out of order).
    const stopped = sidecar.logs().find((l) => l.msg === "sidecar stopped");
    expect(stopped, sidecar.stdout().slice(-1_000)).toBeDefined();
    expect(Date.parse(String(stopped!.time))).toBeGreaterThanOrEqual(Date.parse(String(shuttingDown!.time)));
    expect(sidecar.logs().filter((l) => Date.parse(String(l.time)) > Date.parse(String(stopped!.time)))).toEqual([]);
    await expect(fetch(`${sidecar.baseUrl}/readyz`)).rejects.toThrow();
    expect(sidecar.stderr()).toBe("");

    // The request log names routes and outcomes, never the query (the ticket).
    const requests = sidecar.logs().filter((l) => l.msg === "sidecar request");
    expect(requests.map((l) => [l.route, l.status])).toEqual(
      expect.arrayContaining([
        ["/healthz", 200],
        ["/readyz", 200],
        ["/connect/gmail", 302],
        ["/connect/gmail", 400],
        ["/readyz", 503],
      ]),
    );
    expect(requests.find((l) => l.status === 302)).toMatchObject({ integration: "gmail", userId: "walk-user", outcome: "redirected to provider" });
    expect(requests.find((l) => l.route === "/connect/gmail" && l.status === 400)).toMatchObject({ reason: "ticket_reused" });
    expect(sidecar.stdout()).not.toContain("ticket=");
  }, 120_000);
});

describe("the sidecar with configured secrets, against a vault on the test database", () => {
  it("uses TOKENVAULT_CALLER_SECRET_FILE and TOKENVAULT_TICKET_KEYS, builds redirect URIs on the public URL, and writes nothing to the data folder", async () => {
    const db = await createTestDatabase();
    databases.push(db);
    const password = decodeURIComponent(new URL(db.url).password);
    if (password !== "") otherSecrets.push(password);
    const vaultKey = newKey("k1");
    otherSecrets.push(vaultKey.base64);
    const serveEnv = cliEnv({
      DATABASE_URL: db.url,
      TOKENVAULT_KEYS: vaultKey.entry,
      TOKENVAULT_PORT: "0",
      TOKENVAULT_LOG_LEVEL: "info",
      TOKENVAULT_DATA_DIR: tempDir(),
    });
    // The README's production setup: a caller allowed only Store, made with the CLI.
    const callerSecret = await addCallerWithCli("oauth-sidecar", serveEnv, "Store", "*");
    rememberCallerSecret(callerSecret);
    const serve = await startServe(serveEnv);
    expect(serve.listening).toMatchObject({ embeddedDatabase: false });

    const secretsDir = tempDir();
    const callerSecretFile = path.join(secretsDir, "tokenvault-sidecar");
    writeFileSync(callerSecretFile, `${callerSecret}\n`, { mode: 0o600 });
    // A key made the way the README says, signing first, and an older one still verifying.
    const generated = onlyLine(await runCli(["tickets", "generate-key", "--id", "k2"], cliEnv({ TOKENVAULT_DATA_DIR: tempDir() })));
    rememberTicketKeys(generated);
    const ticketKeys = `${generated},${ticketKey("k1")}`;

    const dataDir = tempDir();
    const publicUrl = "https://connect.example.test";
    const sidecarEnv = cliEnv({
      TOKENVAULT_DATA_DIR: dataDir,
      TOKENVAULT_URL: `${serve.baseUrl}/`,
      TOKENVAULT_CALLER_SECRET_FILE: callerSecretFile,
      TOKENVAULT_TICKET_KEYS: ticketKeys,
      TOKENVAULT_SIDECAR_PUBLIC_URL: publicUrl,
      TOKENVAULT_SIDECAR_PORT: "0",
      TOKENVAULT_SIDECAR_RETURN_URLS: returnUrl,
      TOKENVAULT_PROVIDER_GOOGLE_CLIENT_ID: "configured-client",
      TOKENVAULT_LOG_LEVEL: "info",
    });
    const sidecar = await startSidecarCli(sidecarEnv);
    expect(sidecar.listening).toMatchObject({ publicUrl, vault: serve.baseUrl, address: `http://127.0.0.1:${sidecar.port}` });
    expect(await status(`${sidecar.baseUrl}/readyz`)).toBe(200);

    const link = onlyLine(await mint(sidecarEnv, "--link", "--ttl", "120"));
    expect(link.startsWith(`${publicUrl}/connect/gmail?ticket=`)).toBe(true);
    const ticket = new URL(link).searchParams.get("ticket")!;
    rememberTicket(ticket);
    expect(decodeProtectedHeader(ticket).kid).toBe("k2");

    // The browser reaches the public URL; here that is the bound address.
    const connect = await fetch(`${sidecar.baseUrl}/connect/gmail?ticket=${ticket}`, { redirect: "manual" });
    expect(connect.status).toBe(302);
    const location = new URL(connect.headers.get("location")!);
    expect(location.searchParams.get("client_id")).toBe("configured-client");
    expect(location.searchParams.get("redirect_uri")).toBe(`${publicUrl}/callback/gmail`);
    // https public URL: the state cookie is Secure.
    expect(connect.headers.get("set-cookie")).toMatch(/; Secure/);

    // No development secret was made or needed.
    expect(existsSync(path.join(dataDir, "dev-ticket-keys"))).toBe(false);
    expect(existsSync(path.join(dataDir, "dev-sidecar-secret"))).toBe(false);

    // SIGINT (Ctrl-C) stops it gracefully too.
    sidecar.kill("SIGINT");
    expect(await sidecar.exitCode).toBe(0);
    expect(sidecar.logs().find((l) => l.msg === "sidecar shutting down")).toMatchObject({ signal: "SIGINT" });
    expect(sidecar.stderr()).toBe("");
    serve.kill("SIGTERM");
    expect(await serve.exitCode).toBe(0);
  }, 90_000);
});

describe("secrets", () => {
  it("no sidecar or serve process printed a ticket key, a caller secret, a ticket or a token; mint printed only its own ticket", () => {
    const outputs = allOutput();
    const isGenerateKey = (args: readonly string[]) => args[0] === "tickets" && args[1] === "generate-key";
    const isMint = (args: readonly string[]) => args[0] === "tickets" && args[1] === "mint";
    // `callers add` prints the secret it makes, by design.
    const isCallersAdd = (args: readonly string[]) => args[0] === "callers" && args[1] === "add";
    const leaks: string[] = [];
    for (const { args, stdout, stderr } of outputs) {
      const text = stdout + stderr;
      // generate-key prints the key it makes, by design; mint prints its ticket.
      const forbidden = [
        ...(isGenerateKey(args) ? [] : ticketKeyMaterial),
        ...(isCallersAdd(args) ? [] : callerSecrets),
        ...otherSecrets,
        secretMarker,
        ...(isMint(args) ? [] : tickets),
      ];
      for (const needle of forbidden) if (needle !== "" && text.includes(needle)) leaks.push(`[tokenvault ${args.join(" ")}] ${needle.slice(0, 12)}...`);
    }
    // A mint prints one ticket: its own, never another's.
    for (const { args, stdout } of outputs.filter((o) => isMint(o.args))) {
      const found = tickets.filter((t) => t.includes(".") && stdout.includes(t));
      if (found.length > 1) leaks.push(`[tokenvault ${args.join(" ")}] printed ${found.length} tickets`);
    }
    expect(leaks).toEqual([]);

    // Not a vacuous scan: sidecars and serves ran, answered, and secrets were handed out.
    const sidecars = outputs.filter((o) => o.args[0] === "sidecar" && o.stdout.includes(sidecarListening));
    expect(sidecars.length).toBeGreaterThanOrEqual(2);
    expect(sidecars.every((o) => o.stdout.includes('"msg":"sidecar request"'))).toBe(true);
    expect(outputs.filter((o) => o.args[0] === "serve" && o.stdout.includes("tokenvault listening")).length).toBeGreaterThanOrEqual(2);
    expect(callerSecrets.length).toBeGreaterThanOrEqual(4);
    expect(tickets.length).toBeGreaterThanOrEqual(10);
    expect(ticketKeyMaterial.length).toBeGreaterThanOrEqual(9);
  });
});
