/**
 * Mutual TLS through the real server: certificates made with the openssl CLI
 * (a CA, a server certificate for 127.0.0.1/localhost, client certificates
 * from that CA, from another CA and an expired one), the vault started with
 * tls {certFile, keyFile, clientCaFile}, identities bound to callers with
 * bindCertificate, and real clients presenting them: Connect over gRPC
 * (HTTP/2) and over the Connect protocol (HTTP/1.1), and grpc-js createSsl.
 *
 * Proves: a verified certificate maps to its caller by SAN URI, else DNS name,
 * else CN, and the caller's policy applies; certificates that do not verify
 * end the connection whatever else the client sends; a verified certificate
 * bound to no caller is UNAUTHENTICATED; a bearer secret works without a
 * certificate, wins over one, and when presented must be valid.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import tls from "node:tls";
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import { TokenVaultService } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { bindCertificate, revoke } from "../../src/auth/caller-admin.js";
import { rpcNames } from "../../src/auth/policy.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { secretToken, testKeyRing } from "../helpers/secrets.js";
import { bearer, grpcJsClient, startVault, type TestVault } from "../helpers/server.js";

type VaultClient = Client<typeof TokenVaultService>;

const unauthenticatedMessage =
  "missing or invalid credentials: send 'authorization: Bearer <secret>' or a client certificate bound to a caller";

let dir: string;
let db: TestDatabase;
let vault: TestVault;
let ca: Buffer;
let httpsUrl: string;
/** Secrets of the bearer-only callers. */
let bearerB: string;

/** A client key and certificate, read from the temp dir. */
interface ClientCert {
  key: Buffer;
  cert: Buffer;
}
const certs: Record<string, ClientCert> = {};

function openssl(...args: string[]): void {
  execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
}

const ecKey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

/** A self-signed CA certificate and key, as `name`.crt / `name`.key. */
function makeCa(name: string): void {
  openssl(
    "req", "-x509", ...ecKey, "-keyout", `${name}.key`, "-out", `${name}.crt`, "-days", "2", "-subj", `/CN=TokenVault test ${name}`,
    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
  );
}

/** A key and CSR for `subject`. */
function makeRequest(name: string, subject: string): void {
  openssl("req", ...ecKey, "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", subject);
}

/** A client certificate signed by `issuer`, with `san` (or none), valid from now for two days. */
function makeClient(name: string, subject: string, san: string | undefined, issuer = "ca"): void {
  makeRequest(name, subject);
  writeFileSync(
    path.join(dir, `${name}.ext`),
    `basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n${san === undefined ? "" : `subjectAltName=${san}\n`}`,
  );
  openssl(
    "x509", "-req", "-in", `${name}.csr`, "-CA", `${issuer}.crt`, "-CAkey", `${issuer}.key`, "-set_serial", `0x${randomBytes(8).toString("hex")}`,
    "-out", `${name}.crt`, "-days", "2", "-extfile", `${name}.ext`,
  );
  certs[name] = { key: readFileSync(path.join(dir, `${name}.key`)), cert: readFileSync(path.join(dir, `${name}.crt`)) };
}

/**
 * A client certificate from the CA that expired in 2020. OpenSSL 3.0's
 * `x509 -req` cannot set a start date, `openssl ca` can (-startdate/-enddate).
 */
function makeExpiredClient(name: string, subject: string, san: string): void {
  makeRequest(name, subject);
  writeFileSync(
    path.join(dir, "ca.cnf"),
    [
      "[ca]", "default_ca = test_ca",
      "[test_ca]", "dir = .", "database = index.txt", "new_certs_dir = .", "serial = serial", "default_md = sha256",
      "policy = any", "copy_extensions = none", "x509_extensions = client_ext", "unique_subject = no",
      "[any]", "commonName = supplied",
      "[client_ext]", "basicConstraints = CA:FALSE", "keyUsage = critical,digitalSignature", "extendedKeyUsage = clientAuth", `subjectAltName = ${san}`,
      "",
    ].join("\n"),
  );
  writeFileSync(path.join(dir, "index.txt"), "");
  writeFileSync(path.join(dir, "serial"), "1000\n");
  openssl(
    "ca", "-config", "ca.cnf", "-batch", "-notext", "-in", `${name}.csr`, "-out", `${name}.crt`, "-cert", "ca.crt", "-keyfile", "ca.key",
    "-startdate", "20200101000000Z", "-enddate", "20200102000000Z",
  );
  certs[name] = { key: readFileSync(path.join(dir, `${name}.key`)), cert: readFileSync(path.join(dir, `${name}.crt`)) };
}

