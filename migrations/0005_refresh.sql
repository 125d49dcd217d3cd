-- Why: Get refreshes expiring tokens. What a refresh needs to remember lives
-- on the connection, so every replica sees it:
--   - refresh_token_expires_at: some providers say when the refresh token dies,
--     so ListConnections can warn before the connection does;
--   - refresh_failures / refresh_retry_at: transient failures back off per
--     connection (exponential, capped; a 429's Retry-After), so repeated Gets
--     on any replica do not hammer a provider that is down;
--   - last_refreshed_at: when the vault last refreshed it.
-- Backoff bookkeeping does not bump the generation: the token set is unchanged.

-- Up Migration
alter table connections
  add column refresh_token_expires_at timestamptz,
  add column last_refreshed_at timestamptz,
  add column refresh_failures integer not null default 0,
  add column refresh_retry_at timestamptz;

-- Down Migration
alter table connections
  drop column refresh_token_expires_at,
  drop column last_refreshed_at,
  drop column refresh_failures,
  drop column refresh_retry_at;
