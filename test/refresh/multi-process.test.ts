/**
 * Refresh across replicas: three real `tokenvault serve` processes (src/main.ts
 * through tsx, test/cli/helpers.ts) on one PostgreSQL database, pointed at a
 * real oidc-provider (test/helpers/oidc.ts) with refresh token rotation and
 * reuse detection through TOKENVAULT_PROVIDERS_FILE and
 * TOKENVAULT_PROVIDER_GOOGLE_CLIENT_ID/_CLIENT_SECRET.
 *
 * 1. 50 concurrent Gets spread over the three processes for a token about to
 *    expire: exactly one refresh_token grant reaches the provider, all 50 get
 *    the same new access token, the rotated refresh token is stored, and the
 *    provider's reuse detection never fires. Done twice: as the calls come,
 *    and with the provider's answer held until every process has calls
 *    queued behind the refresh (so the cross-process fence is certainly used).
 * 2. The crash window (see the header comment of src/refresh/refresher.ts):
 *    a process is SIGKILLed (a) while it waits for the provider's answer,
 *    after the provider rotated the refresh token, and (b) after it received
 *    the answer and before its transaction committed (its UPDATE held back by
 *    a table lock the test takes). The next Get, on another process, refreshes
 *    again with the old refresh token; the provider sees a consumed token
 *    reused, revokes the grant, and the Get answers NEEDS_REAUTH. Nothing else
 *    breaks: the other processes, other connections, a new Store, the audit chain.
 */
import { randomBytes } from "node:crypto";
import { performance } from "node:perf_hooks";
import { setTimeout as sleep } from "node:timers/promises";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import {
  ConnectionStatus,
  ErrorDetailSchema,
  ErrorReason,
  RefreshMode,
  TokenVaultService,
  type GetResponse,
} from "../../src/gen/tokenvault/v1/tokenvault_pb.js";
import { addCaller } from "../../src/auth/caller-admin.js";
import { rpcNames } from "../../src/auth/policy.js";
import { createTestDatabase, type TestDatabase } from "../helpers/db.js";
import { encodings, secretToken } from "../helpers/secrets.js";
import { startOidcProvider, type OidcServer } from "../helpers/oidc.js";
import { cleanupCli, cliEnv, linesContaining, newKey, outcome, startServe, tempDir, vaultClient, type ServeProcess } from "../cli/helpers.js";

type VaultClient = Client<typeof TokenVaultService>;

const gmailScope = "https://www.googleapis.com/auth/gmail.readonly";

let db: TestDatabase;
let op: OidcServer;
let secret: string;
let env: Record<string, string>;
/** The three replicas; some are killed on the way. */
let procs: ServeProcess[] = [];
/** Tokens the tests stored themselves. */
const stored: string[] = [];

beforeAll(async () => {
  db = await createTestDatabase();
  ({ secret } = await addCaller(db.pool, "mp-client", { allow: rpcNames, integrations: ["*"], refreshTokens: true }));
  op = await startOidcProvider({ accessTokenTtl: 600 });
  env = cliEnv({
    DATABASE_URL: db.url,
    TOKENVAULT_KEYS: newKey("k1").entry,
    TOKENVAULT_PORT: "0",
    TOKENVAULT_LOG_LEVEL: "info",
    TOKENVAULT_PROVIDERS_FILE: op.writeCatalogue(tempDir("tokenvault-oidc-")),
    // Well above any wait below: the provider call itself never times out in these tests.
    TOKENVAULT_REFRESH_TIMEOUT_MS: "20000",
    ...op.env(),
  });
  procs = await Promise.all([0, 1, 2].map((i) => startReplica(i)));
});

afterAll(async () => {
  await cleanupCli();
  // No process printed a token, a provider secret or the caller's secret.
  const needles = [...stored, ...(op?.issuedSecrets ?? []), op?.postClient.clientSecret, op?.basicClient.clientSecret, secret]
    .filter((s): s is string => s !== undefined)
    .flatMap(encodings);
  expect(linesContaining(needles)).toEqual([]);
  await op?.close();
  await db?.drop();
});

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/**
 * Starts replica number `i`. Its database sessions carry application_name
 * tokenvault-r<i> (a connection string parameter wins over the pool's default
 * name), so the test can tell in pg_stat_activity which replica waits where.
 */
