/**
 * Bad input at the edge. Every documented validation rule of the .proto,
 * table-driven over the Connect gRPC client: each violation is
 * INVALID_ARGUMENT whose message starts with the field path and whose
 * ErrorDetail names it, and nothing in the database changes (a snapshot of
 * every connections row before and after each case). Then requests that are
 * not even messages: one over maxMessageBytes, random bytes in gRPC frames,
 * no framing at all, and garbage on the HTTP/1.1 side of the port; the
 * server answers each with an error and keeps serving. Every request, the raw
 * ones included, carries the admin caller's secret, so what is refused is the
 * input, never the caller (caller authentication is test/auth/).
 */
import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { create, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import {
  ErrorDetailSchema,
  ErrorReason,
  GetRequestSchema,
  RefreshMode,
  StoreRequestSchema,
  TokenVaultService,
  type TokenSetSchema,
} from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { secretToken, testKeyRing } from "../helpers/secrets.js";
import { bearer, startVault, type TestVault } from "../helpers/server.js";

const maxMessageBytes = 64 * 1024;

let db: TestDatabase;
let vault: TestVault;

/** The one valid connection every case aims at, so an accidental write or read would show. */
const victim = { userId: "victim-user", integration: "gmail" } as const;
const victimAccessToken = secretToken("access");

beforeAll(async () => {
  db = await createTestDatabase();
  vault = await startVault({ pool: db.pool, keyRing: testKeyRing("k1"), maxMessageBytes });
  await vault.grpcClient.store({
    ...victim,
    tokenSet: {
      accessToken: victimAccessToken,
      refreshToken: secretToken("refresh"),
      idToken: secretToken("id"),
      scopes: ["openid", "email"],
      expiry: { case: "expiresIn", value: durationFromMs(3_600_000) },
      extras: { tenant: "contoso" },
    },
    metadata: { ipAddress: "198.51.100.7", userAgent: "victim-agent" },
  });
  // Rows under the invalid identifiers the cases use, written behind the
  // service's back: a Remove or ClearUser that skipped validation would
  // delete one of them, and the snapshot would show it.
  const seed = async (userId: string, integration: string) =>
    db.pool.query(
      "insert into connections (user_id, integration, key_id, access_token_sealed, token_type) values ($1, $2, 'k1', '\\x00'::bytea, 'Bearer')",
      [userId, integration],
    );
  for (const userId of badUserIds.filter((b) => b.seedable)) await seed(userId.value, victim.integration);
  for (const integration of badIntegrations) await seed(victim.userId, integration.value);
});

afterAll(async () => {
  await vault?.close();
  expect(vault.logs.leaks()).toEqual([]);
  await db?.drop();
});

/** Every row and the count, as PostgreSQL has them. */
async function snapshot() {
  const rows = await db.pool.query("select * from connections order by id");
  const count = await db.pool.query("select count(*)::int as n from connections");
  return { rows: rows.rows, count: count.rows[0].n as number };
}

type Vault = Client<typeof TokenVaultService>;
/** The fields of a TokenSet init, without the message's $typeName. */
type TokenSetInit = Omit<Exclude<MessageInitShape<typeof TokenSetSchema>, { $typeName: string }>, "$typeName">;

interface BadCase {
  readonly name: string;
  /** The field path the message must start with and the ErrorDetail must name. */
  readonly field: string;
  readonly call: (client: Vault) => Promise<unknown>;
}

const badUserIds: { name: string; value: string; seedable: boolean }[] = [
  { name: "empty", value: "", seedable: true },
  { name: "257 characters", value: "u".repeat(257), seedable: true },
  { name: "257 astral characters", value: "\u{1F600}".repeat(257), seedable: true },
  { name: "a BEL control character", value: "bad\u0007user", seedable: true },
  { name: "a C1 control character (NEL)", value: "bad\u0085user", seedable: true },
  { name: "a newline", value: "bad\nuser", seedable: true },
  { name: "a NUL", value: "bad\u0000user", seedable: false }, // PostgreSQL text cannot hold NUL
  { name: "a DEL", value: "bad\u007fuser", seedable: true },
];

const badIntegrations: { name: string; value: string }[] = [
  { name: "empty", value: "" },
  { name: "uppercase", value: "Gmail" },
  { name: "a leading dash", value: "-gmail" },
  { name: "a leading dot", value: ".gmail" },
  { name: "65 characters", value: "a".repeat(65) },
  { name: "a slash", value: "gm/ail" },
  { name: "a space", value: "g mail" },
  { name: "a trailing newline", value: "gmail\n" },
  { name: "a non-ASCII letter", value: "gmaïl" },
];

const tenYears = 10 * 365 * 24 * 3600;

/** A Store of the victim's connection with `tokenSet` over a valid base. */
const storeWith = (tokenSet: Partial<TokenSetInit>) => (c: Vault) =>
  c.store({ ...victim, tokenSet: { accessToken: secretToken("bad"), ...tokenSet } });

const tokenSetCases: BadCase[] = [
  { name: "token_set missing", field: "token_set", call: (c) => c.store({ ...victim }) },
  { name: "access_token empty", field: "token_set.access_token", call: storeWith({ accessToken: "" }) },
  { name: "access_token 16385 bytes", field: "token_set.access_token", call: storeWith({ accessToken: "a".repeat(16 * 1024 + 1) }) },
  // 8193 characters but 16386 bytes: the limit is in bytes.
  { name: "access_token 16386 bytes in 8193 characters", field: "token_set.access_token", call: storeWith({ accessToken: "\u00e9".repeat(8193) }) },
  { name: "access_token containing \\n", field: "token_set.access_token", call: storeWith({ accessToken: `${secretToken()}\nX-Injected: 1` }) },
  { name: "access_token containing \\r", field: "token_set.access_token", call: storeWith({ accessToken: `${secretToken()}\r` }) },
  { name: "refresh_token present but empty", field: "token_set.refresh_token", call: storeWith({ refreshToken: "" }) },
  { name: "refresh_token 16385 bytes", field: "token_set.refresh_token", call: storeWith({ refreshToken: "r".repeat(16 * 1024 + 1) }) },
  { name: "id_token present but empty", field: "token_set.id_token", call: storeWith({ idToken: "" }) },
  { name: "id_token 16385 bytes", field: "token_set.id_token", call: storeWith({ idToken: "i".repeat(16 * 1024 + 1) }) },
  { name: "token_type with a space", field: "token_set.token_type", call: storeWith({ tokenType: "Bearer x" }) },
  { name: "token_type 65 characters", field: "token_set.token_type", call: storeWith({ tokenType: "B".repeat(65) }) },
  { name: "token_type with a tab", field: "token_set.token_type", call: storeWith({ tokenType: "Bearer\t" }) },
  { name: "scopes with 257 entries", field: "token_set.scopes", call: storeWith({ scopes: Array.from({ length: 257 }, (_, i) => `s${i}`) }) },
  { name: "scopes entry with a space", field: "token_set.scopes", call: storeWith({ scopes: ["openid", "mail read"] }) },
  { name: "scopes entry with a tab", field: "token_set.scopes", call: storeWith({ scopes: ["openid", "mail\tread"] }) },
  { name: "scopes entry empty", field: "token_set.scopes", call: storeWith({ scopes: ["openid", ""] }) },
  { name: "scopes entry of 513 characters", field: "token_set.scopes", call: storeWith({ scopes: ["s".repeat(513)] }) },
  { name: "scopes over 8 KiB in all", field: "token_set.scopes", call: storeWith({ scopes: Array.from({ length: 17 }, (_, i) => `${String(i).padStart(3, "0")}${"s".repeat(509)}`) }) },
  { name: "expires_in zero", field: "token_set.expires_in", call: storeWith({ expiry: { case: "expiresIn", value: { seconds: 0n, nanos: 0 } } }) },
  { name: "expires_in negative", field: "token_set.expires_in", call: storeWith({ expiry: { case: "expiresIn", value: { seconds: -60n, nanos: 0 } } }) },
  { name: "expires_in -1 ns", field: "token_set.expires_in", call: storeWith({ expiry: { case: "expiresIn", value: { seconds: 0n, nanos: -1 } } }) },
  { name: "expires_in 10 years + 1 s", field: "token_set.expires_in", call: storeWith({ expiry: { case: "expiresIn", value: { seconds: BigInt(tenYears + 1), nanos: 0 } } }) },
  { name: "expires_in with nanos of 1e9", field: "token_set.expires_in", call: storeWith({ expiry: { case: "expiresIn", value: { seconds: 60n, nanos: 1_000_000_000 } } }) },
  { name: "expires_in with mixed signs", field: "token_set.expires_in", call: storeWith({ expiry: { case: "expiresIn", value: { seconds: 60n, nanos: -1 } } }) },
  { name: "expires_in beyond 2^53 seconds", field: "token_set.expires_in", call: storeWith({ expiry: { case: "expiresIn", value: { seconds: 2n ** 60n, nanos: 0 } } }) },
  { name: "refresh_token_expires_in without a refresh_token", field: "token_set.refresh_token_expires_in", call: storeWith({ refreshToken: undefined, refreshTokenExpiresIn: { seconds: 3600n, nanos: 0 } }) },
  { name: "refresh_token_expires_in zero", field: "token_set.refresh_token_expires_in", call: storeWith({ refreshToken: secretToken("refresh"), refreshTokenExpiresIn: { seconds: 0n, nanos: 0 } }) },
  { name: "refresh_token_expires_in 10 years + 1 s", field: "token_set.refresh_token_expires_in", call: storeWith({ refreshToken: secretToken("refresh"), refreshTokenExpiresIn: { seconds: BigInt(tenYears + 1), nanos: 0 } }) },
  { name: "expires_at with negative nanos", field: "token_set.expires_at", call: storeWith({ expiry: { case: "expiresAt", value: { seconds: 1_900_000_000n, nanos: -1 } } }) },
  { name: "expires_at with nanos of 1e9", field: "token_set.expires_at", call: storeWith({ expiry: { case: "expiresAt", value: { seconds: 1_900_000_000n, nanos: 1_000_000_000 } } }) },
  { name: "expires_at after 9999-12-31", field: "token_set.expires_at", call: storeWith({ expiry: { case: "expiresAt", value: { seconds: 253402300800n, nanos: 0 } } }) },
  { name: "expires_at before 0001-01-01", field: "token_set.expires_at", call: storeWith({ expiry: { case: "expiresAt", value: { seconds: -62135596801n, nanos: 0 } } }) },
  { name: "extras over 16 KiB as JSON", field: "token_set.extras", call: storeWith({ extras: { blob: "x".repeat(16 * 1024) } }) },
  {
    name: "extras over 16 KiB as JSON only once escaped",
    field: "token_set.extras",
    // 6000 characters, 6000 bytes of UTF-8, but 36000 bytes of JSON ("\u0001" each).
    call: storeWith({ extras: { blob: "\u0001".repeat(6000) } }),
  },
];

const metadataCases: BadCase[] = [
  { name: "ip_address not an IP", field: "metadata.ip_address", call: (c) => c.store({ ...victim, tokenSet: { accessToken: secretToken() }, metadata: { ipAddress: "not-an-ip" } }) },
  { name: "ip_address 256.1.1.1", field: "metadata.ip_address", call: (c) => c.store({ ...victim, tokenSet: { accessToken: secretToken() }, metadata: { ipAddress: "256.1.1.1" } }) },
  { name: "ip_address with a trailing space", field: "metadata.ip_address", call: (c) => c.store({ ...victim, tokenSet: { accessToken: secretToken() }, metadata: { ipAddress: "203.0.113.9 " } }) },
  { name: "ip_address with a CIDR suffix", field: "metadata.ip_address", call: (c) => c.store({ ...victim, tokenSet: { accessToken: secretToken() }, metadata: { ipAddress: "203.0.113.0/24" } }) },
  { name: "user_agent 513 characters", field: "metadata.user_agent", call: (c) => c.store({ ...victim, tokenSet: { accessToken: secretToken() }, metadata: { userAgent: "M".repeat(513) } }) },
  { name: "user_agent with a newline", field: "metadata.user_agent", call: (c) => c.store({ ...victim, tokenSet: { accessToken: secretToken() }, metadata: { userAgent: "Mozilla\nX: y" } }) },
];

const getCases: BadCase[] = [
  { name: "min_valid_for negative", field: "min_valid_for", call: (c) => c.get({ ...victim, minValidFor: { seconds: -1n, nanos: 0 } }) },
  { name: "min_valid_for over 24 h", field: "min_valid_for", call: (c) => c.get({ ...victim, minValidFor: { seconds: 24n * 3600n + 1n, nanos: 0 } }) },
  { name: "min_valid_for 24 h + 1 ns", field: "min_valid_for", call: (c) => c.get({ ...victim, minValidFor: { seconds: 24n * 3600n, nanos: 1 } }) },
  { name: "min_valid_for with nanos of 1e9", field: "min_valid_for", call: (c) => c.get({ ...victim, minValidFor: { seconds: 1n, nanos: 1_000_000_000 } }) },
  { name: "refresh = 99 (unknown enum value)", field: "refresh", call: (c) => c.get({ ...victim, refresh: 99 as RefreshMode }) },
  { name: "refresh = -1 (unknown enum value)", field: "refresh", call: (c) => c.get({ ...victim, refresh: -1 as RefreshMode }) },
];

const identifierCases: BadCase[] = [
  ...badUserIds.flatMap(({ name, value }): BadCase[] => [
    { name: `Store user_id ${name}`, field: "user_id", call: (c) => c.store({ userId: value, integration: victim.integration, tokenSet: { accessToken: secretToken() } }) },
    { name: `Get user_id ${name}`, field: "user_id", call: (c) => c.get({ userId: value, integration: victim.integration }) },
    { name: `Remove user_id ${name}`, field: "user_id", call: (c) => c.remove({ userId: value, integration: victim.integration }) },
    { name: `ClearUser user_id ${name}`, field: "user_id", call: (c) => c.clearUser({ userId: value }) },
    { name: `ListConnections user_id ${name}`, field: "user_id", call: (c) => c.listConnections({ userId: value }) },
  ]),
  ...badIntegrations.flatMap(({ name, value }): BadCase[] => [
    { name: `Store integration ${name}`, field: "integration", call: (c) => c.store({ userId: victim.userId, integration: value, tokenSet: { accessToken: secretToken() } }) },
    { name: `Get integration ${name}`, field: "integration", call: (c) => c.get({ userId: victim.userId, integration: value }) },
    { name: `Remove integration ${name}`, field: "integration", call: (c) => c.remove({ userId: victim.userId, integration: value }) },
  ]),
];

/** Runs `call` and expects INVALID_ARGUMENT for `field`, with nothing changed in the database. */
async function expectRejectedUnchanged(call: () => Promise<unknown>, field: string): Promise<void> {
  const before = await snapshot();
  const outcome = await call().then(
    (res) => ({ ok: true as const, res }),
    (err: unknown) => ({ ok: false as const, err: ConnectError.from(err) }),
  );
  const after = await snapshot();
  expect(outcome.ok, "the call succeeded").toBe(false);
  const err = (outcome as { err: ConnectError }).err;
  expect(Code[err.code]).toBe(Code[Code.InvalidArgument]);
  expect(err.rawMessage.startsWith(`${field} `), `message "${err.rawMessage}"`).toBe(true);
  expect(err.findDetails(ErrorDetailSchema)).toEqual([expect.objectContaining({ reason: ErrorReason.INVALID_FIELD, field })]);
  expect(after.count).toBe(before.count);
  expect(after.rows).toEqual(before.rows);
}

describe("every invalid field is INVALID_ARGUMENT naming it, and nothing changes", () => {
  it("the table has rows to compare against", async () => {
    const { count, rows } = await snapshot();
    expect(count).toBe(1 + badUserIds.filter((b) => b.seedable).length + badIntegrations.length);
    expect(rows[0]).toMatchObject({ user_id: victim.userId, integration: victim.integration, generation: "1", last_used_at: null });
  });

  it.each([...tokenSetCases, ...metadataCases])("Store $name", async ({ call, field }) => {
    await expectRejectedUnchanged(() => call(vault.grpcClient), field);
  });

  it.each(getCases)("Get $name", async ({ call, field }) => {
    await expectRejectedUnchanged(() => call(vault.grpcClient), field);
  });

  it.each(identifierCases)("$name", async ({ call, field }) => {
    await expectRejectedUnchanged(() => call(vault.grpcClient), field);
  });

  // A lone surrogate cannot cross the binary protocol (the client's UTF-8
  // encoder turns it into U+FFFD), but Connect's JSON carries it as "\ud800".
  // (connect-node clients default to binary even over the Connect protocol,
  // so this needs a transport of its own.) protobuf-es refuses it while
  // parsing the JSON, before validate.ts runs: INVALID_ARGUMENT whose message
  // names the field by its full name, without an ErrorDetail.
  describe("a lone surrogate, sent as Connect JSON", () => {
    const lone = "bad\ud800user";
    let jsonClient: Vault;
    beforeAll(() => {
      jsonClient = createClient(
        TokenVaultService,
        createConnectTransport({ baseUrl: vault.baseUrl, httpVersion: "1.1", useBinaryFormat: false, interceptors: [bearer(vault.secret)] }),
      );
    });
    it.each<BadCase>([
      { name: "Store", field: "user_id", call: (c) => c.store({ userId: lone, integration: victim.integration, tokenSet: { accessToken: secretToken() } }) },
      { name: "Get", field: "user_id", call: (c) => c.get({ userId: lone, integration: victim.integration }) },
      { name: "Remove", field: "user_id", call: (c) => c.remove({ userId: lone, integration: victim.integration }) },
      { name: "ClearUser", field: "user_id", call: (c) => c.clearUser({ userId: lone }) },
      { name: "ListConnections", field: "user_id", call: (c) => c.listConnections({ userId: lone }) },
      { name: "Store user_agent", field: "metadata.user_agent", call: (c) => c.store({ ...victim, tokenSet: { accessToken: secretToken() }, metadata: { userAgent: `UA ${lone}` } }) },
      { name: "Store access_token", field: "token_set.access_token", call: (c) => c.store({ ...victim, tokenSet: { accessToken: `${secretToken()}\udc00` } }) },
    ])("$name", async ({ call, field }) => {
      const before = await snapshot();
      const err = await call(jsonClient).then(
        () => undefined,
        (e: unknown) => ConnectError.from(e),
      );
      expect(err, "the call succeeded").toBeInstanceOf(ConnectError);
      expect(Code[err!.code]).toBe(Code[Code.InvalidArgument]);
      expect(err!.rawMessage).toContain(field.split(".").pop());
      expect(await snapshot()).toEqual(before);
    });

    it("while the same JSON transport passes a well-formed astral character through", async () => {
      const userId = "json-\u{1F600}-user";
      expect((await jsonClient.store({ userId, integration: "gmail", tokenSet: { accessToken: secretToken() } })).connection?.userId).toBe(userId);
      expect((await jsonClient.clearUser({ userId })).removedCount).toBe(1);
    });
  });

  it("the snapshot would show an accidental read: a valid Get of the victim changes it", async () => {
    const before = await snapshot();
    await vault.grpcClient.get({ ...victim, refresh: RefreshMode.NEVER });
    const after = await snapshot();
    expect(after.count).toBe(before.count);
    expect(after.rows).not.toEqual(before.rows);
  });

  it("the limits are not off by one: values at each limit are accepted", async () => {
    // 16384 bytes exactly, most of them two-byte characters.
    const refreshHead = secretToken("r");
    const refreshRest = 16 * 1024 - refreshHead.length;
    const refreshToken = `${refreshHead}${"\u00e9".repeat(Math.floor(refreshRest / 2))}${"x".repeat(refreshRest % 2)}`;
    expect(Buffer.byteLength(refreshToken)).toBe(16 * 1024);
    const res = await vault.grpcClient.store({
      userId: "\u{1F600}".repeat(256),
      integration: `a${"-".repeat(63)}`,
      tokenSet: {
        accessToken: `${secretToken()}${"a".repeat(16 * 1024 - secretToken().length)}`,
        refreshToken,
        tokenType: "T".repeat(64),
        scopes: [...Array.from({ length: 255 }, (_, i) => `s${i}`), "s".repeat(512)],
        expiry: { case: "expiresIn", value: { seconds: BigInt(tenYears), nanos: 0 } },
        extras: { blob: "x".repeat(16 * 1024 - '{"blob":""}'.length) },
      },
      metadata: { ipAddress: "::ffff:192.0.2.1", userAgent: "M".repeat(512) },
    });
    expect(res.created).toBe(true);
    const got = await vault.grpcClient.get({
      userId: "\u{1F600}".repeat(256),
      integration: `a${"-".repeat(63)}`,
      minValidFor: { seconds: 24n * 3600n, nanos: 0 },
      refresh: RefreshMode.NEVER,
    });
    expect(got.accessToken).toHaveLength(16 * 1024);
    expect(got.connection?.hasRefreshToken).toBe(true);
    expect(got.tokenType).toBe("T".repeat(64));
    expect(got.connection?.consent?.userAgent).toHaveLength(512);
    expect(got.scopes).toHaveLength(256);
    await vault.grpcClient.remove({ userId: "\u{1F600}".repeat(256), integration: `a${"-".repeat(63)}` });
  });
});

/** A token of exactly `bytes` bytes, carrying the secret marker. */
const padded = (kind: string, bytes = 16 * 1024) => {
  const t = secretToken(kind);
  return t + "x".repeat(bytes - t.length);
};
/** `n` distinct scopes of `chars` characters each. */
const scopeList = (n: number, chars: number) => Array.from({ length: n }, (_, i) => `${String(i).padStart(3, "0")}${"s".repeat(chars - 3)}`);

describe("a message over maxMessageBytes", () => {
  // Every field within its own limit: three 16 KiB tokens, 16 KiB of extras and 8 KiB of scopes, ~72 KiB.
  const oversized = (): MessageInitShape<typeof StoreRequestSchema> => ({
    ...victim,
    tokenSet: {
      accessToken: padded("big"),
      refreshToken: padded("big-r"),
      idToken: padded("big-i"),
      scopes: scopeList(16, 512),
      extras: { blob: "x".repeat(16 * 1024 - '{"blob":""}'.length) },
    },
  });

  it("really is over the limit and valid otherwise", () => {
    expect(toBinary(StoreRequestSchema, create(StoreRequestSchema, oversized())).byteLength).toBeGreaterThan(maxMessageBytes);
  });

  it.each(["grpcClient", "connectClient", "grpcWebClient"] as const)("is refused over %s with RESOURCE_EXHAUSTED, nothing written", async (transport) => {
    const before = await snapshot();
    const err = await vault[transport].store(oversized()).then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    expect(err, "the oversized Store succeeded").toBeInstanceOf(ConnectError);
    expect(Code[err!.code]).toBe(Code[Code.ResourceExhausted]);
    expect(await snapshot()).toEqual(before);
    await expectServing();
  });

  it("a message just under the limit is accepted", async () => {
    const userId = "size-ok-user";
    const request = create(StoreRequestSchema, {
      userId,
      integration: "gmail",
      tokenSet: { accessToken: padded("a"), refreshToken: padded("r"), idToken: padded("i"), extras: { blob: "x".repeat(12 * 1024) } },
    });
    expect(toBinary(StoreRequestSchema, request).byteLength).toBeLessThan(maxMessageBytes);
    expect((await vault.grpcClient.store(request)).created).toBe(true);
    await vault.grpcClient.clearUser({ userId });
  });
});

describe("a connection the vault accepted can be read back", () => {
  // Get and ListConnections answer with more than Store took: GetResponse
  // carries the scopes twice (scopes and connection.scopes). A Store the
  // vault accepts must not make a connection that can never be read.
  it("at maxMessageBytes = 64 KiB (the configured minimum): Get of a Store that fit", async () => {
    const userId = "near-limit-user";
    const request = create(StoreRequestSchema, {
      userId,
      integration: "gmail",
      tokenSet: { accessToken: padded("a"), refreshToken: padded("r"), idToken: padded("i"), scopes: scopeList(16, 400), extras: { blob: "x".repeat(4 * 1024) } },
    });
    expect(toBinary(StoreRequestSchema, request).byteLength).toBeLessThan(maxMessageBytes);
    expect((await vault.grpcClient.store(request)).created).toBe(true);
    try {
      const got = await vault.grpcClient.get({ userId, integration: "gmail" });
      expect(got.scopes).toHaveLength(16);
    } finally {
      await vault.grpcClient.clearUser({ userId });
    }
  });

  it("at the default maxMessageBytes (256 KiB): Get of a token set at every documented limit", async () => {
    const big = await startVault({ pool: db.pool, keyRing: testKeyRing("k1") });
    const userId = "at-limits-user";
    try {
      const request = create(StoreRequestSchema, {
        userId,
        integration: "gmail",
        tokenSet: {
          accessToken: padded("a"),
          refreshToken: padded("r"),
          idToken: padded("i"),
          scopes: scopeList(16, 512),
          extras: { blob: "x".repeat(16 * 1024 - '{"blob":""}'.length) },
        },
      });
      expect(toBinary(StoreRequestSchema, request).byteLength).toBeLessThan(256 * 1024);
      expect((await big.grpcClient.store(request)).created).toBe(true);
      const got = await big.grpcClient.get({ userId, integration: "gmail" });
      expect(got.scopes).toHaveLength(16);
      expect(got.accessToken).toBe(request.tokenSet!.accessToken);
    } finally {
      await big.grpcClient.clearUser({ userId }).catch(() => {});
      await big.close();
      expect(big.logs.leaks()).toEqual([]);
    }
  });
});

// --- Requests that are not messages at all --------------------------------

/** A Get of the victim through brand-new connections (h2c and HTTP/1.1): the server still serves. */
async function expectServing(): Promise<void> {
  const interceptors = [bearer(vault.secret)];
  const grpc = createClient(TokenVaultService, createGrpcTransport({ baseUrl: vault.baseUrl, interceptors }));
  const connect = createClient(TokenVaultService, createConnectTransport({ baseUrl: vault.baseUrl, httpVersion: "1.1", interceptors }));
  for (const client of [grpc, connect]) {
    const got = await client.get({ ...victim, refresh: RefreshMode.NEVER });
    expect(got.accessToken).toBe(victimAccessToken);
  }
}

interface RawGrpcResult {
  httpStatus: number;
  grpcStatus: string | undefined;
  grpcMessage: string | undefined;
  body: Buffer;
}

/**
 * Sends `body` as a raw HTTP/2 request from the admin caller (so what is
 * refused is the body, not the caller) and reads the gRPC status from
 * trailers (or trailers-only headers).
 */
function rawGrpc(path: string, body: Buffer, contentType = "application/grpc"): Promise<RawGrpcResult> {
  return new Promise((resolve, reject) => {
    const session = http2.connect(vault.baseUrl);
    const timer = setTimeout(() => {
      session.destroy();
      reject(new Error("the server did not finish the call within 5 s"));
    }, 5_000);
    session.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    const req = session.request({
      ":method": "POST",
      ":path": path,
      "content-type": contentType,
      te: "trailers",
      authorization: `Bearer ${vault.secret}`,
    });
    let headers: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders = {};
    const chunks: Buffer[] = [];
    req.on("response", (h) => (headers = h));
    req.on("trailers", (t) => (trailers = t));
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("error", (err) => {
      clearTimeout(timer);
      session.destroy();
      reject(err);
    });
    req.on("close", () => {
      clearTimeout(timer);
      session.close();
      const pick = (name: string) => (trailers[name] ?? headers[name]) as string | undefined;
      resolve({ httpStatus: Number(headers[":status"]), grpcStatus: pick("grpc-status"), grpcMessage: pick("grpc-message"), body: Buffer.concat(chunks) });
    });
    req.end(body);
  });
}

function frame(payload: Buffer, flags = 0, declaredLength = payload.length): Buffer {
  const header = Buffer.alloc(5);
  header.writeUInt8(flags, 0);
  header.writeUInt32BE(declaredLength, 1);
  return Buffer.concat([header, payload]);
}

const storePath = "/tokenvault.v1.TokenVaultService/Store";
const getPath = "/tokenvault.v1.TokenVaultService/Get";

describe("random bytes over raw HTTP/2 gRPC", () => {
  /** `code`, when given, is the one grpc-status that is right for the case. */
  const bodies: { name: string; path: string; body: () => Buffer; code?: string }[] = [
    { name: "a valid frame header + random payload (Store)", path: storePath, body: () => frame(randomBytes(512)) },
    { name: "a valid frame header + random payload (Get)", path: getPath, body: () => frame(randomBytes(64)) },
    { name: "random bytes without framing", path: storePath, body: () => randomBytes(1024) },
    { name: "a truncated frame header", path: storePath, body: () => Buffer.from([0, 0, 0]) },
    { name: "a frame shorter than its declared length", path: storePath, body: () => frame(randomBytes(10), 0, 1000) },
    // Refused on the declared length alone, without waiting for 4 GiB.
    { name: "a frame declaring 4 GiB", path: storePath, body: () => frame(randomBytes(10), 0, 0xffffffff), code: String(Code.ResourceExhausted) },
    { name: "a compressed flag without grpc-encoding", path: storePath, body: () => frame(Buffer.from(toBinary(GetRequestSchema, create(GetRequestSchema, victim))), 1) },
    { name: "two frames for a unary method", path: getPath, body: () => Buffer.concat([frame(Buffer.from(toBinary(GetRequestSchema, create(GetRequestSchema, victim)))), frame(Buffer.from(toBinary(GetRequestSchema, create(GetRequestSchema, victim))))]) },
    // user_id = "b\xffb": not UTF-8, which proto3 forbids in a string field.
    { name: "a string field that is not UTF-8", path: storePath, body: () => frame(Buffer.from([0x0a, 0x03, 0x62, 0xff, 0x62, 0x12, 0x05, ...Buffer.from("gmail"), 0x1a, 0x05, 0x0a, 0x03, 0x61, 0x62, 0x63])) },
    { name: "an empty body", path: storePath, body: () => Buffer.alloc(0) },
  ];

  it.each(bodies)("$name: a gRPC error status, nothing written, still serving", async ({ path, body, code }) => {
    const before = await snapshot();
    const res = await rawGrpc(path, body());
    expect(res.httpStatus).toBe(200);
    expect(res.grpcStatus, "no grpc-status").toBeDefined();
    expect(res.grpcStatus).not.toBe("0");
    // The request carried a valid credential: the body is what was refused.
    expect(res.grpcStatus).not.toBe(String(Code.Unauthenticated));
    if (code !== undefined) expect(res.grpcStatus).toBe(code);
    expect(await snapshot()).toEqual(before);
    await expectServing();
  });

  it("a valid frame through the same raw client succeeds (the harness can tell)", async () => {
    const res = await rawGrpc(getPath, frame(Buffer.from(toBinary(GetRequestSchema, create(GetRequestSchema, { ...victim, refresh: RefreshMode.NEVER })))));
    expect(res.grpcStatus).toBe("0");
    expect(res.body.length).toBeGreaterThan(5);
  });

});

/** Writes `bytes` on a fresh TCP connection and returns what came back once the server closed it. */
function rawTcp(bytes: Buffer): Promise<{ reply: Buffer; closedByServer: boolean }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(vault.port, "127.0.0.1");
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ reply: Buffer.concat(chunks), closedByServer: false });
    }, 5_000);
    socket.on("data", (c: Buffer) => chunks.push(c));
    socket.on("error", (err) => {
      clearTimeout(timer);
      if ((err as NodeJS.ErrnoException).code === "ECONNRESET") resolve({ reply: Buffer.concat(chunks), closedByServer: true });
      else reject(err);
    });
    socket.on("close", () => {
      clearTimeout(timer);
      resolve({ reply: Buffer.concat(chunks), closedByServer: true });
    });
    socket.write(bytes);
  });
}

