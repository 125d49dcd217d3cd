-- Why: every RPC must know who calls and what that caller may do. Callers
-- live in the database, not in a config file, so a change made on one replica
-- (through the CLI) reaches every replica within seconds without a restart.
-- Secrets are stored only as SHA-256 hashes: they are 256 random bits, so a
-- slow password hash would add nothing but latency on every call.

-- Up Migration
create table callers (
  id bigint generated always as identity primary key,
  name text not null unique check (name ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
  -- SHA-256 of the bearer secret; null for a caller that proves itself by certificate only
  secret_hash bytea,
  -- the client-certificate identity (SAN URI such as a SPIFFE id, else DNS name, else CN)
  cert_identity text unique,
  -- RPC method names (Store, Get ...) this caller may call
  allowed_rpcs text[] not null default '{}',
  -- integration names, or '*' for all
  allowed_integrations text[] not null default '{}',
  -- user ids, or prefixes ending in '*'; null means every user
  allowed_users text[],
  -- whether Get may hand this caller the refresh token
  may_receive_refresh_token boolean not null default false,
  revoked_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

-- Replicas cache the callers table and reload it when told: NOTIFY is a hint
-- for speed, a periodic reload is the guarantee.
create function notify_callers_changed() returns trigger language plpgsql as $$
begin
  perform pg_notify('tokenvault_callers', '');
  return null;
end;
$$;

create trigger callers_changed after insert or update or delete or truncate on callers
  for each statement execute function notify_callers_changed();

-- Down Migration
drop trigger callers_changed on callers;
drop function notify_callers_changed();
drop table callers;
