-- Named queries of `pgsse migrate` (service/db.py).

-- name: migrations_table
-- Where applied migration files are recorded (created before the first migration runs).
CREATE SCHEMA IF NOT EXISTS realtime;
CREATE TABLE IF NOT EXISTS realtime.migrations (
    name       text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: applied_migrations
SELECT name FROM realtime.migrations

-- name: record_migration
INSERT INTO realtime.migrations (name) VALUES ($1)

-- name: take_lock
-- A transaction-level advisory lock (ids: service/queries.py Lock).
SELECT pg_advisory_xact_lock($1)

-- name: read_only_session
-- A standby, or a session whose transactions are read-only (role or database setting).
SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'

-- name: migrations_recorded
SELECT to_regclass('realtime.migrations') IS NOT NULL
