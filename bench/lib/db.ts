/**
 * The benchmark's PostgreSQL: BENCH_DATABASE_URL or DATABASE_URL when set
 * (its role must be allowed to create databases), else the system server at
 * postgres://postgres@127.0.0.1:5432 when it answers, else the embedded
 * PostgreSQL the vault uses in development (in a temporary folder). On it,
 * dedicated databases are dropped and created afresh, migrated with the
 * service's own migrations, and seeded with connections sealed by the
 * service's own sealing code.
 */
import os from "node:os";
import path from "node:path";
import pg from "pg";
import { migrate } from "../../src/db/migrate.js";
import { startEmbeddedPostgres } from "../../src/db/embedded.js";
import { sealSecrets } from "../../src/crypto/token-seal.js";
import type { KeyRing } from "../../src/crypto/key-ring.js";
import { addCaller } from "../../src/auth/caller-admin.js";
import { rpcNames } from "../../src/auth/policy.js";
import type { Logger } from "../../src/log.js";
import { benchIntegration, benchScopes, farExpiry, makeTokenSets, userId } from "./tokens.js";

/** A PostgreSQL server the benchmark may create databases on. */
export interface BenchServer {
  /** "env", "system" or "embedded". */
  kind: string;
  /** Where, without credentials. */
  where: string;
  /** URL of database `name` on this server (may carry a password: never print it). */
  urlFor(name: string): string;
  adminUrl: string;
  version: string;
  close(): Promise<void>;
}

const systemUrl = "postgres://postgres@127.0.0.1:5432/postgres";

function withDatabase(url: string, name: string): string {
  const u = new URL(url);
  u.pathname = `/${name}`;
  return u.toString();
}

async function reachable(url: string): Promise<boolean> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 2_000 });
  try {
    await client.connect();
    await client.query("select 1");
    return true;
  } catch {
    return false;
  } finally {
    await client.end().catch(() => {});
  }
}

async function serverVersion(url: string): Promise<string> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query<{ version: string }>("select version()")).rows[0]!.version;
  } finally {
    await client.end();
  }
}

/** Picks the server (see the module comment). */
export async function openBenchServer(logger: Logger): Promise<BenchServer> {
  const given = process.env.BENCH_DATABASE_URL ?? process.env.DATABASE_URL;
  if (given !== undefined && given !== "") {
    const u = new URL(given);
    return {
      kind: "env",
      where: `${u.hostname}:${u.port || 5432} (from ${process.env.BENCH_DATABASE_URL ? "BENCH_DATABASE_URL" : "DATABASE_URL"})`,
      urlFor: (name) => withDatabase(given, name),
      adminUrl: given,
      version: await serverVersion(given),
      close: async () => {},
    };
  }
  if (process.env.BENCH_EMBEDDED !== "1" && (await reachable(systemUrl))) {
    return {
      kind: "system",
      where: "127.0.0.1:5432 (system PostgreSQL)",
      urlFor: (name) => withDatabase(systemUrl, name),
      adminUrl: systemUrl,
      version: await serverVersion(systemUrl),
      close: async () => {},
    };
  }
  const dir = process.env.BENCH_EMBEDDED_DIR ?? path.join(os.tmpdir(), "tokenvault-bench-pg");
  const embedded = await startEmbeddedPostgres(dir, 0, logger);
  return {
    kind: "embedded",
    where: `embedded PostgreSQL in ${dir} (127.0.0.1:${embedded.port})`,
    urlFor: (name) => withDatabase(embedded.adminUrl, name),
    adminUrl: embedded.adminUrl,
    version: await serverVersion(embedded.adminUrl),
    close: () => embedded.stop(),
  };
}

/** Runs `sql` on the server's admin connection. */
export async function adminQuery(server: BenchServer, sql: string): Promise<void> {
  const client = new pg.Client({ connectionString: server.adminUrl });
  await client.connect();
  try {
    await client.query(sql);
  } finally {
    await client.end();
  }
}

/** Drops (if there) and creates database `name`, then applies the migrations. */
export async function freshDatabase(server: BenchServer, name: string): Promise<string> {
  await adminQuery(server, `drop database if exists ${name} with (force)`);
  await adminQuery(server, `create database ${name}`);
  const url = server.urlFor(name);
  await migrate(url, { direction: "up" });
  return url;
}

