-- Why: auditors must be able to answer who touched which user's tokens, when,
-- and with what outcome, and trust that the answer was not edited.
--
-- Each event's hash covers the previous event's hash and the event's canonical
-- encoding (computed by the service, see src/audit/chain.ts). Ids are not a
-- sequence: the writer assigns them while holding the row lock on audit_head,
-- which it keeps until commit, so ids are gapless and commit in order across
-- every replica. A reader that has seen id N has seen every event <= N, so a
-- cursor never skips an event that committed late.

-- Up Migration
create table audit_events (
  id bigint primary key,
  -- hashed at millisecond precision, so stored at exactly that precision
  occurred_at timestamptz not null check (occurred_at = date_trunc('milliseconds', occurred_at)),
  -- the authenticated caller's name; null when the caller was not authenticated
  caller text,
  action text not null,
  user_id text,
  integration text,
  -- the Connect code in snake case: ok, not_found, permission_denied ...
  outcome text not null,
  request_id text,
  peer text,
  -- facts without any secret (the RPC, a denial's reason, counts ...)
  details jsonb not null default '{}',
  prev_hash bytea not null check (length(prev_hash) = 32),
  hash bytea not null check (length(hash) = 32)
);

-- Auditors' usual questions: one user's history, and time ranges for pruning.
create index audit_events_user on audit_events (user_id, id);
create index audit_events_occurred_at on audit_events (occurred_at);

-- The end of the chain: the last id and hash. One row, locked by each batch
-- for the length of its transaction; it also keeps the chain going after a
-- prune removed every event.
create table audit_head (
  singleton boolean primary key default true check (singleton),
  last_id bigint not null,
  last_hash bytea not null check (length(last_hash) = 32)
) with (fillfactor = 50); -- room for HOT updates: it is rewritten by every batch
insert into audit_head (last_id, last_hash) values (0, '\x0000000000000000000000000000000000000000000000000000000000000000');

-- Where `audit prune` cut the log: events up to last_id are gone, and the
-- event after it must carry last_hash as its prev_hash.
create table audit_checkpoints (
  last_id bigint primary key,
  last_hash bytea not null check (length(last_hash) = 32),
  pruned_count bigint not null,
  pruned_before timestamptz not null,
  created_at timestamptz not null default now()
);

-- Down Migration
drop table audit_checkpoints;
drop table audit_head;
drop table audit_events;
