// End-to-end tests of src/vault/reflection.ts against a real HTTP/2 server,
// with the clients people actually point at it: a Connect client, grpc-js,
// and `buf curl` (which resolves the whole schema through reflection).

import { execFile, spawnSync } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { promisify } from "node:util";

import { create, createFileRegistry, equals, fromBinary } from "@bufbuild/protobuf";
import type { DescService, MessageInitShape } from "@bufbuild/protobuf";
import {
  FieldDescriptorProto_Label,
  FieldDescriptorProto_Type,
  FileDescriptorProtoSchema,
  FileDescriptorSetSchema,
  timestampFromDate,
} from "@bufbuild/protobuf/wkt";
import type { FileDescriptorProto } from "@bufbuild/protobuf/wkt";
import { createClient } from "@connectrpc/connect";
import type { ConnectRouter } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { Health } from "../../src/gen/grpc/health/v1/health_pb.js";
import {
  ServerReflection,
  ServerReflectionRequestSchema,
} from "../../src/gen/grpc/reflection/v1/reflection_pb.js";
import type { ServerReflectionResponse } from "../../src/gen/grpc/reflection/v1/reflection_pb.js";
import { TokenVaultService } from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { createHealthService } from "../../src/vault/health.js";
import { registerReflection } from "../../src/vault/reflection.js";
import { startRouterServer, type RouterServer } from "../helpers/router-server.js";

const execFileAsync = promisify(execFile);
const repoRoot = path.resolve(import.meta.dirname, "../..");
const bufBin = path.join(repoRoot, "node_modules/.bin/buf");


/** Starts an HTTP/2 cleartext server on 127.0.0.1 with an ephemeral port. */
const startServer = (routes: (router: ConnectRouter) => void): Promise<RouterServer> => startRouterServer(routes);

type RequestInit = MessageInitShape<typeof ServerReflectionRequestSchema>;

/** Sends `requests` on one reflection stream and collects every response. */
async function reflect(
  baseUrl: string,
  requests: RequestInit[],
): Promise<ServerReflectionResponse[]> {
  // Reflection is a bidi stream; connect-node 2.x's gRPC transport always
  // uses HTTP/2 (its options type no longer has httpVersion).
  const client = createClient(
    ServerReflection,
    createGrpcTransport({ baseUrl }),
  );
  async function* input(): AsyncIterable<RequestInit> {
    yield* requests;
  }
  const responses: ServerReflectionResponse[] = [];
  for await (const res of client.serverReflectionInfo(input())) responses.push(res);
  return responses;
}

/** Decodes the files of a file_descriptor_response, failing otherwise. */
function filesOf(res: ServerReflectionResponse | undefined, label?: string): FileDescriptorProto[] {
  expect(res?.messageResponse.case, label).toBe("fileDescriptorResponse");
  if (res?.messageResponse.case !== "fileDescriptorResponse") return [];
  return res.messageResponse.value.fileDescriptorProto.map((b) =>
    fromBinary(FileDescriptorProtoSchema, b),
  );
}

function errorOf(res: ServerReflectionResponse | undefined): { code: number; message: string } {
  expect(res?.messageResponse.case).toBe("errorResponse");
  if (res?.messageResponse.case !== "errorResponse") return { code: -1, message: "" };
  return {
    code: res.messageResponse.value.errorCode,
    message: res.messageResponse.value.errorMessage,
  };
}

/** Runs node_modules/.bin/buf asynchronously: the server shares this event loop. */
async function buf(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileAsync(bufBin, args, {
      cwd: repoRoot,
      timeout: 20_000,
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === "number" ? e.code : -1, stdout: e.stdout ?? "", stderr: e.stderr ?? "" };
  }
}

const curlFlags = ["curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1"];

