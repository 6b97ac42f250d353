-- pgsse migration 005: watches that follow the table's schema (issue #19).
--
-- * `columns` is an allow-list by construction: the capture triggers (version 3) keep only
--   the listed names in `row`/`old`. Before, they removed the columns that existed at watch
--   time, so a column added later (ADD COLUMN ssn) or renamed (password -> pw) was shipped.
-- * Watches remember their key column and listed columns by attribute number, and an event
--   trigger on ALTER TABLE re-derives their names in the DDL's own transaction: a renamed key
--   column keeps routing (RENAME COLUMN store_id TO shop_id: events stay on orders/<key>), a
--   renamed listed column keeps being shipped under its new name, a dropped one is gone.
-- * An event trigger on sql_drop refuses to drop a watch's key column (SQLSTATE 2BP01: call
--   realtime.watch() with another key, or realtime.unwatch(), first), and unwatches a dropped
--   table (its realtime.watches row used to stay).
-- * Unwatching (realtime.unwatch, DROP TABLE, or the table's old name after a RENAME) records
--   a position-bearing marker: a change with type 'pgsse.unwatched', topic '' (no
--   subscription can match it) and the table's name. The service's aggregates see it in the
--   feed and serve every aggregate reading that table as unwatched from that position on;
--   streams never receive it (no topic is ''), and GET /events/<position> does not show it.
-- * Event triggers need a superuser: a role without it migrates all the same (a WARNING says
--   so) and keeps the allow-list; a superuser then runs realtime.track_schema_changes() once.

SELECT pg_advisory_xact_lock(7013170583926);  -- no sequencing batch runs while we migrate

ALTER TABLE realtime.watches
    ADD COLUMN IF NOT EXISTS tbl_name       text,      -- schema.table, as last seen
    ADD COLUMN IF NOT EXISTS key_attnum     smallint,  -- key_column, by identity
    ADD COLUMN IF NOT EXISTS column_attnums smallint[], -- columns, by identity
    ADD COLUMN IF NOT EXISTS hidden         text[];    -- what the triggers remove (see below)

-- Watches of tables dropped before this migration (finding 7): their rows go.
DELETE FROM realtime.watches w WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = w.tbl);

