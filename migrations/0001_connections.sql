-- Why: one row per (user, integration), the "connection". Secret fields are
-- sealed by the service (AES-256-GCM, see src/crypto) before they reach this
-- table, so a database dump or a replica holds no usable token. Metadata stays
-- in clear so ListConnections and operators can query it without keys.

-- Up Migration
create table connections (
  id bigint generated always as identity primary key,
  user_id text not null,
  integration text not null,
  -- the key that sealed every *_sealed column of this row
  key_id text not null,
  access_token_sealed bytea not null,
  refresh_token_sealed bytea,
  id_token_sealed bytea,
  extras_sealed bytea,
  token_type text not null,
  scopes text[] not null default '{}',
  expires_at timestamptz,
  status text not null default 'active' check (status in ('active', 'needs_reauth')),
  -- the version of the token set: every write of the sealed columns (store,
  -- refresh, re-seal) increments it, so a writer can tell whether the row
  -- moved since it read it
  generation bigint not null default 1,
  ip_address inet,
  user_agent text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  last_used_at timestamptz,
  issued_at timestamptz not null default now(),
  constraint connections_user_integration_key unique (user_id, integration)
)
-- Get updates last_used_at on every call; free space on each page keeps those
-- updates HOT (no index maintenance, no bloat of the unique index).
with (fillfactor = 85);

-- keys status counts rows per key; rotation walks the rows of an old key in id order.
create index connections_key_id_idx on connections (key_id, id);

-- Down Migration
drop table connections;