const billingId = "spiffe://example.org/billing";

beforeAll(async () => {
  dir = mkdtempSync(path.join(tmpdir(), "tokenvault-mtls-"));
  makeCa("ca");
  makeCa("other-ca");
  makeRequest("server", "/CN=localhost");
  writeFileSync(
    path.join(dir, "server.ext"),
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
  );
  openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext");
  // Its CN is bound to another caller: the SAN URI must win.
  makeClient("billing", "/CN=billing-cn", `URI:${billingId}`);
  // Only a CN.
  makeClient("legacy", "/CN=legacy-batch.internal", undefined);
  // A DNS name, and a CN bound to another caller: the DNS name must win.
  makeClient("worker", "/CN=worker-cn", "DNS:worker.example.org");
  // Verifies, but no caller is bound to it.
  makeClient("unbound", "/CN=unbound-cn", "URI:spiffe://example.org/nobody");
  // Claims billing's identity, from a CA the server does not trust.
  makeClient("impostor", "/CN=billing-cn", `URI:${billingId}`, "other-ca");
  // Bound to a caller with every permission, but expired.
  makeExpiredClient("expired", "/CN=expired-cn", "URI:spiffe://example.org/expired");
  // Bound to a caller that gets revoked.
  makeClient("revokable", "/CN=revokable-cn", "URI:spiffe://example.org/revokable");
  ca = readFileSync(path.join(dir, "ca.crt"));

  db = await createTestDatabase();
  vault = await startVault({
    pool: db.pool,
    keyRing: testKeyRing("k1"),
    tls: { certFile: path.join(dir, "server.crt"), keyFile: path.join(dir, "server.key"), clientCaFile: path.join(dir, "ca.crt") },
  });
  httpsUrl = `https://127.0.0.1:${vault.port}`;

  const bind = async (name: string, spec: Parameters<TestVault["addCaller"]>[1], identity: string) => {
    await vault.addCaller(name, spec);
    await bindCertificate(db.pool, name, identity);
  };
  await bind("billing", { allow: ["Get", "ListConnections"], integrations: ["gmail"] }, billingId);
  await bind("billing-cn-decoy", { allow: rpcNames, integrations: ["*"] }, "billing-cn");
  await bind("legacy", { allow: ["Store", "ListConnections"], integrations: ["*"] }, "legacy-batch.internal");
  await bind("worker", { allow: ["ListConnections"], integrations: ["outlook"] }, "worker.example.org");
  await bind("worker-cn-decoy", { allow: rpcNames, integrations: ["*"] }, "worker-cn");
  await bind("expired-svc", { allow: rpcNames, integrations: ["*"] }, "spiffe://example.org/expired");
  await bind("revokable", { allow: ["ListConnections"], integrations: ["*"] }, "spiffe://example.org/revokable");
  bearerB = (await vault.addCaller("bearer-b", { allow: ["Store", "ListConnections"], integrations: ["outlook"] })).secret;
  await vault.callers.reload();

  const admin = adminClient();
  for (const integration of ["gmail", "outlook"]) {
    await admin.store({ userId: "alice", integration, tokenSet: { accessToken: secretToken(integration) } });
  }
});

afterAll(async () => {
  await vault?.close();
  expect(vault.logs.leaks([bearerB])).toEqual([]);
  await db?.drop();
  if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
});

/** A TLS client with no certificate, sending the admin secret. */
function adminClient(): VaultClient {
  return createClient(TokenVaultService, createGrpcTransport({ baseUrl: httpsUrl, nodeOptions: { ca }, interceptors: [bearer(vault.secret)] }));
}

