/**
 * Every RPC through a plain @grpc/grpc-js client loaded from the .proto, as
 * another language's generated client would call it: snake_case fields,
 * Duration and Timestamp as {seconds, nanos}, extras as a
 * google.protobuf.Struct {fields: {...}}. Errors are read the way such a
 * client reads them: the grpc status code, and the google.rpc.Status in the
 * `grpc-status-details-bin` trailer, decoded by hand.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import * as grpc from "@grpc/grpc-js";
import { fromBinary } from "@bufbuild/protobuf";
import { AnySchema, type Any } from "@bufbuild/protobuf/wkt";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { ErrorDetailSchema, ErrorReason } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { secretToken, testKeyRing } from "../helpers/secrets.js";
import { grpcJsClient, grpcJsService, startVault, type GrpcJsVault, type TestVault } from "../helpers/server.js";

let db: TestDatabase;
let vault: TestVault;
let client: GrpcJsVault;

beforeAll(async () => {
  db = await createTestDatabase();
  vault = await startVault({ pool: db.pool, keyRing: testKeyRing("k1") });
  client = grpcJsClient(vault.port, vault.secret);
});

afterAll(async () => {
  client?.close();
  await vault?.close();
  expect(vault.logs.leaks()).toEqual([]);
  await db?.drop();
});

/** A Timestamp or Duration as proto-loader hands it over (longs: String). */
interface WireTime {
  seconds: string;
  nanos: number;
}

/**
 * A google.protobuf.Value as proto-loader hands it over (oneofs: true adds
 * `kind`). proto-loader takes the well-known types from protobufjs' bundled
 * descriptors, whose field names are camelCase whatever keepCase says.
 */
interface WireValue {
  kind?: string;
  nullValue?: string;
  numberValue?: number;
  stringValue?: string;
  boolValue?: boolean;
  structValue?: WireStruct;
  listValue?: { values: WireValue[] };
}
interface WireStruct {
  fields: Record<string, WireValue>;
}

interface WireConnection {
  user_id: string;
  integration: string;
  scopes: string[];
  token_type: string;
  expires_at: WireTime | null;
  status: string;
  has_refresh_token: boolean;
  created_at: WireTime | null;
  updated_at: WireTime | null;
  last_used_at: WireTime | null;
  issued_at: WireTime | null;
  consent: { ip_address: string; user_agent: string } | null;
}

interface WireStoreResponse {
  connection: WireConnection;
  created: boolean;
}

interface WireGetResponse {
  access_token: string;
  token_type: string;
  expires_at: WireTime | null;
  scopes: string[];
  id_token?: string;
  extras: WireStruct | null;
  refreshed: boolean;
  connection: WireConnection;
}

function ms(t: WireTime | null | undefined): number {
  if (t === null || t === undefined) throw new Error("timestamp is unset");
  return Number(t.seconds) * 1000 + t.nanos / 1e6;
}

/** Turns a wire Struct back into plain JSON, the way any client library would. */
function structToJson(s: WireStruct): Record<string, unknown> {
  return Object.fromEntries(Object.entries(s.fields).map(([k, v]) => [k, valueToJson(v)]));
}
function valueToJson(v: WireValue): unknown {
  switch (v.kind) {
    case "nullValue":
      return null;
    case "numberValue":
      return v.numberValue;
    case "stringValue":
      return v.stringValue;
    case "boolValue":
      return v.boolValue;
    case "structValue":
      return structToJson(v.structValue!);
    case "listValue":
      return v.listValue!.values.map(valueToJson);
    default:
      throw new Error(`unexpected Value kind ${String(v.kind)}`);
  }
}

/**
 * Decodes a google.rpc.Status {int32 code = 1; string message = 2; repeated
 * google.protobuf.Any details = 3;} without a generated schema.
 */
function decodeRpcStatus(bytes: Uint8Array): { code: number; message: string; details: Any[] } {
  const reader = new BinaryReader(bytes);
  const status = { code: 0, message: "", details: [] as Any[] };
  while (reader.pos < reader.len) {
    const [fieldNo, wireType] = reader.tag();
    if (fieldNo === 1 && wireType === WireType.Varint) status.code = reader.int32();
    else if (fieldNo === 2 && wireType === WireType.LengthDelimited) status.message = reader.string();
    else if (fieldNo === 3 && wireType === WireType.LengthDelimited) status.details.push(fromBinary(AnySchema, reader.bytes()));
    else reader.skip(wireType);
  }
  return status;
}

