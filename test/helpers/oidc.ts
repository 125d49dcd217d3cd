/**
 * A real OAuth 2.0 / OpenID Connect authorization server for the refresh
 * tests: panva's `oidc-provider` on listen(0) in the test process (its
 * in-memory adapter), not a hand-written stub.
 *
 * - Two confidential clients, one authenticating with client_secret_post and
 *   one with client_secret_basic, both allowed authorization_code and
 *   refresh_token.
 * - `rotateRefreshToken: true`: every refresh consumes the refresh token and
 *   issues a new one. Presenting a consumed refresh token again is reuse:
 *   oidc-provider then revokes the whole grant (emitting `grant.revoked`) and
 *   answers invalid_grant ("refresh token already used").
 * - Revocation (RFC 7009, /token/revocation) and introspection (RFC 7662,
 *   /token/introspection) are on, so tests can ask the provider itself
 *   whether a token still works.
 * - Refresh tokens are minted without a browser through the provider's own
 *   models, as its authorization_code grant does after a consent: a Grant
 *   with the OIDC scopes `openid offline_access`, saved, then a RefreshToken
 *   bound to that grant, account and client, saved (the saved value is the
 *   opaque token string).
 * - Optionally (`devInteractions`) the provider's own built-in login and
 *   consent pages, so a real browser can sign in (any login and password) and
 *   consent or cancel, and (`redirectUris`) the clients' redirect URIs; given
 *   as a function, they are read each time the provider looks a client up, so
 *   a URI known only later (a sidecar's callback on its listen(0) port) can be
 *   registered after the provider started.
 * - A Koa middleware (provider.use) sees every token, revocation and
 *   introspection request with its answer (what the provider produced), so
 *   tests count calls exactly; it can also hold /token answers after the
 *   provider produced them (the provider has already rotated the refresh
 *   token; the client has not got the answer yet).
 */