/** Connect clients presenting client certificate `name` (or none), with optional extra interceptors. */
function clientsFor(name: string | undefined, interceptors: Interceptor[] = []) {
  const nodeOptions = name === undefined ? { ca } : { ca, cert: certs[name]!.cert, key: certs[name]!.key };
  return {
    grpc: createClient(TokenVaultService, createGrpcTransport({ baseUrl: httpsUrl, nodeOptions, interceptors })),
    connect: createClient(TokenVaultService, createConnectTransport({ baseUrl: httpsUrl, httpVersion: "1.1", nodeOptions, interceptors })),
  };
}

/** Sends `x-request-id: id` on every call. */
const withRequestId = (id: string): Interceptor => (next) => (req) => {
  req.header.set("x-request-id", id);
  return next(req);
};

/** The caller named in the log line of the call with `requestId` (undefined when none). */
function loggedCaller(requestId: string): unknown {
  const lines = vault.logs.lines.filter((l) => l.includes(`"requestId":"${requestId}"`) && l.includes('"msg":"call'));
  expect(lines, `log lines of ${requestId}`).toHaveLength(1);
  return (JSON.parse(lines[0]!) as { caller?: unknown }).caller;
}

/** Every connections row. */
async function snapshot(): Promise<Record<string, unknown>[]> {
  return (await db.pool.query("select * from connections order by id")).rows;
}

/** Resolves to undefined on success, else to the ConnectError. */
function failure(promise: Promise<unknown>): Promise<ConnectError | undefined> {
  return promise.then(
    () => undefined,
    (e: unknown) => ConnectError.from(e),
  );
}

/** Expects PERMISSION_DENIED or UNAUTHENTICATED with `message`, and the table unchanged. */
async function expectDenied(call: () => Promise<unknown>, code: Code, message: string): Promise<void> {
  const before = await snapshot();
  const err = await failure(call());
  expect(err, "the call succeeded").toBeInstanceOf(ConnectError);
  expect(Code[err!.code]).toBe(Code[code]);
  expect(err!.rawMessage).toBe(message);
  expect(await snapshot()).toEqual(before);
}

/** A grpc-js unary call with `metadata`, through credentials presenting client certificate `name`. */
async function grpcJsCall<T>(name: string, method: string, request: Record<string, unknown>, metadata = new grpc.Metadata()): Promise<T> {
  const client = grpcJsClient(vault.port, undefined, grpc.credentials.createSsl(ca, certs[name]!.key, certs[name]!.cert));
  try {
    return await new Promise<T>((resolve, reject) => {
      client.raw[method]!(request, metadata, { deadline: Date.now() + 5_000 }, (err: grpc.ServiceError | null, res: T) => (err ? reject(err) : resolve(res)));
    });
  } finally {
    client.close();
  }
}

describe("a certificate with a SAN URI (SPIFFE id)", () => {
  it.each(["grpc", "connect"] as const)("maps to its caller over %s, and the log line names it (not the CN's caller)", async (kind) => {
    const requestId = `mtls-billing-${kind}-${randomBytes(4).toString("hex")}`;
    const client = clientsFor("billing", [withRequestId(requestId)])[kind];
    const res = await client.listConnections({ userId: "alice" });
    // billing's policy: gmail only.
    expect(res.connections.map((c) => c.integration)).toEqual(["gmail"]);
    expect(loggedCaller(requestId)).toBe("billing");
  });

  it("maps to its caller over grpc-js createSsl(ca, key, cert)", async () => {
    const res = await grpcJsCall<{ connections: { integration: string }[] }>("billing", "ListConnections", { user_id: "alice" });
    expect(res.connections.map((c) => c.integration)).toEqual(["gmail"]);
  });

  it("is subject to its caller's policy: Get gmail is allowed", async () => {
    const got = await clientsFor("billing").grpc.get({ userId: "alice", integration: "gmail" });
    expect(got.accessToken).toContain("tvsecret-gmail-");
  });

  it("is subject to its caller's policy: another integration or another RPC is PERMISSION_DENIED, nothing changes", async () => {
    const { grpc: client } = clientsFor("billing");
    await expectDenied(() => client.get({ userId: "alice", integration: "outlook" }), Code.PermissionDenied, `caller "billing" may not access integration "outlook"`);
    await expectDenied(
      () => client.store({ userId: "alice", integration: "gmail", tokenSet: { accessToken: secretToken() } }),
      Code.PermissionDenied,
      `caller "billing" may not call Store`,
    );
    await expectDenied(() => client.clearUser({ userId: "alice" }), Code.PermissionDenied, `caller "billing" may not call ClearUser`);
  });

  it("grpc-js sees the same PERMISSION_DENIED", async () => {
    const err = await grpcJsCall("billing", "Get", { user_id: "alice", integration: "outlook" }).then(
      () => undefined,
      (e: grpc.ServiceError) => e,
    );
    expect(err?.code).toBe(grpc.status.PERMISSION_DENIED);
  });
});