async function startReplica(i: number): Promise<ServeProcess> {
  const url = new URL(db.url);
  url.searchParams.set("application_name", `tokenvault-r${i}`);
  return startServe({ ...env, DATABASE_URL: url.toString(), TOKENVAULT_DATA_DIR: tempDir() }, 90_000);
}

const newUser = (label: string) => `mp-${label}-${randomBytes(4).toString("hex")}`;

/** A client of replica `i` on a connection of its own. */
const clientOf = (proc: ServeProcess): VaultClient => vaultClient(proc.baseUrl, secret);

/** Stores a token set whose access token expires in a minute (within Get's default min_valid_for of 5 minutes). */
async function storeExpiring(client: VaultClient, userId: string, refreshToken: string): Promise<string> {
  const accessToken = secretToken("at");
  stored.push(accessToken);
  await client.store({
    userId,
    integration: "gmail",
    tokenSet: { accessToken, refreshToken, tokenType: "Bearer", scopes: [gmailScope], expiry: { case: "expiresIn", value: durationFromMs(60_000) } },
  });
  return accessToken;
}

/** The refresh token stored now, read without refreshing. */
async function storedRefreshToken(client: VaultClient, userId: string): Promise<string | undefined> {
  return (await client.get({ userId, integration: "gmail", refresh: RefreshMode.NEVER, includeRefreshToken: true })).refreshToken;
}

async function getError(client: VaultClient, userId: string): Promise<ConnectError> {
  try {
    await client.get({ userId, integration: "gmail" });
  } catch (err) {
    return ConnectError.from(err);
  }
  throw new Error("Get succeeded, expected an error");
}

const reasonOf = (err: ConnectError) => err.findDetails(ErrorDetailSchema)[0]?.reason;

