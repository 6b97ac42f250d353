-- pgsse migration 002: history that cannot lose an event silently, sequencing whose speed
-- does not depend on plan history, and SSE-safe names.
--
-- * realtime.readers: every process's change feed records the position it has read. The
--   service's automatic pruning (realtime.prune_retained) never removes what a live reader
--   has not read yet. realtime.prune() stays the operator's "prune now".
-- * Readers prove completeness themselves: rows and realtime.sequencer.pruned_through are
--   read in one statement (one snapshot), and prune deletes rows and raises pruned_through in
--   one transaction, so a reader either sees the rows or sees that they are gone.
-- * realtime.sequence_v2: the batch is a keyed range (id <= the batch's highest id) read in
--   one statement, so the plan is an index range or a filtered scan, never a semi join that
--   degrades when the plan was cached while the inbox was empty.
-- * realtime.watch rejects tables whose names contain control characters: the table name
--   becomes the SSE event type, and a CR or LF there would let a row forge SSE fields.

CREATE TABLE IF NOT EXISTS realtime.readers (
    name     text PRIMARY KEY,
    position bigint      NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- A reader not seen for this long is gone (crashed or scaled down): it no longer holds
-- history back. Its clients, resuming elsewhere, get `reset` if their history was pruned.
CREATE OR REPLACE FUNCTION realtime.reader_horizon() RETURNS interval
LANGUAGE sql IMMUTABLE AS $$ SELECT interval '10 minutes' $$;

CREATE OR REPLACE FUNCTION realtime.sequence_v2(batch_size int DEFAULT 5000) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    head bigint;
    moved int;
BEGIN
    PERFORM pg_advisory_xact_lock(7013170583926);
    SELECT last_position INTO head FROM realtime.sequencer WHERE id = 1 FOR UPDATE;
    WITH top AS (
        SELECT max(id) AS id FROM (SELECT id FROM realtime.inbox ORDER BY id LIMIT batch_size) s
    ), batch AS (
        DELETE FROM realtime.inbox WHERE id <= (SELECT id FROM top)
        RETURNING *
    ), numbered AS (
        INSERT INTO realtime.events (position, topics, type, tbl, payload, created_at)
        SELECT head + row_number() OVER (ORDER BY b.id), b.topics, b.type, b.tbl, b.payload, b.created_at
        FROM batch b
        RETURNING position, tbl
    ), versions AS (
        INSERT INTO realtime.table_versions AS v (tbl, position)
        SELECT tbl, max(position) FROM numbered WHERE tbl IS NOT NULL GROUP BY tbl
        ON CONFLICT (tbl) DO UPDATE SET position = EXCLUDED.position
        RETURNING 1
    )
    SELECT count(*) INTO moved FROM numbered;
    IF moved > 0 THEN
        UPDATE realtime.sequencer SET last_position = head + moved WHERE id = 1;
        IF NOT EXISTS (SELECT 1 FROM realtime.checkpoints
                       WHERE at > clock_timestamp() - interval '5 seconds') THEN
            INSERT INTO realtime.checkpoints VALUES (head + moved, clock_timestamp())
            ON CONFLICT (position) DO NOTHING;
        END IF;
        PERFORM pg_notify('realtime_events', (head + moved)::text);
    END IF;
    RETURN moved;
END
$$;

-- The service's own pruning: past `older_than`, but never beyond what a live reader has read.
CREATE OR REPLACE FUNCTION realtime.prune_retained(older_than interval) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    removed bigint;
    highest bigint;
    slowest bigint;
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
    DELETE FROM realtime.events WHERE position <= highest;
    GET DIAGNOSTICS removed = ROW_COUNT;
    DELETE FROM realtime.checkpoints WHERE position < highest;
    UPDATE realtime.sequencer SET pruned_through = greatest(pruned_through, highest) WHERE id = 1;
    DELETE FROM realtime.readers WHERE seen_at < clock_timestamp() - interval '1 day';
    RETURN removed;
END
$$;

CREATE OR REPLACE FUNCTION realtime.safe_name(name text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT name IS NOT NULL AND name !~ '[[:cntrl:]]' AND length(name) BETWEEN 1 AND 200
$$;

-- watch(), as in 001, plus the name check.
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
    EXECUTE format('CREATE TRIGGER pgsse_capture_insert AFTER INSERT ON %s FOR EACH ROW EXECUTE FUNCTION realtime.capture_row_v1(%s)', tbl, args);
    EXECUTE format('CREATE TRIGGER pgsse_capture_update AFTER UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION realtime.capture_row_v1(%s)', tbl, args);
    EXECUTE format('CREATE TRIGGER pgsse_capture_delete AFTER DELETE ON %s FOR EACH ROW EXECUTE FUNCTION realtime.capture_row_v1(%s)', tbl, args);
    EXECUTE format('CREATE TRIGGER pgsse_capture_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION realtime.capture_truncate_v1(%s)', tbl, args);
    INSERT INTO realtime.watches (tbl, topic, key_column, columns, key_columns)
    VALUES (tbl, base_topic, key_column, columns,
            CASE WHEN key_column IS NOT NULL THEN ARRAY[key_column] ELSE pk END);
END
$$;

-- publish(), as in 001, with the offending values quoted (a CR/LF shows as itself, escaped).
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
    INSERT INTO realtime.inbox (topics, type, tbl, payload) VALUES (ARRAY[topic], type, NULL, data);
    IF (SELECT wake_writers FROM realtime.sequencer WHERE id = 1) THEN
        PERFORM pg_notify('realtime_wakeup', '');
    END IF;
END
$$;

GRANT SELECT ON realtime.readers TO pgsse_reader;
