/**
 * Connect tickets (src/sidecar/tickets.ts): the short-lived HS256 JWT an
 * application's backend mints so the browser can start a connect at the
 * sidecar.
 *
 * 1. mint/verify round trip, and the exact header and claims minted;
 * 2. key rotation: the first key signs, every key verifies, an unknown kid
 *    (or none) is refused;
 * 3. parseTicketKeys / generateTicketKey / loadTicketKeys and their errors;
 * 4. every way a ticket can be wrong is a TicketError whose message never
 *    repeats the ticket: signature, alg, audience, lifetime, clock, claims;
 * 5. a ticket minted by hand following the documented format, once with
 *    plain jose and once with nothing but an HMAC (as a Go or Python backend
 *    would, from the TOKENVAULT_TICKET_KEYS string), verifies.
 */
import { createHmac, randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { SignJWT, decodeJwt, decodeProtectedHeader } from "jose";
import {
  TicketError,
  TicketKeyError,
  generateTicketKey,
  loadTicketKeys,
  maxTicketLifetimeSeconds,
  mintConnectTicket,
  parseTicketKeys,
  ticketAudience,
  verifyConnectTicket,
  type TicketKeys,
} from "../../src/sidecar/tickets.js";

const returnUrl = "https://app.example.com/settings/integrations";
const keyText = generateTicketKey("k1");
const keys = parseTicketKeys(keyText, "test");

const b64url = (value: unknown) => Buffer.from(JSON.stringify(value)).toString("base64url");
const nowSeconds = () => Math.floor(Date.now() / 1000);
const nonce = () => randomBytes(16).toString("base64url");

/** A JWT signed with nothing but HMAC-SHA256, as any language can. */
function hmacJwt(secret: Uint8Array, header: Record<string, unknown>, claims: Record<string, unknown>): string {
  const input = `${b64url(header)}.${b64url(claims)}`;
  return `${input}.${createHmac("sha256", secret).update(input).digest("base64url")}`;
}

/** The documented claims, `over` replacing or (as undefined) removing some. */
function claims(over: Record<string, unknown> = {}): Record<string, unknown> {
  const iat = nowSeconds();
  const all: Record<string, unknown> = {
    aud: ticketAudience,
    sub: "user-1",
    integration: "gmail",
    return_url: returnUrl,
    iat,
    exp: iat + 300,
    jti: nonce(),
    ...over,
  };
  for (const [k, v] of Object.entries(all)) if (v === undefined) delete all[k];
  return all;
}

/** A documented-format ticket under `keys`' signing key with claims changed by `over`. */
const ticketWith = (over: Record<string, unknown> = {}, header: Record<string, unknown> = {}, signing: TicketKeys = keys) =>
  hmacJwt(signing.signing.secret, { alg: "HS256", typ: "JWT", kid: signing.signing.id, ...header }, claims(over));

/** Verifies and expects a TicketError whose message matches `message` and does not repeat the ticket. */
async function expectRefused(ticket: string, message: RegExp, verifyKeys: TicketKeys = keys, now?: Date): Promise<void> {
  const err = await verifyConnectTicket(verifyKeys, ticket, now).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, "the ticket must be refused").toBeInstanceOf(TicketError);
  const text = (err as Error).message;
  expect(text).toMatch(message);
  for (const part of ticket.split(".")) if (part.length > 8) expect(text).not.toContain(part);
}