async function until(condition: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

/** Sessions of the replicas (application_name tokenvault-r<i>) on the test database that wait for a lock. */
async function lockWaiters(): Promise<{ pid: number; query: string; replica: string }[]> {
  return (
    await db.pool.query<{ pid: number; query: string; replica: string }>(
      `select pid, query, application_name as replica from pg_stat_activity
       where datname = current_database() and application_name like 'tokenvault-r%' and wait_event_type = 'Lock'`,
    )
  ).rows;
}

/** The replica whose session holds the row lock and waits for the provider (idle in its refresh transaction). */
async function refreshingReplica(): Promise<string | undefined> {
  return (
    await db.pool.query<{ replica: string }>(
      `select application_name as replica from pg_stat_activity
       where datname = current_database() and application_name like 'tokenvault-r%' and state = 'idle in transaction'
         and query like 'select id, user_id, integration%for update'`,
    )
  ).rows[0]?.replica;
}

/** The connection row as stored (generation, status, refresh bookkeeping). */
async function rowOf(userId: string) {
  return (
    await db.pool.query<{ generation: string; status: string; last_refreshed_at: Date | null; refresh_failures: number }>(
      "select generation, status, last_refreshed_at, refresh_failures from connections where user_id = $1::text and integration = 'gmail'",
      [userId],
    )
  ).rows[0]!;
}

async function auditActions(userId: string): Promise<{ action: string; outcome: string; details: Record<string, unknown> }[]> {
  return (
    await db.pool.query<{ action: string; outcome: string; details: Record<string, unknown> }>(
      "select action, outcome, details from audit_events where user_id = $1::text order by id",
      [userId],
    )
  ).rows;
}

/**
 * 50 concurrent Gets of one connection, spread round-robin over two clients
 * (connections) per replica. Returns the answers in call order and the time taken.
 */
async function fiftyGets(userId: string, replicas: ServeProcess[]): Promise<{ results: PromiseSettledResult<GetResponse>[]; ms: number; perReplica: number[] }> {
  const clients = replicas.flatMap((p) => [clientOf(p), clientOf(p)]);
  const perReplica = replicas.map(() => 0);
  const started = performance.now();
  const results = await Promise.allSettled(
    Array.from({ length: 50 }, (_, i) => {
      perReplica[Math.floor((i % clients.length) / 2)]!++;
      return clients[i % clients.length]!.get({ userId, integration: "gmail" });
    }),
  );
  return { results, ms: Math.round(performance.now() - started), perReplica };
}

function fulfilled(results: PromiseSettledResult<GetResponse>[]): GetResponse[] {
  const failures = results.filter((r): r is PromiseRejectedResult => r.status === "rejected").map((r) => String(r.reason));
  expect(failures).toEqual([]);
  return results.map((r) => (r as PromiseFulfilledResult<GetResponse>).value);
}

// ---------------------------------------------------------------------------

describe("50 concurrent Gets over 3 replicas, one refresh", () => {
  it("as the calls come: one provider call, one new access token for all 50, rotated refresh token stored, no reuse", async () => {
    const userId = newUser("fifty");
    const { refreshToken: minted, grantId } = await op.mintRefreshToken(userId);
    const old = await storeExpiring(clientOf(procs[0]!), userId, minted);
    const before = op.tokenCalls().length;
    const consumedBefore = op.consumedRefreshTokens.length;

    const { results, ms, perReplica } = await fiftyGets(userId, procs);
    const answers = fulfilled(results);

    const calls = op.tokenCalls().slice(before);
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatchObject({ grantType: "refresh_token", status: 200, clientId: op.postClient.clientId });
    const fresh = calls[0]!.accessToken!;
    expect(new Set(answers.map((a) => a.accessToken))).toEqual(new Set([fresh]));
    expect(fresh).not.toBe(old);
    const refreshedCount = answers.filter((a) => a.refreshed).length;
    expect(refreshedCount).toBeGreaterThanOrEqual(1);

    // The rotated refresh token is what the vault holds; the minted one was consumed exactly once.
    expect(await storedRefreshToken(clientOf(procs[1]!), userId)).toBe(calls[0]!.refreshToken);
    expect(op.consumedRefreshTokens.length - consumedBefore).toBe(1);
    // Reuse detection never fired: the grant is intact and nothing was refused.
    expect(op.revokedGrants).not.toContain(grantId);
    expect(await op.grantExists(grantId)).toBe(true);
    expect(await op.introspect(fresh, "access_token")).toMatchObject({ active: true, sub: userId });

    // One refresh event in the shared audit log, and one get event per call.
    const events = await auditActions(userId);
    expect(events.filter((e) => e.action === "refresh")).toHaveLength(1);
    expect(events.filter((e) => e.action === "refresh_failed")).toHaveLength(0);
    expect(events.filter((e) => e.action === "get" && e.outcome === "ok")).toHaveLength(50 + 1);

    console.log(`50 Gets over 3 replicas (${perReplica.join("/")}), as they come: ${calls.length} provider call(s), ${refreshedCount} answers refreshed=true, ${ms} ms`);
  });

  it("with the provider's answer held until every replica has calls queued behind the refresh: still exactly one provider call", async () => {
    const userId = newUser("fifty-held");
    const { refreshToken: minted, grantId } = await op.mintRefreshToken(userId);
    const old = await storeExpiring(clientOf(procs[2]!), userId, minted);
    const before = op.tokenCalls().length;

    const hold = op.holdTokenAnswers();
    let queued: Awaited<ReturnType<typeof lockWaiters>> = [];
    let holder: string | undefined;
    try {
      const gets = fiftyGets(userId, procs);
      const held = await hold.next();
      expect(held.call).toMatchObject({ grantType: "refresh_token", status: 200 });
      // One replica holds the row lock and waits for the provider. Every other replica's calls queue on that
      // lock: the first to have read the old row waits in SELECT ... FOR UPDATE (the others of that replica
      // share its wait), later ones wait in their read. Release once both other replicas have a session
      // queued (promptly: calls waiting for a pool connection give up after 5 s).
      holder = await refreshingReplica();
      expect(holder).toBeDefined();
      const others = ["tokenvault-r0", "tokenvault-r1", "tokenvault-r2"].filter((r) => r !== holder);
      await until(async () => {
        queued = await lockWaiters();
        return others.every((r) => queued.some((w) => w.replica === r));
      }, 20_000, "calls of both other replicas queued on the row lock");
      hold.stop();
      const { results, ms, perReplica } = await gets;
      const answers = fulfilled(results);

      const calls = op.tokenCalls().slice(before);
      expect(calls).toHaveLength(1);
      expect(new Set(answers.map((a) => a.accessToken))).toEqual(new Set([calls[0]!.accessToken]));
      expect(answers.every((a) => a.accessToken !== old)).toBe(true);
      const refreshedCount = answers.filter((a) => a.refreshed).length;
      expect(await storedRefreshToken(clientOf(procs[0]!), userId)).toBe(calls[0]!.refreshToken);
      expect(op.revokedGrants).not.toContain(grantId);
      expect(await op.grantExists(grantId)).toBe(true);
      expect((await auditActions(userId)).filter((e) => e.action === "refresh")).toHaveLength(1);

      console.log(`50 Gets over 3 replicas (${perReplica.join("/")}), answer held at ${holder} until ${queued.length} sessions of the others queued: ${calls.length} provider call(s), ${refreshedCount} answers refreshed=true, ${ms} ms`);
    } finally {
      hold.stop();
    }
  });
});

describe("a slow provider", () => {
  /*
   * While one connection's refresh waits for a slow provider (9 s here, under the default 10 s
   * TOKENVAULT_REFRESH_TIMEOUT_MS), further Gets of that connection must not pin a pool connection
   * each on the refresher's row lock: they read without waiting (selectConnectionForUse marks the
   * row used with SKIP LOCKED) and share the process's single in-flight refresh. Before that fix,
   * thirteen such Gets filled the pool of ten and the replica failed unrelated Gets and its audit
   * writer (UNAVAILABLE).
   */
  it("a refresh waiting on a slow provider does not stall Gets of other connections on the same replica", async () => {
    const replica = procs[0]!;
    const hot = newUser("hot");
    const cold = newUser("cold");
    const { refreshToken: hotMinted } = await op.mintRefreshToken(hot);
    await storeExpiring(clientOf(replica), hot, hotMinted);
    // Another user's connection whose token is valid for an hour: its Get needs no provider.
    const coldToken = secretToken("at");
    stored.push(coldToken);
    await clientOf(replica).store({
      userId: cold,
      integration: "gmail",
      tokenSet: { accessToken: coldToken, scopes: [gmailScope], expiry: { case: "expiresIn", value: durationFromMs(3_600_000) } },
    });

    const hold = op.holdTokenAnswers();
    let timer: NodeJS.Timeout | undefined;
    try {
      // The first Get of the hot connection refreshes; the provider takes 9 s to answer.
      const first = outcome(clientOf(replica).get({ userId: hot, integration: "gmail" }));
      await hold.next();
      timer = setTimeout(() => hold.stop(), 9_000);
      // A dozen more Gets of the hot connection arrive meanwhile ...
      const more = Array.from({ length: 12 }, () => outcome(clientOf(replica).get({ userId: hot, integration: "gmail" })));
      // They wait in the replica's single flight, not on the row lock with a pool connection each.
      await sleep(1_000);
      expect(await lockWaiters()).toEqual([]);
      // ... and a Get of an unrelated connection on the same replica, which must be served.
      const coldAnswer = await outcome(clientOf(replica).get({ userId: cold, integration: "gmail" }));
      const hotOutcomes = await Promise.all([first, ...more]);
      console.log(`slow provider (9 s): unrelated Get ${coldAnswer}; 13 hot Gets ${JSON.stringify(countBy(hotOutcomes))}`);
      expect(coldAnswer).toBe("ok");
      expect(hotOutcomes.every((o) => o === "ok")).toBe(true);
    } finally {
      clearTimeout(timer);
      hold.stop();
    }
  });
});

function countBy(values: string[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const v of values) counts[v] = (counts[v] ?? 0) + 1;
  return counts;
}

describe("the crash window: a replica dies after the provider rotated the refresh token", () => {
  it("(a) SIGKILL while waiting for the provider's answer: the next Get, on another replica, gets NEEDS_REAUTH; the rest keeps working", async () => {
    const [victim, survivor, other] = procs as [ServeProcess, ServeProcess, ServeProcess];
    const userId = newUser("crash-a");
    const bystander = newUser("bystander-a");
    const { refreshToken: minted, grantId } = await op.mintRefreshToken(userId);
    const { refreshToken: bystanderMinted } = await op.mintRefreshToken(bystander);
    await storeExpiring(clientOf(survivor), userId, minted);
    await storeExpiring(clientOf(survivor), bystander, bystanderMinted);
    const rowBefore = await rowOf(userId);

    const hold = op.holdTokenAnswers();
    let doomed: Promise<string>;
    let lostRefreshToken: string;
    try {
      doomed = outcome(clientOf(victim).get({ userId, integration: "gmail" }));
      const held = await hold.next();
      // The provider answered: it consumed the stored refresh token and issued a new one, which the
      // vault has not received. The victim holds the row lock while it waits.
      lostRefreshToken = held.call.refreshToken!;
      expect(lostRefreshToken).toBeDefined();
      expect(await op.introspect(minted, "refresh_token")).toMatchObject({ active: false });
      victim.kill("SIGKILL");
      expect(await victim.exit).toMatchObject({ signal: "SIGKILL" });
    } finally {
      hold.stop();
    }
    expect(await doomed).not.toBe("ok");

    // Nothing was written: the row still holds the old (now consumed) refresh token, same generation.
    expect(await rowOf(userId)).toMatchObject({ generation: rowBefore.generation, status: "active", last_refreshed_at: null });
    expect(await storedRefreshToken(clientOf(survivor), userId)).toBe(minted);

    // What was lost: the new access token and the rotated refresh token the provider issued to the dead
    // replica. The next Get refreshes with the old refresh token; with rotation and reuse detection the
    // provider takes it for a stolen token replayed, revokes the whole grant (the lost rotated token with
    // it) and answers invalid_grant: the vault marks the connection needs-reauth, the user must consent again.
    const before = op.tokenCalls().length;
    const err = await getError(clientOf(survivor), userId);
    expect(err.code).toBe(Code.FailedPrecondition);
    expect(reasonOf(err)).toBe(ErrorReason.NEEDS_REAUTH);
    expect(op.tokenCalls().slice(before)).toMatchObject([{ grantType: "refresh_token", status: 400, error: "invalid_grant" }]);
    expect(op.revokedGrants).toContain(grantId);
    expect(await op.grantExists(grantId)).toBe(false);
    expect(await op.introspect(lostRefreshToken, "refresh_token")).toMatchObject({ active: false });
    expect((await rowOf(userId)).status).toBe("needs_reauth");

    // Every other replica answers NEEDS_REAUTH at once now, without the provider.
    const fromOther = await getError(clientOf(other), userId);
    expect(reasonOf(fromOther)).toBe(ErrorReason.NEEDS_REAUTH);
    expect(op.tokenCalls().length).toBe(before + 1);
    const events = await auditActions(userId);
    expect(events.filter((e) => e.action === "refresh")).toHaveLength(0);
    expect(events.filter((e) => e.action === "refresh_failed")).toMatchObject([
      { outcome: "failed_precondition", details: { error: "invalid_grant", needs_reauth: true } },
    ]);

    // Nothing else broke: another connection refreshes on the survivors, and a new consent heals this one.
    const bystanderAnswer = await clientOf(other).get({ userId: bystander, integration: "gmail" });
    expect(bystanderAnswer.refreshed).toBe(true);
    expect(await op.introspect(bystanderAnswer.accessToken, "access_token")).toMatchObject({ active: true, sub: bystander });
    const { refreshToken: again } = await op.mintRefreshToken(userId);
    await storeExpiring(clientOf(other), userId, again);
    const healed = await clientOf(survivor).get({ userId, integration: "gmail" });
    expect(healed.refreshed).toBe(true);
    expect(healed.connection?.status).toBe(ConnectionStatus.ACTIVE);
  });

  it("(b) SIGKILL after the answer arrived and before the commit: the same, NEEDS_REAUTH on the next Get; a new replica and the audit chain are fine", async () => {
    const [, victim, survivor] = procs as [ServeProcess, ServeProcess, ServeProcess];
    expect(victim.exited()).toBe(false);
    const userId = newUser("crash-b");
    const { refreshToken: minted, grantId } = await op.mintRefreshToken(userId);
    await storeExpiring(clientOf(survivor), userId, minted);
    const rowBefore = await rowOf(userId);

    const hold = op.holdTokenAnswers();
    const locker = new pg.Client({ connectionString: db.url, application_name: "mp-test-locker" });
    await locker.connect();
    let doomed: Promise<string> | undefined;
    let lostRefreshToken: string;
    let blockedPid: number;
    try {
      doomed = outcome(clientOf(victim).get({ userId, integration: "gmail" }));
      const held = await hold.next();
      lostRefreshToken = held.call.refreshToken!;
      // The victim holds the row lock (SELECT ... FOR UPDATE: ROW SHARE on the table). A SHARE lock on the
      // table does not conflict with it, but holds back the victim's UPDATE of the refreshed tokens: the
      // victim then has the provider's whole answer and cannot commit.
      await locker.query("begin");
      await locker.query("lock table connections in share mode");
      hold.stop();
      await until(
        async () => (await lockWaiters()).some((w) => w.query.startsWith("update connections set key_id")),
        20_000,
        "the victim's refreshed-token UPDATE to wait on the table lock",
      );
      blockedPid = (await lockWaiters()).find((w) => w.query.startsWith("update connections set key_id"))!.pid;
      victim.kill("SIGKILL");
      expect(await victim.exit).toMatchObject({ signal: "SIGKILL" });
    } finally {
      hold.stop();
      await locker.query("rollback").catch(() => undefined);
      await locker.end();
    }
    expect(await doomed).not.toBe("ok");
    // Its session goes away without committing (the COMMIT was never sent).
    await until(
      async () => (await db.pool.query("select 1 from pg_stat_activity where pid = $1::int", [blockedPid])).rowCount === 0,
      20_000,
      "the killed replica's session to end",
    );
    expect(await rowOf(userId)).toMatchObject({ generation: rowBefore.generation, status: "active", last_refreshed_at: null });
    expect(await storedRefreshToken(clientOf(survivor), userId)).toBe(minted);

    // Lost, as documented: the provider's new tokens. The old refresh token is refused as reused.
    const before = op.tokenCalls().length;
    const err = await getError(clientOf(survivor), userId);
    expect(err.code).toBe(Code.FailedPrecondition);
    expect(reasonOf(err)).toBe(ErrorReason.NEEDS_REAUTH);
    expect(op.tokenCalls().slice(before)).toMatchObject([{ status: 400, error: "invalid_grant" }]);
    expect(op.revokedGrants).toContain(grantId);
    expect(await op.introspect(lostRefreshToken, "refresh_token")).toMatchObject({ active: false });
    const listed = await clientOf(survivor).listConnections({ userId });
    expect(listed.connections.map((c) => c.status)).toEqual([ConnectionStatus.NEEDS_REAUTH]);

    // A replacement replica starts on the same database and serves; the audit chain is intact.
    const replacement = await startReplica(3);
    procs.push(replacement);
    const { refreshToken: again } = await op.mintRefreshToken(userId);
    await storeExpiring(clientOf(replacement), userId, again);
    const healed = await clientOf(replacement).get({ userId, integration: "gmail" });
    expect(healed.refreshed).toBe(true);
    expect(await op.introspect(healed.accessToken, "access_token")).toMatchObject({ active: true, sub: userId });
    const verified = await clientOf(survivor).verifyAudit({});
    expect(verified.ok).toBe(true);
    expect(Number(verified.checked)).toBeGreaterThan(0);

    // Over the whole file the provider never saw a refresh token reused except in the two crash windows.
    expect(op.tokenCalls().filter((c) => c.status !== 200)).toHaveLength(2);
  });
});