/** The ErrorDetails of a grpc-js error, read from its grpc-status-details-bin trailer. */
function errorDetails(err: grpc.ServiceError) {
  const values = err.metadata.get("grpc-status-details-bin");
  expect(values).toHaveLength(1);
  expect(Buffer.isBuffer(values[0])).toBe(true);
  const status = decodeRpcStatus(values[0] as Buffer);
  expect(status.code).toBe(err.code);
  // grpc-js reads grpc-message with decodeURI, which leaves reserved
  // characters such as ',' percent-encoded; the Status in the trailer is exact.
  expect(status.message).toBe(decodeURIComponent(err.details));
  return status.details.map((any) => {
    expect(any.typeUrl).toMatch(/\/tokenvault\.v1\.ErrorDetail$/);
    return fromBinary(ErrorDetailSchema, any.value);
  });
}

async function failure(promise: Promise<unknown>): Promise<grpc.ServiceError> {
  const outcome = await promise.then(
    (res) => ({ ok: true as const, res }),
    (err: unknown) => ({ ok: false as const, err }),
  );
  if (outcome.ok) throw new Error(`expected the call to fail, got ${JSON.stringify(outcome.res)}`);
  return outcome.err as grpc.ServiceError;
}

/** A unary call that also hands back the response headers. */
function callWithHeaders<T>(method: string, request: Record<string, unknown>, metadata = new grpc.Metadata()) {
  return new Promise<{ res: T; headers: grpc.Metadata }>((resolve, reject) => {
    let headers = new grpc.Metadata();
    // client.raw bypasses the helper that adds the credential: send it as call metadata.
    if (metadata.get("authorization").length === 0) metadata.set("authorization", `Bearer ${vault.secret}`);
    const call = client.raw[method]!(request, metadata, (err: grpc.ServiceError | null, res: T) =>
      err ? reject(err) : resolve({ res, headers }),
    ) as grpc.ClientUnaryCall;
    call.on("metadata", (m: grpc.Metadata) => (headers = m));
  });
}

