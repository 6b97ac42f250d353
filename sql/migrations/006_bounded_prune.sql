-- pgsse migration 006: pruning in bounded steps, and a question the sequencer asks first.
--
-- * realtime.prune_retained() deleted everything past retention in one statement. With a role
--   statement_timeout shorter than that statement (100 ms and 300,000 retained events; 30 s
--   and tens of millions after an outage) history was never pruned. The service now asks for
--   the cut-off (realtime.prune_target_v6) and removes it in position ranges
--   (realtime.prune_step_v6), one statement and one transaction per range: each range's rows
--   go and pruned_through rises in the same transaction, so a reader still either has the
--   rows or knows they are gone. realtime.prune() and realtime.prune_retained() keep their
--   meaning (one transaction), each range now bounded below by pruned_through.
-- * realtime.sequencing_blocked(): why this session could not number changes (a read-only
--   node or session, a missing privilege), or NULL. Asked before the sequencer takes the
--   lead, so a read-only database fails readiness instead of looking caught up.

-- The cut-off of the service's pruning: the last checkpoint older than `older_than`, never
-- past what a live reader has read; NULL when nothing is due.
CREATE OR REPLACE FUNCTION realtime.prune_target_v6(older_than interval) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    highest bigint;
    slowest bigint;
BEGIN
    SELECT c.position INTO highest FROM realtime.checkpoints c
    WHERE c.at < clock_timestamp() - older_than ORDER BY c.position DESC LIMIT 1;
    IF highest IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT min(r.position) INTO slowest FROM realtime.readers r
    WHERE r.seen_at > clock_timestamp() - realtime.reader_horizon();
    IF slowest IS NOT NULL AND slowest < highest THEN
        highest := slowest;
    END IF;
    IF highest <= (SELECT pruned_through FROM realtime.sequencer WHERE id = 1) THEN
        RETURN NULL;
    END IF;
    RETURN highest;
END
$$;

-- Removes the positions in (pruned_through, upto], with the changes they numbered, and
-- raises pruned_through to upto, in the caller's transaction. The lower bound keeps the
-- index scan off the dead entries earlier steps left behind.
CREATE OR REPLACE FUNCTION realtime.prune_range_v6(upto bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    removed bigint;
    done bigint;
BEGIN
    SELECT pruned_through INTO done FROM realtime.sequencer WHERE id = 1 FOR UPDATE;
    IF upto <= done THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM realtime.events WHERE position > done AND position <= upto RETURNING xid, id
    ), dropped AS (
        DELETE FROM realtime.changes c USING gone g WHERE c.xid = g.xid AND c.id = g.id
    )
    SELECT count(*) INTO removed FROM gone;
    DELETE FROM realtime.checkpoints WHERE position < upto;
    UPDATE realtime.sequencer SET pruned_through = upto WHERE id = 1;
    RETURN removed;
END
$$;

-- One bounded step of the service's pruning: at most `batch` positions, never past `target`.
-- Returns what it removed and where pruned_through now stands.
CREATE OR REPLACE FUNCTION realtime.prune_step_v6(target bigint, batch bigint,
                                                  OUT removed bigint, OUT pruned_through bigint)
LANGUAGE plpgsql AS $$
DECLARE
    upto bigint;
BEGIN
    SELECT least(target, s.pruned_through + greatest(batch, 1)) INTO upto
    FROM realtime.sequencer s WHERE s.id = 1;
    removed := realtime.prune_range_v6(upto);
    IF upto >= target THEN
        DELETE FROM realtime.readers WHERE seen_at < clock_timestamp() - interval '1 day';
    END IF;
    SELECT s.pruned_through INTO pruned_through FROM realtime.sequencer s WHERE s.id = 1;
END
$$;

-- The one-transaction forms keep their meaning, on the bounded range.
CREATE OR REPLACE FUNCTION realtime.prune_through_v3(highest bigint) RETURNS bigint
LANGUAGE sql AS $$ SELECT realtime.prune_range_v6(highest) $$;

-- Why this session could not number changes, or NULL. Read-only itself: it runs anywhere.
CREATE OR REPLACE FUNCTION realtime.sequencing_blocked() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN pg_is_in_recovery() THEN
            'the database is a read-only standby (DATABASE_URL must point at the primary)'
        WHEN current_setting('transaction_read_only') = 'on' THEN
            'the session is read-only (default_transaction_read_only is on for this role or database)'
        WHEN NOT (has_table_privilege('realtime.sequencer', 'UPDATE')
                  AND has_table_privilege('realtime.events', 'INSERT, DELETE')
                  AND has_table_privilege('realtime.changes', 'SELECT, DELETE')
                  AND has_table_privilege('realtime.table_versions', 'INSERT, UPDATE')
                  AND has_table_privilege('realtime.checkpoints', 'INSERT, DELETE')
                  AND has_function_privilege('realtime.sequence_v3(integer)', 'EXECUTE')) THEN
            'the role ' || current_user || ' lacks privileges on the realtime tables'
    END
$$;
