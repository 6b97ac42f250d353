-- pgsse migration 003: capture that costs the writer little (issue #9).
--
-- Before: a row trigger built the whole event envelope (to_jsonb, jsonb_build_object,
-- to_char, a SELECT of the wake-up flag) into realtime.inbox, and the sequencer then DELETEd
-- each inbox row and INSERTed it again, payload and all, into realtime.events: three heap
-- writes and four index writes per business row, the payload written to WAL twice.
--
-- After:
-- * Writers append one row to realtime.changes: the row (and old row) as to_jsonb gives it,
--   the topic(s) and a few scalars. The envelope is assembled when reading, by text
--   concatenation in SQL (realtime.payload_v3), byte for byte what jsonb printed before.
--   INSERT and DELETE are captured per statement (transition tables: a 10,000-row
--   INSERT ... SELECT is one INSERT ... SELECT into realtime.changes); UPDATE per row (old and
--   new rows must be paired). The wake-up flag is read from a sequence (no query).
-- * Numbering without moving: a change stays where it was written. The sequencer numbers
--   the changes whose transactions committed since its previous snapshot (PgQ's idea:
--   changes carry their transaction id; a change is new iff its transaction is not visible
--   in the previous snapshot, i.e. it was in progress then or began after), writing one
--   narrow row per event to realtime.events (position, xid, id, type). Positions stay
--   dense and in commit order: a batch holds transactions that committed after every
--   transaction of the previous batch was visible.
-- * realtime.inbox becomes a view: committed changes not numbered yet (what it meant).
-- * Retained history and positions survive: old events are copied into the new layout with
--   their payload verbatim (op NULL), pending inbox rows are numbered here, after them.

SELECT pg_advisory_xact_lock(7013170583926);  -- no sequencing batch runs while we migrate

CREATE TABLE realtime.changes (
    -- The writer's top-level transaction, and insertion order within it.
    xid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    id         bigint      GENERATED ALWAYS AS IDENTITY (CACHE 32),
    tbl        text,                 -- schema.table; NULL for realtime.publish()
    type       text        NOT NULL, -- the SSE event type
    op         text,                 -- insert|update|delete|truncate; NULL: data is the payload
    topic      text        NOT NULL,
    old_topic  text,                 -- an UPDATE that changed the key: the old key's topic
    data       jsonb,                -- the row (the old row for a delete), or publish()'s data
    old        jsonb,                -- the old row of an update
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- The sequencer's scan (transactions since a snapshot) and the readers' join, in one index.
CREATE INDEX changes_xid_id ON realtime.changes (xid, id);

-- The wake-up flag writers read: 1 = the sequencer is idle and waits for a NOTIFY. A
-- sequence's value is read by a function call (pg_sequence_last_value), which PL/pgSQL
-- evaluates without running a query; a table would cost every writer an executor run.
CREATE SEQUENCE realtime.wakeup MINVALUE 0 MAXVALUE 1 START 1 NO CYCLE;
SELECT setval('realtime.wakeup', CASE WHEN wake_writers THEN 1 ELSE 0 END)
FROM realtime.sequencer WHERE id = 1;

-- Where the sequencer stands: changes of transactions not visible in snap_prev are not
-- numbered yet. A batch of at most batch_size is cut at (after_xid, after_id) of snap_target.
ALTER TABLE realtime.sequencer
    ADD COLUMN snap_prev   pg_snapshot,
    ADD COLUMN snap_target pg_snapshot,
    ADD COLUMN after_xid   xid8   NOT NULL DEFAULT '0',
    ADD COLUMN after_id    bigint NOT NULL DEFAULT 0;

-- The envelope of a watched table's change, as jsonb printed it (keys by length, then bytes:
-- op, ts, old, row, table, topic); NULL op: the stored data is the payload (publish, and
-- events retained from before this migration). SQL, STABLE: inlined into the reads.
CREATE FUNCTION realtime.payload_v3(op text, tbl text, topic text, data jsonb, old jsonb,
                                    created_at timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN op IS NULL THEN data::text
           ELSE '{"op": "' || op
                || '", "ts": "' || to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
                || '", "old": ' || COALESCE(old::text, 'null')
                || ', "row": ' || COALESCE(data::text, 'null')
                || ', "table": ' || to_json(tbl)::text
                || ', "topic": ' || to_json(topic)::text || '}' END
$$;

-- --- retained history and pending changes move to the new layout ---------------------------

LOCK TABLE realtime.inbox, realtime.events IN ACCESS EXCLUSIVE MODE;
ALTER TABLE realtime.events RENAME TO events_v1;
ALTER TABLE realtime.events_v1 RENAME CONSTRAINT events_pkey TO events_v1_pkey;

-- One narrow row per event: the numbering. Readers join it to realtime.changes.
CREATE TABLE realtime.events (
    position bigint PRIMARY KEY,
    xid      xid8   NOT NULL,
    id       bigint NOT NULL,
    type     text   NOT NULL
);

-- Old events keep their position and their payload, verbatim (xid 2: frozen, long visible).
INSERT INTO realtime.changes (xid, id, tbl, type, op, topic, old_topic, data, created_at)
OVERRIDING SYSTEM VALUE
SELECT '2', position, tbl, type, NULL, topics[1], topics[2], payload, created_at
FROM realtime.events_v1;
INSERT INTO realtime.events (position, xid, id, type)
SELECT position, '2', position, type FROM realtime.events_v1;

-- Committed inbox rows not numbered yet: numbered now, after the last position, as before.
WITH pending AS (
    SELECT i.*, s.last_position + row_number() OVER (ORDER BY i.id) AS position
    FROM realtime.inbox i, realtime.sequencer s WHERE s.id = 1
), copied AS (
    INSERT INTO realtime.changes (xid, id, tbl, type, op, topic, old_topic, data, created_at)
    OVERRIDING SYSTEM VALUE
    SELECT '2', position, tbl, type, NULL, topics[1], topics[2], payload, created_at FROM pending
), numbered AS (
    INSERT INTO realtime.events (position, xid, id, type)
    SELECT position, '2', position, type FROM pending
    RETURNING position
), versions AS (
    INSERT INTO realtime.table_versions AS v (tbl, position)
    SELECT tbl, max(position) FROM pending WHERE tbl IS NOT NULL GROUP BY tbl
    ON CONFLICT (tbl) DO UPDATE SET position = greatest(v.position, EXCLUDED.position)
)
UPDATE realtime.sequencer SET last_position = last_position + (SELECT count(*) FROM numbered)
WHERE id = 1;

DROP TABLE realtime.events_v1;
DROP TABLE realtime.inbox;
-- New identities start above every copied id (ids only order changes within a transaction,
-- but (xid, id) must stay unique).
SELECT setval(pg_get_serial_sequence('realtime.changes', 'id'),
              greatest((SELECT max(id) FROM realtime.changes), 1));

-- Everything committed so far is numbered: from here on, a change is new when its
-- transaction is not visible in this snapshot (this migration's own copies carry xid 2).
UPDATE realtime.sequencer SET snap_prev = pg_current_snapshot(), snap_target = NULL,
                              after_xid = '0', after_id = 0
WHERE id = 1;

-- Committed changes the sequencer has not numbered yet (the old inbox's meaning: "count(*) =
-- 0" means every committed change has its position).
CREATE VIEW realtime.inbox AS
SELECT c.id,
       CASE WHEN c.old_topic IS NULL THEN ARRAY[c.topic] ELSE ARRAY[c.topic, c.old_topic] END AS topics,
       c.type, c.tbl, realtime.payload_v3(c.op, c.tbl, c.topic, c.data, c.old, c.created_at) AS payload,
       c.created_at
FROM realtime.sequencer s
JOIN realtime.changes c ON c.xid >= pg_snapshot_xmin(s.snap_prev)
WHERE s.id = 1
  AND NOT pg_visible_in_snapshot(c.xid, s.snap_prev)
  AND NOT (s.snap_target IS NOT NULL AND pg_visible_in_snapshot(c.xid, s.snap_target)
           AND (c.xid, c.id) <= (s.after_xid, s.after_id));

-- A writer that was already running the old capture body when this migration committed
-- inserts into realtime.inbox: its change is kept, as a verbatim payload.
CREATE FUNCTION realtime.inbox_insert_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO realtime.changes (tbl, type, op, topic, old_topic, data, created_at)
    VALUES (NEW.tbl, NEW.type, NULL, NEW.topics[1], NEW.topics[2], NEW.payload::jsonb,
            COALESCE(NEW.created_at, clock_timestamp()));
    RETURN NEW;
END
$$;
CREATE TRIGGER inbox_insert INSTEAD OF INSERT ON realtime.inbox
FOR EACH ROW EXECUTE FUNCTION realtime.inbox_insert_v1();

-- --- capture -----------------------------------------------------------------------------

-- key_topic with the common case (a key already in the topic alphabet) inline.
CREATE FUNCTION realtime.key_topic_v2(base text, key_value text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN key_value IS NULL OR key_value = '' THEN base
                WHEN key_value ~ '^[A-Za-z0-9_.:@-]+$' THEN base || '/' || key_value
                ELSE base || '/' || realtime.topic_segment(key_value) END
$$;

-- TG_ARGV of every capture trigger: topic, key column ('' for none), columns removed from
-- row/old (a text[] literal, '{}' for none). Transition rows are taken whole with alias.*
-- (a bare alias would mean a column if the table had one of that name).

-- INSERT, per statement: one INSERT ... SELECT from the transition table.
CREATE FUNCTION realtime.capture_insert_v2() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_ARGV[1] = '' AND TG_ARGV[2] = '{}' THEN
        INSERT INTO realtime.changes (tbl, type, op, topic, data)
        SELECT TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_TABLE_NAME || '.insert', 'insert',
               TG_ARGV[0], to_jsonb(pgsse_n.*)
        FROM pgsse_new pgsse_n;
    ELSE
        INSERT INTO realtime.changes (tbl, type, op, topic, data)
        SELECT TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_TABLE_NAME || '.insert', 'insert',
               CASE WHEN TG_ARGV[1] = '' THEN TG_ARGV[0]
                    ELSE realtime.key_topic_v2(TG_ARGV[0], r ->> TG_ARGV[1]) END,
               r - TG_ARGV[2]::text[]
        FROM (SELECT to_jsonb(pgsse_n.*) AS r FROM pgsse_new pgsse_n) s;
    END IF;
    IF FOUND AND pg_sequence_last_value('realtime.wakeup') = 1 THEN
        -- A payload-free wake-up; identical notifications fold into one per transaction.
        PERFORM pg_notify('realtime_wakeup', '');
    END IF;
    RETURN NULL;
END
$$;

-- DELETE, per statement: the old rows, as `row`.
CREATE FUNCTION realtime.capture_delete_v2() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO realtime.changes (tbl, type, op, topic, data)
    SELECT TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_TABLE_NAME || '.delete', 'delete',
           CASE WHEN TG_ARGV[1] = '' THEN TG_ARGV[0]
                ELSE realtime.key_topic_v2(TG_ARGV[0], r ->> TG_ARGV[1]) END,
           CASE WHEN TG_ARGV[2] = '{}' THEN r ELSE r - TG_ARGV[2]::text[] END
    FROM (SELECT to_jsonb(pgsse_o.*) AS r FROM pgsse_old pgsse_o) s;
    IF FOUND AND pg_sequence_last_value('realtime.wakeup') = 1 THEN
        PERFORM pg_notify('realtime_wakeup', '');
    END IF;
    RETURN NULL;
END
$$;

-- UPDATE, per row: the old and the new row of each update belong together (transition
-- tables do not pair them), and a key change reaches the old key's topic too.
CREATE FUNCTION realtime.capture_update_v2() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r jsonb := to_jsonb(NEW);
    o jsonb := to_jsonb(OLD);
    topic text := TG_ARGV[0];
    old_topic text;
BEGIN
    IF TG_ARGV[1] <> '' THEN
        topic := realtime.key_topic_v2(TG_ARGV[0], r ->> TG_ARGV[1]);
        old_topic := NULLIF(realtime.key_topic_v2(TG_ARGV[0], o ->> TG_ARGV[1]), topic);
    END IF;
    IF TG_ARGV[2] <> '{}' THEN
        r := r - TG_ARGV[2]::text[];
        o := o - TG_ARGV[2]::text[];
    END IF;
    INSERT INTO realtime.changes (tbl, type, op, topic, old_topic, data, old)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_TABLE_NAME || '.update', 'update',
            topic, old_topic, r, o);
    IF pg_sequence_last_value('realtime.wakeup') = 1 THEN
        PERFORM pg_notify('realtime_wakeup', '');
    END IF;
    RETURN NULL;
END
$$;

-- TRUNCATE has no rows: one event per statement.
CREATE FUNCTION realtime.capture_truncate_v2() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO realtime.changes (tbl, type, op, topic)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_TABLE_NAME || '.truncate', 'truncate',
            TG_ARGV[0]);
    IF pg_sequence_last_value('realtime.wakeup') = 1 THEN
        PERFORM pg_notify('realtime_wakeup', '');
    END IF;
    RETURN NULL;
END
$$;

-- The version-1 trigger functions, for any trigger still pointing at them: the same capture
-- as version 2, per row (this migration re-installs every watch's triggers below).
CREATE OR REPLACE FUNCTION realtime.capture_row_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r jsonb;
    o jsonb;
    topic text := TG_ARGV[0];
    old_topic text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        r := to_jsonb(OLD);
    ELSE
        r := to_jsonb(NEW);
    END IF;
    IF TG_OP = 'UPDATE' THEN
        o := to_jsonb(OLD);
    END IF;
    IF TG_ARGV[1] <> '' THEN
        topic := realtime.key_topic_v2(TG_ARGV[0], r ->> TG_ARGV[1]);
        IF o IS NOT NULL THEN
            old_topic := NULLIF(realtime.key_topic_v2(TG_ARGV[0], o ->> TG_ARGV[1]), topic);
        END IF;
    END IF;
    IF TG_ARGV[2] <> '{}' THEN
        r := r - TG_ARGV[2]::text[];
        o := o - TG_ARGV[2]::text[];
    END IF;
    INSERT INTO realtime.changes (tbl, type, op, topic, old_topic, data, old)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_TABLE_NAME || '.' || lower(TG_OP),
            lower(TG_OP), topic, old_topic, r, o);
    IF pg_sequence_last_value('realtime.wakeup') = 1 THEN
        PERFORM pg_notify('realtime_wakeup', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION realtime.capture_truncate_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO realtime.changes (tbl, type, op, topic)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_TABLE_NAME || '.truncate', 'truncate',
            TG_ARGV[0]);
    IF pg_sequence_last_value('realtime.wakeup') = 1 THEN
        PERFORM pg_notify('realtime_wakeup', '');
    END IF;
    RETURN NULL;
END
$$;

-- watch(), as in 002, installing the version-2 capture.
CREATE OR REPLACE FUNCTION realtime.watch(
    tbl regclass, topic text DEFAULT NULL, key_column text DEFAULT NULL,
    columns text[] DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    base_topic text;
    rel_name text;
    all_columns text[];
    hidden text[] := '{}';
    pk text[];
    args text;
BEGIN
    SELECT c.relname INTO rel_name FROM pg_class c WHERE c.oid = tbl;
    IF NOT realtime.safe_name(rel_name) THEN
        RAISE EXCEPTION 'cannot watch table %: its name becomes the SSE event type and must not contain control characters (CR, LF, NUL, ...)',
            quote_literal(rel_name) USING ERRCODE = '22023';
    END IF;
    base_topic := COALESCE(topic, rel_name);
    IF NOT realtime.valid_topic(base_topic) THEN
        RAISE EXCEPTION 'invalid topic %: use /-separated segments of [A-Za-z0-9_.:@%%-], at most 256 characters', quote_literal(base_topic)
            USING ERRCODE = '22023';
    END IF;
    SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO all_columns
    FROM pg_attribute a WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped;
    IF key_column IS NOT NULL AND NOT key_column = ANY (all_columns) THEN
        RAISE EXCEPTION 'column % does not exist in %', key_column, tbl USING ERRCODE = '42703';
    END IF;
    IF columns IS NOT NULL THEN
        IF NOT columns <@ all_columns THEN
            RAISE EXCEPTION 'columns % are not all columns of %', columns, tbl USING ERRCODE = '42703';
        END IF;
        SELECT COALESCE(array_agg(c), '{}') INTO hidden FROM unnest(all_columns) c WHERE NOT c = ANY (columns);
    END IF;
    SELECT COALESCE(array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum)), '{}') INTO pk
    FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
    WHERE i.indrelid = tbl AND i.indisprimary;

    PERFORM realtime.unwatch(tbl);
    args := format('%L, %L, %L', base_topic, COALESCE(key_column, ''), hidden::text);
    EXECUTE format('CREATE TRIGGER pgsse_capture_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS pgsse_new FOR EACH STATEMENT EXECUTE FUNCTION realtime.capture_insert_v2(%s)', tbl, args);
    EXECUTE format('CREATE TRIGGER pgsse_capture_update AFTER UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION realtime.capture_update_v2(%s)', tbl, args);
    EXECUTE format('CREATE TRIGGER pgsse_capture_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS pgsse_old FOR EACH STATEMENT EXECUTE FUNCTION realtime.capture_delete_v2(%s)', tbl, args);
    EXECUTE format('CREATE TRIGGER pgsse_capture_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION realtime.capture_truncate_v2(%s)', tbl, args);
    INSERT INTO realtime.watches (tbl, topic, key_column, columns, key_columns)
    VALUES (tbl, base_topic, key_column, columns,
            CASE WHEN key_column IS NOT NULL THEN ARRAY[key_column] ELSE pk END);
END
$$;

-- Every existing watch gets the version-2 triggers.
SELECT realtime.watch(w.tbl, w.topic, w.key_column, w.columns) FROM realtime.watches w;

CREATE OR REPLACE FUNCTION realtime.publish(topic text, type text, data jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT realtime.valid_topic(topic) THEN
        RAISE EXCEPTION 'invalid topic %: use /-separated segments of [A-Za-z0-9_.:@%%-], at most 256 characters', quote_literal(topic)
            USING ERRCODE = '22023';
    END IF;
    IF type IS NULL OR type !~ '^[A-Za-z0-9_.:-]{1,64}$' OR type IN ('reset', 'auth_expired')
       OR type LIKE 'aggregate.%' THEN
        RAISE EXCEPTION 'invalid event type %: [A-Za-z0-9_.:-]{1,64}, not reset, auth_expired or aggregate.*', quote_literal(type)
            USING ERRCODE = '22023';
    END IF;
    IF data IS NULL THEN
        RAISE EXCEPTION 'data must not be NULL (use the JSON value null)' USING ERRCODE = '22004';
    END IF;
    INSERT INTO realtime.changes (type, topic, data) VALUES (type, topic, data);
    IF pg_sequence_last_value('realtime.wakeup') = 1 THEN
        PERFORM pg_notify('realtime_wakeup', '');
    END IF;
END
$$;

-- --- sequencing --------------------------------------------------------------------------

-- Numbers the changes of transactions that committed since the previous batch, at most
-- batch_size at a time, in (transaction, insertion) order; returns how many it numbered.
-- A change is new iff its transaction is not visible in snap_prev: it was in progress then
-- (its xid is in snap_prev's list, a short one) or began later (xid >= snap_prev's xmax).
-- Only transactions visible in snap_target are taken, so a batch never holds a transaction
-- committed after a later one it left out. When every such change is numbered, snap_target
-- becomes snap_prev. Safe to call from anywhere: the advisory lock serialises callers.
CREATE FUNCTION realtime.sequence_v3(batch_size int DEFAULT 5000) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    s realtime.sequencer%ROWTYPE;
    target pg_snapshot;
    prev_xip xid8[];
    prev_xmax xid8;
    moved int;
    last_xid xid8;
    last_id bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7013170583926);
    SELECT * INTO s FROM realtime.sequencer WHERE id = 1 FOR UPDATE;
    target := COALESCE(s.snap_target, pg_current_snapshot());
    prev_xip := ARRAY(SELECT pg_snapshot_xip(s.snap_prev));
    prev_xmax := pg_snapshot_xmax(s.snap_prev);
    -- The index scans start at the first candidate transaction: a scalar bound on xid. The
    -- cut of a partial batch is a filter written so it cannot become the scan's start key
    -- (a row comparison from ('0', 0) would walk the whole index every batch).
    WITH batch AS (
        SELECT b.xid, b.id, b.tbl, b.type FROM (
            (SELECT c.xid, c.id, c.tbl, c.type FROM realtime.changes c
             WHERE c.xid = ANY (prev_xip) AND c.xid >= s.after_xid
               AND CASE WHEN c.xid = s.after_xid THEN c.id > s.after_id ELSE true END
               AND pg_visible_in_snapshot(c.xid, target)
             ORDER BY c.xid, c.id LIMIT batch_size)
            UNION ALL
            (SELECT c.xid, c.id, c.tbl, c.type FROM realtime.changes c
             WHERE c.xid >= greatest(prev_xmax, s.after_xid)
               AND CASE WHEN c.xid = s.after_xid THEN c.id > s.after_id ELSE true END
               AND pg_visible_in_snapshot(c.xid, target)
             ORDER BY c.xid, c.id LIMIT batch_size)
        ) b ORDER BY b.xid, b.id LIMIT batch_size
    ), ranked AS (
        SELECT s.last_position + row_number() OVER (ORDER BY b.xid, b.id) AS position,
               b.xid, b.id, b.tbl, b.type
        FROM batch b
    ), numbered AS (
        INSERT INTO realtime.events (position, xid, id, type)
        SELECT position, xid, id, type FROM ranked
    ), versions AS (
        INSERT INTO realtime.table_versions AS v (tbl, position)
        SELECT tbl, max(position) FROM ranked WHERE tbl IS NOT NULL GROUP BY tbl
        ON CONFLICT (tbl) DO UPDATE SET position = EXCLUDED.position
    )
    -- (Data-modifying CTEs run whether or not they are read.)
    SELECT n.moved, l.xid, l.id INTO moved, last_xid, last_id
    FROM (SELECT count(*)::int AS moved FROM ranked) n
    LEFT JOIN LATERAL (SELECT xid, id FROM ranked ORDER BY position DESC LIMIT 1) l ON true;
    IF moved >= batch_size THEN
        -- More may be visible in target: continue after the last one numbered.
        UPDATE realtime.sequencer SET last_position = last_position + moved,
            snap_target = target, after_xid = last_xid, after_id = last_id
        WHERE id = 1;
    ELSE
        UPDATE realtime.sequencer SET last_position = last_position + moved,
            snap_prev = target, snap_target = NULL, after_xid = '0', after_id = 0
        WHERE id = 1;
    END IF;
    IF moved > 0 THEN
        IF NOT EXISTS (SELECT 1 FROM realtime.checkpoints
                       WHERE at > clock_timestamp() - interval '5 seconds') THEN
            INSERT INTO realtime.checkpoints VALUES (s.last_position + moved, clock_timestamp())
            ON CONFLICT (position) DO NOTHING;
        END IF;
        PERFORM pg_notify('realtime_events', (s.last_position + moved)::text);
    END IF;
    RETURN moved;
END
$$;

-- Earlier names, for callers that still use them (scripts, a process of the previous
-- version during a rolling deploy).
CREATE OR REPLACE FUNCTION realtime.sequence_v1(batch_size int DEFAULT 5000) RETURNS int
LANGUAGE sql AS $$ SELECT realtime.sequence_v3(batch_size) $$;
CREATE OR REPLACE FUNCTION realtime.sequence_v2(batch_size int DEFAULT 5000) RETURNS int
LANGUAGE sql AS $$ SELECT realtime.sequence_v3(batch_size) $$;

-- --- pruning -----------------------------------------------------------------------------

-- Removes every position at or below `highest` (a prefix, so pruned_through is exact) and
-- the changes they numbered, and raises pruned_through, in the caller's transaction.
CREATE FUNCTION realtime.prune_through_v3(highest bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    removed bigint;
BEGIN
    WITH gone AS (
        DELETE FROM realtime.events WHERE position <= highest RETURNING xid, id
    ), dropped AS (
        DELETE FROM realtime.changes c USING gone g WHERE c.xid = g.xid AND c.id = g.id
    )
    SELECT count(*) INTO removed FROM gone;
    DELETE FROM realtime.checkpoints WHERE position < highest;
    UPDATE realtime.sequencer SET pruned_through = greatest(pruned_through, highest) WHERE id = 1;
    RETURN removed;
END
$$;

CREATE OR REPLACE FUNCTION realtime.prune(older_than interval) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    highest bigint;
BEGIN
    IF older_than <= interval '0' THEN
        SELECT max(position) INTO highest FROM realtime.events;
    ELSE
        -- Checkpoints are written every few seconds, so retention is that precise.
        SELECT c.position INTO highest FROM realtime.checkpoints c
        WHERE c.at < clock_timestamp() - older_than ORDER BY c.position DESC LIMIT 1;
    END IF;
    IF highest IS NULL THEN
        RETURN 0;
    END IF;
    RETURN realtime.prune_through_v3(highest);
END
$$;

CREATE OR REPLACE FUNCTION realtime.prune_retained(older_than interval) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    highest bigint;
    slowest bigint;
    removed bigint;
BEGIN
    SELECT c.position INTO highest FROM realtime.checkpoints c
    WHERE c.at < clock_timestamp() - older_than ORDER BY c.position DESC LIMIT 1;
    IF highest IS NULL THEN
        RETURN 0;
    END IF;
    SELECT min(r.position) INTO slowest FROM realtime.readers r
    WHERE r.seen_at > clock_timestamp() - realtime.reader_horizon();
    IF slowest IS NOT NULL AND slowest < highest THEN
        highest := slowest;
    END IF;
    IF highest <= (SELECT pruned_through FROM realtime.sequencer WHERE id = 1) THEN
        RETURN 0;
    END IF;
    removed := realtime.prune_through_v3(highest);
    DELETE FROM realtime.readers WHERE seen_at < clock_timestamp() - interval '1 day';
    RETURN removed;
END
$$;

GRANT SELECT ON realtime.events TO pgsse_reader;