describe("TokenVaultService over grpc-js", () => {
  const user = "grpcjs-user";

  it("Store takes snake_case fields, expires_in as {seconds, nanos}, extras as a Struct", async () => {
    const before = Date.now();
    const res = await client.call<WireStoreResponse>("Store", {
      user_id: user,
      integration: "gmail",
      token_set: {
        access_token: secretToken("access"),
        refresh_token: secretToken("refresh"),
        scopes: ["https://mail.google.com/", "openid", "openid"],
        expires_in: { seconds: 59, nanos: 500_000_000 },
        extras: { fields: { tenant: { stringValue: "contoso" }, instance_url: { stringValue: "https://eu.example" } } },
      },
      metadata: { ip_address: "2001:db8::1", user_agent: "grpc-js test" },
    });
    const after = Date.now();
    expect(res.created).toBe(true);
    const c = res.connection;
    expect(c.user_id).toBe(user);
    expect(c.integration).toBe("gmail");
    expect(c.scopes).toEqual(["https://mail.google.com/", "openid"]);
    expect(c.token_type).toBe("Bearer");
    expect(c.status).toBe("CONNECTION_STATUS_ACTIVE");
    expect(c.has_refresh_token).toBe(true);
    expect(c.consent).toEqual({ ip_address: "2001:db8::1", user_agent: "grpc-js test" });
    expect(c.last_used_at).toBeNull();
    expect(ms(c.created_at)).toBeGreaterThanOrEqual(before - 1_000);
    expect(ms(c.created_at)).toBeLessThanOrEqual(after + 1_000);
    // 59.5 s after the vault received it: the nanos were read, not dropped.
    expect(ms(c.expires_at)).toBeGreaterThanOrEqual(before + 59_500);
    expect(ms(c.expires_at)).toBeLessThanOrEqual(after + 59_500);
    expect(JSON.stringify(res)).not.toContain("tvsecret");

    // It expires within the default min_valid_for (5 min): ask for less, so no refresh is due.
    const got = await client.call<WireGetResponse>("Get", { user_id: user, integration: "gmail", min_valid_for: { seconds: 30, nanos: 0 } });
    expect(structToJson(got.extras!)).toEqual({ tenant: "contoso", instance_url: "https://eu.example" });
    expect(got.expires_at).toEqual(c.expires_at);
    expect(got.connection.has_refresh_token).toBe(true);
  });

  it("Get returns what was stored: token, id token, expires_at {seconds, nanos}, every Struct value kind", async () => {
    const accessToken = secretToken("access");
    const idToken = secretToken("id");
    const expiresAtSeconds = Math.floor(Date.now() / 1000) + 7_200;
    const extras: WireStruct = {
      fields: {
        tenant: { stringValue: "contoso" },
        ext_expires_in: { numberValue: 3600.5 },
        ok: { boolValue: true },
        nothing: { nullValue: "NULL_VALUE" },
        nested: { structValue: { fields: { region: { stringValue: "eu" } } } },
        list: { listValue: { values: [{ numberValue: 1 }, { stringValue: "two" }] } },
      },
    };
    const stored = await client.call<WireStoreResponse>("Store", {
      user_id: user,
      integration: "outlook",
      token_set: {
        access_token: accessToken,
        token_type: "bearer",
        id_token: idToken,
        scopes: ["Mail.Read"],
        expires_at: { seconds: expiresAtSeconds, nanos: 250_000_000 },
        extras,
      },
    });
    expect(stored.connection.has_refresh_token).toBe(false);

    const got = await client.call<WireGetResponse>("Get", {
      user_id: user,
      integration: "outlook",
      min_valid_for: { seconds: 60, nanos: 0 },
      refresh: "REFRESH_MODE_NEVER",
    });
    expect(got.access_token).toBe(accessToken);
    expect(got.id_token).toBe(idToken);
    expect(got.token_type).toBe("bearer");
    expect(got.scopes).toEqual(["Mail.Read"]);
    expect(got.expires_at).toEqual({ seconds: String(expiresAtSeconds), nanos: 250_000_000 });
    expect(got.connection.expires_at).toEqual(got.expires_at);
    expect(got.refreshed).toBe(false);
    expect(got.connection.last_used_at).not.toBeNull();
    const expectedJson = {
      tenant: "contoso",
      ext_expires_in: 3600.5,
      ok: true,
      nothing: null,
      nested: { region: "eu" },
      list: [1, "two"],
    };
    expect(structToJson(got.extras!)).toEqual(expectedJson);
    // The Struct a foreign client wrote is the JSON a Connect client reads back.
    const viaConnect = await vault.grpcClient.get({ userId: user, integration: "outlook" });
    expect(viaConnect.extras).toEqual(expectedJson);
    expect(viaConnect.accessToken).toBe(accessToken);
  });

  it("Get of a token without id token or extras leaves them unset", async () => {
    const accessToken = secretToken();
    await client.call("Store", { user_id: user, integration: "github", token_set: { access_token: accessToken } });
    const got = await client.call<WireGetResponse>("Get", { user_id: user, integration: "github" });
    expect(got.access_token).toBe(accessToken);
    expect(got.id_token).toBeUndefined();
    expect(got.extras).toBeNull();
    expect(got.expires_at).toBeNull();
  });

  it("ListConnections lists metadata ordered by integration, never a secret", async () => {
    await client.call("Store", { user_id: user, integration: "hubspot", token_set: { access_token: secretToken(), refresh_token: secretToken("r") } });
    const res = await client.call<{ connections: WireConnection[] }>("ListConnections", { user_id: user });
    expect(res.connections.map((c) => c.integration)).toEqual(["github", "gmail", "hubspot", "outlook"]);
    expect(res.connections.every((c) => c.user_id === user && c.status === "CONNECTION_STATUS_ACTIVE")).toBe(true);
    // Every connection but hubspot was read by a Get.
    expect(res.connections.filter((c) => c.last_used_at === null).map((c) => c.integration)).toEqual(["hubspot"]);
    expect(res.connections.filter((c) => c.has_refresh_token).map((c) => c.integration)).toEqual(["gmail", "hubspot"]);
    expect(JSON.stringify(res)).not.toContain("tvsecret");
  });

  it("Remove says whether the connection existed", async () => {
    expect(await client.call("Remove", { user_id: user, integration: "github" })).toEqual({ existed: true, revocation: null });
    expect(await client.call("Remove", { user_id: user, integration: "github" })).toEqual({ existed: false, revocation: null });
    const row = await db.pool.query("select count(*)::int as n from connections where user_id = $1 and integration = 'github'", [user]);
    expect(row.rows[0].n).toBe(0);
  });

  it("ClearUser removes every connection of the user and says how many", async () => {
    await client.call("Store", { user_id: "grpcjs-bystander", integration: "gmail", token_set: { access_token: secretToken() } });
    expect(await client.call("ClearUser", { user_id: user })).toEqual({ removed_count: 3, revocations: [] });
    expect(await client.call("ListConnections", { user_id: user })).toEqual({ connections: [] });
    expect(await client.call("ClearUser", { user_id: user })).toEqual({ removed_count: 0, revocations: [] });
    const left = await client.call<{ connections: WireConnection[] }>("ListConnections", { user_id: "grpcjs-bystander" });
    expect(left.connections.map((c) => c.integration)).toEqual(["gmail"]);
  });
});

