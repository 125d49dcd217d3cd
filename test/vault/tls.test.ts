/**
 * The vault over TLS: a CA and a server certificate for 127.0.0.1/localhost
 * made with the openssl CLI, the real server started with tls {certFile,
 * keyFile}, and every kind of client a deployment sees: Connect over gRPC
 * (HTTP/2, ALPN h2), Connect and gRPC-Web over HTTP/1.1, and grpc-js with
 * createSsl. A cleartext client to the TLS port, and a client that trusts
 * another CA, are refused. Every client sends the admin caller's secret, so a
 * refusal is the transport's, not the interceptor's (mutual TLS is
 * test/auth/mtls.test.ts).
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import tls from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import { TokenVaultService } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { secretToken, testKeyRing } from "../helpers/secrets.js";
import { bearer, grpcJsClient, startVault, type TestVault } from "../helpers/server.js";

let dir: string;
let db: TestDatabase;
let vault: TestVault;
let ca: Buffer;
let otherCa: Buffer;
let httpsUrl: string;

function openssl(...args: string[]): void {
  execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
}

/** A self-signed CA certificate and key, as `name`.crt / `name`.key. */
function makeCa(name: string): void {
  openssl(
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
    "-keyout", `${name}.key`, "-out", `${name}.crt`, "-days", "2", "-subj", `/CN=TokenVault test ${name}`,
    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
  );
}

beforeAll(async () => {
  dir = mkdtempSync(path.join(tmpdir(), "tokenvault-tls-"));
  makeCa("ca");
  makeCa("other-ca");
  openssl(
    "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
    "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
  );
  writeFileSync(
    path.join(dir, "server.ext"),
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
  );
  openssl(
    "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
    "-out", "server.crt", "-days", "2", "-extfile", "server.ext",
  );
  ca = readFileSync(path.join(dir, "ca.crt"));
  otherCa = readFileSync(path.join(dir, "other-ca.crt"));

  db = await createTestDatabase();
  vault = await startVault({
    pool: db.pool,
    keyRing: testKeyRing("k1"),
    tls: { certFile: path.join(dir, "server.crt"), keyFile: path.join(dir, "server.key") },
  });
  httpsUrl = `https://127.0.0.1:${vault.port}`;
});

afterAll(async () => {
  await vault?.close();
  expect(vault.logs.leaks()).toEqual([]);
  await db?.drop();
  if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
});

/** Stores a fresh token through `client` and reads it back. */
async function roundTrip(client: Client<typeof TokenVaultService>, userId: string): Promise<void> {
  const accessToken = secretToken("tls");
  const stored = await client.store({ userId, integration: "gmail", tokenSet: { accessToken, scopes: ["openid"] } });
  expect(stored.created).toBe(true);
  const got = await client.get({ userId, integration: "gmail" });
  expect(got.accessToken).toBe(accessToken);
  expect(got.scopes).toEqual(["openid"]);
}

/** Call metadata carrying the admin secret, as another language's client sends it. */
function withSecret(): grpc.Metadata {
  const md = new grpc.Metadata();
  md.set("authorization", `Bearer ${vault.secret}`);
  return md;
}

/** What a raw TLS handshake offering `alpn` negotiates with the server. */
function handshake(alpn: string[]) {
  return new Promise<{ protocol: string | false | null; subjectaltname: string | undefined; authorized: boolean }>((resolve, reject) => {
    const socket = tls.connect({ host: "127.0.0.1", port: vault.port, ca, ALPNProtocols: alpn }, () => {
      const result = { protocol: socket.alpnProtocol, subjectaltname: socket.getPeerCertificate().subjectaltname, authorized: socket.authorized };
      socket.end();
      resolve(result);
    });
    socket.on("error", reject);
  });
}

describe("the certificate and ALPN", () => {
  it("the server presents the certificate made for 127.0.0.1 and localhost, trusted through the CA", async () => {
    const res = await handshake(["h2", "http/1.1"]);
    expect(res.authorized).toBe(true);
    expect(res.subjectaltname).toContain("IP Address:127.0.0.1");
    expect(res.subjectaltname).toContain("DNS:localhost");
  });

  it("negotiates h2 for HTTP/2 clients and http/1.1 for HTTP/1.1 clients", async () => {
    expect((await handshake(["h2", "http/1.1"])).protocol).toBe("h2");
    expect((await handshake(["http/1.1"])).protocol).toBe("http/1.1");
  });
});