-- `r` with only the keys listed in `allowed`: whatever the table has gained since the watch.
CREATE FUNCTION realtime.allowed_v5(r jsonb, allowed text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT r - ARRAY(SELECT k FROM jsonb_object_keys(r) k WHERE NOT k = ANY (allowed))
$$;

-- TG_ARGV of the version-3 capture triggers: topic, key column ('' for none), the columns
-- removed from `row`/`old` as of the last install (a text[] literal), and the columns they
-- may carry (a text[] literal; '' for all). Removing the hidden columns is cheap (one jsonb
-- operator); what is left is checked against the allow-list with another one, and only if
-- something unlisted is left (a column added or renamed since, with no event trigger to
-- re-install the watch) is the row rebuilt from the allowed keys (realtime.allowed_v5).
-- Measured (single-row statements, 6 columns, 3 listed, a loaded 2-core machine): within
-- the noise of version 2 (insert median 95 vs 79 us/statement, minima 40 vs 67); calling
-- allowed_v5 on every row instead measured 139 vs 93 us per insert, 175 vs 70 per update.

CREATE FUNCTION realtime.capture_insert_v3() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hidden text[];
    allowed text[];
BEGIN
    IF TG_ARGV[1] = '' AND TG_ARGV[3] = '' THEN
        INSERT INTO realtime.changes (tbl, type, op, topic, data)
        SELECT TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_TABLE_NAME || '.insert', 'insert',
               TG_ARGV[0], to_jsonb(pgsse_n.*)
        FROM pgsse_new pgsse_n;
    ELSE
        IF TG_ARGV[3] <> '' THEN
            hidden := TG_ARGV[2]::text[];
            allowed := TG_ARGV[3]::text[];
        END IF;
        INSERT INTO realtime.changes (tbl, type, op, topic, data)
        SELECT TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_TABLE_NAME || '.insert', 'insert',
               CASE WHEN TG_ARGV[1] = '' THEN TG_ARGV[0]
                    ELSE realtime.key_topic_v2(TG_ARGV[0], r ->> TG_ARGV[1]) END,
               CASE WHEN allowed IS NULL THEN r
                    WHEN (r - hidden) - allowed = '{}' THEN r - hidden
                    ELSE realtime.allowed_v5(r, allowed) END
        FROM (SELECT to_jsonb(pgsse_n.*) AS r FROM pgsse_new pgsse_n) s;
    END IF;
    IF FOUND AND pg_sequence_last_value('realtime.wakeup') = 1 THEN
        PERFORM pg_notify('realtime_wakeup', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION realtime.capture_delete_v3() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hidden text[];
    allowed text[];
BEGIN
    IF TG_ARGV[3] <> '' THEN
        hidden := TG_ARGV[2]::text[];
        allowed := TG_ARGV[3]::text[];
    END IF;
    INSERT INTO realtime.changes (tbl, type, op, topic, data)
    SELECT TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_TABLE_NAME || '.delete', 'delete',
           CASE WHEN TG_ARGV[1] = '' THEN TG_ARGV[0]
                ELSE realtime.key_topic_v2(TG_ARGV[0], r ->> TG_ARGV[1]) END,
           CASE WHEN allowed IS NULL THEN r
                WHEN (r - hidden) - allowed = '{}' THEN r - hidden
                ELSE realtime.allowed_v5(r, allowed) END
    FROM (SELECT to_jsonb(pgsse_o.*) AS r FROM pgsse_old pgsse_o) s;
    IF FOUND AND pg_sequence_last_value('realtime.wakeup') = 1 THEN
        PERFORM pg_notify('realtime_wakeup', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION realtime.capture_update_v3() RETURNS trigger
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
    IF TG_ARGV[3] <> '' THEN
        r := r - TG_ARGV[2]::text[];
        o := o - TG_ARGV[2]::text[];
        IF r - TG_ARGV[3]::text[] <> '{}' OR o - TG_ARGV[3]::text[] <> '{}' THEN
            r := realtime.allowed_v5(r, TG_ARGV[3]::text[]);
            o := realtime.allowed_v5(o, TG_ARGV[3]::text[]);
        END IF;
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

-- The name realtime.watches and the feed know a table by: schema.table, unquoted.
CREATE FUNCTION realtime.table_name_v5(rel regclass) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT n.nspname || '.' || c.relname FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel
$$;

-- The marker an unwatch leaves in the feed (see the header): never delivered to a stream.
CREATE FUNCTION realtime.mark_unwatched_v5(name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO realtime.changes (tbl, type, op, topic) VALUES (name, 'pgsse.unwatched', 'unwatch', '');
    IF pg_sequence_last_value('realtime.wakeup') = 1 THEN
        PERFORM pg_notify('realtime_wakeup', '');
    END IF;
END
$$;

-- (Re)installs the four capture triggers of `rel` with these names; returns the columns the
-- triggers remove (the table's other columns now), which realtime.watches keeps.
CREATE FUNCTION realtime.install_capture_v5(rel regclass, base_topic text, key_name text,
                                            column_names text[]) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    op text;
    args text;
    hidden text[] := '{}';
BEGIN
    IF column_names IS NOT NULL THEN
        SELECT COALESCE(array_agg(a.attname::text ORDER BY a.attnum), '{}') INTO hidden
        FROM pg_attribute a
        WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
          AND NOT a.attname::text = ANY (column_names);
    END IF;
    FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'pgsse_capture_' || op, rel);
    END LOOP;
    args := format('%L, %L, %L, %L', base_topic, COALESCE(key_name, ''), hidden::text,
                   COALESCE(column_names::text, ''));
    EXECUTE format('CREATE TRIGGER pgsse_capture_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS pgsse_new FOR EACH STATEMENT EXECUTE FUNCTION realtime.capture_insert_v3(%s)', rel, args);
    EXECUTE format('CREATE TRIGGER pgsse_capture_update AFTER UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION realtime.capture_update_v3(%s)', rel, args);
    EXECUTE format('CREATE TRIGGER pgsse_capture_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS pgsse_old FOR EACH STATEMENT EXECUTE FUNCTION realtime.capture_delete_v3(%s)', rel, args);
    EXECUTE format('CREATE TRIGGER pgsse_capture_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION realtime.capture_truncate_v2(%s)', rel, args);
    RETURN hidden;
END
$$;

-- The primary key's column names, in key order.
CREATE FUNCTION realtime.primary_key_v5(rel regclass) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum)), '{}')
    FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
    WHERE i.indrelid = rel AND i.indisprimary
$$;

CREATE OR REPLACE FUNCTION realtime.unwatch(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    op text;
    name text;
BEGIN
    FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'pgsse_capture_' || op, tbl);
    END LOOP;
    DELETE FROM realtime.watches w WHERE w.tbl = unwatch.tbl RETURNING w.tbl_name INTO name;
    IF FOUND THEN
        PERFORM realtime.mark_unwatched_v5(COALESCE(name, realtime.table_name_v5(tbl)));
    END IF;
END
$$;

-- watch(), as in 003, with the version-3 capture and the columns remembered by identity.
-- Replacing a watch does not unwatch the table in between (no marker).
CREATE OR REPLACE FUNCTION realtime.watch(
    tbl regclass, topic text DEFAULT NULL, key_column text DEFAULT NULL,
    columns text[] DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    base_topic text;
    rel_name text;
    all_columns text[];
    key_number smallint;
    numbers smallint[];
    hidden text[];
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
    IF columns IS NOT NULL AND NOT columns <@ all_columns THEN
        RAISE EXCEPTION 'columns % are not all columns of %', columns, tbl USING ERRCODE = '42703';
    END IF;
    SELECT a.attnum INTO key_number FROM pg_attribute a
    WHERE a.attrelid = tbl AND a.attname = key_column AND NOT a.attisdropped;
    IF columns IS NOT NULL THEN
        SELECT COALESCE(array_agg(a.attnum ORDER BY array_position(columns, a.attname::text)), '{}')
        INTO numbers FROM pg_attribute a
        WHERE a.attrelid = tbl AND a.attname = ANY (columns) AND NOT a.attisdropped;
    END IF;

    hidden := realtime.install_capture_v5(tbl, base_topic, key_column, columns);
    INSERT INTO realtime.watches AS w (tbl, topic, key_column, columns, key_columns, tbl_name,
                                       key_attnum, column_attnums, hidden)
    VALUES (tbl, base_topic, key_column, columns,
            CASE WHEN key_column IS NOT NULL THEN ARRAY[key_column] ELSE realtime.primary_key_v5(tbl) END,
            realtime.table_name_v5(tbl), key_number, numbers, hidden)
    ON CONFLICT ON CONSTRAINT watches_pkey DO UPDATE SET
        topic = EXCLUDED.topic, key_column = EXCLUDED.key_column, columns = EXCLUDED.columns,
        key_columns = EXCLUDED.key_columns, tbl_name = EXCLUDED.tbl_name,
        key_attnum = EXCLUDED.key_attnum, column_attnums = EXCLUDED.column_attnums,
        hidden = EXCLUDED.hidden;
END
$$;

-- After an ALTER TABLE: each watch's names re-derived from its attribute numbers. A table
-- renamed or moved to another schema stays watched (its events carry the new name; the old
-- name is marked unwatched for aggregates that knew the table by it).
CREATE FUNCTION realtime.refresh_watch_v5(rel regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    w realtime.watches%ROWTYPE;
    current_name text := realtime.table_name_v5(rel);
    key_name text;
    column_names text[];
    numbers smallint[];
    hidden_now text[] := '{}';
    pk text[] := realtime.primary_key_v5(rel);
BEGIN
    SELECT * INTO w FROM realtime.watches x WHERE x.tbl = rel;
    IF NOT FOUND OR current_name IS NULL THEN
        RETURN;
    END IF;
    IF w.key_attnum IS NOT NULL THEN
        SELECT a.attname INTO key_name FROM pg_attribute a
        WHERE a.attrelid = rel AND a.attnum = w.key_attnum AND NOT a.attisdropped;
        IF key_name IS NULL THEN  -- only when the drop trigger was not there to refuse it
            RAISE WARNING 'the key column of the watch on % is gone: its events go to the bare topic %',
                current_name, w.topic;
        END IF;
    END IF;
    IF w.column_attnums IS NOT NULL THEN
        SELECT COALESCE(array_agg(a.attname::text ORDER BY array_position(w.column_attnums, a.attnum)), '{}'),
               COALESCE(array_agg(a.attnum ORDER BY array_position(w.column_attnums, a.attnum)), '{}')
        INTO column_names, numbers
        FROM pg_attribute a
        WHERE a.attrelid = rel AND a.attnum = ANY (w.column_attnums) AND NOT a.attisdropped;
    END IF;
    IF column_names IS NOT NULL THEN  -- a column added since: removed cheaply (see capture)
        SELECT COALESCE(array_agg(a.attname::text ORDER BY a.attnum), '{}') INTO hidden_now
        FROM pg_attribute a
        WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
          AND NOT a.attname::text = ANY (column_names);
    END IF;
    IF key_name IS DISTINCT FROM w.key_column OR column_names IS DISTINCT FROM w.columns
       OR hidden_now IS DISTINCT FROM w.hidden THEN
        hidden_now := realtime.install_capture_v5(rel, w.topic, key_name, column_names);
    END IF;
    IF key_name IS DISTINCT FROM w.key_column OR column_names IS DISTINCT FROM w.columns
       OR hidden_now IS DISTINCT FROM w.hidden OR current_name IS DISTINCT FROM w.tbl_name
       OR w.key_columns IS DISTINCT FROM (CASE WHEN key_name IS NOT NULL THEN ARRAY[key_name] ELSE pk END) THEN
        UPDATE realtime.watches x SET
            key_column = key_name, columns = column_names, column_attnums = numbers,
            key_attnum = CASE WHEN key_name IS NULL THEN NULL ELSE w.key_attnum END,
            key_columns = CASE WHEN key_name IS NOT NULL THEN ARRAY[key_name] ELSE pk END,
            tbl_name = current_name, hidden = hidden_now
        WHERE x.tbl = rel;
    END IF;
    IF w.tbl_name IS NOT NULL AND current_name IS DISTINCT FROM w.tbl_name THEN
        PERFORM realtime.mark_unwatched_v5(w.tbl_name);
    END IF;
END
$$;

-- Event trigger functions: SECURITY DEFINER (the migrating superuser), so a table owner's
-- ALTER TABLE keeps realtime.watches right without privileges on the realtime schema.
CREATE FUNCTION realtime.on_alter_table_v5() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass;
BEGIN
    -- Every watch, not only the tables named: an ALTER of a partitioned table renames the
    -- columns of its partitions too. Watches are few; an unchanged one costs a few lookups.
    FOR rel IN SELECT w.tbl FROM realtime.watches w LOOP
        PERFORM realtime.refresh_watch_v5(rel);
    END LOOP;
END
$$;

CREATE FUNCTION realtime.on_sql_drop_v5() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d record;
    w realtime.watches%ROWTYPE;
BEGIN
    IF to_regclass('realtime.watches') IS NULL THEN
        RETURN;  -- the realtime schema itself is being dropped
    END IF;
    FOR d IN SELECT * FROM pg_event_trigger_dropped_objects() x
             WHERE x.classid = 'pg_class'::regclass LOOP
        IF d.objsubid > 0 THEN
            SELECT * INTO w FROM realtime.watches x
            WHERE x.tbl::oid = d.objid AND x.key_attnum = d.objsubid;
            IF FOUND AND NOT EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() t
                                     WHERE t.classid = d.classid AND t.objid = d.objid
                                       AND t.objsubid = 0) THEN
                RAISE EXCEPTION 'cannot drop column % of %: realtime.watch routes its events by it (key_column)',
                    quote_ident(w.key_column), w.tbl_name
                    USING ERRCODE = '2BP01',
                          HINT = format('call realtime.watch(%L, %L) without key_column (or with another one), or realtime.unwatch(%L), first',
                                        w.tbl_name, w.topic, w.tbl_name);
            END IF;
        ELSE
            DELETE FROM realtime.watches x WHERE x.tbl::oid = d.objid RETURNING x.* INTO w;
            IF FOUND THEN
                PERFORM realtime.mark_unwatched_v5(COALESCE(w.tbl_name, d.schema_name || '.' || d.object_name));
            END IF;
        END IF;
    END LOOP;
END
$$;

-- Installs the two event triggers (a superuser only; the migration calls it when it runs as
-- one). A deployment migrated by a non-superuser has a superuser run it once, later:
--     SELECT realtime.track_schema_changes();
-- The trigger functions then belong to that superuser (they are SECURITY DEFINER).
CREATE FUNCTION realtime.track_schema_changes() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'realtime.track_schema_changes() needs a superuser: PostgreSQL lets only superusers create event triggers'
            USING ERRCODE = '42501';
    END IF;
    EXECUTE format('ALTER FUNCTION realtime.on_alter_table_v5() OWNER TO %I', current_user);
    EXECUTE format('ALTER FUNCTION realtime.on_sql_drop_v5() OWNER TO %I', current_user);
    DROP EVENT TRIGGER IF EXISTS pgsse_watch_alter;
    DROP EVENT TRIGGER IF EXISTS pgsse_watch_drop;
    CREATE EVENT TRIGGER pgsse_watch_alter ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
        EXECUTE FUNCTION realtime.on_alter_table_v5();
    CREATE EVENT TRIGGER pgsse_watch_drop ON sql_drop
        EXECUTE FUNCTION realtime.on_sql_drop_v5();
END
$$;

DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        PERFORM realtime.track_schema_changes();
    ELSE
        RAISE WARNING 'pgsse: % is not a superuser, so no event triggers were created: renamed key columns and dropped tables are not followed until a superuser runs SELECT realtime.track_schema_changes() (the columns allow-list holds regardless)', current_user;
    END IF;
END
$$;

-- Every existing watch gets the version-3 triggers and its columns by identity. A listed
-- column or key renamed or dropped since it was watched (the old capture did not follow it)
-- is left out: nothing unlisted is ever shipped.
DO $$
DECLARE
    w record;
    kept text[];
    key_name text;
BEGIN
    FOR w IN SELECT * FROM realtime.watches LOOP
        key_name := w.key_column;
        IF key_name IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM pg_attribute a WHERE a.attrelid = w.tbl AND a.attname = key_name
                AND NOT a.attisdropped) THEN
            RAISE WARNING 'pgsse: the key column % of the watch on % no longer exists: the watch is unkeyed', key_name, w.tbl;
            key_name := NULL;
        END IF;
        kept := w.columns;
        IF kept IS NOT NULL THEN
            SELECT COALESCE(array_agg(c ORDER BY o), '{}') INTO kept
            FROM unnest(w.columns) WITH ORDINALITY u(c, o)
            WHERE EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = w.tbl AND a.attname = c
                          AND NOT a.attisdropped);
        END IF;
        PERFORM realtime.watch(w.tbl, w.topic, key_name, kept);
    END LOOP;
END
$$;
