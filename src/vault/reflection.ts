// gRPC server reflection (grpc.reflection.v1.ServerReflection) for
// connect-node. No npm package provides it for Connect, and tools such as
// `buf curl`, grpcurl and Postman need it to call the service without a local
// copy of the .proto files.
//
// Spec: https://github.com/grpc/grpc/blob/master/doc/server-reflection.md and
// the comments in proto/grpc/reflection/v1/reflection.proto. The behaviour
// follows grpc-go's reference implementation where the spec is silent.

import { create, toBinary } from "@bufbuild/protobuf";
import type {
  DescEnum,
  DescExtension,
  DescFile,
  DescMessage,
  DescService,
} from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import type { ConnectRouter } from "@connectrpc/connect";
import {
  ServerReflection,
  ServerReflectionResponseSchema,
} from "../gen/grpc/reflection/v1/reflection_pb.js";
import type {
  ServerReflectionRequest,
  ServerReflectionResponse,
} from "../gen/grpc/reflection/v1/reflection_pb.js";

// grpc::StatusCode values carried in ErrorResponse.error_code. The reflection
// protocol reports per-request failures inside the stream, so these are plain
// numbers rather than ConnectError codes.
const STATUS_INVALID_ARGUMENT = 3;
const STATUS_NOT_FOUND = 5;

/**
 * Everything a reflection request can ask for, computed once at registration:
 * the descriptors are immutable for the life of the process, so per-request
 * work is reduced to map look-ups.
 */
interface ReflectionIndex {
  /** Full service names for list_services, in registration order. */
  readonly serviceNames: readonly string[];
  /** File path (e.g. "tokenvault/v1/tokenvault.proto") to its response payload. */
  readonly filesByName: ReadonlyMap<string, readonly Uint8Array[]>;
  /** Fully-qualified symbol to the response payload of its declaring file. */
  readonly filesBySymbol: ReadonlyMap<string, readonly Uint8Array[]>;
  /** Fully-qualified message names that reflection knows about. */
  readonly messageNames: ReadonlySet<string>;
  /** Extendee full name to extension field number to the declaring file's payload. */
  readonly extensions: ReadonlyMap<string, ReadonlyMap<number, readonly Uint8Array[]>>;
}

/**
 * Registers the standard gRPC server reflection service
 * (`grpc.reflection.v1.ServerReflection/ServerReflectionInfo`) on a Connect
 * router.
 *
 * The service describes `services` (and itself): list_services answers their
 * full names plus "grpc.reflection.v1.ServerReflection"; file_by_filename,
 * file_containing_symbol and file_containing_extension answer the serialized
 * `FileDescriptorProto` of the requested file followed by all its transitive
 * dependencies; all_extension_numbers_of_type answers the extension numbers
 * known for a message. A request that names an unknown file, symbol or type
 * is answered with an `error_response` (code 5, NOT_FOUND) and the stream
 * stays open for further requests.
 *
 * Reflection uses a bidirectional stream, so clients must reach the server
 * over HTTP/2 with the gRPC protocol (or Connect/gRPC-Web over HTTP/2).
 *
 * @param router - the router to register the service on.
 * @param services - the services to advertise, normally every service the
 *   router serves (including grpc.health.v1.Health when registered).
 */
export function registerReflection(
  router: ConnectRouter,
  services: readonly DescService[],
): void {
  const index = buildIndex(services);
  router.service(ServerReflection, {
    async *serverReflectionInfo(requests) {
      // One response per request, in order: the spec pairs them by position
      // (and by the echoed original_request), so no request may be dropped.
      for await (const request of requests) {
        yield answer(index, request);
      }
    },
  });
}

