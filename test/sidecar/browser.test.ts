/**
 * The OAuth sidecar end to end in a real browser: Debian's headless Chromium
 * (/usr/bin/chromium, driven by playwright-core; never a downloaded browser)
 * connects a Gmail account through the real sidecar on listen(0), at a real
 * authorization server (panva's oidc-provider with its own built-in login and
 * consent pages, test/helpers/oidc.ts), into the real vault over a real
 * PostgreSQL, and comes back to a small "app" page of the test's own.
 *
 * - The vault's catalogue moves the built-in "google" provider (integration
 *   "gmail", with its PKCE and access_type=offline&prompt=consent) to
 *   oidc-provider; gmail asks for `openid offline_access`, the scopes
 *   oidc-provider knows, instead of Google's Gmail scope.
 * - The sidecar stores through the vault as a caller allowed only Store; the
 *   test reads back through the admin client.
 * - oidc-provider registers the sidecar's callback as the client's only
 *   redirect URI (exact match), read when the provider first needs it, since
 *   the sidecar's port is known only once it listens.
 * - Nothing leaves the loopback interface: the browser aborts any other
 *   request (the provider's pages @import a web font).
 *
 * 1. Consent: login and consent pages, back at the app with status=connected;
 *    the vault holds the access token oidc-provider issued to the code
 *    exchange, with the browser's IP and user agent as consent metadata; a
 *    later Get that needs a longer validity refreshes it at oidc-provider.
 * 2. Cancel on the consent page: back at the app with status=denied,
 *    reason=access_denied; nothing exchanged, nothing stored.
 * 3. Leaks: no token, code, ticket, state or secret in any sidecar or vault log
 *    line, nor in any URL the app was sent to.
 */
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { ConnectionStatus } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { loadCatalogue } from "../../src/providers/catalogue.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { startOidcProvider, type OidcServer } from "../helpers/oidc.js";
import { testKeyRing } from "../helpers/secrets.js";
import { startVault, type TestVault } from "../helpers/server.js";
import { startSidecar, type TestSidecar } from "../helpers/sidecar.js";

/** Debian's Chromium: CI installs it (.ci/run); the test never downloads a browser. */
const chromiumPath = "/usr/bin/chromium";
const chromiumArgs = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-quic",
  "--no-first-run",
  "--disable-component-update",
  "--disable-sync",
];
const integration = "gmail";
/** The waits of one flow (navigation, a page element): generous, never asserted on. */
const browserTimeoutMs = 20_000;

// ---------------------------------------------------------------------------
// The app the sidecar sends the browser back to
// ---------------------------------------------------------------------------

/** A tiny web app on 127.0.0.1 whose page shows the query it was opened with. */
interface App {
  /** The return URL the tickets name (and the sidecar allows). */
  readonly url: string;
  readonly origin: string;
  /** Every URL the app was asked for. */
  readonly visits: URL[];
  close(): Promise<void>;
}