describe("registerReflection", () => {
  let srv: RouterServer;

  beforeAll(async () => {
    const health = createHealthService();
    srv = await startServer((router) => {
      // Get is implemented so that `buf curl` can round-trip a message with
      // Duration, Timestamp and Struct fields through reflected descriptors;
      // the other methods answer UNIMPLEMENTED.
      router.service(TokenVaultService, {
        get(req) {
          return {
            accessToken: `${req.userId}:${req.integration}`,
            tokenType: `min=${req.minValidFor?.seconds ?? "none"} refresh=${req.refresh}`,
            expiresAt: timestampFromDate(new Date("2030-01-02T03:04:05Z")),
            scopes: ["a", "b"],
            extras: { k: "v", n: 1 },
          };
        },
      });
      health.register(router);
      registerReflection(router, [TokenVaultService, Health]);
    });
  });

  afterAll(async () => {
    await srv?.close();
  });

  it("lists the given services plus itself, echoing host and request", async () => {
    const [res, ...rest] = await reflect(srv.baseUrl, [
      { host: "vault.example", messageRequest: { case: "listServices", value: "*" } },
    ]);
    expect(rest).toHaveLength(0);
    expect(res?.validHost).toBe("vault.example");
    expect(res?.originalRequest?.messageRequest).toEqual({ case: "listServices", value: "*" });
    expect(res?.messageResponse.case).toBe("listServicesResponse");
    const names =
      res?.messageResponse.case === "listServicesResponse"
        ? res.messageResponse.value.service.map((s) => s.name)
        : [];
    expect([...names].sort()).toEqual([
      "grpc.health.v1.Health",
      "grpc.reflection.v1.ServerReflection",
      "tokenvault.v1.TokenVaultService",
    ]);
  });

  it("answers file_by_filename with the file and all transitive dependencies", async () => {
    const [res] = await reflect(srv.baseUrl, [
      { messageRequest: { case: "fileByFilename", value: "tokenvault/v1/tokenvault.proto" } },
    ]);
    const files = filesOf(res);
    expect(files.map((f) => f.name)).toEqual([
      "tokenvault/v1/tokenvault.proto",
      "google/protobuf/duration.proto",
      "google/protobuf/struct.proto",
      "google/protobuf/timestamp.proto",
    ]);
    const [main] = files;
    expect(main?.package).toBe("tokenvault.v1");
    expect([...(main?.dependency ?? [])].sort()).toEqual([
      "google/protobuf/duration.proto",
      "google/protobuf/struct.proto",
      "google/protobuf/timestamp.proto",
    ]);
    expect(main?.service.map((s) => s.name)).toEqual(["TokenVaultService"]);
    expect(main?.service[0]?.method.map((m) => m.name)).toEqual([
      "Store",
      "Get",
      "Remove",
      "ClearUser",
      "ListConnections",
      "StreamAudit",
      "VerifyAudit",
    ]);
    // The compact embedded form drops json_name; it must be restored.
    const getRequest = main?.messageType.find((m) => m.name === "GetRequest");
    expect(getRequest?.field.find((f) => f.name === "min_valid_for")?.jsonName).toBe("minValidFor");
    // The WKT files are complete descriptors, not just names.
    const timestamp = files.find((f) => f.name === "google/protobuf/timestamp.proto");
    expect(timestamp?.messageType.map((m) => m.name)).toEqual(["Timestamp"]);
    expect(timestamp?.messageType[0]?.field.map((f) => f.name)).toEqual(["seconds", "nanos"]);
  });

  it("serves descriptors identical to `buf build` (without source info)", async () => {
    const dir = await mkdtemp(path.join(tmpdir(), "tokenvault-reflection-"));
    try {
      const out = path.join(dir, "fds.binpb");
      const built = await buf(["build", "--exclude-source-info", "--as-file-descriptor-set", "-o", out]);
      expect(built.stderr).toBe("");
      expect(built.code).toBe(0);
      const expected = fromBinary(FileDescriptorSetSchema, await readFile(out));
      const wanted = [
        "tokenvault/v1/tokenvault.proto",
        "grpc/health/v1/health.proto",
        "grpc/reflection/v1/reflection.proto",
      ];
      const responses = await reflect(
        srv.baseUrl,
        wanted.map((value) => ({ messageRequest: { case: "fileByFilename", value } })),
      );
      for (const [i, name] of wanted.entries()) {
        const got = filesOf(responses[i])[0];
        const want = expected.file.find((f) => f.name === name);
        expect(want, name).toBeDefined();
        expect(got && want && equals(FileDescriptorProtoSchema, got, want), name).toBe(true);
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("resolves every kind of fully-qualified symbol to its file", async () => {
    const cases: Array<[symbol: string, file: string]> = [
      ["tokenvault.v1.TokenVaultService", "tokenvault/v1/tokenvault.proto"],
      ["tokenvault.v1.TokenVaultService.Get", "tokenvault/v1/tokenvault.proto"],
      ["tokenvault.v1.GetRequest", "tokenvault/v1/tokenvault.proto"],
      ["tokenvault.v1.GetRequest.min_valid_for", "tokenvault/v1/tokenvault.proto"],
      ["tokenvault.v1.TokenSet.expiry", "tokenvault/v1/tokenvault.proto"],
      ["tokenvault.v1.RefreshMode", "tokenvault/v1/tokenvault.proto"],
      // Canonical enum value name (sibling of the enum) and the qualified one.
      ["tokenvault.v1.REFRESH_MODE_AUTO", "tokenvault/v1/tokenvault.proto"],
      ["tokenvault.v1.RefreshMode.REFRESH_MODE_AUTO", "tokenvault/v1/tokenvault.proto"],
      [".tokenvault.v1.ErrorDetail", "tokenvault/v1/tokenvault.proto"],
      ["grpc.health.v1.Health.Watch", "grpc/health/v1/health.proto"],
      ["grpc.health.v1.HealthCheckResponse.ServingStatus", "grpc/health/v1/health.proto"],
      ["grpc.health.v1.HealthCheckResponse.SERVICE_UNKNOWN", "grpc/health/v1/health.proto"],
      ["grpc.reflection.v1.ServerReflection", "grpc/reflection/v1/reflection.proto"],
      ["grpc.reflection.v1.ServerReflectionRequest", "grpc/reflection/v1/reflection.proto"],
      ["google.protobuf.Timestamp", "google/protobuf/timestamp.proto"],
      // A nested message (the map entry of Struct.fields).
      ["google.protobuf.Struct.FieldsEntry", "google/protobuf/struct.proto"],
      ["google.protobuf.NULL_VALUE", "google/protobuf/struct.proto"],
    ];
    const responses = await reflect(
      srv.baseUrl,
      cases.map(([value]) => ({ messageRequest: { case: "fileContainingSymbol", value } })),
    );
    expect(responses).toHaveLength(cases.length);
    for (const [i, [symbol, file]] of cases.entries()) {
      const res = responses[i];
      expect(res?.originalRequest?.messageRequest.value, symbol).toBe(symbol);
      expect(filesOf(res, symbol)[0]?.name, symbol).toBe(file);
    }
    // The tokenvault file still comes with its imports when found by symbol.
    expect(filesOf(responses[0]).map((f) => f.name)).toContain("google/protobuf/timestamp.proto");
  });

  it("answers unknown names with NOT_FOUND in-stream and keeps the stream open", async () => {
    const responses = await reflect(srv.baseUrl, [
      { host: "h", messageRequest: { case: "fileContainingSymbol", value: "tokenvault.v1.Nope" } },
      { messageRequest: { case: "fileByFilename", value: "nope/v1/nope.proto" } },
      // A package is not a symbol.
      { messageRequest: { case: "fileContainingSymbol", value: "tokenvault.v1" } },
      { messageRequest: { case: "fileContainingSymbol", value: "tokenvault.v1.TokenVaultService" } },
      { messageRequest: { case: undefined } },
      { messageRequest: { case: "listServices", value: "" } },
    ]);
    expect(responses).toHaveLength(6);
    expect(responses[0]?.validHost).toBe("h");
    expect(errorOf(responses[0])).toEqual({ code: 5, message: "symbol not found: tokenvault.v1.Nope" });
    expect(errorOf(responses[1]).code).toBe(5);
    expect(errorOf(responses[2]).code).toBe(5);
    expect(filesOf(responses[3])[0]?.name).toBe("tokenvault/v1/tokenvault.proto");
    expect(errorOf(responses[4]).code).toBe(3);
    expect(responses[5]?.messageResponse.case).toBe("listServicesResponse");
  });

  it("answers extension requests for types without extensions", async () => {
    const responses = await reflect(srv.baseUrl, [
      { messageRequest: { case: "allExtensionNumbersOfType", value: "tokenvault.v1.GetRequest" } },
      { messageRequest: { case: "allExtensionNumbersOfType", value: "tokenvault.v1.Nope" } },
      // An enum is a symbol but not a message type.
      { messageRequest: { case: "allExtensionNumbersOfType", value: "tokenvault.v1.RefreshMode" } },
      {
        messageRequest: {
          case: "fileContainingExtension",
          value: { containingType: "tokenvault.v1.GetRequest", extensionNumber: 100 },
        },
      },
      {
        messageRequest: {
          case: "fileContainingExtension",
          value: { containingType: "tokenvault.v1.Nope", extensionNumber: 1 },
        },
      },
    ]);
    expect(responses[0]?.messageResponse).toEqual({
      case: "allExtensionNumbersResponse",
      value: expect.objectContaining({ baseTypeName: "tokenvault.v1.GetRequest", extensionNumber: [] }),
    });
    expect(errorOf(responses[1]).code).toBe(5);
    expect(errorOf(responses[2]).code).toBe(5);
    expect(errorOf(responses[3]).code).toBe(5);
    expect(errorOf(responses[4]).code).toBe(5);
  });

  it("is usable from a plain @grpc/grpc-js client", async () => {
    const def = await protoLoader.load("grpc/reflection/v1/reflection.proto", {
      includeDirs: [path.join(repoRoot, "proto")],
      keepCase: true,
      oneofs: true,
      defaults: false,
      longs: String,
      enums: Number,
    });
    type Ctor = new (address: string, creds: grpc.ChannelCredentials) => grpc.Client & {
      ServerReflectionInfo(): grpc.ClientDuplexStream<object, GrpcJsResponse>;
    };
    interface GrpcJsResponse {
      valid_host?: string;
      message_response?: string;
      file_descriptor_response?: { file_descriptor_proto: Buffer[] };
      list_services_response?: { service: Array<{ name: string }> };
      error_response?: { error_code: number; error_message: string };
    }
    const pkg = grpc.loadPackageDefinition(def) as unknown as {
      grpc: { reflection: { v1: { ServerReflection: Ctor } } };
    };
    const client = new pkg.grpc.reflection.v1.ServerReflection(
      `127.0.0.1:${srv.port}`,
      grpc.credentials.createInsecure(),
    );
    try {
      const responses = await new Promise<GrpcJsResponse[]>((resolve, reject) => {
        const out: GrpcJsResponse[] = [];
        const call = client.ServerReflectionInfo();
        call.on("data", (res: GrpcJsResponse) => out.push(res));
        call.on("error", reject);
        call.on("end", () => resolve(out));
        call.write({ host: "grpc-js", list_services: "" });
        call.write({ file_containing_symbol: "tokenvault.v1.TokenVaultService.Get" });
        call.write({ file_containing_symbol: "no.such.Symbol" });
        call.end();
      });
      expect(responses).toHaveLength(3);
      expect(responses[0]?.valid_host).toBe("grpc-js");
      expect(responses[0]?.list_services_response?.service.map((s) => s.name).sort()).toEqual([
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "tokenvault.v1.TokenVaultService",
      ]);
      const files = (responses[1]?.file_descriptor_response?.file_descriptor_proto ?? []).map((b) =>
        fromBinary(FileDescriptorProtoSchema, b),
      );
      expect(files.map((f) => f.name)).toEqual([
        "tokenvault/v1/tokenvault.proto",
        "google/protobuf/duration.proto",
        "google/protobuf/struct.proto",
        "google/protobuf/timestamp.proto",
      ]);
      expect(responses[2]?.message_response).toBe("error_response");
      expect(responses[2]?.error_response?.error_code).toBe(5);
    } finally {
      client.close();
    }
  });

  it("lets `buf curl --list-services` and `--list-methods` discover the API", async () => {
    const services = await buf([...curlFlags, "--list-services", srv.baseUrl]);
    expect(services.stderr).toBe("");
    expect(services.code).toBe(0);
    expect(services.stdout.trim().split("\n").sort()).toEqual([
      "grpc.health.v1.Health",
      "grpc.reflection.v1.ServerReflection",
      "tokenvault.v1.TokenVaultService",
    ]);

    const methods = await buf([...curlFlags, "--list-methods", srv.baseUrl]);
    expect(methods.stderr).toBe("");
    expect(methods.code).toBe(0);
    const lines = methods.stdout.trim().split("\n");
    for (const m of ["Store", "Get", "Remove", "ClearUser", "ListConnections"]) {
      expect(lines).toContain(`tokenvault.v1.TokenVaultService/${m}`);
    }
    expect(lines).toContain("grpc.health.v1.Health/Check");
    expect(lines).toContain("grpc.health.v1.Health/Watch");
    expect(lines).toContain("grpc.reflection.v1.ServerReflection/ServerReflectionInfo");
  });

  it("lets `buf curl` call a method using only reflected descriptors (WKT round trip)", async () => {
    const res = await buf([
      ...curlFlags,
      "-d",
      JSON.stringify({
        userId: "u1",
        integration: "gmail",
        minValidFor: "90s",
        refresh: "REFRESH_MODE_NEVER",
      }),
      `${srv.baseUrl}/tokenvault.v1.TokenVaultService/Get`,
    ]);
    expect(res.stderr).toBe("");
    expect(res.code).toBe(0);
    expect(JSON.parse(res.stdout)).toEqual({
      accessToken: "u1:gmail",
      tokenType: "min=90 refresh=2",
      expiresAt: "2030-01-02T03:04:05Z",
      scopes: ["a", "b"],
      extras: { k: "v", n: 1 },
    });

    // An unimplemented method still resolves (buf curl reports the server's
    // error, not a schema failure).
    const unimplemented = await buf([
      ...curlFlags,
      "-d",
      "{}",
      `${srv.baseUrl}/tokenvault.v1.TokenVaultService/Remove`,
    ]);
    expect(unimplemented.code).not.toBe(0);
    expect(unimplemented.stderr).toContain("unimplemented");
  });

  const hasPythonReflection =
    spawnSync("/usr/bin/python3", ["-c", "import grpc, grpc_reflection"], { stdio: "ignore" })
      .status === 0;

  // Optional cross-check with Debian's python3-grpcio; skipped when absent.
  it.skipIf(!hasPythonReflection)("is usable from Python grpcio", async () => {
    // v1 and v1alpha messages are wire-identical, so the v1alpha classes that
    // grpcio-reflection ships can talk to the v1 service.
    const script = `
import sys, grpc
from grpc_reflection.v1alpha import reflection_pb2 as r
from google.protobuf import descriptor_pb2, descriptor_database, descriptor_pool
ch = grpc.insecure_channel(sys.argv[1])
call = ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    request_serializer=r.ServerReflectionRequest.SerializeToString,
    response_deserializer=r.ServerReflectionResponse.FromString)
reqs = [r.ServerReflectionRequest(file_containing_symbol="tokenvault.v1.TokenVaultService")]
db = descriptor_database.DescriptorDatabase()
for resp in call(iter(reqs), timeout=10):
    for b in resp.file_descriptor_response.file_descriptor_proto:
        db.Add(descriptor_pb2.FileDescriptorProto.FromString(b))
pool = descriptor_pool.DescriptorPool(db)
svc = pool.FindServiceByName("tokenvault.v1.TokenVaultService")
get = svc.methods_by_name["Get"]
print(get.output_type.fields_by_name["expires_at"].message_type.full_name)
`;
    const { stdout } = await promisify(execFile)(
      "/usr/bin/python3",
      ["-c", script, `127.0.0.1:${srv.port}`],
      { timeout: 20_000 },
    );
    expect(stdout.trim()).toBe("google.protobuf.Timestamp");
  });
});

describe("registerReflection with extensions", () => {
  // None of the project's files declares extensions, so build a proto2 file
  // that does (top level and nested in a message) to prove both extension
  // queries find real data, not just empty answers.
  const extFile = createFileRegistry(
    create(FileDescriptorProtoSchema, {
      name: "reflecttest/v1/ext.proto",
      package: "reflecttest.v1",
      syntax: "proto2",
      messageType: [
        {
          name: "Extendable",
          field: [
            {
              name: "name",
              number: 1,
              type: FieldDescriptorProto_Type.STRING,
              label: FieldDescriptorProto_Label.OPTIONAL,
              jsonName: "name",
            },
          ],
          extensionRange: [{ start: 100, end: 200 }],
          nestedType: [
            {
              name: "Inner",
              extension: [
                {
                  name: "nested_ext",
                  number: 150,
                  type: FieldDescriptorProto_Type.INT32,
                  label: FieldDescriptorProto_Label.OPTIONAL,
                  extendee: ".reflecttest.v1.Extendable",
                  jsonName: "nestedExt",
                },
              ],
            },
          ],
        },
      ],
      extension: [
        {
          name: "top_ext",
          number: 100,
          type: FieldDescriptorProto_Type.STRING,
          label: FieldDescriptorProto_Label.OPTIONAL,
          extendee: ".reflecttest.v1.Extendable",
          jsonName: "topExt",
        },
      ],
      service: [
        {
          name: "ExtService",
          method: [
            {
              name: "Ping",
              inputType: ".reflecttest.v1.Extendable",
              outputType: ".reflecttest.v1.Extendable",
            },
          ],
        },
      ],
    }),
    () => undefined,
  );
  const ExtService = extFile.getService("reflecttest.v1.ExtService") as DescService;
  let srv: RouterServer;

  beforeAll(async () => {
    expect(ExtService).toBeDefined();
    srv = await startServer((router) => {
      router.service(ExtService, {});
      registerReflection(router, [ExtService]);
    });
  });

  afterAll(async () => {
    await srv?.close();
  });

  it("finds extensions by number and lists extension numbers", async () => {
    const ext = (extensionNumber: number): RequestInit => ({
      messageRequest: {
        case: "fileContainingExtension",
        value: { containingType: "reflecttest.v1.Extendable", extensionNumber },
      },
    });
    const responses = await reflect(srv.baseUrl, [
      { messageRequest: { case: "allExtensionNumbersOfType", value: "reflecttest.v1.Extendable" } },
      ext(100),
      ext(150),
      ext(199),
      { messageRequest: { case: "fileContainingSymbol", value: "reflecttest.v1.top_ext" } },
      { messageRequest: { case: "fileContainingSymbol", value: "reflecttest.v1.Extendable.Inner.nested_ext" } },
    ]);
    expect(responses[0]?.messageResponse).toEqual({
      case: "allExtensionNumbersResponse",
      value: expect.objectContaining({ baseTypeName: "reflecttest.v1.Extendable", extensionNumber: [100, 150] }),
    });
    expect(filesOf(responses[1]).map((f) => f.name)).toEqual(["reflecttest/v1/ext.proto"]);
    expect(filesOf(responses[2]).map((f) => f.name)).toEqual(["reflecttest/v1/ext.proto"]);
    expect(errorOf(responses[3]).code).toBe(5);
    expect(filesOf(responses[4])[0]?.extension.map((e) => e.name)).toEqual(["top_ext"]);
    expect(filesOf(responses[5])[0]?.name).toBe("reflecttest/v1/ext.proto");
  });
});
