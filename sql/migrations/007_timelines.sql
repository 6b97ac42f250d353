-- pgsse migration 007: failover without phantoms (issue 22).
--
-- With asynchronous streaming replication a promoted standby may lack the last events the
-- old primary numbered, and clients may already hold them. The new primary must never hand
-- those positions to different events. So the sequencer records the timeline it numbers
-- under; on a new timeline (a promoted standby) it first jumps last_position well past
-- anything the old primary could have assigned and records the skipped range. A resume
-- from inside a skipped range gets `reset` (unknown_position); a reader whose cursor is
-- inside one resets its live clients.

CREATE TABLE realtime.timelines (
    timeline        int         PRIMARY KEY,
    -- Positions in (skipped_from, skipped_through] were never numbered on this history
    -- (empty when equal: the first timeline pgsse saw).
    skipped_from    bigint      NOT NULL,
    skipped_through bigint      NOT NULL,
    at              timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (skipped_through >= skipped_from)
);

-- The timeline this server writes WAL on. pg_control_checkpoint() lags a promotion until the
-- end-of-recovery checkpoint completes; the WAL file name of the insert position does not.
CREATE FUNCTION realtime.current_timeline_v1() RETURNS int
LANGUAGE sql VOLATILE AS $$
    SELECT greatest((SELECT timeline_id FROM pg_control_checkpoint()),
                    ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int)
$$;

-- Called by the sequencer each time it takes the lead, before numbering. Returns how many
-- positions it skipped (0: same timeline as recorded). `skip` must exceed the events the old
-- primary can have numbered that never reached the standby (10^9: hours at any rate this
-- sequencer reaches; bigint leaves room for billions of failovers).
CREATE FUNCTION realtime.observe_timeline_v1(skip bigint DEFAULT 1000000000) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    tl   int := realtime.current_timeline_v1();
    seen int;
    last bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7013170583926);  -- no numbering batch meanwhile
    SELECT max(timeline) INTO seen FROM realtime.timelines;
    IF seen IS NOT NULL AND tl <= seen THEN
        RETURN 0;
    END IF;
    SELECT last_position INTO last FROM realtime.sequencer WHERE id = 1 FOR UPDATE;
    IF seen IS NULL THEN
        INSERT INTO realtime.timelines (timeline, skipped_from, skipped_through)
        VALUES (tl, last, last);
        RETURN 0;
    END IF;
    UPDATE realtime.sequencer SET last_position = last + skip WHERE id = 1;
    INSERT INTO realtime.timelines (timeline, skipped_from, skipped_through)
    VALUES (tl, last, last + skip);
    PERFORM pg_notify('realtime_events', (last + skip)::text);
    RETURN skip;
END
$$;

SELECT realtime.observe_timeline_v1();