describe("a certificate without a SAN URI", () => {
  it("a DNS name maps to its caller (not the CN's)", async () => {
    const requestId = `mtls-worker-${randomBytes(4).toString("hex")}`;
    const res = await clientsFor("worker", [withRequestId(requestId)]).grpc.listConnections({ userId: "alice" });
    expect(res.connections.map((c) => c.integration)).toEqual(["outlook"]);
    expect(loggedCaller(requestId)).toBe("worker");
  });

  it("a CN-only certificate maps via its CN, over Connect gRPC, Connect HTTP/1.1 and grpc-js", async () => {
    const requestId = `mtls-legacy-${randomBytes(4).toString("hex")}`;
    const { grpc: viaGrpc, connect: viaConnect } = clientsFor("legacy", [withRequestId(requestId)]);
    expect((await viaGrpc.listConnections({ userId: "alice" })).connections.map((c) => c.integration)).toEqual(["gmail", "outlook"]);
    expect(loggedCaller(requestId)).toBe("legacy");
    expect((await viaConnect.store({ userId: "legacy-user", integration: "gmail", tokenSet: { accessToken: secretToken() } })).created).toBe(true);
    const listed = await grpcJsCall<{ connections: unknown[] }>("legacy", "ListConnections", { user_id: "legacy-user" });
    expect(listed.connections).toHaveLength(1);
    // legacy may not Get.
    await expectDenied(() => viaGrpc.get({ userId: "alice", integration: "gmail" }), Code.PermissionDenied, `caller "legacy" may not call Get`);
  });
});