describe("mint and verify", () => {
  it("round-trips user, integration, return URL, expiry and nonce", async () => {
    const before = nowSeconds();
    const ticket = await mintConnectTicket(keys, { userId: "user-1", integration: "gmail", returnUrl });
    const verified = await verifyConnectTicket(keys, ticket);
    expect(verified.userId).toBe("user-1");
    expect(verified.integration).toBe("gmail");
    expect(verified.returnUrl).toBe(returnUrl);
    expect(verified.expiresAt).toBeGreaterThanOrEqual(before + 300);
    expect(verified.expiresAt).toBeLessThanOrEqual(nowSeconds() + 300);
    expect(verified.nonce).toMatch(/^[A-Za-z0-9_-]{22,}$/);
  });

  it("mints exactly the documented header and claims", async () => {
    const at = new Date("2030-01-02T03:04:05Z");
    const ticket = await mintConnectTicket(keys, { userId: "tenant-a/user 7", integration: "outlook", returnUrl, ttlSeconds: 120, now: at });
    expect(decodeProtectedHeader(ticket)).toEqual({ alg: "HS256", typ: "JWT", kid: "k1" });
    const payload = decodeJwt(ticket);
    const iat = Math.floor(at.getTime() / 1000);
    expect(payload).toEqual({
      aud: "tokenvault-sidecar",
      sub: "tenant-a/user 7",
      integration: "outlook",
      return_url: returnUrl,
      iat,
      exp: iat + 120,
      jti: expect.stringMatching(/^[A-Za-z0-9_-]{22}$/),
    });
    // verified at its own clock
    const verified = await verifyConnectTicket(keys, ticket, new Date(at.getTime() + 60_000));
    expect(verified).toMatchObject({ userId: "tenant-a/user 7", integration: "outlook", expiresAt: iat + 120 });
  });

  it("gives every ticket its own nonce", async () => {
    const nonces = new Set<string>();
    for (let i = 0; i < 20; i++) {
      const ticket = await mintConnectTicket(keys, { userId: "u", integration: "gmail", returnUrl });
      nonces.add((await verifyConnectTicket(keys, ticket)).nonce);
    }
    expect(nonces.size).toBe(20);
  });

  it("mints lifetimes of 1 to 600 seconds and refuses others", async () => {
    for (const ttlSeconds of [1, 600]) {
      const ticket = await mintConnectTicket(keys, { userId: "u", integration: "gmail", returnUrl, ttlSeconds });
      const { exp, iat } = decodeJwt(ticket);
      expect(exp! - iat!).toBe(ttlSeconds);
      await expect(verifyConnectTicket(keys, ticket)).resolves.toBeDefined();
    }
    for (const ttlSeconds of [0, -1, 601, 1.5, Number.NaN]) {
      await expect(mintConnectTicket(keys, { userId: "u", integration: "gmail", returnUrl, ttlSeconds })).rejects.toThrow(RangeError);
    }
  });

  it("refuses to mint without a user or an integration", async () => {
    await expect(mintConnectTicket(keys, { userId: "", integration: "gmail", returnUrl })).rejects.toThrow(RangeError);
    await expect(mintConnectTicket(keys, { userId: "u", integration: "", returnUrl })).rejects.toThrow(RangeError);
  });
});

describe("key rotation", () => {
  const a = generateTicketKey("a");
  const b = generateTicketKey("b");
  const both = parseTicketKeys(`${a},${b}`, "rotation");
  const onlyA = parseTicketKeys(a, "a");
  const onlyB = parseTicketKeys(b, "b");

  it("signs with the first key", async () => {
    expect(both.signing.id).toBe("a");
    expect(both.all.map((k) => k.id)).toEqual(["a", "b"]);
    const ticket = await mintConnectTicket(both, { userId: "u", integration: "gmail", returnUrl });
    expect(decodeProtectedHeader(ticket).kid).toBe("a");
    await expect(verifyConnectTicket(onlyA, ticket)).resolves.toMatchObject({ userId: "u" });
  });

  it("verifies a ticket signed by the second key", async () => {
    const ticket = await mintConnectTicket(onlyB, { userId: "u-b", integration: "gmail", returnUrl });
    expect(decodeProtectedHeader(ticket).kid).toBe("b");
    await expect(verifyConnectTicket(both, ticket)).resolves.toMatchObject({ userId: "u-b", integration: "gmail" });
  });

  it("refuses a ticket whose kid it does not know, or that has none", async () => {
    const c = parseTicketKeys(generateTicketKey("c"), "c");
    await expectRefused(await mintConnectTicket(c, { userId: "u", integration: "gmail", returnUrl }), /unknown key/, both);
    await expectRefused(hmacJwt(onlyA.signing.secret, { alg: "HS256", typ: "JWT" }, claims()), /unknown key/, both);
    // once "a" is dropped, what it signed stops working
    await expectRefused(await mintConnectTicket(onlyA, { userId: "u", integration: "gmail", returnUrl }), /unknown key/, onlyB);
  });

  it("refuses a ticket that names one key and is signed with another", async () => {
    const lying = hmacJwt(onlyA.signing.secret, { alg: "HS256", typ: "JWT", kid: "b" }, claims());
    await expectRefused(lying, /signature does not verify/, both);
  });

  it("refuses a ticket signed under the same kid with another secret (forged)", async () => {
    const impostor = parseTicketKeys(generateTicketKey("k1"), "impostor");
    await expectRefused(await mintConnectTicket(impostor, { userId: "u", integration: "gmail", returnUrl }), /signature does not verify/);
  });
});

