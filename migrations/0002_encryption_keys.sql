-- Why: a wrong key must be caught when the service starts, not at the first
-- Get. Each key id the service has used is recorded with a check value (an
-- HMAC under the key, which reveals nothing about it), so a start-up with a
-- different key under the same id is refused and names the id.

-- Up Migration
create table encryption_keys (
  key_id text primary key,
  check_value bytea not null,
  first_seen_at timestamptz not null default now()
);

-- Down Migration
drop table encryption_keys;