describe("errors as a grpc-js client sees them", () => {
  it("NOT_FOUND is status 5 with an ErrorDetail CONNECTION_NOT_FOUND in grpc-status-details-bin", async () => {
    const err = await failure(client.call("Get", { user_id: "grpcjs-nobody", integration: "gmail" }));
    expect(err.code).toBe(grpc.status.NOT_FOUND);
    expect(errorDetails(err)).toEqual([
      expect.objectContaining({ reason: ErrorReason.CONNECTION_NOT_FOUND, field: "" }),
    ]);
    expect(err.metadata.get("x-request-id")[0]).toMatch(/^[0-9a-f-]{36}$/);
  });

  it("INVALID_ARGUMENT is status 3 with an ErrorDetail naming the field", async () => {
    const err = await failure(
      client.call("Store", { user_id: "grpcjs-user", integration: "Gmail", token_set: { access_token: secretToken() } }),
    );
    expect(err.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(err.details.startsWith("integration ")).toBe(true);
    expect(errorDetails(err)).toEqual([
      expect.objectContaining({ reason: ErrorReason.INVALID_FIELD, field: "integration" }),
    ]);
  });

  it("a nested field is named by its path", async () => {
    const err = await failure(
      client.call("Store", {
        user_id: "grpcjs-user",
        integration: "gmail",
        token_set: { access_token: secretToken(), expires_at: { seconds: 1_700_000_000, nanos: 1_000_000_000 } },
      }),
    );
    expect(err.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(errorDetails(err)).toEqual([
      expect.objectContaining({ reason: ErrorReason.INVALID_FIELD, field: "token_set.expires_at" }),
    ]);
    const rows = await db.pool.query("select count(*)::int as n from connections where user_id = 'grpcjs-user'");
    expect(rows.rows[0].n).toBe(0);
  });

  it("an error echoes the caller's x-request-id in the trailers", async () => {
    const md = new grpc.Metadata();
    md.set("x-request-id", "grpcjs-err-1");
    const err = await failure(client.call("Get", { user_id: "grpcjs-nobody", integration: "gmail" }, md));
    expect(err.code).toBe(grpc.status.NOT_FOUND);
    expect(err.metadata.get("x-request-id")).toEqual(["grpcjs-err-1"]);
  });
});

describe("request ids over grpc-js", () => {
  it("a response carries the caller's x-request-id", async () => {
    const md = new grpc.Metadata();
    md.set("x-request-id", "grpcjs-req-42");
    const { res, headers } = await callWithHeaders<{ connections: unknown[] }>("ListConnections", { user_id: "rid" }, md);
    expect(res.connections).toEqual([]);
    expect(headers.get("x-request-id")).toEqual(["grpcjs-req-42"]);
  });

  it("a response without one gets a generated id", async () => {
    const { headers } = await callWithHeaders("ListConnections", { user_id: "rid" });
    expect(headers.get("x-request-id")).toEqual([expect.stringMatching(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/)]);
  });
});

describe("grpc.health.v1.Health over grpc-js", () => {
  let health: grpc.Client & Record<string, (...args: unknown[]) => unknown>;

  beforeAll(() => {
    const Health = grpcJsService("grpc/health/v1/health.proto", "grpc.health.v1.Health");
    health = new Health(`127.0.0.1:${vault.port}`, grpc.credentials.createInsecure()) as typeof health;
  });

  afterAll(() => health?.close());

  const check = (service: string) =>
    new Promise<{ status: string }>((resolve, reject) => {
      health["Check"]!({ service }, (err: grpc.ServiceError | null, res: { status: string }) => (err ? reject(err) : resolve(res)));
    });

  it.each(["", "tokenvault.v1.TokenVaultService"])("Check(%j) is SERVING", async (service) => {
    expect(await check(service)).toEqual({ status: "SERVING" });
  });

  it("Check of an unknown service is NOT_FOUND", async () => {
    const err = await failure(check("tokenvault.v1.NoSuchService"));
    expect(err.code).toBe(grpc.status.NOT_FOUND);
  });
});