describe("parseTicketKeys, generateTicketKey, loadTicketKeys", () => {
  const secret32 = randomBytes(32).toString("base64url");

  it("reads entries separated by commas or newlines, with comments, blanks and padding", () => {
    const padded = Buffer.from(randomBytes(33)).toString("base64"); // may end in "="
    const urlSafePadded = padded.replace(/\+/g, "-").replace(/\//g, "_");
    const parsed = parseTicketKeys(`# rotation in progress\n new.2024:${secret32} \n\n old_1:${urlSafePadded},third-3:${secret32}\n`, "file");
    expect(parsed.all.map((k) => k.id)).toEqual(["new.2024", "old_1", "third-3"]);
    expect(parsed.signing.id).toBe("new.2024");
    expect(Buffer.from(parsed.signing.secret).toString("base64url")).toBe(secret32);
    expect(parsed.byId("old_1")?.secret.length).toBe(33);
    expect(parsed.byId("missing")).toBeUndefined();
  });

  it("takes a key of exactly 32 bytes", () => {
    expect(parseTicketKeys(`k:${randomBytes(32).toString("base64url")}`, "x").signing.secret.length).toBe(32);
  });

  it.each([
    ["a key shorter than 32 bytes", () => `short:${randomBytes(31).toString("base64url")}`, /"short" must be at least 32 bytes/],
    ["a tiny key", () => "tiny:AAAA", /at least 32 bytes/],
    ["no colon", () => randomBytes(32).toString("base64url"), /ID:BASE64URL/],
    ["an empty id", () => `:${randomBytes(32).toString("base64url")}`, /ID:BASE64URL/],
    ["an id with a space", () => `my key:${randomBytes(32).toString("base64url")}`, /ID:BASE64URL/],
    ["an id of 65 characters", () => `${"a".repeat(65)}:${randomBytes(32).toString("base64url")}`, /ID:BASE64URL/],
    ["standard base64 with + or /", () => `k:${"+/".repeat(22)}`, /ID:BASE64URL/],
    ["an empty secret", () => "k:", /ID:BASE64URL/],
    ["a second colon", () => `k:${randomBytes(32).toString("base64url")}:x`, /ID:BASE64URL/],
    ["a duplicate id", () => `dup:${randomBytes(32).toString("base64url")},dup:${randomBytes(32).toString("base64url")}`, /"dup" appears twice/],
    ["nothing", () => "", /no ticket key given/],
    ["only comments and blanks", () => "# nothing here\n\n , ", /no ticket key given/],
  ])("refuses %s", (_what, text, message) => {
    const value = text();
    let err: unknown;
    try {
      parseTicketKeys(value, "TOKENVAULT_TICKET_KEYS");
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(TicketKeyError);
    expect((err as Error).message).toMatch(/^TOKENVAULT_TICKET_KEYS: /);
    expect((err as Error).message).toMatch(message);
    // the message names the key, never its secret
    for (const entry of value.split(/[,\n]/)) {
      const secret = entry.split(":")[1];
      if (secret !== undefined && secret.length >= 8) expect((err as Error).message).not.toContain(secret);
    }
  });

  it("generates id:base64url entries of 32 random bytes that parse", () => {
    const one = generateTicketKey("prod-2025.01_a");
    const two = generateTicketKey("prod-2025.01_a");
    expect(one).toMatch(/^prod-2025\.01_a:[A-Za-z0-9_-]{43}$/);
    expect(one).not.toBe(two);
    expect(parseTicketKeys(one, "x").signing.secret.length).toBe(32);
  });

  it.each(["", "has space", "a/b", "é", "x".repeat(65)])("refuses to generate a key with id %j", (id) => {
    expect(() => generateTicketKey(id)).toThrow(TicketKeyError);
  });

  const dir = mkdtempSync(path.join(tmpdir(), "tv-tickets-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("loads keys from the environment, a file, or a development file it creates once", () => {
    expect(loadTicketKeys({ kind: "env", value: keyText }).signing.id).toBe("k1");
    const file = path.join(dir, "keys");
    writeFileSync(file, `# keys\n${keyText}\n`);
    expect(loadTicketKeys({ kind: "file", path: file }).signing.id).toBe("k1");
    expect(() => loadTicketKeys({ kind: "file", path: path.join(dir, "missing") })).toThrow(TicketKeyError);

    const dev = path.join(dir, "dev-ticket-key");
    const first = loadTicketKeys({ kind: "development", path: dev });
    expect(first.signing.id).toBe("dev");
    expect(statSync(dev).mode & 0o777).toBe(0o600);
    const again = loadTicketKeys({ kind: "development", path: dev });
    expect(Buffer.from(again.signing.secret).equals(Buffer.from(first.signing.secret))).toBe(true);
    expect(readFileSync(dev, "utf8")).toMatch(/^dev:[A-Za-z0-9_-]{43}\n$/);
  });
});

describe("verification refuses", () => {
  it("an expired ticket (past the 30 s tolerance)", async () => {
    const iat = nowSeconds() - 400;
    await expectRefused(ticketWith({ iat, exp: iat + 300 }), /expired/);
    const minted = await mintConnectTicket(keys, { userId: "u", integration: "gmail", returnUrl, ttlSeconds: 60, now: new Date(Date.now() - 120_000) });
    await expectRefused(minted, /expired/);
  });

  it("but accepts one that expired within the tolerance", async () => {
    const iat = nowSeconds() - 320;
    await expect(verifyConnectTicket(keys, ticketWith({ iat, exp: iat + 300 }))).resolves.toBeDefined();
  });

  it("a ticket living longer than 600 s, and takes one of exactly 600 s", async () => {
    expect(maxTicketLifetimeSeconds).toBe(600);
    const iat = nowSeconds();
    await expectRefused(ticketWith({ iat, exp: iat + 601 }), /lives longer than 600 seconds/);
    await expectRefused(ticketWith({ iat, exp: iat + 86_400 }), /lives longer than 600 seconds/);
    await expect(verifyConnectTicket(keys, ticketWith({ iat, exp: iat + 600 }))).resolves.toBeDefined();
  });

  it("a ticket issued in the future (past the tolerance)", async () => {
    const iat = nowSeconds() + 120;
    await expectRefused(ticketWith({ iat, exp: iat + 300 }), /issued in the future/);
    const soon = nowSeconds() + 20;
    await expect(verifyConnectTicket(keys, ticketWith({ iat: soon, exp: soon + 300 }))).resolves.toBeDefined();
  });

  it("a ticket for another audience, or none", async () => {
    await expectRefused(ticketWith({ aud: "some-other-service" }), /"aud" claim is not valid/);
    await expectRefused(ticketWith({ aud: undefined }), /"aud" claim is not valid/);
  });

  it.each(["sub", "exp", "iat", "jti"])("a ticket without %s", async (claim) => {
    await expectRefused(ticketWith({ [claim]: undefined }), new RegExp(`"${claim}" claim is not valid`));
  });

  it("an empty sub, a short jti, a missing or empty integration or return_url", async () => {
    await expectRefused(ticketWith({ sub: "" }), /"sub" claim must be a non-empty string/);
    // 16 random bytes are 22 base64url characters.
    await expectRefused(ticketWith({ jti: "a".repeat(21) }), /nonce \(jti\) is shorter than 16 random bytes/);
    await expectRefused(ticketWith({ integration: undefined }), /no "integration" claim/);
    await expectRefused(ticketWith({ integration: "" }), /no "integration" claim/);
    await expectRefused(ticketWith({ integration: ["gmail"] }), /no "integration" claim/);
    await expectRefused(ticketWith({ return_url: undefined }), /no "return_url" claim/);
    await expectRefused(ticketWith({ return_url: "" }), /no "return_url" claim/);
  });

  // The documented claims are strings: "sub":"<user id>", "jti":"<random nonce, at least 16 bytes>".
  // A non-string sub or jti is refused like a missing one (else a numeric jti would skip the length
  // check and a numeric sub would fail only at the callback, after consent).
  it("a sub or jti that is not a string", async () => {
    await expectRefused(ticketWith({ sub: 12345 }), /sub/);
    await expectRefused(ticketWith({ jti: 1234567890123456 }), /jti/);
    await expectRefused(ticketWith({ jti: ["a".repeat(22)] }), /jti/);
  });

  it("exp or iat that are not numbers", async () => {
    await expectRefused(ticketWith({ exp: String(nowSeconds() + 300) }), /"exp" claim is not valid/);
    await expectRefused(ticketWith({ iat: String(nowSeconds()) }), /"iat" claim is not valid/);
  });

  it('alg "none" (an unsigned ticket)', async () => {
    const unsigned = `${b64url({ alg: "none", typ: "JWT", kid: "k1" })}.${b64url(claims())}.`;
    await expectRefused(unsigned, /not a valid signed JWT/);
  });

  it("another HMAC algorithm (HS512) under the right key", async () => {
    const hs512 = await new SignJWT(claims()).setProtectedHeader({ alg: "HS512", typ: "JWT", kid: "k1" }).sign(keys.signing.secret);
    await expectRefused(hs512, /not a valid signed JWT/);
  });

  it("a tampered payload (another user) with the original signature", async () => {
    const ticket = await mintConnectTicket(keys, { userId: "attacker", integration: "gmail", returnUrl });
    const [header, payload, signature] = ticket.split(".") as [string, string, string];
    const changed = { ...JSON.parse(Buffer.from(payload, "base64url").toString("utf8")), sub: "victim" };
    await expectRefused(`${header}.${b64url(changed)}.${signature}`, /signature does not verify/);
    // a longer lifetime, or another return URL, the same
    const longer = { ...JSON.parse(Buffer.from(payload, "base64url").toString("utf8")), return_url: "https://evil.example/x" };
    await expectRefused(`${header}.${b64url(longer)}.${signature}`, /signature does not verify/);
  });

  it("a tampered signature, a truncated ticket, garbage", async () => {
    const ticket = await mintConnectTicket(keys, { userId: "u", integration: "gmail", returnUrl });
    const [header, payload, signature] = ticket.split(".") as [string, string, string];
    const flipped = `${signature.slice(0, 10)}${signature[10] === "A" ? "B" : "A"}${signature.slice(11)}`;
    await expectRefused(`${header}.${payload}.${flipped}`, /signature does not verify/);
    await expectRefused(`${header}.${payload}`, /not a valid signed JWT/);
    await expectRefused(`${header}.${payload}.`, /signature does not verify|not a valid signed JWT/);
    await expectRefused("not-a-jwt", /not a valid signed JWT/);
    await expectRefused("", /not a valid signed JWT/);
  });
});

describe("a ticket minted by hand, as another language's backend would", () => {
  it("with plain jose, following the documented header and claims, verifies", async () => {
    const iat = nowSeconds();
    const ticket = await new SignJWT({
      aud: "tokenvault-sidecar",
      sub: "user-from-jose",
      integration: "gmail",
      return_url: returnUrl,
      iat,
      exp: iat + 300,
      jti: randomBytes(16).toString("base64url"),
    })
      .setProtectedHeader({ alg: "HS256", typ: "JWT", kid: "k1" })
      .sign(keys.signing.secret);
    await expect(verifyConnectTicket(keys, ticket)).resolves.toEqual({
      userId: "user-from-jose",
      integration: "gmail",
      returnUrl,
      expiresAt: iat + 300,
      nonce: expect.any(String),
    });
  });

  it("with nothing but HMAC-SHA256 over the TOKENVAULT_TICKET_KEYS string (the README's Python recipe), verifies", async () => {
    // kid, b64 = os.environ["TOKENVAULT_TICKET_KEYS"].split(",")[0].split(":", 1)
    const env = `${generateTicketKey("backend-2025")},${generateTicketKey("older")}`;
    const [kid, b64] = env.split(",")[0]!.split(/:(.*)/s) as [string, string];
    // key = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    const key = Buffer.from(b64 + "=".repeat((4 - (b64.length % 4)) % 4), "base64url");
    const now = nowSeconds();
    // jwt.encode(...) puts typ and alg in the header; PyJWT orders them alg, typ, kid
    const ticket = hmacJwt(key, { alg: "HS256", typ: "JWT", kid }, {
      aud: "tokenvault-sidecar",
      sub: "user-from-python",
      integration: "outlook",
      return_url: returnUrl,
      iat: now,
      exp: now + 300,
      jti: randomBytes(16).toString("base64url"),
    });
    const sidecarKeys = parseTicketKeys(env, "TOKENVAULT_TICKET_KEYS");
    await expect(verifyConnectTicket(sidecarKeys, ticket)).resolves.toMatchObject({ userId: "user-from-python", integration: "outlook", returnUrl });
  });

  it("without typ in the header (some libraries leave it out), verifies", async () => {
    await expect(verifyConnectTicket(keys, hmacJwt(keys.signing.secret, { alg: "HS256", kid: "k1" }, claims()))).resolves.toBeDefined();
  });
});