async function startApp(): Promise<App> {
  const visits: URL[] = [];
  const escape = (s: string) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? "/", "http://app.invalid");
    visits.push(url);
    const rows = [...url.searchParams].map(([k, v]) => `<li>${escape(k)}=${escape(v)}</li>`).join("");
    const body = `<!doctype html><html><head><meta charset="utf-8"><title>App settings</title></head>
<body><h1>Connections</h1><ul id="query">${rows}</ul></body></html>`;
    res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store", "content-length": Buffer.byteLength(body) });
    res.end(body);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const origin = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return {
    url: `${origin}/settings/integrations`,
    origin,
    visits,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

let browserLaunch: Promise<Browser> | undefined;
const contexts: BrowserContext[] = [];
let db: TestDatabase | undefined;
let op: OidcServer | undefined;
let vault: TestVault | undefined;
let sidecar: TestSidecar | undefined;
let app: App | undefined;
let catalogueDir: string | undefined;
let callerSecret = "";

/** Tickets minted, and codes and states seen in the browser's callback requests: for the leak scans. */
const tickets: string[] = [];
const codes: string[] = [];
const states: string[] = [];

/**
 * Chromium, launched once, by the first test that needs it: without
 * /usr/bin/chromium every browser test fails with this message (a failure in
 * beforeAll would only mark the tests skipped).
 */
function launchBrowser(): Promise<Browser> {
  browserLaunch ??= (async () => {
    if (!existsSync(chromiumPath)) {
      throw new Error(`${chromiumPath} is missing: this test drives Debian's Chromium (apt-get install chromium; .ci/run installs it) and never downloads a browser`);
    }
    return chromium.launch({ executablePath: chromiumPath, args: chromiumArgs });
  })();
  return browserLaunch;
}

beforeAll(async () => {
  db = await createTestDatabase();
  op = await startOidcProvider({
    devInteractions: true,
    // The sidecar's callback, exactly; read when the provider first looks the client up (after the sidecar started).
    redirectUris: () => {
      if (sidecar === undefined) throw new Error("the provider looked its client up before the sidecar started");
      return [`${sidecar.url}/callback/${integration}`];
    },
  });
  catalogueDir = mkdtempSync(path.join(tmpdir(), "tokenvault-browser-"));
  // The helper's override moves google (and with it gmail) to oidc-provider; gmail then asks
  // for the OpenID scopes oidc-provider knows (offline_access: a refresh token) instead of Gmail's.
  const file = op.writeCatalogue(catalogueDir);
  const override = JSON.parse(readFileSync(file, "utf8")) as { integrations: Record<string, unknown> };
  override.integrations[integration] = { scopes: ["openid", "offline_access"] };
  writeFileSync(file, JSON.stringify(override));
  const provider = op;
  const catalogue = loadCatalogue({ overrideFile: file, settings: (p) => provider.settings(p) });

  vault = await startVault({ pool: db.pool, keyRing: testKeyRing("k1"), catalogue });
  callerSecret = (await vault.addCaller("sidecar", { allow: ["Store"], integrations: ["*"] })).secret;
  app = await startApp();
  sidecar = await startSidecar({ vaultUrl: vault.baseUrl, callerSecret, catalogue, returnUrls: [app.url] });
});

afterAll(async () => {
  for (const context of contexts) await context.close().catch(() => {});
  await (await browserLaunch?.catch(() => undefined))?.close();
  await sidecar?.close();
  await vault?.close();
  await app?.close();
  await op?.close();
  await db?.drop();
  if (catalogueDir !== undefined) rmSync(catalogueDir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

function need<T>(value: T | undefined, what: string): T {
  if (value === undefined) throw new Error(`${what} did not start`);
  return value;
}

const newUser = () => `user-e2e-${randomBytes(4).toString("hex")}`;

/** What one browser flow saw. */
interface Flow {
  readonly context: BrowserContext;
  readonly page: Page;
  /** Every URL the page requested, redirects included, in order. */
  readonly requests: URL[];
  /** The browser's requests to the sidecar's /callback. */
  readonly callbacks: URL[];
}

/**
 * Opens a fresh browser context on the sidecar's connect link for `userId`,
 * signs in on oidc-provider's login page (as `userId`, any password) and stops
 * on its consent page.
 */
async function startFlow(userId: string): Promise<Flow> {
  const sc = need(sidecar, "the sidecar");
  const context = await (await launchBrowser()).newContext();
  contexts.push(context);
  context.setDefaultTimeout(browserTimeoutMs);
  context.setDefaultNavigationTimeout(browserTimeoutMs);
  // Hermetic: only this test's loopback servers; anything else (a web font) is refused.
  await context.route((url) => url.hostname !== "127.0.0.1" && url.hostname !== "localhost", (route) => route.abort());
  const page = await context.newPage();
  const requests: URL[] = [];
  const callbacks: URL[] = [];
  page.on("request", (request) => {
    const url = new URL(request.url());
    requests.push(url);
    if (url.origin === sc.url && url.pathname === `/callback/${integration}`) {
      callbacks.push(url);
      const code = url.searchParams.get("code");
      const state = url.searchParams.get("state");
      if (code !== null) codes.push(code);
      if (state !== null) states.push(state);
    }
  });

  const ticket = await sc.mint({ userId, integration, returnUrl: need(app, "the app").url });
  tickets.push(ticket);
  await page.goto(sc.connectUrl(integration, ticket));

  // oidc-provider's login page (prompt "login"): any login, any password.
  await page.locator("h1", { hasText: "Sign-in" }).waitFor();
  expect(new URL(page.url()).origin).toBe(need(op, "oidc-provider").issuer);
  await page.locator('input[name="login"]').fill(userId);
  await page.locator('input[name="password"]').fill("correct horse battery staple");
  await page.getByRole("button", { name: "Sign-in" }).click();

  // Its consent page (prompt "consent", which the google entry's prompt=consent asks for).
  await page.locator("h1", { hasText: "Authorize" }).waitFor();
  expect(new URL(page.url()).origin).toBe(need(op, "oidc-provider").issuer);
  return { context, page, requests, callbacks };
}

/** Waits until the browser is on the app's page and returns the URL it landed on. */
async function landedAtApp(page: Page): Promise<URL> {
  const target = need(app, "the app");
  await page.waitForURL((url) => url.origin === target.origin);
  await page.locator("#query").waitFor();
  return new URL(page.url());
}

// ---------------------------------------------------------------------------

describe("connecting Gmail in Chromium through the sidecar, at oidc-provider", () => {
  it("consent: back at the app as connected; the vault holds the issued token with the browser's IP and user agent; a later Get refreshes it", async () => {
    const provider = need(op, "oidc-provider");
    const admin = need(vault, "the vault").grpcClient;
    const sc = need(sidecar, "the sidecar");
    const userId = newUser();
    const exchangesBefore = provider.tokenCalls("authorization_code").length;

    const flow = await startFlow(userId);
    const userAgent = (await flow.page.evaluate("navigator.userAgent")) as string;
    expect(userAgent).toContain("Chrome/");
    await flow.page.getByRole("button", { name: "Continue" }).click();
    const landed = await landedAtApp(flow.page);

    // The authorization request the browser took to oidc-provider: the google entry's shape, PKCE S256, our callback.
    const authorization = flow.requests.find((u) => u.origin === provider.issuer && u.pathname === "/auth" && u.searchParams.has("client_id"));
    expect(authorization).toBeDefined();
    expect(Object.fromEntries(authorization!.searchParams)).toMatchObject({
      response_type: "code",
      client_id: provider.postClient.clientId,
      redirect_uri: `${sc.url}/callback/${integration}`,
      scope: "openid offline_access",
      access_type: "offline",
      prompt: "consent",
      code_challenge_method: "S256",
    });

    // oidc-provider sent the browser back to the sidecar with a code, exactly once.
    expect(flow.callbacks).toHaveLength(1);
    expect(flow.callbacks[0]!.searchParams.get("code")).toBeTruthy();
    expect(flow.callbacks[0]!.searchParams.get("state")).toBe(authorization!.searchParams.get("state"));

    // The browser is on the app's page, with the outcome in the query and nothing else.
    expect(`${landed.origin}${landed.pathname}`).toBe(need(app, "the app").url);
    expect(Object.fromEntries(landed.searchParams)).toEqual({ status: "connected", integration });
    expect(await flow.page.locator("#query li").allTextContents()).toEqual(["status=connected", `integration=${integration}`]);
    // The flow's state cookie is gone.
    const cookies = await flow.context.cookies(`${sc.url}/callback/${integration}`);
    expect(cookies.filter((c) => c.name.startsWith("tv_flow_"))).toEqual([]);

    // The sidecar exchanged the code once, as the post client with its secret in the form.
    const exchanges = provider.tokenCalls("authorization_code").slice(exchangesBefore);
    expect(exchanges).toHaveLength(1);
    const exchange = exchanges[0]!;
    expect(exchange).toMatchObject({ status: 200, clientId: provider.postClient.clientId, secretInBody: true });
    expect(exchange.accessToken).toBeTruthy();
    expect(exchange.refreshToken).toBeTruthy();

    // The vault answers with exactly the token oidc-provider issued to that exchange, without refreshing.
    const got = await admin.get({ userId, integration, includeRefreshToken: true });
    expect(got.refreshed).toBe(false);
    expect(got.accessToken).toBe(exchange.accessToken);
    expect(got.refreshToken).toBe(exchange.refreshToken);
    expect(got.idToken).toBe(exchange.idToken);
    expect(got.scopes).toEqual(["openid", "offline_access"]);
    expect(got.tokenType).toBe("Bearer");
    // The id token is for the account signed in on the login page.
    const idClaims = JSON.parse(Buffer.from(got.idToken!.split(".")[1]!, "base64url").toString("utf8")) as Record<string, unknown>;
    expect(idClaims).toMatchObject({ sub: userId, iss: provider.issuer, aud: provider.postClient.clientId });

    // The consent metadata is the browser's: its address at the sidecar and its User-Agent.
    const { connections } = await admin.listConnections({ userId });
    expect(connections).toHaveLength(1);
    const connection = connections[0]!;
    expect(connection).toMatchObject({ userId, integration, status: ConnectionStatus.ACTIVE, hasRefreshToken: true });
    expect(connection.consent?.ipAddress).toBe("127.0.0.1");
    expect(connection.consent?.userAgent).toBe(userAgent);
    expect(got.connection?.consent?.ipAddress).toBe("127.0.0.1");
    expect(got.connection?.consent?.userAgent).toBe(userAgent);

    // A later Get that needs the token valid longer than oidc-provider's access token lifetime refreshes it there.
    const refreshesBefore = provider.tokenCalls("refresh_token").length;
    const later = await admin.get({ userId, integration, minValidFor: durationFromMs((provider.accessTokenTtl + 300) * 1000) });
    const refreshes = provider.tokenCalls("refresh_token").slice(refreshesBefore);
    expect(refreshes).toHaveLength(1);
    expect(refreshes[0]).toMatchObject({ status: 200, clientId: provider.postClient.clientId });
    expect(later.refreshed).toBe(true);
    expect(later.accessToken).toBe(refreshes[0]!.accessToken);
    expect(later.accessToken).not.toBe(exchange.accessToken);
    // oidc-provider itself says the new token is live for the user who consented.
    expect(await provider.introspect(later.accessToken, "access_token")).toMatchObject({ active: true, sub: userId, client_id: provider.postClient.clientId });
    // The consent metadata stays the browser's after the refresh.
    expect(later.connection?.consent?.ipAddress).toBe("127.0.0.1");
    expect(later.connection?.consent?.userAgent).toBe(userAgent);
  }, 60_000);

  it("cancel on the consent page: back at the app as denied (access_denied); nothing exchanged, nothing stored", async () => {
    const provider = need(op, "oidc-provider");
    const admin = need(vault, "the vault").grpcClient;
    const userId = newUser();
    const exchangesBefore = provider.tokenCalls().length;

    const flow = await startFlow(userId);
    await flow.page.getByRole("link", { name: "[ Cancel ]" }).click();
    const landed = await landedAtApp(flow.page);

    // oidc-provider sent the browser back to the sidecar with access_denied and no code.
    expect(flow.callbacks).toHaveLength(1);
    expect(flow.callbacks[0]!.searchParams.get("error")).toBe("access_denied");
    expect(flow.callbacks[0]!.searchParams.has("code")).toBe(false);

    expect(`${landed.origin}${landed.pathname}`).toBe(need(app, "the app").url);
    expect(Object.fromEntries(landed.searchParams)).toEqual({ status: "denied", integration, reason: "access_denied" });
    expect(await flow.page.locator("#query li").allTextContents()).toEqual(["status=denied", `integration=${integration}`, "reason=access_denied"]);
    const cookies = await flow.context.cookies(`${need(sidecar, "the sidecar").url}/callback/${integration}`);
    expect(cookies.filter((c) => c.name.startsWith("tv_flow_"))).toEqual([]);

    // No token request, and no connection for this user.
    expect(provider.tokenCalls().length).toBe(exchangesBefore);
    expect((await admin.listConnections({ userId })).connections).toEqual([]);
  }, 60_000);

  it("leaks: no token, code, ticket, state or secret in any sidecar or vault log line, nor in any URL the app was sent to", () => {
    const provider = need(op, "oidc-provider");
    const sc = need(sidecar, "the sidecar");
    const v = need(vault, "the vault");
    // The flows above ran: there is something to scan.
    expect(provider.issuedSecrets.length).toBeGreaterThanOrEqual(4);
    expect(codes.length).toBeGreaterThanOrEqual(1);
    expect(tickets.length).toBeGreaterThanOrEqual(2);
    expect(sc.logs.lines.filter((l) => l.includes(`/callback/${integration}`)).length).toBeGreaterThanOrEqual(2);

    const secrets = [
      ...provider.issuedSecrets,
      ...codes,
      ...tickets,
      ...states,
      provider.postClient.clientSecret,
      provider.basicClient.clientSecret,
      callerSecret,
      v.secret,
    ];
    expect(sc.logs.leaks(secrets)).toEqual([]);
    expect(v.logs.leaks(secrets)).toEqual([]);

    // The app was only ever sent the outcome: no token, code, ticket, state or secret in its URLs.
    const appUrls = need(app, "the app").visits.map((u) => u.href);
    expect(appUrls.length).toBeGreaterThanOrEqual(2);
    expect(appUrls.filter((u) => secrets.some((s) => s !== "" && u.includes(s)))).toEqual([]);
  });
});