describe("certificates that do not verify end the connection", () => {
  /**
   * A raw TLS connection presenting certificate `name` that sends, as soon as
   * the handshake completes, a complete and valid HTTP/1.1 Store from the admin
   * (so only the certificate can make it fail): what the server did.
   */
  function rawStore(name: string, userId: string) {
    return new Promise<{ handshake: boolean; reply: string; closed: boolean }>((resolve) => {
      let handshake = false;
      let reply = "";
      const body = JSON.stringify({ userId, integration: "gmail", tokenSet: { accessToken: secretToken("raw") } });
      const socket = tls.connect({ host: "127.0.0.1", port: vault.port, ca, cert: certs[name]!.cert, key: certs[name]!.key, ALPNProtocols: ["http/1.1"] }, () => {
        handshake = true;
        socket.write(
          `POST /tokenvault.v1.TokenVaultService/Store HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n` +
            `authorization: Bearer ${vault.secret}\r\nconnection: close\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
        );
      });
      const timer = setTimeout(() => {
        socket.destroy();
        resolve({ handshake, reply, closed: false });
      }, 5_000);
      socket.on("data", (c: Buffer) => (reply += c.toString("latin1")));
      socket.on("error", () => {});
      socket.on("close", () => {
        clearTimeout(timer);
        resolve({ handshake, reply, closed: true });
      });
    });
  }

  /** How many connections `userId` has. */
  const rowsOf = async (userId: string) =>
    (await db.pool.query<{ n: number }>("select count(*)::int as n from connections where user_id = $1", [userId])).rows[0]!.n;

  it("the harness can tell: with a valid certificate the same raw request is answered and writes its row", async () => {
    const res = await rawStore("unbound", "raw-valid-cert");
    expect(res.reply).toMatch(/^HTTP\/1\.1 200 /);
    expect(await rowsOf("raw-valid-cert")).toBe(1);
  });

  it.each([
    { name: "a certificate from another CA (claiming billing's identity)", cert: "impostor", reason: "UNABLE_TO_VERIFY_LEAF_SIGNATURE" },
    { name: "an expired certificate from the CA", cert: "expired", reason: "CERT_HAS_EXPIRED" },
  ])("$name: closed right after the handshake, nothing answered, the refusal logged", async ({ cert, reason }) => {
    const logged = vault.logs.lines.length;
    const res = await rawStore(cert, `raw-${cert}`);
    expect(res.handshake, "the TLS handshake itself completed (the refusal comes after it)").toBe(true);
    expect(res.closed, "the server kept the connection open").toBe(true);
    expect(res.reply, "the server answered").toBe("");
    // Let a request that wrongly got through finish before looking for its traces.
    await new Promise((r) => setTimeout(r, 500));
    const newLines = vault.logs.lines.slice(logged).map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(newLines.filter((l) => l["msg"] === "client certificate refused").map((l) => l["reason"])).toEqual([reason]);
    // The request that came with the handshake was not executed: no row, no call.
    expect(await rowsOf(`raw-${cert}`), "a request on a refused connection was executed").toBe(0);
    expect(newLines.filter((l) => l["msg"] === "call")).toEqual([]);
  });

  it.each([
    { name: "a certificate from another CA", cert: "impostor" },
    { name: "an expired certificate", cert: "expired" },
  ])("$name: Connect calls fail at once, even with a valid bearer secret", async ({ cert }) => {
    const before = await snapshot();
    for (const [kind, client] of Object.entries(clientsFor(cert, [bearer(vault.secret)]))) {
      const err = await failure(
        client.store({ userId: `connect-${kind}-${cert}`, integration: "gmail", tokenSet: { accessToken: secretToken() } }, { timeoutMs: 5_000 }),
      );
      expect(err, "a call with a bad certificate succeeded").toBeInstanceOf(ConnectError);
      // Refused by the connection, not by the interceptor, and not left to time out.
      expect(Code[err!.code]).not.toBe(Code[Code.DeadlineExceeded]);
      expect(Code[err!.code]).not.toBe(Code[Code.Unauthenticated]);
      expect(Code[err!.code]).not.toBe(Code[Code.PermissionDenied]);
    }
    await new Promise((r) => setTimeout(r, 300));
    expect(await snapshot()).toEqual(before);
  });

  it.each([
    { name: "a certificate from another CA", cert: "impostor" },
    { name: "an expired certificate", cert: "expired" },
  ])("$name: grpc-js fails with UNAVAILABLE", async ({ cert }) => {
    const md = new grpc.Metadata();
    md.set("authorization", `Bearer ${vault.secret}`);
    const err = await grpcJsCall(cert, "ListConnections", { user_id: "alice" }, md).then(
      () => undefined,
      (e: grpc.ServiceError) => e,
    );
    expect(err, "a call with a bad certificate succeeded").toBeDefined();
    expect(err!.code).toBe(grpc.status.UNAVAILABLE);
  });
});

describe("credentials that prove no caller", () => {
  it("a valid certificate bound to no caller is UNAUTHENTICATED, nothing read", async () => {
    for (const client of Object.values(clientsFor("unbound"))) {
      await expectDenied(() => client.get({ userId: "alice", integration: "gmail" }), Code.Unauthenticated, unauthenticatedMessage);
    }
    const err = await grpcJsCall("unbound", "ListConnections", { user_id: "alice" }).then(
      () => undefined,
      (e: grpc.ServiceError) => e,
    );
    expect(err?.code).toBe(grpc.status.UNAUTHENTICATED);
  });

  it("a TLS client with neither certificate nor secret is UNAUTHENTICATED", async () => {
    await expectDenied(() => clientsFor(undefined).grpc.get({ userId: "alice", integration: "gmail" }), Code.Unauthenticated, unauthenticatedMessage);
  });

  it("a revoked caller's certificate stops working", async () => {
    const { grpc: client } = clientsFor("revokable");
    expect((await client.listConnections({ userId: "alice" })).connections).toHaveLength(2);
    await revoke(db.pool, "revokable");
    await vault.callers.reload();
    await expectDenied(() => client.listConnections({ userId: "alice" }), Code.Unauthenticated, unauthenticatedMessage);
  });
});

describe("bearer secrets over mutual TLS", () => {
  it("a TLS client without a certificate but with a bearer secret works", async () => {
    const requestId = `mtls-nocert-${randomBytes(4).toString("hex")}`;
    const { grpc: client } = clientsFor(undefined, [bearer(bearerB), withRequestId(requestId)]);
    expect((await client.listConnections({ userId: "alice" })).connections.map((c) => c.integration)).toEqual(["outlook"]);
    expect(loggedCaller(requestId)).toBe("bearer-b");
  });

  // Documented behaviour (README, interceptor.ts): a presented secret is
  // always checked and wins over a certificate. So a client holding caller
  // A's certificate and caller B's secret acts as B, with B's policy only.
  it("a certificate bound to caller A plus caller B's secret acts as B (the bearer wins)", async () => {
    const requestId = `mtls-both-${randomBytes(4).toString("hex")}`;
    const { grpc: client } = clientsFor("billing", [bearer(bearerB), withRequestId(requestId)]);
    // B's policy: ListConnections on outlook (billing would see gmail).
    expect((await client.listConnections({ userId: "alice" })).connections.map((c) => c.integration)).toEqual(["outlook"]);
    expect(loggedCaller(requestId)).toBe("bearer-b");
    // billing may Get gmail; B may not.
    await expectDenied(() => client.get({ userId: "alice", integration: "gmail" }), Code.PermissionDenied, `caller "bearer-b" may not call Get`);
    // B may Store on outlook; billing may not.
    expect((await client.store({ userId: "bearer-b-user", integration: "outlook", tokenSet: { accessToken: secretToken() } })).created).toBe(true);
  });

  it("the same over grpc-js: certificate of A, metadata secret of B, acts as B", async () => {
    const md = new grpc.Metadata();
    md.set("authorization", `Bearer ${bearerB}`);
    const res = await grpcJsCall<{ connections: { integration: string }[] }>("billing", "ListConnections", { user_id: "alice" }, md);
    expect(res.connections.map((c) => c.integration)).toEqual(["outlook"]);
  });

  it.each([
    { name: "a wrong secret (right format, wrong bytes)", header: () => `Bearer ${vault.secret.slice(0, -43)}${randomBytes(32).toString("base64url")}` },
    { name: "a secret of a caller id that does not exist", header: () => `Bearer tvs_987654321_${randomBytes(32).toString("base64url")}` },
    { name: "a valid secret followed by more text", header: () => `Bearer ${bearerB} trailing` },
    { name: "'Bearer' with no secret", header: () => "Bearer" },
  ])("$name with a valid certificate is UNAUTHENTICATED: a presented secret must be valid", async ({ header }) => {
    const setHeader: Interceptor = (next) => (req) => {
      req.header.set("authorization", header());
      return next(req);
    };
    for (const client of Object.values(clientsFor("billing", [setHeader]))) {
      await expectDenied(() => client.get({ userId: "alice", integration: "gmail" }), Code.Unauthenticated, unauthenticatedMessage);
    }
  });

  it("the same certificate without any authorization header is let in (the cases above fail only for the secret)", async () => {
    const got = await clientsFor("billing").grpc.get({ userId: "alice", integration: "gmail" });
    expect(got.accessToken).toContain("tvsecret-gmail-");
  });
});