describe("garbage on the HTTP/1.1 side of the port", () => {
  /** Random bytes that cannot start an HTTP/2 preface or an HTTP method. */
  const garbage = (n: number) => {
    const b = randomBytes(n);
    b[0] = 0x00;
    return b;
  };

  it.each([
    { name: "random bytes", bytes: () => garbage(4096) },
    { name: "a request line with random bytes after it", bytes: () => Buffer.concat([Buffer.from("POST /tokenvault.v1.TokenVaultService/Store HTTP/1.1\r\n"), garbage(512)]) },
    { name: "an oversized header section", bytes: () => Buffer.from(`GET / HTTP/1.1\r\nHost: x\r\nX-Big: ${"a".repeat(100 * 1024)}\r\n\r\n`) },
  ])("$name: the server answers 4xx or hangs up, and keeps serving", async ({ bytes }) => {
    const { reply, closedByServer } = await rawTcp(bytes());
    expect(closedByServer, "the server kept a garbage connection open").toBe(true);
    if (reply.length > 0) expect(reply.toString("latin1")).toMatch(/^HTTP\/1\.1 4\d\d /);
    await expectServing();
  });

  it("the HTTP/2 preface followed by random bytes: the session is torn down, the server keeps serving", async () => {
    const preface = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    // A DATA frame on stream 0 first, a protocol error in any case, so the
    // outcome does not depend on what the random bytes happen to encode.
    const dataOnStreamZero = Buffer.from([0, 0, 8, 0, 0, 0, 0, 0, 0]);
    const { closedByServer } = await rawTcp(Buffer.concat([preface, dataOnStreamZero, garbage(2048)]));
    expect(closedByServer).toBe(true);
    await expectServing();
  });

  it("random bytes as a Connect request body: an error, nothing written", async () => {
    const before = await snapshot();
    for (const contentType of ["application/proto", "application/json"]) {
      const res = await new Promise<{ status: number; body: string }>((resolve, reject) => {
        const headers = { "content-type": contentType, authorization: `Bearer ${vault.secret}` };
        const req = http.request(`${vault.baseUrl}${storePath}`, { method: "POST", headers }, (r) => {
          const chunks: Buffer[] = [];
          r.on("data", (c: Buffer) => chunks.push(c));
          r.on("end", () => resolve({ status: r.statusCode ?? 0, body: Buffer.concat(chunks).toString("utf8") }));
        });
        req.on("error", reject);
        req.end(randomBytes(300));
      });
      expect(res.status).toBeGreaterThanOrEqual(400);
      expect(JSON.parse(res.body)).toMatchObject({ code: expect.any(String) });
      // Sent by the admin caller: the body is what was refused.
      expect(JSON.parse(res.body).code).not.toBe("unauthenticated");
    }
    expect(await snapshot()).toEqual(before);
    await expectServing();
  });
});