/** Builds the look-up tables for `services` plus the reflection service. */
function buildIndex(services: readonly DescService[]): ReflectionIndex {
  // The reflection service describes itself too, so a client can discover it
  // from list_services and then resolve its own schema like any other.
  const advertised = uniqueBy([...services, ServerReflection], (s) => s.typeName);

  // Every file reachable from an advertised service. Keyed by path rather than
  // by object identity: two registries could in theory hold distinct DescFile
  // objects for the same path, and clients address files by path.
  const files = new Map<string, DescFile>();
  const visit = (file: DescFile): void => {
    if (files.has(file.proto.name)) return;
    files.set(file.proto.name, file);
    file.dependencies.forEach(visit);
  };
  advertised.forEach((s) => visit(s.file));

  // Serialize each file once; responses share the same byte arrays.
  //
  // The generated code embeds descriptors in a compact form, but
  // @bufbuild/protobuf restores what it strips when it hydrates them:
  // `dependency` is rebuilt from the generated imports and json_name from the
  // field names. Only source_code_info (comments) stays missing, which
  // reflection clients do not need; test/vault/reflection.test.ts checks the
  // result is identical to `buf build --exclude-source-info`. The exception
  // is google/protobuf/descriptor.proto (only reached if a file declares
  // custom options): it is bootstrapped without file options or reserved
  // ranges, though its messages and fields, which clients need, are intact.
  const bytes = new Map<string, Uint8Array>();
  for (const [name, file] of files) {
    bytes.set(name, toBinary(FileDescriptorProtoSchema, file.proto));
  }

  // The spec requires a file's transitive dependencies in the same response:
  // simple clients build a descriptor pool from one response and cannot link
  // a file whose imports are missing. The requested file comes first, as grpc-go does,
  // then its dependencies in a depth-first order.
  const payloads = new Map<string, readonly Uint8Array[]>();
  for (const [name, file] of files) {
    const closure: Uint8Array[] = [];
    const seen = new Set<string>();
    const walk = (f: DescFile): void => {
      if (seen.has(f.proto.name)) return;
      seen.add(f.proto.name);
      closure.push(bytes.get(f.proto.name) as Uint8Array);
      f.dependencies.forEach(walk);
    };
    walk(file);
    payloads.set(name, closure);
  }

  const filesBySymbol = new Map<string, readonly Uint8Array[]>();
  const messageNames = new Set<string>();
  const extensions = new Map<string, Map<number, readonly Uint8Array[]>>();
  for (const [name, file] of files) {
    const payload = payloads.get(name) as readonly Uint8Array[];
    const addSymbol = (symbol: string): void => {
      // First declaration wins; protoc rejects duplicate symbols within one
      // pool, so a clash can only come from two unrelated registries.
      if (!filesBySymbol.has(symbol)) filesBySymbol.set(symbol, payload);
    };
    const addExtension = (ext: DescExtension): void => {
      addSymbol(ext.typeName);
      let byNumber = extensions.get(ext.extendee.typeName);
      if (byNumber === undefined) {
        byNumber = new Map();
        extensions.set(ext.extendee.typeName, byNumber);
      }
      if (!byNumber.has(ext.number)) byNumber.set(ext.number, payload);
    };
    const addEnum = (e: DescEnum): void => {
      addSymbol(e.typeName);
      // Enum values are scoped as siblings of their enum (C++ scoping rules),
      // so the canonical name of tokenvault.v1.RefreshMode's value is
      // "tokenvault.v1.REFRESH_MODE_AUTO"; that is what protoc-based clients
      // ask for. The enum-qualified spelling is accepted too because people
      // type it, and it cannot collide with anything.
      const scope = e.parent?.typeName ?? file.proto.package;
      for (const v of e.values) {
        addSymbol(scope === "" ? v.name : `${scope}.${v.name}`);
        addSymbol(`${e.typeName}.${v.name}`);
      }
    };
    const addMessage = (m: DescMessage): void => {
      addSymbol(m.typeName);
      messageNames.add(m.typeName);
      // Fields and oneofs are symbols in the protobuf sense too (grpc-go
      // resolves them), and clients may ask for them when resolving options.
      for (const f of m.fields) addSymbol(`${m.typeName}.${f.name}`);
      // The proto's oneof_decl, not m.oneofs: the latter omits the synthetic
      // oneofs of proto3 `optional` fields, which are still declared symbols.
      for (const o of m.proto.oneofDecl) addSymbol(`${m.typeName}.${o.name}`);
      m.nestedMessages.forEach(addMessage);
      // Map entry messages (e.g. google.protobuf.Struct.FieldsEntry) are
      // declared in the descriptor, but @bufbuild/protobuf leaves them out of
      // nestedMessages, so take them from the proto.
      for (const nested of m.proto.nestedType) {
        if (nested.options?.mapEntry !== true) continue;
        const entryName = `${m.typeName}.${nested.name}`;
        addSymbol(entryName);
        for (const f of nested.field) addSymbol(`${entryName}.${f.name}`);
      }
      m.nestedEnums.forEach(addEnum);
      m.nestedExtensions.forEach(addExtension);
    };
    file.messages.forEach(addMessage);
    file.enums.forEach(addEnum);
    file.extensions.forEach(addExtension);
    for (const s of file.services) {
      addSymbol(s.typeName);
      for (const m of s.methods) addSymbol(`${s.typeName}.${m.name}`);
    }
  }

  return {
    serviceNames: advertised.map((s) => s.typeName),
    filesByName: payloads,
    filesBySymbol,
    messageNames,
    extensions,
  };
}