describe("clients over TLS", () => {
  it("a Connect client over gRPC (HTTP/2) stores and gets a token", async () => {
    const client = createClient(TokenVaultService, createGrpcTransport({ baseUrl: httpsUrl, nodeOptions: { ca }, interceptors: [bearer(vault.secret)] }));
    await roundTrip(client, "tls-grpc-user");
  });

  it("a Connect client over the Connect protocol on HTTP/1.1 stores and gets a token", async () => {
    const client = createClient(TokenVaultService, createConnectTransport({ baseUrl: httpsUrl, httpVersion: "1.1", nodeOptions: { ca }, interceptors: [bearer(vault.secret)] }));
    await roundTrip(client, "tls-connect-user");
  });

  it("a Connect client over the Connect protocol on HTTP/2 stores and gets a token", async () => {
    const client = createClient(TokenVaultService, createConnectTransport({ baseUrl: httpsUrl, httpVersion: "2", nodeOptions: { ca }, interceptors: [bearer(vault.secret)] }));
    await roundTrip(client, "tls-connect-h2-user");
  });

  it("a gRPC-Web client on HTTP/1.1 stores and gets a token", async () => {
    const client = createClient(TokenVaultService, createGrpcWebTransport({ baseUrl: httpsUrl, httpVersion: "1.1", nodeOptions: { ca }, interceptors: [bearer(vault.secret)] }));
    await roundTrip(client, "tls-grpcweb-user");
  });

  it("a grpc-js client with createSsl(ca) stores, gets and lists", async () => {
    const client = grpcJsClient(vault.port, vault.secret, grpc.credentials.createSsl(ca));
    try {
      const accessToken = secretToken("tls-grpcjs");
      const stored = await client.call<{ created: boolean }>("Store", {
        user_id: "tls-grpcjs-user",
        integration: "outlook",
        token_set: { access_token: accessToken, expires_in: { seconds: 3600, nanos: 0 } },
      });
      expect(stored.created).toBe(true);
      const got = await client.call<{ access_token: string }>("Get", { user_id: "tls-grpcjs-user", integration: "outlook" });
      expect(got.access_token).toBe(accessToken);
      const listed = await client.call<{ connections: { integration: string }[] }>("ListConnections", { user_id: "tls-grpcjs-user" });
      expect(listed.connections.map((c) => c.integration)).toEqual(["outlook"]);
    } finally {
      client.close();
    }
  });

  it("a grpc-js client reaching the server as localhost verifies the DNS name", async () => {
    const client = grpcJsClient(vault.port, vault.secret, grpc.credentials.createSsl(ca), "localhost");
    try {
      const listed = await client.call<{ connections: unknown[] }>("ListConnections", { user_id: "tls-grpcjs-user" });
      expect(listed.connections).toHaveLength(1);
    } finally {
      client.close();
    }
  });
});

describe("refused", () => {
  it("a cleartext h2c client to the TLS port fails, and the server keeps serving TLS", async () => {
    const h2c = createClient(TokenVaultService, createGrpcTransport({ baseUrl: `http://127.0.0.1:${vault.port}`, interceptors: [bearer(vault.secret)] }));
    const err = await h2c.listConnections({ userId: "tls-grpc-user" }, { timeoutMs: 5_000 }).then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    expect(err, "a cleartext call succeeded on the TLS port").toBeInstanceOf(ConnectError);
    // Refused at once: the TLS server drops a connection that does not start
    // with a ClientHello, so the call does not run into its deadline.
    // (connect-node reports the session the server closed as CANCELED.)
    expect(Code[err!.code]).not.toBe(Code[Code.DeadlineExceeded]);
    const client = createClient(TokenVaultService, createGrpcTransport({ baseUrl: httpsUrl, nodeOptions: { ca }, interceptors: [bearer(vault.secret)] }));
    expect((await client.listConnections({ userId: "tls-grpc-user" })).connections).toHaveLength(1);
  });

  it("a cleartext HTTP/1.1 Connect client to the TLS port fails", async () => {
    const h1 = createClient(TokenVaultService, createConnectTransport({ baseUrl: `http://127.0.0.1:${vault.port}`, httpVersion: "1.1", interceptors: [bearer(vault.secret)] }));
    const err = await h1.listConnections({ userId: "tls-grpc-user" }, { timeoutMs: 5_000 }).then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    expect(err, "a cleartext call succeeded on the TLS port").toBeInstanceOf(ConnectError);
    expect(Code[err!.code]).not.toBe(Code[Code.DeadlineExceeded]);
  });

  it("a cleartext grpc-js client to the TLS port fails with UNAVAILABLE", async () => {
    const client = grpcJsClient(vault.port, vault.secret);
    try {
      const md = withSecret();
      const err = await new Promise<grpc.ServiceError | undefined>((resolve) => {
        client.raw["ListConnections"]!({ user_id: "tls-grpc-user" }, md, { deadline: Date.now() + 5_000 }, (e: grpc.ServiceError | null) =>
          resolve(e ?? undefined),
        );
      });
      expect(err, "a cleartext call succeeded on the TLS port").toBeDefined();
      expect(err!.code).toBe(grpc.status.UNAVAILABLE);
    } finally {
      client.close();
    }
  });

  it("a client that trusts another CA is refused, so the certificate really is checked", async () => {
    const client = createClient(TokenVaultService, createGrpcTransport({ baseUrl: httpsUrl, nodeOptions: { ca: otherCa }, interceptors: [bearer(vault.secret)] }));
    const err = await client.listConnections({ userId: "tls-grpc-user" }, { timeoutMs: 5_000 }).then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    expect(err, "a client trusting another CA got an answer").toBeInstanceOf(ConnectError);
    expect(err!.rawMessage).toMatch(/unable to verify the first certificate/);
  });

  it("a grpc-js client that trusts another CA is refused", async () => {
    const client = grpcJsClient(vault.port, vault.secret, grpc.credentials.createSsl(otherCa));
    try {
      const err = await new Promise<grpc.ServiceError | undefined>((resolve) => {
        client.raw["ListConnections"]!({ user_id: "tls-grpc-user" }, withSecret(), { deadline: Date.now() + 5_000 }, (e: grpc.ServiceError | null) =>
          resolve(e ?? undefined),
        );
      });
      expect(err, "a client trusting another CA got an answer").toBeDefined();
      expect(err!.code).toBe(grpc.status.UNAVAILABLE);
    } finally {
      client.close();
    }
  });
});