import http from "node:http";
import { generateKeyPairSync, randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import path from "node:path";
import type { AddressInfo, Socket } from "node:net";

/**
 * The parts of oidc-provider (which ships no type declarations) these tests
 * use. It is imported by a computed name so the type checker does not look
 * for declarations.
 */
interface KoaContext {
  method: string;
  path: string;
  status: number;
  body: unknown;
  get(header: string): string;
  oidc?: { params?: Record<string, unknown>; client?: { clientId: string } };
}
interface ProviderModel {
  save(): Promise<string>;
}
/** A running oidc-provider instance (a Koa application). */
export interface Provider {
  use(middleware: (ctx: KoaContext, next: () => Promise<void>) => Promise<void>): void;
  on(event: string, listener: (...args: never[]) => void): void;
  callback(): http.RequestListener;
  Grant: (new (init: { accountId: string; clientId: string }) => ProviderModel & { addOIDCScope(scope: string): void }) & {
    find(id: string): Promise<unknown>;
  };
  RefreshToken: new (init: Record<string, unknown>) => ProviderModel;
  Client: { find(id: string): Promise<unknown> };
}
type ProviderConstructor = new (issuer: string, configuration: Record<string, unknown>) => Provider;

async function loadProvider(): Promise<ProviderConstructor> {
  const name = "oidc-provider";
  const mod = (await import(name)) as { default: ProviderConstructor };
  return mod.default;
}

/** What oidc-provider asks of a storage adapter (one per model: "Client", "Session", "AccessToken" ...). */
interface ProviderAdapter {
  upsert(id: string, payload: Record<string, unknown>, expiresIn: number): Promise<void>;
  find(id: string): Promise<Record<string, unknown> | undefined>;
  findByUserCode(userCode: string): Promise<Record<string, unknown> | undefined>;
  findByUid(uid: string): Promise<Record<string, unknown> | undefined>;
  consume(id: string): Promise<void>;
  destroy(id: string): Promise<void>;
  revokeByGrantId(grantId: string): Promise<void>;
}

/** oidc-provider's own in-memory adapter (the default one), as a factory of per-model adapters over one store. */
async function loadMemoryAdapter(): Promise<(model: string) => ProviderAdapter> {
  const name = "oidc-provider/lib/adapters/memory_adapter.js";
  const mod = (await import(name)) as { createMemoryAdapter(clockTolerance: number): (model: string) => ProviderAdapter };
  return mod.createMemoryAdapter(0);
}

/** One confidential client of the provider. */
export interface OidcClient {
  readonly clientId: string;
  readonly clientSecret: string;
  readonly method: "client_secret_post" | "client_secret_basic";
}

/** A request the provider answered (or is holding), as the middleware saw it. */
export interface EndpointCall {
  /** True for requests this helper sent itself (refreshDirectly, revokeDirectly, introspect), not the vault. */
  readonly direct: boolean;
  /** "token", "revocation" or "introspection". */
  readonly endpoint: "token" | "revocation" | "introspection";
  /** grant_type of a token request. */
  readonly grantType: string | undefined;
  /** token_type_hint of a revocation request. */
  readonly tokenTypeHint: string | undefined;
  /** The client the provider authenticated, when it did. */
  readonly clientId: string | undefined;
  /** The scheme of the Authorization header ("Basic"), when one was sent. */
  readonly authorizationScheme: string | undefined;
  /** Whether client_secret came in the form body. */
  readonly secretInBody: boolean;
  /** The HTTP status of the answer. */
  readonly status: number;
  /** The OAuth error code of the answer, when it is one. */
  readonly error: string | undefined;
  /** error_description of the answer, when there is one. */
  readonly errorDescription: string | undefined;
  /** The access token the answer carried (token endpoint, success). */
  readonly accessToken: string | undefined;
  /** The refresh token the answer carried (token endpoint, success). */
  readonly refreshToken: string | undefined;
  /** The id token the answer carried (token endpoint, success). */
  readonly idToken: string | undefined;
  /** expires_in of the answer. */
  readonly expiresIn: number | undefined;
}

/** What a held /token answer is waiting for. */
export interface HeldAnswer {
  /** The call as the provider answered it (the refresh token is already rotated). */
  readonly call: EndpointCall;
  /** Lets the answer go to the client. */
  release(): void;
}

/** A running provider. */
export interface OidcServer {
  readonly provider: Provider;
  readonly issuer: string;
  readonly port: number;
  readonly tokenUrl: string;
  readonly revocationUrl: string;
  readonly introspectionUrl: string;
  /** The client_secret_post client. */
  readonly postClient: OidcClient;
  /** The client_secret_basic client. */
  readonly basicClient: OidcClient;
  /** Access token lifetime in seconds. */
  readonly accessTokenTtl: number;
  /** Every token, revocation and introspection request so far, in order of their answers. */
  readonly calls: EndpointCall[];
  /** Grant ids oidc-provider revoked (reuse detection, revocation), from its `grant.revoked` event. */
  readonly revokedGrants: string[];
  /** Ids (jti) of refresh tokens consumed by a rotation, from `refresh_token.consumed`. */
  readonly consumedRefreshTokens: string[];
  /** Every token value the provider handed out or the helper minted (for leak scans). */
  readonly issuedSecrets: string[];
  /** Token endpoint calls the vault made so far (not the helper's own), optionally of one grant type. */
  tokenCalls(grantType?: string): EndpointCall[];
  /** Revocation endpoint calls the vault made so far (not the helper's own). */
  revocationCalls(): EndpointCall[];
  /**
   * Mints a refresh token (and its grant) for `accountId` without a browser,
   * through the provider's models. The token is valid at the token endpoint
   * for `client` (default: the post client).
   */
  mintRefreshToken(accountId: string, options?: { client?: OidcClient; scope?: string }): Promise<{ refreshToken: string; grantId: string }>;
  /** RFC 7662 introspection of `token` by the post client. */
  introspect(token: string, hint?: "access_token" | "refresh_token"): Promise<Record<string, unknown>>;
  /** RFC 7009 revocation of `token` sent straight to the provider (as when the user disconnects the app there), by `client`. */
  revokeDirectly(token: string, client?: OidcClient): Promise<number>;
  /** A refresh_token grant sent straight to the provider (not through the vault), by `client`. */
  refreshDirectly(refreshToken: string, client?: OidcClient): Promise<{ status: number; body: Record<string, unknown> }>;
  /** Whether the grant is still stored at the provider. */
  grantExists(grantId: string): Promise<boolean>;
  /**
   * From now on, every /token answer is held after the provider produced it,
   * until released; `next()` resolves with each held answer in turn. `stop()`
   * releases everything held and ends holding.
   */
  holdTokenAnswers(): { next(): Promise<HeldAnswer>; stop(): void };
  /**
   * Writes a provider catalogue override file into `dir` pointing the
   * built-in "google" provider (and with it the "gmail" integration) at this
   * provider with the post client, and adds provider "oidc-basic" with
   * integration "oidc-basic-mail" using the basic client. Returns its path.
   */
  writeCatalogue(dir: string): string;
  /** Client settings for loadCatalogue's `settings` (google: post client, oidc-basic: basic client). */
  settings(provider: string): { clientId?: string; clientSecret?: string };
  /** The TOKENVAULT_PROVIDER_* variables of a `tokenvault serve` using {@link writeCatalogue}'s file. */
  env(): Record<string, string>;
  close(): Promise<void>;
}

/** Options of {@link startOidcProvider}. */
export interface OidcOptions {
  /** Access token lifetime in seconds (default 600: shorter than Google's hour, longer than Get's default min_valid_for of 5 minutes). */
  accessTokenTtl?: number;
  /**
   * Serve oidc-provider's built-in login page (any login, any password) and
   * consent page (Continue, or "[ Cancel ]": access_denied) at
   * /interaction/:uid; default false (no interactive authorization).
   */
  devInteractions?: boolean;
  /**
   * The redirect URIs both clients register (oidc-provider accepts only an
   * exact match); default the fixed https://vault.example.test/oauth/callback.
   * A function is called each time the provider looks a client up (the
   * clients then come from the provider's adapter instead of its static
   * configuration), so it may name a URI known only after the provider
   * started; it must return at least one URI by the time a client is used.
   */
  redirectUris?: readonly string[] | (() => readonly string[]);
}

/** Marks the requests the helper sends itself. */
const directHeader = "x-oidc-test-direct";

/** The scopes minted refresh tokens carry: an OpenID grant with offline access. */
export const defaultScope = "openid offline_access";

/** The redirect URI the clients register unless told otherwise. */
export const defaultRedirectUri = "https://vault.example.test/oauth/callback";

/** Starts oidc-provider on 127.0.0.1 and a free port. */
export async function startOidcProvider(options: OidcOptions = {}): Promise<OidcServer> {
  const accessTokenTtl = options.accessTokenTtl ?? 600;
  const server = http.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;
  const issuer = `http://127.0.0.1:${port}`;

  const postClient: OidcClient = { clientId: "tokenvault-post", clientSecret: randomBytes(32).toString("base64url"), method: "client_secret_post" };
  const basicClient: OidcClient = { clientId: "tokenvault-basic", clientSecret: randomBytes(32).toString("base64url"), method: "client_secret_basic" };
  const rsa = generateKeyPairSync("rsa", { modulusLength: 2048 }).privateKey.export({ format: "jwk" });

  const redirectUris = options.redirectUris ?? [defaultRedirectUri];
  const clientMetadata = (c: OidcClient, uris: readonly string[]) => ({
    client_id: c.clientId,
    client_secret: c.clientSecret,
    token_endpoint_auth_method: c.method,
    grant_types: ["authorization_code", "refresh_token"],
    response_types: ["code"],
    redirect_uris: [...uris],
  });
  // Static clients, or (redirect URIs given as a function) clients the provider
  // finds through its adapter: oidc-provider looks a non-static client up with
  // the "Client" adapter on every use and validates the metadata it gets
  // (caching by content), so the URIs are read when needed. Every other model
  // stays in oidc-provider's own in-memory adapter.
  let clientConfiguration: Record<string, unknown>;
  if (typeof redirectUris === "function") {
    const memory = await loadMemoryAdapter();
    const byId = new Map([postClient, basicClient].map((c) => [c.clientId, c]));
    const clientAdapter: ProviderAdapter = {
      find: async (id) => {
        const c = byId.get(id);
        return c === undefined ? undefined : clientMetadata(c, redirectUris());
      },
      upsert: async () => {
        throw new Error("the test provider's clients are fixed");
      },
      destroy: async () => {},
      consume: async () => {},
      revokeByGrantId: async () => {},
      findByUid: async () => undefined,
      findByUserCode: async () => undefined,
    };
    clientConfiguration = { clients: [], adapter: (model: string) => (model === "Client" ? clientAdapter : memory(model)) };
  } else {
    clientConfiguration = { clients: [postClient, basicClient].map((c) => clientMetadata(c, redirectUris)) };
  }

  const Provider = await loadProvider();
  const provider = new Provider(issuer, {
    ...clientConfiguration,
    // Every account exists; its only claim is sub.
    findAccount: (_ctx: unknown, sub: string) => ({ accountId: sub, claims: () => ({ sub }) }),
    scopes: ["openid", "offline_access"],
    jwks: { keys: [{ ...rsa, kid: "test-rs256", alg: "RS256", use: "sig" }] },
    rotateRefreshToken: true,
    issueRefreshToken: (_ctx: unknown, client: { grantTypeAllowed(g: string): boolean }, code: { scopes: Set<string> }) =>
      client.grantTypeAllowed("refresh_token") && code.scopes.has("offline_access"),
    ttl: {
      AccessToken: accessTokenTtl,
      IdToken: 3600,
      RefreshToken: 14 * 24 * 3600,
      Grant: 14 * 24 * 3600,
      AuthorizationCode: 60,
      Interaction: 3600,
      Session: 3600,
    },
    features: {
      devInteractions: { enabled: options.devInteractions ?? false },
      revocation: { enabled: true },
      introspection: { enabled: true },
    },
    clientBasedCORS: () => false,
  });
  // Quiet: the provider's own error events are looked at through `calls`.
  provider.on("server_error", () => {});

  const calls: EndpointCall[] = [];
  const revokedGrants: string[] = [];
  const consumedRefreshTokens: string[] = [];
  const issuedSecrets: string[] = [];
  provider.on("grant.revoked", (_ctx: unknown, grantId: string) => revokedGrants.push(grantId));
  provider.on("refresh_token.consumed", (token: { jti: string }) => consumedRefreshTokens.push(token.jti));

  let holding: { queue: HeldAnswer[]; waiters: ((h: HeldAnswer) => void)[]; released: Set<() => void> } | undefined;

  const endpoints: Record<string, EndpointCall["endpoint"]> = {
    "/token": "token",
    "/token/revocation": "revocation",
    "/token/introspection": "introspection",
  };
  provider.use(async (ctx, next) => {
    await next();
    const endpoint = ctx.method === "POST" ? endpoints[ctx.path] : undefined;
    if (endpoint === undefined) return;
    const params = (ctx.oidc?.params ?? {}) as Record<string, unknown>;
    const body = (typeof ctx.body === "object" && ctx.body !== null ? ctx.body : {}) as Record<string, unknown>;
    const str = (v: unknown) => (typeof v === "string" ? v : undefined);
    const call: EndpointCall = {
      direct: ctx.get(directHeader) !== "",
      endpoint,
      grantType: str(params.grant_type),
      tokenTypeHint: str(params.token_type_hint),
      clientId: ctx.oidc?.client?.clientId,
      authorizationScheme: ctx.get("authorization") === "" ? undefined : ctx.get("authorization").split(" ")[0],
      secretInBody: typeof params.client_secret === "string",
      status: ctx.status,
      error: str(body.error),
      errorDescription: str(body.error_description),
      accessToken: endpoint === "token" ? str(body.access_token) : undefined,
      refreshToken: endpoint === "token" ? str(body.refresh_token) : undefined,
      idToken: endpoint === "token" ? str(body.id_token) : undefined,
      expiresIn: typeof body.expires_in === "number" ? body.expires_in : undefined,
    };
    for (const t of [call.accessToken, call.refreshToken, call.idToken]) if (t !== undefined) issuedSecrets.push(t);
    calls.push(call);
    if (endpoint === "token" && holding !== undefined) {
      const h = holding;
      await new Promise<void>((resolve) => {
        h.released.add(resolve);
        const held: HeldAnswer = {
          call,
          release: () => {
            h.released.delete(resolve);
            resolve();
          },
        };
        const waiter = h.waiters.shift();
        if (waiter !== undefined) waiter(held);
        else h.queue.push(held);
      });
    }
  });

  server.on("request", provider.callback());
  const sockets = new Set<Socket>();
  server.on("connection", (s) => {
    sockets.add(s);
    s.once("close", () => sockets.delete(s));
  });

  const basicHeader = (c: OidcClient) => {
    const enc = (s: string) => encodeURIComponent(s).replace(/%20/g, "+");
    return `Basic ${Buffer.from(`${enc(c.clientId)}:${enc(c.clientSecret)}`).toString("base64")}`;
  };
  const post = async (url: string, form: Record<string, string>, client: OidcClient) => {
    const headers: Record<string, string> = { "content-type": "application/x-www-form-urlencoded", accept: "application/json", [directHeader]: "1" };
    const body = new URLSearchParams(form);
    if (client.method === "client_secret_basic") headers.authorization = basicHeader(client);
    else {
      body.set("client_id", client.clientId);
      body.set("client_secret", client.clientSecret);
    }
    const response = await fetch(url, { method: "POST", headers, body });
    const text = await response.text();
    return { status: response.status, body: (text === "" ? {} : JSON.parse(text)) as Record<string, unknown> };
  };

  const tokenUrl = `${issuer}/token`;
  const revocationUrl = `${issuer}/token/revocation`;
  const introspectionUrl = `${issuer}/token/introspection`;

  return {
    provider,
    issuer,
    port,
    tokenUrl,
    revocationUrl,
    introspectionUrl,
    postClient,
    basicClient,
    accessTokenTtl,
    calls,
    revokedGrants,
    consumedRefreshTokens,
    issuedSecrets,
    tokenCalls: (grantType) => calls.filter((c) => !c.direct && c.endpoint === "token" && (grantType === undefined || c.grantType === grantType)),
    revocationCalls: () => calls.filter((c) => !c.direct && c.endpoint === "revocation"),

    async mintRefreshToken(accountId, { client = postClient, scope = defaultScope } = {}) {
      // What a consent leaves behind: a grant of the OIDC scopes to this client ...
      const grant = new provider.Grant({ accountId, clientId: client.clientId });
      grant.addOIDCScope(scope);
      const grantId = await grant.save();
      // ... and the refresh token the authorization_code grant would issue for it.
      const registered = await provider.Client.find(client.clientId);
      if (registered === undefined) throw new Error(`client ${client.clientId} is not registered`);
      const token = new provider.RefreshToken({
        accountId,
        client: registered,
        grantId,
        gty: "authorization_code",
        scope,
        rotations: 0,
        authTime: Math.floor(Date.now() / 1000),
      });
      const refreshToken = await token.save();
      issuedSecrets.push(refreshToken);
      return { refreshToken, grantId };
    },

    async introspect(token, hint) {
      const { status, body } = await post(introspectionUrl, { token, ...(hint === undefined ? {} : { token_type_hint: hint }) }, postClient);
      if (status !== 200) throw new Error(`introspection answered HTTP ${status}: ${JSON.stringify(body)}`);
      return body;
    },

    revokeDirectly: async (token, client = postClient) => (await post(revocationUrl, { token }, client)).status,

    refreshDirectly: (refreshToken, client = postClient) => post(tokenUrl, { grant_type: "refresh_token", refresh_token: refreshToken }, client),

    async grantExists(grantId) {
      return (await provider.Grant.find(grantId)) !== undefined;
    },

    holdTokenAnswers() {
      const h = { queue: [] as HeldAnswer[], waiters: [] as ((held: HeldAnswer) => void)[], released: new Set<() => void>() };
      holding = h;
      return {
        next: () => {
          const queued = h.queue.shift();
          if (queued !== undefined) return Promise.resolve(queued);
          return new Promise<HeldAnswer>((resolve) => h.waiters.push(resolve));
        },
        stop: () => {
          if (holding === h) holding = undefined;
          for (const release of [...h.released]) release();
          h.released.clear();
        },
      };
    },

    writeCatalogue(dir) {
      const file = path.join(dir, "providers.json");
      const endpoints = { tokenUrl, revocationUrl, authorizationUrl: `${issuer}/auth` };
      writeFileSync(
        file,
        JSON.stringify({
          providers: {
            // Merged over the built-in google entry: only the endpoints move.
            google: { ...endpoints, tokenEndpointAuthMethod: "client_secret_post" },
            "oidc-basic": {
              ...endpoints,
              tokenEndpointAuthMethod: "client_secret_basic",
              scopeSeparator: " ",
              pkce: true,
              authorizationParams: {},
              requiredScopes: ["offline_access"],
              refreshSendsScope: false,
              refreshTokenRotates: true,
            },
          },
          integrations: { "oidc-basic-mail": { provider: "oidc-basic", scopes: ["openid", "offline_access"] } },
        }),
      );
      return file;
    },

    settings(name) {
      if (name === "google") return { clientId: postClient.clientId, clientSecret: postClient.clientSecret };
      if (name === "oidc-basic") return { clientId: basicClient.clientId, clientSecret: basicClient.clientSecret };
      return {};
    },

    env() {
      return {
        TOKENVAULT_PROVIDER_GOOGLE_CLIENT_ID: postClient.clientId,
        TOKENVAULT_PROVIDER_GOOGLE_CLIENT_SECRET: postClient.clientSecret,
        TOKENVAULT_PROVIDER_OIDC_BASIC_CLIENT_ID: basicClient.clientId,
        TOKENVAULT_PROVIDER_OIDC_BASIC_CLIENT_SECRET: basicClient.clientSecret,
      };
    },

    async close() {
      if (holding !== undefined) {
        for (const release of [...holding.released]) release();
        holding = undefined;
      }
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      });
    },
  };
}
