-- Named queries of the aggregate side (service/aggregates.py, catalog.py, export.py).
-- A block starts with "-- name: <name>"; the comment lines after it say what it is for.

-- name: become_reader
-- Inside a read-only transaction: act as pgsse_reader with the caller's claims, so row-level
-- security applies; $1 claims (JSON text), $2 statement timeout.
SELECT set_config('role', 'pgsse_reader', true),
       set_config('request.jwt.claims', $1, true),
       set_config('statement_timeout', $2, true)

-- name: become_exporter
-- As become_reader, for a streamed export; $3 idle-in-transaction timeout (a reader that
-- stops reading loses its export instead of holding a snapshot).
SELECT set_config('role', 'pgsse_reader', true),
       set_config('request.jwt.claims', $1, true),
       set_config('statement_timeout', $2, true),
       set_config('idle_in_transaction_session_timeout', $3, true)

-- name: become_inspector
-- At start-up, preparing a file as pgsse_reader with generic plans (to find its tables).
SELECT set_config('role', 'pgsse_reader', true),
       set_config('request.jwt.claims', '{}', true),
       set_config('statement_timeout', '10s', true),
       set_config('plan_cache_mode', 'force_generic_plan', true)

-- name: table_versions
-- The last position that touched each watched table (the ETag's input).
SELECT tbl, position FROM realtime.table_versions

-- name: watched_tables
-- Every table realtime.watch() covers, as schema.table.
SELECT n.nspname || '.' || c.relname AS t FROM realtime.watches w
JOIN pg_class c ON c.oid = w.tbl JOIN pg_namespace n ON n.oid = c.relnamespace

-- name: partition_trees
-- Every relation of the partition trees the given (schema, name) pairs belong to.
SELECT DISTINCT n.nspname || '.' || c.relname AS t
FROM unnest($1::text[], $2::text[]) AS r(nsp, rel)
CROSS JOIN LATERAL pg_partition_tree(
    pg_partition_root(to_regclass(format('%I.%I', r.nsp, r.rel)))) p
JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace

-- name: table_shapes
-- A fingerprint of each named table: its oid and storage (relfilenode: a rewrite such as
-- ALTER COLUMN TYPE … USING, or TRUNCATE, moves it), its columns (number, name, type, typmod)
-- and privileges; empty when no such table. ALTER TABLE, RENAME, DROP, GRANT and REVOKE
-- change it (service/shapes.py). $1 schemas, $2 table names.
SELECT r.nsp || '.' || r.rel AS t,
       md5(coalesce(c.oid::text || '|' || c.relfilenode::text || '|'
                    || coalesce(c.relacl::text, '') || '|' || coalesce((
           SELECT string_agg(a.attnum || ' ' || a.attname || ' ' || a.atttypid || ' ' || a.atttypmod || ' '
                             || coalesce(a.attacl::text, ''), ',' ORDER BY a.attnum)
           FROM pg_attribute a
           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), ''), '')) AS shape
FROM unnest($1::text[], $2::text[]) AS r(nsp, rel)
LEFT JOIN pg_class c ON c.oid = to_regclass(format('%I.%I', r.nsp, r.rel))