/** Answers a single reflection request; never throws for unknown input. */
function answer(
  index: ReflectionIndex,
  request: ServerReflectionRequest,
): ServerReflectionResponse {
  // The spec asks servers to echo the host and the request so that clients
  // can match responses to requests.
  const base = { validHost: request.host, originalRequest: request };
  const files = (payload: readonly Uint8Array[]): ServerReflectionResponse =>
    create(ServerReflectionResponseSchema, {
      ...base,
      messageResponse: {
        case: "fileDescriptorResponse",
        value: { fileDescriptorProto: [...payload] },
      },
    });
  const error = (code: number, message: string): ServerReflectionResponse =>
    create(ServerReflectionResponseSchema, {
      ...base,
      messageResponse: {
        case: "errorResponse",
        value: { errorCode: code, errorMessage: message },
      },
    });

  const req = request.messageRequest;
  switch (req.case) {
    case "listServices":
      // The field's content "will not be checked", per the spec.
      return create(ServerReflectionResponseSchema, {
        ...base,
        messageResponse: {
          case: "listServicesResponse",
          value: { service: index.serviceNames.map((name) => ({ name })) },
        },
      });
    case "fileByFilename": {
      const payload = index.filesByName.get(req.value);
      return payload
        ? files(payload)
        : error(STATUS_NOT_FOUND, `file not found: ${req.value}`);
    }
    case "fileContainingSymbol": {
      // Tolerate a leading dot: descriptors spell type references that way
      // and some clients pass them through unchanged.
      const symbol = req.value.startsWith(".") ? req.value.slice(1) : req.value;
      const payload = index.filesBySymbol.get(symbol);
      return payload
        ? files(payload)
        : error(STATUS_NOT_FOUND, `symbol not found: ${req.value}`);
    }
    case "fileContainingExtension": {
      const { containingType, extensionNumber } = req.value;
      const payload = index.extensions.get(containingType)?.get(extensionNumber);
      if (payload) return files(payload);
      return index.messageNames.has(containingType)
        ? error(
            STATUS_NOT_FOUND,
            `extension not found: ${containingType} has no extension ${extensionNumber}`,
          )
        : error(STATUS_NOT_FOUND, `type not found: ${containingType}`);
    }
    case "allExtensionNumbersOfType": {
      // An unknown type is an error, but a known message without extensions
      // is an empty list: clients use the answer to tell the two apart.
      if (!index.messageNames.has(req.value)) {
        return error(STATUS_NOT_FOUND, `type not found: ${req.value}`);
      }
      const numbers = [...(index.extensions.get(req.value)?.keys() ?? [])].sort(
        (a, b) => a - b,
      );
      return create(ServerReflectionResponseSchema, {
        ...base,
        messageResponse: {
          case: "allExtensionNumbersResponse",
          value: { baseTypeName: req.value, extensionNumber: numbers },
        },
      });
    }
    default:
      // An empty oneof: a newer client may have sent a request kind this
      // server does not know. Answer in-stream instead of failing the stream
      // so the client's other requests still succeed.
      return error(STATUS_INVALID_ARGUMENT, "unsupported or empty message_request");
  }
}

/** Keeps the first element for each key, in order. */
function uniqueBy<T>(items: readonly T[], key: (item: T) => string): T[] {
  const seen = new Set<string>();
  return items.filter((item) => {
    const k = key(item);
    if (seen.has(k)) return false;
    seen.add(k);
    return true;
  });
}