/** Whether database `name` exists and holds a seeded connections table with `count` rows. */
export async function seededAlready(server: BenchServer, name: string, count: number): Promise<boolean> {
  const client = new pg.Client({ connectionString: server.urlFor(name) });
  try {
    await client.connect();
    const r = await client.query<{ n: string }>("select count(*) as n from connections where user_id like 'bench-u%'");
    return Number(r.rows[0]!.n) === count;
  } catch {
    return false;
  } finally {
    await client.end().catch(() => {});
  }
}

/** Drops database `name`. */
export async function dropDatabase(server: BenchServer, name: string): Promise<void> {
  await adminQuery(server, `drop database if exists ${name} with (force)`);
}

/** Adds the benchmark's caller (every RPC, every integration); returns its bearer secret. */
export async function addBenchCaller(url: string, name = "bench"): Promise<string> {
  const pool = new pg.Pool({ connectionString: url, max: 1 });
  try {
    const { secret } = await addCaller(pool, name, { allow: [...rpcNames], integrations: ["*"] });
    return secret;
  } finally {
    await pool.end();
  }
}

/**
 * Inserts `count` connections (users prefix0..prefix{count-1}, integration
 * gmail), each sealed for its own user and integration with the real sealing
 * code; a few hundred plaintext token sets are reused. Multi-row unnest
 * inserts, two in flight while the next batch is sealed.
 */
export async function seedConnections(url: string, ring: KeyRing, prefix: string, count: number, progress?: (done: number) => void): Promise<void> {
  // Seeding need not be durable: a crash means seeding again.
  const pool = new pg.Pool({ connectionString: url, max: 2, options: "-c synchronous_commit=off" });
  const sets = makeTokenSets(256);
  const expiresAt = farExpiry();
  const batchSize = 5_000;
  const inFlight: Promise<unknown>[] = [];
  try {
    for (let start = 0; start < count; start += batchSize) {
      const n = Math.min(batchSize, count - start);
      const users: string[] = new Array(n);
      // The ciphertexts travel as one binary parameter each (sliced in SQL):
      // much cheaper than bytea[] parameters, which go as hex text.
      const access: Buffer[] = new Array(n);
      const refresh: Buffer[] = new Array(n);
      const accessAt: number[] = new Array(n);
      const accessLength: number[] = new Array(n);
      const refreshAt: number[] = new Array(n);
      const refreshLength: number[] = new Array(n);
      let a = 1;
      let r = 1;
      for (let i = 0; i < n; i++) {
        const u = userId(prefix, start + i);
        const sealed = sealSecrets(ring, { userId: u, integration: benchIntegration }, sets[(start + i) % sets.length]!);
        users[i] = u;
        access[i] = sealed.accessToken;
        refresh[i] = sealed.refreshToken!;
        accessAt[i] = a;
        accessLength[i] = sealed.accessToken.length;
        a += sealed.accessToken.length;
        refreshAt[i] = r;
        refreshLength[i] = sealed.refreshToken!.length;
        r += sealed.refreshToken!.length;
      }
      if (inFlight.length >= 2) await inFlight.shift();
      inFlight.push(
        pool.query(
          `insert into connections (user_id, integration, key_id, access_token_sealed, refresh_token_sealed, token_type, scopes,
             expires_at, ip_address, user_agent)
           select u, $2::text, $3::text, substring($6::bytea from aa for al), substring($7::bytea from ra for rl),
             'Bearer', $4::text[], $5::timestamptz, '203.0.113.7'::inet, 'tokenvault-bench'
           from unnest($1::text[], $8::int[], $9::int[], $10::int[], $11::int[]) as t(u, aa, al, ra, rl)`,
          [users, benchIntegration, ring.current.id, benchScopes, expiresAt, Buffer.concat(access), Buffer.concat(refresh),
            accessAt, accessLength, refreshAt, refreshLength],
        ),
      );
      progress?.(start + n);
      // Let the inserts' sockets drain between batches.
      await new Promise((resolve) => setImmediate(resolve));
    }
    await Promise.all(inFlight);
    await pool.query("vacuum (analyze) connections");
  } finally {
    await pool.end();
  }
}

/** Runs one query on database `url` and returns its rows. */
export async function queryRows<T extends pg.QueryResultRow>(url: string, sql: string, values: unknown[] = []): Promise<T[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query<T>(sql, values)).rows;
  } finally {
    await client.end();
  }
}

/** Runs several statements on database `url`. */
export async function execute(url: string, sql: string): Promise<void> {
  await queryRows(url, sql);
}
